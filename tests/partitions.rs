//! Partition files of `attach -P`: created from the table, replaced when a writer of `disk`
//! closes it, confined to their window, and coherent with `disk`.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::{Sandbox, is_root, pattern, run_ok, sfdisk};

const MIB: u64 = 1 << 20;

/// Partition `(number, start, size)` in bytes as util-linux reads them from `image`.
fn partx(image: &Path) -> Vec<(u32, u64, u64)> {
    let text = run_ok(
        "partx",
        [
            "--show".as_ref(),
            "--bytes".as_ref(),
            "--noheadings".as_ref(),
            "-o".as_ref(),
            "NR,START,SIZE".as_ref(),
            image.as_os_str(),
        ],
    );
    text.lines()
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .map(|field| field.parse().unwrap())
                .collect();
            (fields[0] as u32, fields[1] * 512, fields[2])
        })
        .collect()
}

/// Copies `size` bytes at `start` of `image` into a new file of the sandbox.
fn extract(sandbox: &Sandbox, image: &Path, start: u64, size: u64, name: &str) -> PathBuf {
    let mut bytes = vec![0u8; size as usize];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut bytes, start)
        .unwrap();
    sandbox.image_with(name, &bytes)
}

fn partition_file(device: &Path, number: u32) -> PathBuf {
    device.with_file_name(format!("p{number}"))
}

#[test]
fn gpt_written_through_disk_appears_without_rescan() {
    let test = "gpt_written_through_disk_appears_without_rescan";
    let tools = [
        "sfdisk",
        "partx",
        "mkfs.ext4",
        "e2fsck",
        "mkfs.vfat",
        "fsck.vfat",
    ];
    let Some(sandbox) = Sandbox::new(test, &tools) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 96 * MIB);
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    assert!(!partition_file(&device, 1).exists());

    sfdisk(&device, "label: gpt\n,40M,L\n,,L\n");
    let p1 = partition_file(&device, 1);
    let p2 = partition_file(&device, 2);
    assert_eq!(fs::metadata(&p1).unwrap().len(), 40 * MIB);
    run_ok("mkfs.ext4", ["-q".as_ref(), "-F".as_ref(), p1.as_os_str()]);
    run_ok("mkfs.vfat", [p2.as_os_str()]);
    run_ok("e2fsck", ["-fn".as_ref(), p1.as_os_str()]);
    run_ok("fsck.vfat", ["-n".as_ref(), p2.as_os_str()]);
    sandbox.detach(&device);

    let partitions = partx(&image);
    assert_eq!(partitions.len(), 2, "{partitions:?}");
    assert_eq!(partitions[0].2, 40 * MIB);
    let first = extract(&sandbox, &image, partitions[0].1, partitions[0].2, "p1.img");
    let second = extract(&sandbox, &image, partitions[1].1, partitions[1].2, "p2.img");
    run_ok("e2fsck", ["-fn".as_ref(), first.as_os_str()]);
    run_ok("fsck.vfat", ["-n".as_ref(), second.as_os_str()]);
    sandbox.assert_clean();
}

