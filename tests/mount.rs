//! `loopfuse mount` and `umount`: filesystems populated and read back through userspace
//! drivers, checked afterwards with stock tools straight from the image, and failures that
//! leave nothing mounted or registered.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{Sandbox, find_tool, pattern, run, run_ok, sfdisk, wait_until};

const MIB: u64 = 1 << 20;

/// Byte offsets of the partitions of `image`, as util-linux reads them.
fn partition_starts(image: &Path) -> Vec<u64> {
    let text = run_ok(
        "partx",
        [
            "--show".as_ref(),
            "--bytes".as_ref(),
            "--noheadings".as_ref(),
            "-o".as_ref(),
            "START".as_ref(),
            image.as_os_str(),
        ],
    );
    text.lines()
        .map(|line| line.trim().parse::<u64>().unwrap() * 512)
        .collect()
}

/// Creates a small tree of files with varied sizes (empty, odd, several pages) and nested
/// directories, including an empty one.
fn make_tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let files = [
        ("hello.txt", b"hello, loopfuse\n".to_vec()),
        ("empty", Vec::new()),
        ("sub/data.bin", pattern(300_000, 1)),
        ("sub/deeper/odd.bin", pattern(4097, 2)),
    ];
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::create_dir_all(root.join("void")).unwrap();
    for (name, bytes) in &files {
        fs::write(root.join(name), bytes).unwrap();
    }
    files
        .into_iter()
        .map(|(name, bytes)| (PathBuf::from(name), bytes))
        .collect()
}

/// Relative paths and contents (`None` for directories) of everything under `root`.
fn read_tree(root: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut entries = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(root).unwrap().to_path_buf();
            if path.is_dir() {
                entries.push((relative, None));
                pending.push(path);
            } else {
                entries.push((relative, Some(fs::read(&path).unwrap())));
            }
        }
    }
    entries.sort();
    entries
}

