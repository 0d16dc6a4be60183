//! Holes stay holes: discards through the device free space in the image, SEEK_DATA and
//! SEEK_HOLE report the image's allocation (translated for partitions), and sparse copies of
//! a device file come out as sparse as copies of the image.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::{Fuse2fs, Sandbox, is_root, kernel_loop, pattern, run_ok, sfdisk};
use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Returns the data ranges `(start, end)` of a file, found with SEEK_DATA and SEEK_HOLE.
fn data_map(path: &Path) -> Vec<(u64, u64)> {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    let mut ranges = Vec::new();
    let mut position = 0;

    while position < len {
        let Ok(data) = lseek(file.as_fd(), position as i64, Whence::SeekData) else {
            break;
        };
        let hole = lseek(file.as_fd(), data, Whence::SeekHole).unwrap();
        ranges.push((data as u64, hole as u64));
        position = hole as u64;
    }
    ranges
}

/// Returns the part of `map` inside `start..end`, shifted to start at 0.
fn map_within(map: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    map.iter()
        .filter(|&&(data, hole)| hole > start && data < end)
        .map(|&(data, hole)| (data.max(start) - start, hole.min(end) - start))
        .collect()
}

/// Bytes allocated for a file, from `st_blocks`.
fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Creates a 64 MiB image with a GPT of two partitions, p1 at 1 MiB (16 MiB) and p2 after it, and
/// patterned 4 KiB-aligned extents in both.
fn partitioned_image(sandbox: &Sandbox) -> PathBuf {
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    sfdisk(&image, "label: gpt\n,16M\n,,\n");
    let file = OpenOptions::new().write(true).open(&image).unwrap();
    for (index, offset) in [2 * MIB, 9 * MIB + 8192, 20 * MIB, 33 * MIB + 4096, 50 * MIB]
        .into_iter()
        .enumerate()
    {
        let extent = pattern((index + 1) * 64 * 1024, index as u64 + 1);
        file.write_all_at(&extent, offset).unwrap();
    }
    file.sync_all().unwrap();
    image
}

/// Returns the `(start, end)` of partition `number` of the first attachment, from `list --json`.
fn partition_range(sandbox: &Sandbox, number: usize) -> (u64, u64) {
    let partition = &sandbox.list()[0]["partitions"][number - 1];
    let start = partition["start"].as_u64().unwrap();
    (start, start + partition["size"].as_u64().unwrap())
}

/// Formats `device` with ext4 and writes files through `fuse2fs`: the job whose allocation
/// is measured. `lazy_journal_init=1` keeps mke2fs 1.47 from zeroing the journal with
/// FALLOC_FL_ZERO_RANGE, which allocates 512 MiB of unwritten extents on a 100 GiB disk,
/// through the kernel loop driver as through loopfuse.
fn format_and_fill(device: &Path, mountpoint: &Path) {
    run_ok(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-E".as_ref(),
            "lazy_journal_init=1".as_ref(),
            device.as_os_str(),
        ],
    );
    let mount = Fuse2fs::mount(device, mountpoint, "rw");
    fs::create_dir(mountpoint.join("files")).unwrap();
    for index in 0..8u64 {
        let content = pattern(2 * MIB as usize, index);
        fs::write(mountpoint.join(format!("files/{index}.bin")), content).unwrap();
    }
    drop(mount);
}