#[test]
fn partition_offsets_match_util_linux() {
    let test = "partition_offsets_match_util_linux";
    let Some(sandbox) = Sandbox::new(test, &["sfdisk", "partx"]) else {
        return;
    };
    let tables = [
        (
            "mbr",
            "label: dos\n,8M,83\n,8M,83\n,,5\n,4M,83\n,4M,83\n,,83\n",
        ),
        ("gpt", "label: gpt\n,8M\n,4M\n,\n"),
    ];

    for (label, script) in tables {
        let image = sandbox.sparse_image(&format!("{label}.img"), 64 * MIB);
        sfdisk(&image, script);
        let expected = partx(&image);
        let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);

        let listed = sandbox.list()[0]["partitions"].as_array().unwrap().clone();
        let found: Vec<(u32, u64, u64)> = listed
            .iter()
            .map(|p| {
                let field = |name: &str| p[name].as_u64().unwrap();
                (field("number") as u32, field("start"), field("size"))
            })
            .collect();
        let numbers: Vec<u32> = found.iter().map(|p| p.0).collect();
        let expected_numbers: Vec<u32> = expected.iter().map(|p| p.0).collect();
        assert_eq!(numbers, expected_numbers, "{label}: partition numbers");

        for ((number, start, size), (_, oracle_start, oracle_size)) in found.iter().zip(&expected) {
            assert_eq!(start, oracle_start, "{label}: start of p{number}");
            // The kernel exposes an MBR extended partition as a 1 KiB stub while util-linux
            // reports its full size; loopfuse follows the kernel.
            if *size != 1024 {
                assert_eq!(size, oracle_size, "{label}: size of p{number}");
            }
            let file_size = fs::metadata(partition_file(&device, *number))
                .unwrap()
                .len();
            assert_eq!(file_size, *size, "{label}: file size of p{number}");
        }
        sandbox.detach(&device);
    }
    sandbox.assert_clean();
}

#[test]
fn partition_writes_stay_in_window() {
    let Some(sandbox) = Sandbox::new("partition_writes_stay_in_window", &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 32 * MIB);
    sfdisk(&image, "label: dos\n,8M,83\n,8M,83\n");
    let before = fs::read(&image).unwrap();
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let p1 = partition_file(&device, 1);
    let data = pattern(8 * MIB as usize, 11);

    let file = OpenOptions::new().write(true).open(&p1).unwrap();
    file.write_all_at(&data, 0).unwrap();
    let error = file.write_at(b"x", 8 * MIB).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
    file.sync_all().unwrap();
    drop(file);
    sandbox.detach(&device);

    let after = fs::read(&image).unwrap();
    let start = MIB as usize;
    let end = start + 8 * MIB as usize;
    assert!(after[..start] == before[..start], "bytes before p1 changed");
    assert!(after[start..end] == data[..], "p1 bytes differ");
    assert!(after[end..] == before[end..], "bytes after p1 changed");
    sandbox.assert_clean();
}