fn loopfuse_ok(sandbox: &Sandbox, args: &[&std::ffi::OsStr]) {
    let output = sandbox.run(args);
    assert!(
        output.status.success(),
        "loopfuse {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn mount(sandbox: &Sandbox, source: &str, directory: &Path) {
    loopfuse_ok(
        sandbox,
        &["mount".as_ref(), source.as_ref(), directory.as_os_str()],
    );
}

fn umount(sandbox: &Sandbox, directory: &Path) {
    loopfuse_ok(sandbox, &["umount".as_ref(), directory.as_os_str()]);
}

/// Copies the contents of `from` into `to` with `cp -r`, as a user would.
fn copy_tree(from: &Path, to: &Path) {
    let mut source = from.as_os_str().to_owned();
    source.push("/.");
    run_ok("cp", ["-r".as_ref(), source.as_os_str(), to.as_os_str()]);
}

#[test]
fn ext4_and_fat_partitions_filled_through_mount() {
    let test = "ext4_and_fat_partitions_filled_through_mount";
    let tools = [
        "sfdisk",
        "partx",
        "mkfs.ext4",
        "e2fsck",
        "debugfs",
        "fuse2fs",
        "mkfs.vfat",
        "fsck.vfat",
        "fusefat",
        "mcopy",
    ];
    let Some(sandbox) = Sandbox::new(test, &tools) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 96 * MIB);
    sfdisk(&image, "label: gpt\n,40M,L\n,,L\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let p1 = device.with_file_name("p1");
    let p2 = device.with_file_name("p2");
    // mke2fs makes the root directory belong to root by default, and this user writes into it.
    let owner = format!(
        "root_owner={}:{}",
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    run_ok(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-E".as_ref(),
            owner.as_ref(),
            p1.as_os_str(),
        ],
    );
    run_ok("mkfs.vfat", [p2.as_os_str()]);
    sandbox.detach(&device);

    let tree = sandbox.path("tree");
    let files = make_tree(&tree);
    let ext4_directory = sandbox.path("ext4");
    let fat_directory = sandbox.path("fat");
    fs::create_dir(&ext4_directory).unwrap();
    fs::create_dir(&fat_directory).unwrap();
    let image_name = image.to_str().unwrap();

    mount(&sandbox, &format!("{image_name}:1"), &ext4_directory);
    let listed = sandbox.list();
    assert_eq!(listed[0]["mounts"][0]["fstype"], "ext4", "{listed:?}");
    assert_eq!(
        listed[0]["mounts"][0]["directory"],
        ext4_directory.to_str().unwrap()
    );
    copy_tree(&tree, &ext4_directory);
    umount(&sandbox, &ext4_directory);
    sandbox.assert_clean();

    mount(&sandbox, &format!("{image_name}:2"), &fat_directory);
    copy_tree(&tree, &fat_directory);
    assert_eq!(read_tree(&fat_directory), read_tree(&tree));
    umount(&sandbox, &fat_directory);
    sandbox.assert_clean();

    let starts = partition_starts(&image);
    let ext4_source = format!("{image_name}?offset={}", starts[0]);
    run_ok("e2fsck", ["-fn", ext4_source.as_str()]);
    let fat_copy = extract(&sandbox, &image, starts[1], 56 * MIB, "p2.img");
    run_ok("fsck.vfat", ["-n".as_ref(), fat_copy.as_os_str()]);

    for (name, bytes) in &files {
        let request = format!("cat /{}", name.display());
        let output = run("debugfs", ["-R", request.as_str(), ext4_source.as_str()]);
        assert!(output.status.success(), "debugfs {request}: {output:?}");
        assert_eq!(&output.stdout, bytes, "ext4 {}", name.display());

        let fat_source = format!("{image_name}@@{}", starts[1]);
        let member = format!("::{}", name.display());
        let output = mcopy(&fat_source, &member);
        assert!(output.status.success(), "mcopy {member}: {output:?}");
        assert_eq!(&output.stdout, bytes, "fat {}", name.display());
    }
}

#[test]
fn exfat_partition_filled_through_mount() {
    let test = "exfat_partition_filled_through_mount";
    let tools = [
        "sfdisk",
        "partx",
        "mkfs.exfat",
        "fsck.exfat",
        "mount.exfat-fuse",
        "fusermount3",
    ];
    let Some(sandbox) = Sandbox::new(test, &tools) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    sfdisk(&image, "label: gpt\n,40M,L\n,,L\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    run_ok("mkfs.exfat", [device.with_file_name("p1").as_os_str()]);
    // Partition 2 claims to be exFAT but contains no valid boot sector.
    let mut bogus = vec![0u8; 512];
    bogus[3..11].copy_from_slice(b"EXFAT   ");
    fs::write(device.with_file_name("p2"), &bogus).unwrap();
    sandbox.detach(&device);

    let tree = sandbox.path("tree");
    make_tree(&tree);
    let directory = sandbox.path("exfat");
    fs::create_dir(&directory).unwrap();
    let image_name = image.to_str().unwrap();

    // exfat-fuse mounts only block devices; loopfuse mounts for it and hands it the connection.
    mount(&sandbox, &format!("{image_name}:1"), &directory);
    let listed = sandbox.list();
    assert_eq!(listed[0]["mounts"][0]["fstype"], "exfat", "{listed:?}");
    assert_eq!(listed[0]["mounts"][0]["driver_exited"], false, "{listed:?}");
    let mounts = sandbox.mounts();
    assert!(
        mounts.iter().any(|mounted| Path::new(mounted) == directory),
        "{mounts:?}"
    );
    copy_tree(&tree, &directory);
    assert_eq!(read_tree(&directory), read_tree(&tree));
    // The driver keeps the device open in its own namespace, where the kernel does not see it
    // as busy, so detach must refuse and leave the mount working.
    let output = sandbox.run(["detach", "--all"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("run 'loopfuse umount"), "{stderr}");
    assert_eq!(read_tree(&directory), read_tree(&tree));

    // exfat-fuse traces every request; its log keeps the start and then only errors.
    fs::create_dir(directory.join("many")).unwrap();
    for number in 0..400 {
        fs::write(directory.join(format!("many/{number}")), number.to_string()).unwrap();
    }
    let log = fs::read(sandbox.registry().join("loop0.p1.driver.log")).unwrap();
    assert!(log.len() < 80 * 1024, "driver log of {} bytes", log.len());
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("request traces are left out"), "{log}");
    fs::remove_dir_all(directory.join("many")).unwrap();
    umount(&sandbox, &directory);
    sandbox.assert_clean();

    let starts = partition_starts(&image);
    let copy = extract(&sandbox, &image, starts[0], 40 * MIB, "p1.img");
    let verdict = run("fsck.exfat", ["-n".as_ref(), copy.as_os_str()]);
    assert!(verdict.status.success(), "fsck.exfat: {verdict:?}");
    let written = fs::read(&copy).unwrap();
    let data = pattern(300_000, 1);
    assert!(
        written.windows(4096).any(|window| window == &data[..4096]),
        "the image does not hold sub/data.bin"
    );

    // Mounted again read-only, the tree reads back and writes are refused.
    loopfuse_ok(
        &sandbox,
        &[
            "mount".as_ref(),
            "-o".as_ref(),
            "ro".as_ref(),
            format!("{image_name}:1").as_ref(),
            directory.as_os_str(),
        ],
    );
    assert_eq!(read_tree(&directory), read_tree(&tree));
    assert!(File::create(directory.join("new")).is_err());
    umount(&sandbox, &directory);
    sandbox.assert_clean();

    // A driver that rejects its filesystem leaves nothing mounted.
    let stderr = mount_fails(
        &sandbox,
        &[format!("{image_name}:2").as_ref(), directory.as_os_str()],
    );
    assert!(stderr.contains("mount.exfat-fuse exited"), "{stderr}");

    // A mount point with files in it is refused, as libfuse would.
    let occupied = sandbox.path("occupied");
    fs::create_dir(&occupied).unwrap();
    fs::write(occupied.join("keep"), b"keep").unwrap();
    let stderr = mount_fails(
        &sandbox,
        &[format!("{image_name}:1").as_ref(), occupied.as_os_str()],
    );
    assert!(stderr.contains("mount point is not empty"), "{stderr}");

    // Root mounts below a directory that only another user may enter.
    if common::is_root() {
        let private = sandbox.path("private");
        fs::create_dir_all(private.join("mnt")).unwrap();
        std::os::unix::fs::chown(&private, Some(65534), Some(65534)).unwrap();
        fs::set_permissions(
            &private,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        mount(&sandbox, &format!("{image_name}:1"), &private.join("mnt"));
        assert_eq!(read_tree(&private.join("mnt")), read_tree(&tree));
        umount(&sandbox, &private.join("mnt"));
        sandbox.assert_clean();
    }

    // A second exFAT mount, started while the first is up, keeps no copy of it: the first
    // unmounts and its driver exits at once.
    let other = sandbox.sparse_image("other.img", 16 * MIB);
    run_ok("mkfs.exfat", [other.as_os_str()]);
    let other_directory = sandbox.path("other");
    fs::create_dir(&other_directory).unwrap();
    let other_name = other.to_str().unwrap();
    let stderr = mount_fails(
        &sandbox,
        &[
            format!("{other_name}:1").as_ref(),
            other_directory.as_os_str(),
        ],
    );
    assert!(
        stderr.contains("the whole image is one exfat filesystem"),
        "{stderr}"
    );
    mount(&sandbox, &format!("{image_name}:1"), &directory);
    loopfuse_ok(
        &sandbox,
        &[
            "mount".as_ref(),
            "-o".as_ref(),
            "noexec".as_ref(),
            other.as_os_str(),
            other_directory.as_os_str(),
        ],
    );
    umount(&sandbox, &directory);
    let options = mount_options(&other_directory);
    assert!(options.split(',').any(|flag| flag == "noexec"), "{options}");
    umount(&sandbox, &other_directory);
    sandbox.assert_clean();

    // A driver that dies leaves its mount marked in the listing, and either umount or
    // detach cleans up: the driver cannot unmount from its own namespace.
    for cleanup in ["umount", "detach"] {
        mount(&sandbox, other_name, &other_directory);
        let listed = sandbox.list();
        let driver = listed[0]["mounts"][0]["driver_pid"]["pid"]
            .as_i64()
            .unwrap() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(driver),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // A zombie counts as exited, because its parent `loopfuse mount` is gone and the
        // process that inherited it may reap it late.
        let exited = wait_until(std::time::Duration::from_secs(10), || {
            fs::read_to_string(format!("/proc/{driver}/stat")).map_or(true, |stat| {
                stat.rsplit(") ")
                    .next()
                    .is_some_and(|rest| rest.starts_with('Z'))
            })
        });
        assert!(exited, "the driver {driver} did not exit");
        let table = sandbox.run(["list"]);
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(table.contains("other[driver-exited]"), "{table}");
        assert_eq!(sandbox.list()[0]["mounts"][0]["driver_exited"], true);
        match cleanup {
            "umount" => umount(&sandbox, &other_directory),
            _ => loopfuse_ok(&sandbox, &["detach".as_ref(), "--all".as_ref()]),
        }
        sandbox.assert_clean();
    }
}

/// Returns the options of the mount on `directory`, from `/proc/self/mountinfo`.
fn mount_options(directory: &Path) -> String {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|line| line.split(' ').nth(4) == directory.to_str())
        .unwrap_or_else(|| panic!("{} is not mounted", directory.display()));
    line.split(' ').nth(5).unwrap().to_string()
}

/// Copies `member` of the FAT filesystem at `source` (`IMAGE@@OFFSET`) to standard output.
fn mcopy(source: &str, member: &str) -> Output {
    Command::new(find_tool("mcopy").unwrap())
        .args(["-n", "-i", source, member, "-"])
        // fusefat 0.1a leaves 0x8000 in FAT entry 1 (its "hard error" bit cleared); fsck.vfat
        // accepts that, but mtools rejects the whole FAT unless MTOOLS_SKIP_CHECK is set.
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Copies `size` bytes at `start` of `image` into a new file of the sandbox.
fn extract(sandbox: &Sandbox, image: &Path, start: u64, size: u64, name: &str) -> PathBuf {
    let mut bytes = vec![0u8; size as usize];
    let read = File::open(image)
        .unwrap()
        .read_at(&mut bytes, start)
        .unwrap();
    bytes.truncate(read);
    sandbox.image_with(name, &bytes)
}

/// Mounts a read-only image made by `make_image` from a tree and checks that the tree reads
/// back exactly and that writes are refused.
fn read_only_image_reads_back(test: &str, tools: &[&str], make_image: fn(&Path, &Path)) {
    let Some(sandbox) = Sandbox::new(test, tools) else {
        return;
    };
    let tree = sandbox.path("tree");
    make_tree(&tree);
    let image = sandbox.path("tree.img");
    make_image(&tree, &image);
    let directory = sandbox.path("mnt");
    fs::create_dir(&directory).unwrap();

    mount(&sandbox, image.to_str().unwrap(), &directory);
    let listed = sandbox.list();
    assert_eq!(listed[0]["read_only"], true, "{listed:?}");
    assert_eq!(read_tree(&directory), read_tree(&tree));
    assert!(File::create(directory.join("new")).is_err());
    let mut text = String::new();
    File::open(directory.join("hello.txt"))
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "hello, loopfuse\n");
    umount(&sandbox, &directory);

    sandbox.assert_clean();
}

fn make_squashfs(tree: &Path, image: &Path) {
    run_ok(
        "mksquashfs",
        [
            tree.as_os_str(),
            image.as_os_str(),
            "-quiet".as_ref(),
            "-noappend".as_ref(),
        ],
    );
}

#[test]
fn squashfs_mounts_read_only_with_same_tree() {
    read_only_image_reads_back(
        "squashfs_mounts_read_only_with_same_tree",
        &["mksquashfs", "squashfuse"],
        make_squashfs,
    );
}

#[test]
fn iso9660_mounts_read_only_with_same_tree() {
    read_only_image_reads_back(
        "iso9660_mounts_read_only_with_same_tree",
        &["xorriso", "fuseiso"],
        |tree, image| {
            // Rock Ridge (-R) keeps names as they are; plain ISO 9660 would upper-case them.
            run_ok(
                "xorriso",
                [
                    "-as".as_ref(),
                    "mkisofs".as_ref(),
                    "-quiet".as_ref(),
                    "-R".as_ref(),
                    "-o".as_ref(),
                    image.as_os_str(),
                    tree.as_os_str(),
                ],
            );
        },
    );
}

/// Runs `loopfuse mount` expecting a failure; returns its standard error.
/// Asserts that `loopfuse ARGS DIRECTORY` fails with every fragment of `expected` in its
/// error and leaves `directory` unmounted.
fn mount_rejected(sandbox: &Sandbox, args: &[&str], directory: &Path, expected: &[&str]) {
    let output = sandbox.loopfuse(args).arg(directory).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
    for fragment in expected {
        assert!(stderr.contains(fragment), "{args:?}: {stderr}");
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(directory.to_str().unwrap()),
        "mounted twice"
    );
}

fn mount_fails(sandbox: &Sandbox, args: &[&std::ffi::OsStr]) -> String {
    let mut command = sandbox.loopfuse(["mount"]);
    command.args(args);
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    sandbox.assert_clean();
    stderr
}

#[test]
fn failed_mounts_leave_nothing_behind() {
    let test = "failed_mounts_leave_nothing_behind";
    let tools = ["sfdisk", "fdisk", "mkfs.vfat", "fuse2fs"];
    let Some(sandbox) = Sandbox::new(test, &tools) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    sfdisk(&image, "label: gpt\n,20M,L\n,,L\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    run_ok("mkfs.vfat", [device.with_file_name("p1").as_os_str()]);
    sandbox.detach(&device);
    let directory = sandbox.path("mnt");
    fs::create_dir(&directory).unwrap();
    let image_name = image.to_str().unwrap();

    let stderr = mount_fails(
        &sandbox,
        &[format!("{image_name}:3").as_ref(), directory.as_os_str()],
    );
    assert!(stderr.contains("no partition 3"), "{stderr}");
    assert!(stderr.contains("partitions 1, 2"), "{stderr}");

    let missing = sandbox.path("missing");
    let stderr = mount_fails(
        &sandbox,
        &[format!("{image_name}:1").as_ref(), missing.as_os_str()],
    );
    assert!(stderr.contains("mount point does not exist"), "{stderr}");

    // fuse2fs exits at once on a FAT filesystem, with its reason on standard error.
    let stderr = mount_fails(
        &sandbox,
        &[
            "-t".as_ref(),
            "ext4".as_ref(),
            format!("{image_name}:1").as_ref(),
            directory.as_os_str(),
        ],
    );
    assert!(stderr.contains("fuse2fs exited"), "{stderr}");
    assert!(stderr.contains("magic"), "{stderr}");

    let stderr = mount_fails(
        &sandbox,
        &[format!("{image_name}:2").as_ref(), directory.as_os_str()],
    );
    assert!(stderr.contains("first 64 KiB are zeros"), "{stderr}");

    let stderr = mount_fails(&sandbox, &[image.as_os_str(), directory.as_os_str()]);
    assert!(stderr.contains("GPT partition table"), "{stderr}");

    // A GPT made with 4096-byte sectors is ignored with 512-byte ones, and the error names
    // the size to give.
    let gpt4k = sandbox.sparse_image("gpt4k.img", 32 * MIB);
    let mut fdisk = std::process::Command::new("fdisk")
        .args(["-b", "4096"])
        .arg(&gpt4k)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    fdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"g\nn\n\n\n+8M\nw\n")
        .unwrap();
    assert!(fdisk.wait().unwrap().success(), "fdisk failed");
    let gpt4k_name = gpt4k.to_str().unwrap();
    let stderr = mount_fails(
        &sandbox,
        &[format!("{gpt4k_name}:1").as_ref(), directory.as_os_str()],
    );
    assert!(stderr.contains("partition table was ignored"), "{stderr}");
    assert!(stderr.contains("give '-b 4096'"), "{stderr}");
    // The whole disk is not scanned, but its error names the size too, and the partition.
    let stderr = mount_fails(&sandbox, &[gpt4k.as_os_str(), directory.as_os_str()]);
    assert!(stderr.contains("GPT partition table"), "{stderr}");
    assert!(stderr.contains("give '-b 4096'"), "{stderr}");
    assert!(stderr.contains(&format!("'{gpt4k_name}:1'")), "{stderr}");

    // An extended partition contains the logical ones, which the error names.
    let dos = sandbox.sparse_image("dos.img", 32 * MIB);
    sfdisk(&dos, "label: dos\n,4M,L\n,,E\n,4M,L\n,4M,L\n");
    let dos_name = dos.to_str().unwrap();
    let stderr = mount_fails(
        &sandbox,
        &[format!("{dos_name}:2").as_ref(), directory.as_os_str()],
    );
    assert!(stderr.contains("is an extended partition"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "logical partitions are 5, 6; mount one of those, as in '{dos_name}:5'"
        )),
        "{stderr}"
    );
}

#[test]
fn unmountable_types_are_explained() {
    let test = "unmountable_types_are_explained";
    let Some(sandbox) = Sandbox::new(test, &[]) else {
        return;
    };
    let directory = sandbox.path("mnt");
    fs::create_dir(&directory).unwrap();

    let mut xfs = vec![0u8; 4 * MIB as usize];
    xfs[..4].copy_from_slice(b"XFSB");
    let image = sandbox.image_with("xfs.img", &xfs);
    let stderr = mount_fails(&sandbox, &[image.as_os_str(), directory.as_os_str()]);
    assert!(stderr.contains("xfs has no userspace driver"), "{stderr}");

    let mut unknown = pattern(4 * MIB as usize, 3);
    unknown[..4].copy_from_slice(b"\x7fELF");
    let image = sandbox.image_with("unknown.img", &unknown);
    let stderr = mount_fails(&sandbox, &[image.as_os_str(), directory.as_os_str()]);
    assert!(
        stderr.contains("unknown filesystem (first bytes: 7f 45 4c 46"),
        "{stderr}"
    );
    assert!(stderr.contains("-t TYPE"), "{stderr}");
}

#[test]
fn missing_driver_names_its_package() {
    let test = "missing_driver_names_its_package";
    let Some(sandbox) = Sandbox::new(test, &["mksquashfs"]) else {
        return;
    };
    let tree = sandbox.path("tree");
    make_tree(&tree);
    let image = sandbox.path("tree.img");
    make_squashfs(&tree, &image);
    let directory = sandbox.path("mnt");
    fs::create_dir(&directory).unwrap();
    // A PATH holding only the FUSE helper hides squashfuse, which lives in /usr/bin.
    let bin = sandbox.path("bin");
    fs::create_dir(&bin).unwrap();
    if let Some(helper) = find_tool("fusermount3") {
        std::os::unix::fs::symlink(helper, bin.join("fusermount3")).unwrap();
    }

    let output = sandbox
        .loopfuse(["mount".as_ref(), image.as_os_str(), directory.as_os_str()])
        .env("PATH", &bin)
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("needs squashfuse, which is not installed"),
        "{stderr}"
    );
    assert!(stderr.contains("apt-get install squashfuse"), "{stderr}");
    sandbox.assert_clean();
}