#[test]
fn mkfs_on_100g_image_stays_sparse() {
    let test = "mkfs_on_100g_image_stays_sparse";
    let Some(sandbox) = Sandbox::new(test, &["mkfs.ext4", "fuse2fs", "e2fsck"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 100 * GIB);
    let mountpoint = sandbox.path("mnt");
    fs::create_dir(&mountpoint).unwrap();

    let device = sandbox.attach([&image]);
    format_and_fill(&device, &mountpoint);
    sandbox.detach(&device);

    let used = allocated(&image);
    eprintln!(
        "{test}: 100 GiB image uses {} KiB after mkfs and 16 MiB of files",
        used >> 10
    );
    assert!(used < 200 * MIB, "image uses {used} bytes");
    assert!(used > 16 * MIB, "image uses only {used} bytes");
    run_ok("e2fsck", ["-fn".as_ref(), image.as_os_str()]);
    sandbox.assert_clean();
}

/// The same mkfs job through the kernel loop driver allocates as much as through loopfuse,
/// both with the journal left lazy and with mke2fs's default of zeroing it.
#[test]
fn mkfs_allocation_matches_kernel_loop() {
    let test = "mkfs_allocation_matches_kernel_loop";
    if !is_root() || !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP {test}: the kernel loop driver needs root and /dev/loop-control");
        return;
    }
    let Some(sandbox) = Sandbox::new(test, &["mkfs.ext4", "fuse2fs", "losetup"]) else {
        return;
    };
    let mountpoint = sandbox.path("mnt");
    fs::create_dir(&mountpoint).unwrap();

    let kernel_image = sandbox.sparse_image("kernel.img", 100 * GIB);
    let loop_device = kernel_loop(&kernel_image);
    format_and_fill(Path::new(&loop_device.0), &mountpoint);
    drop(loop_device);

    let fuse_image = sandbox.sparse_image("fuse.img", 100 * GIB);
    let device = sandbox.attach([&fuse_image]);
    format_and_fill(&device, &mountpoint);
    sandbox.detach(&device);

    let (kernel, fuse) = (allocated(&kernel_image), allocated(&fuse_image));
    eprintln!(
        "{test}: lazy journal: kernel loop {} KiB, loopfuse {} KiB",
        kernel >> 10,
        fuse >> 10
    );
    assert!(
        fuse.abs_diff(kernel) * 10 <= kernel,
        "kernel {kernel}, loopfuse {fuse}"
    );

    // mke2fs's default zeroes the journal with FALLOC_FL_ZERO_RANGE, which both keep allocated.
    let kernel_image = sandbox.sparse_image("kernel-default.img", 100 * GIB);
    let loop_device = kernel_loop(&kernel_image);
    run_ok("mkfs.ext4", ["-q", "-F", loop_device.0.as_str()]);
    drop(loop_device);
    let fuse_image = sandbox.sparse_image("fuse-default.img", 100 * GIB);
    let device = sandbox.attach([&fuse_image]);
    run_ok(
        "mkfs.ext4",
        ["-q".as_ref(), "-F".as_ref(), device.as_os_str()],
    );
    sandbox.detach(&device);

    let (kernel, fuse) = (allocated(&kernel_image), allocated(&fuse_image));
    eprintln!(
        "{test}: zeroed journal: kernel loop {} KiB, loopfuse {} KiB",
        kernel >> 10,
        fuse >> 10
    );
    assert!(
        fuse.abs_diff(kernel) * 10 <= kernel,
        "kernel {kernel}, loopfuse {fuse}"
    );
    sandbox.assert_clean();
}

/// Reads all of `path`, so that its holes are cached, then writes and rewrites 4 KiB blocks
/// spread over it and calls `fsync`. The device file and a plain reference file get the same.
fn read_then_scatter_writes(path: &Path) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut whole = vec![0u8; file.metadata().unwrap().len() as usize];
    file.read_exact_at(&mut whole, 0).unwrap();
    for round in 0..2u64 {
        for index in 0..16u64 {
            let block = pattern(4096, round * 16 + index + 1);
            file.write_all_at(&block, index * 3 * MIB + 8192).unwrap();
        }
    }
    file.sync_all().unwrap();
}

/// Small writes into holes that were read before allocate only the blocks written, as on a
/// plain file, instead of the large folios the page cache read the holes into.
#[test]
fn scattered_writes_allocate_like_a_file() {
    let Some(sandbox) = Sandbox::new("scattered_writes_allocate_like_a_file", &[]) else {
        return;
    };
    let reference = sandbox.sparse_image("reference.img", 64 * MIB);
    read_then_scatter_writes(&reference);
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    let device = sandbox.attach([&image]);

    read_then_scatter_writes(&device);
    sandbox.detach(&device);

    assert_eq!(allocated(&image), allocated(&reference));
    assert_eq!(data_map(&image), data_map(&reference));
    assert_eq!(fs::read(&image).unwrap(), fs::read(&reference).unwrap());
    sandbox.assert_clean();
}

/// Bytes free on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).unwrap();
    stat.blocks_free() as u64 * stat.fragment_size() as u64
}

