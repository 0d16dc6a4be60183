//! Attach, use and detach real images through real FUSE mounts, driving stock tools
//! (`mkfs.ext4`, `e2fsck`, `fuse2fs`, `dd`, `fio`) through the device file.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::time::Duration;

use common::{
    Fuse2fs, Sandbox, assert_chunks_intact, is_root, kernel_loop, pattern, run_ok,
    sandbox_with_small_tmpfs, seeded_fio_writes, sfdisk, sha256, small_tmpfs, wait_until,
    write_until_full,
};

const MIB: u64 = 1 << 20;

#[test]
fn mkfs_ext4_then_e2fsck_is_clean() {
    let Some(sandbox) = Sandbox::new("mkfs_ext4_then_e2fsck_is_clean", &["mkfs.ext4", "e2fsck"])
    else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    let device = sandbox.attach([&image]);

    run_ok(
        "mkfs.ext4",
        ["-q".as_ref(), "-F".as_ref(), device.as_os_str()],
    );
    run_ok("e2fsck", ["-fn".as_ref(), device.as_os_str()]);
    sandbox.detach(&device);

    run_ok("e2fsck", ["-fn".as_ref(), image.as_os_str()]);
    sandbox.assert_clean();
}

#[test]
fn fuse2fs_files_survive_reattach() {
    let test = "fuse2fs_files_survive_reattach";
    let Some(sandbox) = Sandbox::new(test, &["mkfs.ext4", "fuse2fs", "e2fsck"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    let mountpoint = sandbox.path("mnt");
    fs::create_dir(&mountpoint).unwrap();
    let content = pattern(300_000, 7);

    let device = sandbox.attach([&image]);
    run_ok(
        "mkfs.ext4",
        ["-q".as_ref(), "-F".as_ref(), device.as_os_str()],
    );
    let mount = Fuse2fs::mount(&device, &mountpoint, "rw");
    fs::create_dir(mountpoint.join("dir")).unwrap();
    fs::write(mountpoint.join("dir/data.bin"), &content).unwrap();
    fs::write(mountpoint.join("hello.txt"), "hello\n").unwrap();
    drop(mount);
    sandbox.detach(&device);

    let device = sandbox.attach([&image]);
    let mount = Fuse2fs::mount(&device, &mountpoint, "ro");
    assert_eq!(fs::read(mountpoint.join("dir/data.bin")).unwrap(), content);
    assert_eq!(
        fs::read_to_string(mountpoint.join("hello.txt")).unwrap(),
        "hello\n"
    );
    drop(mount);
    sandbox.detach(&device);

    run_ok("e2fsck", ["-fn".as_ref(), image.as_os_str()]);
    sandbox.assert_clean();
}

#[test]
fn offset_window_writes_land_in_window() {
    let Some(sandbox) = Sandbox::new("offset_window_writes_land_in_window", &["dd", "cmp"]) else {
        return;
    };
    let original = pattern(8 * MIB as usize, 1);
    let image = sandbox.image_with("disk.img", &original);
    let data = sandbox.image_with("data.bin", &pattern(2 * MIB as usize, 2));

    let device = sandbox.attach([
        "--offset".as_ref(),
        "1MiB".as_ref(),
        "--sizelimit".as_ref(),
        "2MiB".as_ref(),
        image.as_os_str(),
    ]);
    assert_eq!(fs::metadata(&device).unwrap().len(), 2 * MIB);
    let input = format!("if={}", data.display());
    let output = format!("of={}", device.display());
    run_ok(
        "dd",
        [
            input.as_str(),
            output.as_str(),
            "bs=64K",
            "conv=fsync,notrunc",
            "status=none",
        ],
    );

    // A write past the end of the window fails with ENOSPC and changes nothing.
    let file = OpenOptions::new().write(true).open(&device).unwrap();
    let error = file.write_at(b"beyond", 2 * MIB).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
    drop(file);
    sandbox.detach(&device);

    let after = fs::read(&image).unwrap();
    assert_eq!(after.len(), original.len());
    assert!(
        after[..MIB as usize] == original[..MIB as usize],
        "bytes before the window changed"
    );
    assert!(
        after[MIB as usize..3 * MIB as usize] == fs::read(&data).unwrap()[..],
        "window bytes differ"
    );
    assert!(
        after[3 * MIB as usize..] == original[3 * MIB as usize..],
        "bytes after the window changed"
    );
    sandbox.assert_clean();
}

/// A size limit that reaches past the end of the image is cut at the end, as the kernel
/// loop driver does, and the kernel's device size is the oracle when running as root.
#[test]
fn size_limit_past_end_is_cut() {
    let Some(sandbox) = Sandbox::new("size_limit_past_end_is_cut", &[]) else {
        return;
    };
    let image = sandbox.image_with("disk.img", &pattern(MIB as usize, 4));
    let window = ["--offset", "512K", "--sizelimit", "600K"];

    let mut arguments: Vec<&std::ffi::OsStr> = window.iter().map(|arg| arg.as_ref()).collect();
    arguments.push(image.as_os_str());
    let device = sandbox.attach(arguments);
    let size = fs::metadata(&device).unwrap().len();
    sandbox.detach(&device);
    assert_eq!(size, 512 * 1024);

    if is_root() && common::have_tool("losetup") && common::have_tool("blockdev") {
        let mut losetup = vec!["-f", "--show"];
        losetup.extend(window);
        let path = image.to_str().unwrap();
        losetup.push(path);
        let kernel = common::LoopDevice(run_ok("losetup", losetup).trim().to_string());
        let kernel_size = run_ok("blockdev", ["--getsize64", kernel.0.as_str()]);
        assert_eq!(kernel_size.trim().parse::<u64>().unwrap(), size);
    }

    // A limit that is not a whole number of sectors is rounded down, and the warning
    // names the limit.
    let output = sandbox
        .loopfuse(["attach", "-o", "100", "--sizelimit", "1000"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("size limit 1000 is not"), "{stderr}");
    assert!(stderr.contains("the last 488 bytes"), "{stderr}");
    let device = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert_eq!(fs::metadata(&device).unwrap().len(), 512);
    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn device_keeps_block_device_contract() {
    let Some(sandbox) = Sandbox::new("device_keeps_block_device_contract", &[]) else {
        return;
    };
    let original = pattern(4 * MIB as usize, 3);
    let image = sandbox.image_with("disk.img", &original);
    let device = sandbox.attach([&image]);

    // O_TRUNC and truncate(2) succeed and change nothing, not even the times.
    let before = fs::metadata(&device).unwrap();
    drop(
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&device)
            .unwrap(),
    );
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .unwrap();
    file.set_len(0).unwrap();
    file.set_len(64 * MIB).unwrap();
    let after = fs::metadata(&device).unwrap();
    assert_eq!(after.len(), 4 * MIB);
    assert_eq!(after.mtime(), before.mtime());
    assert_eq!(after.ctime(), before.ctime());

    // Reads past the end return nothing; SEEK_END is the device size.
    let mut buf = [0u8; 16];
    assert_eq!(file.read_at(&mut buf, 4 * MIB).unwrap(), 0);
    assert_eq!(file.read_at(&mut buf, 4 * MIB - 4).unwrap(), 4);
    let mut file = file;
    assert_eq!(file.seek(SeekFrom::End(0)).unwrap(), 4 * MIB);

    // A write crossing the end is cut at the end; one past the end fails with ENOSPC.
    assert_eq!(file.write_at(b"abcdef", 4 * MIB - 2).unwrap(), 2);
    let error = file.write_at(b"x", 4 * MIB).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
    file.sync_all().unwrap();
    drop(file);
    sandbox.detach(&device);

    let after = fs::read(&image).unwrap();
    assert_eq!(after.len(), original.len(), "image size changed");
    assert_eq!(&after[after.len() - 2..], b"ab");
    assert!(
        after[..after.len() - 2] == original[..original.len() - 2],
        "other bytes changed"
    );
    sandbox.assert_clean();
}

#[test]
fn read_only_attach_refuses_writes_with_erofs() {
    let Some(sandbox) = Sandbox::new("read_only_attach_refuses_writes_with_erofs", &[]) else {
        return;
    };
    let image = sandbox.image_with("disk.img", &pattern(MIB as usize, 4));
    let before = sha256(&image);
    let device = sandbox.attach(["-r".as_ref(), image.as_os_str()]);

    let error = OpenOptions::new().write(true).open(&device).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS));
    let mut content = Vec::new();
    fs::File::open(&device)
        .unwrap()
        .read_to_end(&mut content)
        .unwrap();
    assert!(
        content == fs::read(&image).unwrap(),
        "read-only device reads other bytes"
    );
    assert_eq!(sandbox.list()[0]["read_only"], true);
    sandbox.detach(&device);

    assert_eq!(sha256(&image), before);
    sandbox.assert_clean();
}

/// A write-protected image (mode 0444 for a user, a read-only filesystem for root) gets a
/// read-only device with a warning, as losetup sets one up, instead of an error.
#[test]
fn write_protected_image_attaches_read_only() {
    let test = "write_protected_image_attaches_read_only";
    let Some(sandbox) = Sandbox::new(test, &[]) else {
        return;
    };
    let content = pattern(MIB as usize, 9);
    let (image, _tmpfs) = if is_root() {
        let (small, tmpfs) = small_tmpfs(&sandbox);
        let image = small.join("disk.img");
        fs::write(&image, &content).unwrap();
        let read_only = nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY;
        nix::mount::mount(None::<&str>, &small, None::<&str>, read_only, None::<&str>).unwrap();
        (image, Some(tmpfs))
    } else {
        let image = sandbox.image_with("disk.img", &content);
        fs::set_permissions(&image, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
        (image, None)
    };

    for front in [&["attach"][..], &["losetup", "-f", "--show"][..]] {
        let mut command = sandbox.loopfuse(front);
        let output = command.arg(&image).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{front:?}: {stderr}");
        assert!(stderr.contains("write-protected"), "{stderr}");
        let device = String::from_utf8(output.stdout).unwrap();
        let device = device.trim();

        let error = OpenOptions::new().write(true).open(device).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EROFS));
        assert_eq!(fs::read(device).unwrap(), content);
        assert_eq!(sandbox.list()[0]["read_only"], true);
        sandbox.detach(device);
    }
    assert_eq!(fs::read(&image).unwrap(), content);
    sandbox.assert_clean();
}