#[test]
fn umount_of_foreign_directory_is_refused() {
    let test = "umount_of_foreign_directory_is_refused";
    let Some(sandbox) = Sandbox::new(test, &[]) else {
        return;
    };
    let directory = sandbox.path("mnt");
    fs::create_dir(&directory).unwrap();

    let output = sandbox.run(["umount".as_ref(), directory.as_os_str()]);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not mounted by loopfuse"), "{stderr}");
}

#[test]
fn ntfs_round_trip_or_clear_refusal() {
    let test = "ntfs_round_trip_or_clear_refusal";
    let Some(sandbox) = Sandbox::new(test, &["mkntfs", "ntfs-3g"]) else {
        return;
    };
    let image = sandbox.sparse_image("ntfs.img", 32 * MIB);
    run_ok(
        "mkntfs",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-Q".as_ref(),
            image.as_os_str(),
        ],
    );
    let tree = sandbox.path("tree");
    make_tree(&tree);
    let directory = sandbox.path("mnt");
    fs::create_dir(&directory).unwrap();
    let setuid_driver = fs::metadata(find_tool("ntfs-3g").unwrap()).is_ok_and(|metadata| {
        std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o4000 != 0
    });
    let allow_other = fs::read_to_string("/etc/fuse.conf")
        .is_ok_and(|text| text.lines().any(|line| line.trim() == "user_allow_other"));

    // Debian's ntfs-3g is setuid root, and root may not open another user's FUSE files
    // unless the mount allows other users, which needs user_allow_other.
    if !common::is_root() && setuid_driver && !allow_other {
        let stderr = mount_fails(&sandbox, &[image.as_os_str(), directory.as_os_str()]);
        assert!(stderr.contains("user_allow_other"), "{stderr}");
        return;
    }

    mount(&sandbox, image.to_str().unwrap(), &directory);
    copy_tree(&tree, &directory);
    umount(&sandbox, &directory);
    sandbox.assert_clean();

    loopfuse_ok(
        &sandbox,
        &[
            "mount".as_ref(),
            "-o".as_ref(),
            "ro".as_ref(),
            image.as_os_str(),
            directory.as_os_str(),
        ],
    );
    assert_eq!(read_tree(&directory), read_tree(&tree));
    umount(&sandbox, &directory);
    sandbox.assert_clean();
}