/// On XFS, an image whose extents are shared with a reflinked copy is copied on write. So
/// scattered writes through the device must take about as much new space as on a plain
/// file, not a copy of each large folio they land in.
#[test]
fn reflinked_image_writes_allocate_like_a_file() {
    let test = "reflinked_image_writes_allocate_like_a_file";
    if !is_root() || !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP {test}: mounting XFS through the kernel loop driver needs root");
        return;
    }
    let Some(sandbox) = Sandbox::new(test, &["mkfs.xfs", "losetup"]) else {
        return;
    };
    let mount = common::KernelMount::new(&sandbox, "xfs", "xfs", 320 * MIB, &["-q"]);
    let xfs = mount.path.clone();
    let base = xfs.join("base.img");
    fs::write(&base, pattern(64 * MIB as usize, 11)).unwrap();
    let (reference, image) = (xfs.join("reference.img"), xfs.join("disk.img"));
    for copy in [&reference, &image] {
        run_ok(
            "cp",
            [
                "--reflink=always".as_ref(),
                base.as_os_str(),
                copy.as_os_str(),
            ],
        );
    }
    nix::unistd::sync();

    let free_before = free_bytes(&xfs);
    read_then_scatter_writes(&reference);
    nix::unistd::sync();
    let reference_growth = free_before - free_bytes(&xfs);
    let device = sandbox.attach([&image]);
    read_then_scatter_writes(&device);
    sandbox.detach(&device);
    nix::unistd::sync();
    let device_growth = free_before - reference_growth - free_bytes(&xfs);

    assert!(
        device_growth <= reference_growth + MIB,
        "device {device_growth} bytes, plain file {reference_growth} bytes"
    );
    assert_eq!(fs::read(&image).unwrap(), fs::read(&reference).unwrap());
    drop(mount);
    sandbox.assert_clean();
}