/// The owner may chmod a device file and root may chown it, as with `/dev/loopN`, so that
/// an `--allow-other` attachment can be opened to other users.
#[test]
fn device_files_follow_chmod_and_chown() {
    let Some(sandbox) = Sandbox::new("device_files_follow_chmod_and_chown", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let device = sandbox.attach([image.as_os_str()]);
    let mode_of =
        |path: &std::path::Path| fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode_of(&device), 0o600);

    fs::set_permissions(&device, fs::Permissions::from_mode(0o4640)).unwrap();
    assert_eq!(mode_of(&device), 0o4640);

    if is_root() {
        std::os::unix::fs::chown(&device, Some(65534), Some(65534)).unwrap();
        let metadata = fs::metadata(&device).unwrap();
        assert_eq!((metadata.uid(), metadata.gid()), (65534, 65534));
    } else {
        let error = std::os::unix::fs::chown(&device, Some(0), None).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EPERM));
        fs::set_permissions(&device, fs::Permissions::from_mode(0o400)).unwrap();
        let error = OpenOptions::new().write(true).open(&device).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EACCES));
    }
    sandbox.detach(&device);
    sandbox.assert_clean();
}

/// `touch` sets a device file's times as on a device node, and only that file's.
#[test]
fn touch_sets_device_file_times() {
    let Some(sandbox) = Sandbox::new("touch_sets_device_file_times", &["sfdisk", "touch"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    sfdisk(&image, "label: gpt\n,2M\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let partition = device.with_file_name("p1");
    let before = fs::metadata(&partition).unwrap();

    run_ok(
        "touch",
        [
            "-d".as_ref(),
            "2001-02-03 04:05:06 UTC".as_ref(),
            device.as_os_str(),
        ],
    );

    let metadata = fs::metadata(&device).unwrap();
    assert_eq!(metadata.mtime(), 981_173_106);
    assert_eq!(metadata.atime(), 981_173_106);
    assert!(metadata.ctime() >= before.ctime());
    let after = fs::metadata(&partition).unwrap();
    assert_eq!(after.mtime(), before.mtime(), "p1 keeps its time");
    sandbox.detach(&device);
    sandbox.assert_clean();
}

/// A partition that a rescan leaves unchanged keeps its mode and times. One that the new
/// table changes starts afresh, as a new partition device does.
#[test]
fn rescan_resets_changed_partition_mode() {
    let test = "rescan_resets_changed_partition_mode";
    let Some(sandbox) = Sandbox::new(test, &["sfdisk", "touch"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 16 * MIB);
    sfdisk(
        &image,
        "label: gpt\n1: start=2048, size=4096\n2: start=8192, size=4096\n",
    );
    // The disk shows the image's time, and a partition the time its device file was made.
    run_ok(
        "touch",
        ["-d".as_ref(), "@500000000".as_ref(), image.as_os_str()],
    );
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (first, second) = (device.with_file_name("p1"), device.with_file_name("p2"));
    for partition in [&first, &second] {
        fs::set_permissions(partition, fs::Permissions::from_mode(0o640)).unwrap();
        run_ok(
            "touch",
            ["-d".as_ref(), "@1000000000".as_ref(), partition.as_os_str()],
        );
    }

    sfdisk(
        &device,
        "label: gpt\n1: start=2048, size=2048\n2: start=8192, size=4096\n",
    );

    let mode_of = |path: &std::path::Path| fs::metadata(path).unwrap().permissions().mode();
    assert_eq!(fs::metadata(&first).unwrap().len(), MIB);
    assert_eq!(mode_of(&first) & 0o7777, 0o600);
    assert!(fs::metadata(&first).unwrap().mtime() >= started - 1);
    assert_eq!(fs::metadata(&device).unwrap().mtime(), 500_000_000);
    assert_eq!(mode_of(&second) & 0o7777, 0o640);
    assert_eq!(fs::metadata(&second).unwrap().mtime(), 1_000_000_000);
    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn fio_verify_with_two_jobs_passes() {
    let Some(sandbox) = Sandbox::new("fio_verify_with_two_jobs_passes", &["fio"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    let device = sandbox.attach([&image]);

    let filename = format!("--filename={}", device.display());
    run_ok(
        "fio",
        [
            "--name=verify",
            filename.as_str(),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--offset_increment=32M",
            "--numjobs=2",
            "--ioengine=psync",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--do_verify=1",
        ],
    );
    sandbox.detach(&device);
    sandbox.assert_clean();
}

/// The same seeded fio workload through the kernel loop driver and through loopfuse must
/// leave byte-identical images.
#[test]
fn fio_workload_matches_kernel_loop() {
    let test = "fio_workload_matches_kernel_loop";
    if !is_root() || !std::path::Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP {test}: the kernel loop driver needs root and /dev/loop-control");
        return;
    }
    let Some(sandbox) = Sandbox::new(test, &["fio", "losetup"]) else {
        return;
    };
    let kernel_image = sandbox.sparse_image("kernel.img", 64 * MIB);
    let fuse_image = sandbox.sparse_image("fuse.img", 64 * MIB);

    let loop_device = kernel_loop(&kernel_image);
    seeded_fio_writes(std::path::Path::new(&loop_device.0));
    drop(loop_device);

    let device = sandbox.attach([&fuse_image]);
    seeded_fio_writes(&device);
    sandbox.detach(&device);

    assert_eq!(sha256(&fuse_image), sha256(&kernel_image));
    sandbox.assert_clean();
}

#[test]
fn kill_after_fsync_loses_nothing() {
    let Some(sandbox) = Sandbox::new("kill_after_fsync_loses_nothing", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 16 * MIB);
    let device = sandbox.attach([&image]);
    let data = pattern(3 * MIB as usize, 5);

    let mut file = OpenOptions::new().write(true).open(&device).unwrap();
    file.seek(SeekFrom::Start(5 * MIB)).unwrap();
    file.write_all(&data).unwrap();
    file.sync_all().unwrap();

    let pid = sandbox.daemon_pid("loop0");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(
        Duration::from_secs(5),
        || sandbox.list()[0]["state"] == "stale"
    ));
    drop(file);

    let after = fs::read(&image).unwrap();
    assert!(
        after[5 * MIB as usize..8 * MIB as usize] == data[..],
        "fsynced bytes were lost"
    );

    // detach cleans the stale attachment: its dead mount and its registry entry.
    sandbox.detach("loop0");
    sandbox.assert_clean();
}

#[test]
fn sigterm_unmounts_and_flushes() {
    let Some(sandbox) = Sandbox::new("sigterm_unmounts_and_flushes", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 4 * MIB);
    let device = sandbox.attach([&image]);
    fs::OpenOptions::new()
        .write(true)
        .open(&device)
        .unwrap()
        .write_all_at(b"written", 1000)
        .unwrap();

    let pid = sandbox.daemon_pid("loop0");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();

    assert!(wait_until(Duration::from_secs(10), || sandbox
        .list()
        .is_empty()
        && sandbox.mounts().is_empty()));
    assert_eq!(&fs::read(&image).unwrap()[1000..1007], b"written");
    sandbox.assert_clean();
}

#[test]
fn busy_device_is_not_detached() {
    let Some(sandbox) = Sandbox::new("busy_device_is_not_detached", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 4 * MIB);
    let device = sandbox.attach([&image]);

    let open_file = fs::File::open(&device).unwrap();
    let output = sandbox.run(["detach", "loop0"]);
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("busy"), "{message}");
    assert_eq!(sandbox.list()[0]["state"], "attached");

    drop(open_file);
    sandbox.detach("loop0");
    sandbox.assert_clean();
}

#[test]
fn list_shows_each_attachment() {
    let Some(sandbox) = Sandbox::new("list_shows_each_attachment", &[]) else {
        return;
    };
    let first = sandbox.sparse_image("a.img", 4 * MIB);
    let second = sandbox.sparse_image("b.img", 8 * MIB);
    let first_device = sandbox.attach([&first]);
    let second_device = sandbox.attach([
        "-o".as_ref(),
        "1M".as_ref(),
        "-r".as_ref(),
        second.as_os_str(),
    ]);

    let entries = sandbox.list();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["name"], "loop0");
    assert_eq!(entries[0]["device"], first_device.to_str().unwrap());
    assert_eq!(entries[0]["image"], first.to_str().unwrap());
    assert_eq!(entries[0]["size"], 4 * MIB);
    assert_eq!(entries[1]["name"], "loop1");
    assert_eq!(entries[1]["offset"], MIB);
    assert_eq!(entries[1]["size"], 7 * MIB);
    assert_eq!(entries[1]["read_only"], true);
    assert_eq!(entries[1]["state"], "attached");

    let table = String::from_utf8(sandbox.run(["list", "--noheadings"]).stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[1].starts_with("loop1 "), "{table}");
    assert!(
        lines[1].ends_with(second_device.to_str().unwrap()),
        "{table}"
    );

    let output = sandbox.run(["detach", "--all"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    sandbox.assert_clean();
}

/// Reads through the device of a sparse image on tmpfs allocate nothing, as reads of the
/// file itself do, also when attached read-only.
#[test]
fn tmpfs_image_reads_allocate_nothing() {
    let test = "tmpfs_image_reads_allocate_nothing";
    let Some((sandbox, small, _tmpfs)) = sandbox_with_small_tmpfs(test, &[]) else {
        return;
    };
    let image = small.join("disk.img");
    fs::File::create(&image).unwrap().set_len(64 * MIB).unwrap();

    for options in [&[][..], &["-r"][..]] {
        let mut arguments: Vec<&std::ffi::OsStr> = options.iter().map(|o| o.as_ref()).collect();
        arguments.push(image.as_os_str());
        let device = sandbox.attach(arguments);
        let content = fs::read(&device).unwrap();
        sandbox.detach(&device);

        assert_eq!(content.len() as u64, 64 * MIB);
        assert!(content.iter().all(|&byte| byte == 0));
        assert_eq!(fs::metadata(&image).unwrap().blocks(), 0, "{options:?}");
    }
    sandbox.assert_clean();
}

/// On ext4 with 1 KiB blocks, a page can be partly allocated: writes into the rest of it on
/// a full filesystem fail with ENOSPC, not EIO.
#[test]
fn full_small_block_filesystem_answers_enospc() {
    let test = "full_small_block_filesystem_answers_enospc";
    if !is_root() || !std::path::Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP {test}: mounting ext4 through the kernel loop driver needs root");
        return;
    }
    let Some(sandbox) = Sandbox::new(test, &["mkfs.ext4", "losetup", "fallocate"]) else {
        return;
    };
    let ext4 = common::KernelMount::new(&sandbox, "small", "ext4", 64 * MIB, &["-q", "-b", "1024"]);
    let small = ext4.path.clone();
    let image = small.join("disk.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    let device = sandbox.attach([&image]);
    let file = OpenOptions::new().write(true).open(&device).unwrap();
    file.write_all_at(&pattern(4 * MIB as usize, 9), 0).unwrap();
    file.sync_all().unwrap();
    // Punching a page and zeroing 512 bytes of it allocates one 1 KiB block of the page.
    run_ok(
        "fallocate",
        [
            "-p",
            "-o",
            "2097152",
            "-l",
            "4096",
            device.to_str().unwrap(),
        ],
    );
    run_ok(
        "fallocate",
        ["-z", "-o", "2097152", "-l", "512", device.to_str().unwrap()],
    );
    let filler = fs::File::create(small.join("filler")).unwrap();
    let block = vec![0u8; 1024];
    while filler
        .write_all_at(&block, filler.metadata().unwrap().len())
        .is_ok()
    {}
    filler.sync_all().unwrap();

    let error = file
        .write_all_at(&pattern(4096, 10), 2 * MIB)
        .and_then(|()| file.sync_data())
        .unwrap_err();

    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
    drop(file);
    sandbox.detach(&device);
    drop(ext4);
    sandbox.assert_clean();
}

#[test]
fn full_backing_filesystem_answers_enospc() {
    let test = "full_backing_filesystem_answers_enospc";
    let Some((sandbox, small, _tmpfs)) = sandbox_with_small_tmpfs(test, &[]) else {
        return;
    };
    let image = small.join("disk.img");

    for mode in ["writethrough", "writeback"] {
        fs::File::create(&image).unwrap().set_len(64 * MIB).unwrap();
        let device = sandbox.attach(["--cache".as_ref(), mode.as_ref(), image.as_os_str()]);

        let (chunk, written) = write_until_full(&device);

        // The daemon lives on and every write that succeeded reads back intact.
        assert_eq!(sandbox.list()[0]["state"], "attached", "{mode}");
        assert_chunks_intact(&device, &chunk, &written);

        // The chunk that failed reads as the image's contents, not as the data that never
        // reached it. With write-back the daemon drops those cached pages in the background.
        // A hole reads as zeros, although mapping it would need a tmpfs page.
        let failed = (written.last().unwrap() + 1) * MIB;
        let reader = fs::File::open(&device).unwrap();
        let stored = fs::File::open(&image).unwrap();
        let mut through_device = vec![0u8; MIB as usize];
        let mut in_image = vec![0u8; MIB as usize];
        let coherent = wait_until(Duration::from_secs(5), || {
            reader.read_exact_at(&mut through_device, failed).unwrap();
            stored.read_exact_at(&mut in_image, failed).unwrap();
            through_device == in_image
        });
        assert!(coherent, "{mode}: the failed chunk differs from the image");
        reader.read_exact_at(&mut through_device, 63 * MIB).unwrap();
        assert!(through_device.iter().all(|&byte| byte == 0), "{mode}: hole");
        drop(reader);

        sandbox.detach(&device);
        fs::remove_file(&image).unwrap();
    }
    sandbox.assert_clean();
}

#[test]
fn truncated_image_gives_clear_error() {
    let Some(sandbox) = Sandbox::new("truncated_image_gives_clear_error", &[]) else {
        return;
    };
    let image = sandbox.image_with("disk.img", &pattern(4 * MIB as usize, 8));
    let device = sandbox.attach([&image]);
    let log = sandbox.registry().join("loop0.log");

    fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&device)
        .unwrap();
    let error = file.read_exact_at(&mut buf, 3 * MIB).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");

    // The part that still exists stays readable, and the log explains what went wrong.
    file.read_exact_at(&mut buf, 0).unwrap();
    drop(file);
    assert_eq!(sandbox.list()[0]["state"], "attached");
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("truncated"), "log: {text}");
    sandbox.detach("loop0");
    sandbox.assert_clean();
}

/// Every cache mode leaves the same bytes as the same seeded workload on a plain file.
#[test]
fn cache_modes_write_identical_bytes() {
    let Some(sandbox) = Sandbox::new("cache_modes_write_identical_bytes", &["fio"]) else {
        return;
    };
    let reference = sandbox.sparse_image("reference.img", 64 * MIB);
    seeded_fio_writes(&reference);
    let expected = sha256(&reference);

    for mode in ["writethrough", "writeback", "none"] {
        let image = sandbox.sparse_image(&format!("{mode}.img"), 64 * MIB);
        let device = sandbox.attach(["--cache".as_ref(), mode.as_ref(), image.as_os_str()]);
        seeded_fio_writes(&device);
        sandbox.detach(&device);
        assert_eq!(sha256(&image), expected, "cache mode {mode}");
    }
    sandbox.assert_clean();
}

/// A shared writable mapping of the device works in every cache mode, as on a block device,
/// and its stores reach the image.
#[test]
fn shared_mapping_writes_reach_image() {
    let Some(sandbox) = Sandbox::new("shared_mapping_writes_reach_image", &[]) else {
        return;
    };
    let stored = pattern(8192, 12);

    for mode in ["writethrough", "writeback", "none"] {
        let image = sandbox.sparse_image(&format!("{mode}.img"), 4 * MIB);
        let device = sandbox.attach(["--cache".as_ref(), mode.as_ref(), image.as_os_str()]);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&device)
            .unwrap();
        // SAFETY: no other process changes these bytes while the mapping exists.
        let mut mapping = unsafe { memmap2::MmapOptions::new().len(16384).map_mut(&file) }
            .unwrap_or_else(|error| panic!("cache mode {mode}: mmap failed: {error}"));
        mapping[4096..4096 + stored.len()].copy_from_slice(&stored);
        mapping.flush().unwrap();
        drop(mapping);
        drop(file);
        sandbox.detach(&device);

        let written = fs::read(&image).unwrap();
        assert!(
            written[4096..4096 + stored.len()] == stored[..],
            "cache mode {mode}"
        );
    }
    sandbox.assert_clean();
}

/// With write-back caching a write past the end is only reported by fsync, and nothing
/// past the end reaches the image.
#[test]
fn writeback_reports_overflow_at_fsync() {
    let Some(sandbox) = Sandbox::new("writeback_reports_overflow_at_fsync", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 4 * MIB);
    let device = sandbox.attach(["--cache".as_ref(), "writeback".as_ref(), image.as_os_str()]);

    let file = OpenOptions::new().write(true).open(&device).unwrap();
    file.write_all_at(b"inside", 0).unwrap();
    let _ = file.write_at(b"outside", 4 * MIB);
    let error = file.sync_all().unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
    drop(file);
    sandbox.detach(&device);

    assert_eq!(fs::metadata(&image).unwrap().len(), 4 * MIB);
    assert_eq!(&fs::read(&image).unwrap()[..6], b"inside");
    sandbox.assert_clean();
}

/// With write-back caching, `dd` without a count still stops at the end of the device with
/// ENOSPC, as on a block device, instead of filling the page cache forever. Once it has
/// closed the file, the size is the device's again and writes inside it work.
#[test]
fn writeback_stops_a_writer_at_the_end() {
    let Some(sandbox) = Sandbox::new("writeback_stops_a_writer_at_the_end", &["dd", "timeout"])
    else {
        return;
    };
    let image = sandbox.image_with("disk.img", &vec![0xff; 16 * MIB as usize]);
    let device = sandbox.attach(["--cache".as_ref(), "writeback".as_ref(), image.as_os_str()]);

    // An O_DIRECT write bypasses the cache and fails on its own, so it leaves other writers
    // of the device alone, even while its file stays open.
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&device)
        .unwrap();
    let error = direct.write_at(&[7u8; 4096], 16 * MIB).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
    let file = OpenOptions::new().write(true).open(&device).unwrap();
    file.write_all_at(&[0u8; 4096], 0).unwrap();
    file.sync_all().unwrap();
    drop(file);
    drop(direct);

    // A reader and a second writer stay open across the overrun. They keep the inode whose
    // size grew, which must not pass that size or the errors on to files opened later.
    let reader = fs::File::open(&device).unwrap();
    let second = OpenOptions::new().write(true).open(&device).unwrap();

    // Without the guard dd never ends; `timeout` then exits with 124.
    let target = format!("of={}", device.display());
    let output = common::run("timeout", ["60", "dd", "if=/dev/zero", &target, "bs=1M"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "dd: {stderr}");
    assert!(stderr.contains("No space left on device"), "dd: {stderr}");

    assert_eq!(fs::metadata(&device).unwrap().len(), 16 * MIB);
    let file = OpenOptions::new().write(true).open(&device).unwrap();
    assert_eq!(file.metadata().unwrap().len(), 16 * MIB);
    file.write_all_at(b"inside", MIB).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let mut whole = Vec::new();
    fs::File::open(&device)
        .unwrap()
        .read_to_end(&mut whole)
        .unwrap();
    assert_eq!(whole.len() as u64, 16 * MIB);

    // The writer that was open gets ENOSPC once, then writes inside the device again.
    let error = second.write_at(b"second", 2 * MIB).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
    second.write_all_at(b"second", 2 * MIB).unwrap();
    // Its first fsync reports the failed write-back past the end, because fsync reports
    // every write-back error since the file was opened. The next fsync succeeds.
    let error = second.sync_all().unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
    second.sync_all().unwrap();
    drop(second);
    drop(reader);
    sandbox.detach(&device);

    let mut expected = vec![0u8; 16 * MIB as usize];
    expected[MIB as usize..MIB as usize + 6].copy_from_slice(b"inside");
    expected[2 * MIB as usize..2 * MIB as usize + 6].copy_from_slice(b"second");
    assert!(fs::read(&image).unwrap() == expected, "image bytes differ");
    sandbox.assert_clean();
}

#[test]
fn daemon_closes_inherited_pipe() {
    let test = "daemon_closes_inherited_pipe";
    let Some(sandbox) = Sandbox::new(test, &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 16 << 20);
    // A pipe the caller leaves open across exec, as a shell, make or a CI runner may.
    let (mut reader, writer) = std::io::pipe().unwrap();
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
    fcntl(&writer, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();

    let device = sandbox.attach([image.as_os_str()]);
    drop(writer);

    // Once no process has the write end, the reader gets the end of the file. Processes
    // that other tests start meanwhile may inherit it for a moment too, hence the wait.
    fcntl(&reader, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let mut byte = [0u8; 1];
    let closed = wait_until(Duration::from_secs(20), || {
        matches!(reader.read(&mut byte), Ok(0))
    });
    sandbox.detach(&device);
    assert!(closed, "the daemon kept the caller's pipe open");
}