#[test]
fn partition_and_disk_see_each_other() {
    let Some(sandbox) = Sandbox::new("partition_and_disk_see_each_other", &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 32 * MIB);
    sfdisk(&image, "label: dos\n,8M,83\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let p1 = partition_file(&device, 1);
    let mut buf = vec![0u8; 4096];

    // Fill the kernel's cache of both files with the old content first.
    let disk = File::open(&device).unwrap();
    disk.read_exact_at(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let partition = File::open(&p1).unwrap();
    partition.read_exact_at(&mut buf, 4096).unwrap();

    // A write through p1, closed, is seen through disk.
    let mut writer = OpenOptions::new().write(true).open(&p1).unwrap();
    writer.write_all(b"through p1").unwrap();
    drop(writer);
    disk.read_exact_at(&mut buf, MIB).unwrap();
    assert_eq!(&buf[..10], b"through p1");

    // A write through disk, after fsync, is seen through p1.
    let writer = OpenOptions::new().write(true).open(&device).unwrap();
    writer.write_all_at(b"through disk", MIB + 4096).unwrap();
    writer.sync_all().unwrap();
    partition.read_exact_at(&mut buf, 4096).unwrap();
    assert_eq!(&buf[..12], b"through disk");

    drop((writer, disk, partition));
    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn rescan_spares_open_partition_files() {
    let Some(sandbox) = Sandbox::new("rescan_spares_open_partition_files", &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 32 * MIB);
    sfdisk(&image, "label: dos\n2048,4M,83\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let p1 = partition_file(&device, 1);

    let old = OpenOptions::new().read(true).write(true).open(&p1).unwrap();
    sfdisk(&device, "label: dos\n16384,8M,83\n");
    assert_eq!(
        fs::metadata(&p1).unwrap().len(),
        8 * MIB,
        "a new open sees the new table"
    );
    assert_eq!(
        old.metadata().unwrap().len(),
        4 * MIB,
        "the open file keeps its partition"
    );

    old.write_all_at(b"old window", 0).unwrap();
    old.sync_all().unwrap();
    let new = OpenOptions::new().write(true).open(&p1).unwrap();
    new.write_all_at(b"new window", 0).unwrap();
    new.sync_all().unwrap();
    drop((old, new));
    sandbox.detach(&device);

    let bytes = fs::read(&image).unwrap();
    assert_eq!(&bytes[MIB as usize..MIB as usize + 10], b"old window");
    assert_eq!(
        &bytes[8 * MIB as usize..8 * MIB as usize + 10],
        b"new window"
    );
    sandbox.assert_clean();
}

#[test]
fn rescan_command_reads_changed_table() {
    let Some(sandbox) = Sandbox::new("rescan_command_reads_changed_table", &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 32 * MIB);
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    assert!(!partition_file(&device, 1).exists());

    // A table written to the image file directly, bypassing the device, needs a rescan.
    sfdisk(&image, "label: gpt\n,4M\n,4M\n");
    assert!(!partition_file(&device, 2).exists());
    let output = sandbox.run(["rescan", "loop0"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        fs::metadata(partition_file(&device, 2)).unwrap().len(),
        4 * MIB
    );
    assert_eq!(
        fs::metadata(device.with_file_name("diskp2")).unwrap().len(),
        4 * MIB
    );

    let plain = sandbox.sparse_image("plain.img", 4 * MIB);
    let plain_device = sandbox.attach([&plain]);
    let output = sandbox.run(["rescan", "loop1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--partscan"));

    sandbox.detach(&plain_device);
    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn read_only_partitions_refuse_writes() {
    let Some(sandbox) = Sandbox::new("read_only_partitions_refuse_writes", &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 16 * MIB);
    sfdisk(&image, "label: dos\n,4M,83\n");
    let device = sandbox.attach(["-P".as_ref(), "-r".as_ref(), image.as_os_str()]);

    let error = OpenOptions::new()
        .write(true)
        .open(partition_file(&device, 1))
        .unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS));
    let mut content = Vec::new();
    File::open(partition_file(&device, 1))
        .unwrap()
        .read_to_end(&mut content)
        .unwrap();
    assert_eq!(content.len() as u64, 4 * MIB);

    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn detach_of_partition_file_is_refused() {
    let Some(sandbox) = Sandbox::new("detach_of_partition_file_is_refused", &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 16 * MIB);
    sfdisk(&image, "label: dos\n,4M,83\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let name = sandbox.list()[0]["name"].as_str().unwrap().to_string();

    let output = sandbox.run(["detach".as_ref(), partition_file(&device, 1).as_os_str()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("loopfuse detach {name}")),
        "names the whole device: {stderr}"
    );
    assert_eq!(sandbox.list().len(), 1, "still attached");
    assert!(partition_file(&device, 1).exists());

    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn partitions_match_kernel_where_supported() {
    let test = "partitions_match_kernel_where_supported";
    if !is_root() {
        eprintln!("SKIP {test}: the kernel loop driver needs root");
        return;
    }
    let Some(sandbox) = Sandbox::new(test, &["sfdisk", "losetup"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    sfdisk(&image, "label: dos\n,8M,83\n,,5\n,4M,83\n,4M,83\n");
    let loop_device = run_ok(
        "losetup",
        [
            "-f".as_ref(),
            "-P".as_ref(),
            "--show".as_ref(),
            image.as_os_str(),
        ],
    );
    let loop_name = loop_device.trim().trim_start_matches("/dev/").to_string();
    let kernel = kernel_partitions(&loop_name);
    let _ = common::run("losetup", ["-d", loop_device.trim()]);
    if kernel.is_empty() {
        eprintln!("SKIP {test}: this kernel has no MBR/GPT partition support (no {loop_name}p1)");
        return;
    }

    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    for (number, start, size) in kernel {
        let file = partition_file(&device, number);
        assert_eq!(
            fs::metadata(&file).unwrap().len(),
            size,
            "size of p{number}"
        );
        let listed = sandbox.list()[0]["partitions"].as_array().unwrap().clone();
        let entry = listed.iter().find(|p| p["number"] == number).unwrap();
        assert_eq!(
            entry["start"].as_u64().unwrap(),
            start,
            "start of p{number}"
        );
    }
    sandbox.detach(&device);
}

/// `(number, start, size)` in bytes of the kernel's partitions of `loop_name`, from sysfs.
fn kernel_partitions(loop_name: &str) -> Vec<(u32, u64, u64)> {
    let mut partitions = Vec::new();
    for number in 1..=16u32 {
        let directory = PathBuf::from(format!("/sys/class/block/{loop_name}p{number}"));
        let read = |field: &str| -> Option<u64> {
            fs::read_to_string(directory.join(field))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        if let (Some(start), Some(size)) = (read("start"), read("size")) {
            partitions.push((number, start * 512, size * 512));
        }
    }
    partitions
}

#[test]
fn open_partition_survives_rescan() {
    let Some(sandbox) = Sandbox::new("open_partition_survives_rescan", &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 32 * MIB);
    sfdisk(&image, "label: dos\n2048,4M,83\n16384,4M,83\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let p1 = partition_file(&device, 1);
    let p2 = partition_file(&device, 2);
    let inode_before = fs::metadata(&p1).unwrap().ino();

    // p1 stays where it is; p2 moves, while both are open.
    let first = File::open(&p1).unwrap();
    let second = File::open(&p2).unwrap();
    sfdisk(&device, "label: dos\n2048,4M,83\n24576,2M,83\n");

    assert_eq!(
        fs::metadata(&p1).unwrap().ino(),
        inode_before,
        "unchanged p1 keeps its inode"
    );
    assert_eq!(fs::metadata(&p2).unwrap().len(), 2 * MIB);
    // fstat looks the file up by inode, and the replaced p2 must still resolve for its open file.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(first.metadata().unwrap().len(), 4 * MIB);
    assert_eq!(second.metadata().unwrap().len(), 4 * MIB);

    drop((first, second));
    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn sfdisk_partition_names_resolve() {
    let Some(sandbox) = Sandbox::new("sfdisk_partition_names_resolve", &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 16 * MIB);
    sfdisk(&image, "label: dos\n,4M,83\n,4M,83\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);

    // sfdisk and fdisk print "disk1", losetup scripts use "diskp1"; both name p1.
    for name in ["p2", "diskp2", "disk2"] {
        let size = fs::metadata(device.with_file_name(name)).map(|m| m.len());
        assert_eq!(size.ok(), Some(4 * MIB), "{name}");
    }
    assert!(fs::metadata(device.with_file_name("disk3")).is_err());

    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn rescan_command_drops_stale_cache() {
    let Some(sandbox) = Sandbox::new("rescan_command_drops_stale_cache", &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 16 * MIB);
    sfdisk(&image, "label: dos\n,4M,83\n");
    let device = sandbox.attach(["-P".as_ref(), image.as_os_str()]);
    let mut before = vec![0u8; 512];
    File::open(&device)
        .unwrap()
        .read_exact_at(&mut before, 0)
        .unwrap();

    // A new table written straight into the image, then a rescan: disk reads the new bytes.
    sfdisk(&image, "label: dos\n,2M,83\n,2M,83\n");
    let output = sandbox.run(["rescan", "loop0"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let mut after = vec![0u8; 512];
    File::open(&device)
        .unwrap()
        .read_exact_at(&mut after, 0)
        .unwrap();
    assert!(
        after[..] == fs::read(&image).unwrap()[..512],
        "disk still shows the old table"
    );
    assert!(after != before);
    assert_eq!(
        fs::metadata(partition_file(&device, 2)).unwrap().len(),
        2 * MIB
    );

    sandbox.detach(&device);
    sandbox.assert_clean();
}