#[test]
fn seek_data_and_hole_follow_image_map() {
    let test = "seek_data_and_hole_follow_image_map";
    let Some(sandbox) = Sandbox::new(test, &["sfdisk", "cp"]) else {
        return;
    };
    let image = partitioned_image(&sandbox);
    let image_map = data_map(&image);
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let p2 = device.with_file_name("p2");
    let (p2_start, p2_end) = partition_range(&sandbox, 2);
    assert_eq!(p2_start, 17 * MIB);
    assert_eq!(fs::metadata(&p2).unwrap().len(), p2_end - p2_start);

    assert_eq!(data_map(&device), image_map);
    let p2_map = map_within(&image_map, p2_start, p2_end);
    assert_eq!(data_map(&p2), p2_map);
    let p2_data: u64 = p2_map.iter().map(|(data, hole)| hole - data).sum();
    assert_eq!(allocated(&p2), p2_data);

    // cp finds the holes of the device as it finds those of the image.
    let from_image = sandbox.path("from-image.img");
    let from_device = sandbox.path("from-device.img");
    let from_p2 = sandbox.path("from-p2.img");
    for (source, target) in [
        (&image, &from_image),
        (&device, &from_device),
        (&p2, &from_p2),
    ] {
        run_ok(
            "cp",
            [
                "--sparse=always".as_ref(),
                source.as_os_str(),
                target.as_os_str(),
            ],
        );
    }
    assert!(fs::read(&from_device).unwrap() == fs::read(&image).unwrap());
    assert_eq!(data_map(&from_device), data_map(&from_image));
    assert_eq!(
        data_map(&from_p2),
        map_within(&data_map(&from_image), p2_start, p2_end)
    );
    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn punch_through_p2_frees_only_its_range() {
    let test = "punch_through_p2_frees_only_its_range";
    let Some(sandbox) = Sandbox::new(test, &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    sfdisk(&image, "label: gpt\n,16M\n,,\n");
    // Fill everything between the GPTs, so any punch outside p2 would show.
    let file = OpenOptions::new().write(true).open(&image).unwrap();
    file.write_all_at(&pattern(62 * MIB as usize, 3), MIB)
        .unwrap();
    file.sync_all().unwrap();
    drop(file);
    let original = fs::read(&image).unwrap();
    let allocated_before = allocated(&image);

    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let p2 = OpenOptions::new()
        .write(true)
        .open(device.with_file_name("p2"))
        .unwrap();
    let p2_len = p2.metadata().unwrap().len();
    let (p2_start, p2_end) = partition_range(&sandbox, 2);
    assert_eq!(p2_end - p2_start, p2_len);
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(p2.as_fd(), punch, 4 * MIB as i64, 2 * MIB as i64).unwrap();
    // A request crossing the end of p2 is cut there, as on a block device.
    fallocate(p2.as_fd(), punch, (p2_len - 4096) as i64, 4 * MIB as i64).unwrap();
    p2.sync_all().unwrap();
    drop(p2);
    sandbox.detach(&device);

    let mut expected = original;
    let first = (p2_start + 4 * MIB) as usize;
    expected[first..first + 2 * MIB as usize].fill(0);
    let last = (p2_start + p2_len - 4096) as usize;
    expected[last..last + 4096].fill(0);
    let after = fs::read(&image).unwrap();
    assert_eq!(after.len(), expected.len());
    let differing = after.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(differing, None, "first differing byte");
    assert_eq!(allocated_before - allocated(&image), 2 * MIB + 4096);
    sandbox.assert_clean();
}

/// `fallocate` on a device file returns the errors of a block device and changes the same
/// bytes: ranges past the end without KEEP_SIZE, ranges that start at the end, ranges not
/// aligned to sectors and plain allocation are rejected with nothing changed. As root the
/// kernel loop driver is the oracle; otherwise the block device rules it follows are.
#[test]
fn fallocate_matches_block_device_rules() {
    let test = "fallocate_matches_block_device_rules";
    let Some(sandbox) = Sandbox::new(test, &[]) else {
        return;
    };
    let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep;
    let zero = FallocateFlags::FALLOC_FL_ZERO_RANGE;
    let none = FallocateFlags::empty();
    let size = 10 * MIB;
    // (offset, length, mode, the errno a block device returns)
    let cases = [
        (8 * MIB, 5 * MIB, zero, Some(libc::EINVAL)),
        (100, 200, punch, Some(libc::EINVAL)),
        (1000, 3000, zero, Some(libc::EINVAL)),
        (size, MIB, punch, Some(libc::EINVAL)),
        (9 * MIB, 5 * MIB, none, Some(libc::EINVAL)),
        (0, 64 * MIB, none, Some(libc::EINVAL)),
        (0, MIB, none, Some(libc::EOPNOTSUPP)),
        (0, MIB, keep, Some(libc::EOPNOTSUPP)),
        (MIB, 512, punch, None),
        (2 * MIB, MIB, zero, None),
        (9 * MIB, 4 * MIB, zero | keep, None),
    ];
    let original = pattern(size as usize, 13);

    let run_cases = |device: &Path| -> Vec<Option<i32>> {
        let file = OpenOptions::new().write(true).open(device).unwrap();
        let errors = cases
            .iter()
            .map(|&(offset, length, mode, _)| {
                fallocate(file.as_fd(), mode, offset as i64, length as i64)
                    .err()
                    .map(|errno| errno as i32)
            })
            .collect();
        file.sync_all().unwrap();
        // A block device's st_size is 0, so the size comes from SEEK_END.
        let end = lseek(file.as_fd(), 0, Whence::SeekEnd).unwrap();
        assert_eq!(end as u64, size, "the size changed");
        errors
    };

    let fuse_image = sandbox.image_with("fuse.img", &original);
    for cache in ["writethrough", "writeback"] {
        fs::write(&fuse_image, &original).unwrap();
        let device = sandbox.attach(["--cache".as_ref(), cache.as_ref(), fuse_image.as_os_str()]);
        let errors = run_cases(&device);
        sandbox.detach(&device);
        let expected: Vec<_> = cases.iter().map(|case| case.3).collect();
        assert_eq!(errors, expected, "cache mode {cache}");
    }
    let mut expected = original.clone();
    expected[MIB as usize..MIB as usize + 512].fill(0);
    expected[2 * MIB as usize..3 * MIB as usize].fill(0);
    expected[9 * MIB as usize..].fill(0);
    assert!(
        fs::read(&fuse_image).unwrap() == expected,
        "other bytes changed"
    );

    if is_root() && Path::new("/dev/loop-control").exists() && common::have_tool("losetup") {
        let kernel_image = sandbox.image_with("kernel.img", &original);
        let loop_device = kernel_loop(&kernel_image);
        let errors = run_cases(Path::new(&loop_device.0));
        drop(loop_device);
        let expected: Vec<_> = cases.iter().map(|case| case.3).collect();
        assert_eq!(
            errors, expected,
            "the kernel loop driver returns other errors"
        );
        assert!(
            fs::read(&kernel_image).unwrap() == fs::read(&fuse_image).unwrap(),
            "the kernel loop driver changed other bytes"
        );
    }
    sandbox.assert_clean();
}