/// Two partitions of one image mounted at the same time share one attachment, which goes
/// away with the last of them.
/// A partition that the table gives another number while it is mounted still has its
/// filesystem mounted: a mount of it under the new number, or of the disk around it, would
/// start a second driver on it. The kernel refuses a partition overlapping one in use.
#[test]
fn renumbered_partition_is_not_mounted_twice() {
    let test = "renumbered_partition_is_not_mounted_twice";
    let tools = ["sfdisk", "mkfs.ext4", "fuse2fs"];
    let Some(sandbox) = Sandbox::new(test, &tools) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    sfdisk(&image, "label: gpt\n,24M,L\n,,L\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    run_ok(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            device.with_file_name("p1").as_os_str(),
        ],
    );
    sandbox.detach(&device);

    let first = sandbox.path("first");
    let second = sandbox.path("second");
    fs::create_dir(&first).unwrap();
    fs::create_dir(&second).unwrap();
    let image_name = image.to_str().unwrap();
    mount(&sandbox, &format!("{image_name}:1"), &first);
    let disk = sandbox.list()[0]["device"].as_str().unwrap().to_string();
    // Partition 2 now covers the bytes of the mounted partition 1 (sectors 2048-51199).
    sfdisk(
        Path::new(&disk),
        "label: gpt\n1: start=51200, size=20480\n2: start=2048, size=49152\n",
    );

    let first_name = first.to_str().unwrap();
    let renumbered = format!("{image_name}:2");
    for source in [renumbered.as_str(), image_name] {
        mount_rejected(
            &sandbox,
            &["mount", source],
            &second,
            &["shares bytes with the filesystem mounted on", first_name],
        );
    }
    let listing = sandbox.run(["list"]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    let row = listing
        .lines()
        .find(|line| line.starts_with("loop0p2 "))
        .unwrap();
    assert!(
        row.contains(first_name),
        "the mount shows next to p2: {listing}"
    );
    let listed = &sandbox.list()[0];
    assert_eq!(listed["partitions"][1]["number"], 2);
    assert_eq!(listed["partitions"][1]["mountpoint"], first_name);
    assert_eq!(
        listed["partitions"][0]["mountpoint"],
        serde_json::Value::Null
    );
    assert_eq!(listed["mountpoint"], serde_json::Value::Null);
    assert_eq!(
        listed["mounts"][0]["partition"], 1,
        "the partition it was mounted from"
    );
    assert_eq!(listed["mounts"][0]["old_table"], false);

    // With no partition left on its bytes, the mount is listed as one of the old table.
    sfdisk(Path::new(&disk), "label: gpt\n1: start=51200, size=20480\n");
    let listed = &sandbox.list()[0];
    assert_eq!(
        listed["partitions"][0]["mountpoint"],
        serde_json::Value::Null
    );
    assert_eq!(listed["mounts"][0]["old_table"], true);
    let listing = sandbox.run(["list"]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    let row = listing
        .lines()
        .find(|line| line.contains("(old table)"))
        .unwrap_or_else(|| panic!("no row of the old table: {listing}"));
    assert!(row.contains(first_name), "{listing}");

    umount(&sandbox, &first);
    sandbox.assert_clean();
}

#[test]
fn two_partitions_mount_at_once() {
    let test = "two_partitions_mount_at_once";
    let tools = ["sfdisk", "mkfs.ext4", "fuse2fs"];
    let Some(sandbox) = Sandbox::new(test, &tools) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    sfdisk(&image, "label: gpt\n,24M,L\n,,L\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let owner = format!(
        "root_owner={}:{}",
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    for partition in ["p1", "p2"] {
        let file = device.with_file_name(partition);
        run_ok(
            "mkfs.ext4",
            [
                "-q".as_ref(),
                "-F".as_ref(),
                "-E".as_ref(),
                owner.as_ref(),
                file.as_os_str(),
            ],
        );
    }
    sandbox.detach(&device);

    let first = sandbox.path("first");
    let second = sandbox.path("second");
    fs::create_dir(&first).unwrap();
    fs::create_dir(&second).unwrap();
    let image_name = image.to_str().unwrap();
    mount(&sandbox, &format!("{image_name}:1"), &first);
    mount(&sandbox, &format!("{image_name}:2"), &second);
    assert_eq!(sandbox.list().len(), 1, "both mounts share one attachment");
    fs::write(first.join("one.txt"), "one").unwrap();
    fs::write(second.join("two.txt"), "two").unwrap();

    // A second driver on a mounted filesystem would corrupt it, read-only or not.
    let third = sandbox.path("third");
    fs::create_dir(&third).unwrap();
    let source = format!("{image_name}:1");
    let first_name = first.to_str().unwrap();
    let second_name = second.to_str().unwrap();
    let read_write = vec!["mount", source.as_str()];
    let read_only = vec!["mount", "-o", "ro", source.as_str()];
    mount_rejected(
        &sandbox,
        &read_write,
        &third,
        &["already mounted on", first_name],
    );
    mount_rejected(
        &sandbox,
        &read_only,
        &third,
        &["already mounted on", first_name],
    );

    umount(&sandbox, &first);
    assert_eq!(fs::read_to_string(second.join("two.txt")).unwrap(), "two");
    assert_eq!(
        sandbox.list().len(),
        1,
        "the second mount keeps the attachment"
    );
    // Read-only needs another attachment of the image, which the lock refuses.
    let expected = ["attached for the mount on", second_name];
    mount_rejected(&sandbox, &read_only, &third, &expected);
    umount(&sandbox, &second);
    sandbox.assert_clean();

    // Started together, the two mounts still share one attachment.
    let mounting: Vec<_> = [(1, &first), (2, &second)]
        .into_iter()
        .map(|(partition, directory)| {
            let mut command = sandbox.loopfuse(["mount"]);
            command
                .arg(format!("{image_name}:{partition}"))
                .arg(directory);
            command.stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for child in mounting {
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "parallel mount failed: {stderr}");
    }
    assert_eq!(
        sandbox.list().len(),
        1,
        "parallel mounts share one attachment"
    );
    assert_eq!(fs::read_to_string(first.join("one.txt")).unwrap(), "one");
    assert_eq!(fs::read_to_string(second.join("two.txt")).unwrap(), "two");
    umount(&sandbox, &first);
    umount(&sandbox, &second);
    sandbox.assert_clean();
}
