//! Copy-on-write overlays. `attach --overlay` and `--snapshot` never change the image. An
//! overlay shows the same bytes as writing to a copy of the image and keeps every fsynced
//! write when its daemon is killed, and `commit` folds it into the image it was made for.

mod common;

use std::fs::{self, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Sandbox, assert_chunks_intact, is_root, pattern, sandbox_with_small_tmpfs, seeded_fio_writes,
    sfdisk, sha256, wait_until, write_until_full,
};
use nix::fcntl::{FallocateFlags, fallocate};

const MIB: u64 = 1 << 20;

/// Creates a 64 MiB sparse image with patterned data in its first and last MiB and in a few
/// places between.
fn base_image(sandbox: &Sandbox, name: &str, seed: u64) -> std::path::PathBuf {
    let image = sandbox.sparse_image(name, 64 * MIB);
    let file = OpenOptions::new().write(true).open(&image).unwrap();
    for (index, offset) in [0, 5 * MIB, 20 * MIB + 4096, 63 * MIB]
        .into_iter()
        .enumerate()
    {
        file.write_all_at(&pattern(MIB as usize, seed + index as u64), offset)
            .unwrap();
    }
    image
}

/// Kills the daemon of `name` with SIGKILL and waits until `list` shows it stale.
fn kill_daemon(sandbox: &Sandbox, name: &str) {
    let pid = sandbox.daemon_pid(name);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(
        Duration::from_secs(5),
        || sandbox.list()[0]["state"] == "stale"
    ));
}

fn overlay_args<'a>(overlay: &'a Path, image: &'a Path) -> [&'a std::ffi::OsStr; 3] {
    ["--overlay".as_ref(), overlay.as_os_str(), image.as_os_str()]
}

#[test]
fn overlay_matches_direct_fio_writes() {
    let Some(sandbox) = Sandbox::new("overlay_matches_direct_fio_writes", &["fio"]) else {
        return;
    };
    let image = base_image(&sandbox, "base.img", 1);
    let copy = sandbox.path("copy.img");
    fs::copy(&image, &copy).unwrap();
    let before = sha256(&image);
    let overlay = sandbox.path("changes.overlay");

    let device = sandbox.attach([&copy]);
    seeded_fio_writes(&device);
    sandbox.detach(&device);

    let device = sandbox.attach(overlay_args(&overlay, &image));
    assert_eq!(sandbox.list()[0]["overlay"], overlay.to_str().unwrap());
    seeded_fio_writes(&device);
    assert_eq!(sha256(&device), sha256(&copy), "overlay view differs");
    sandbox.detach(&device);

    assert_eq!(sha256(&image), before, "image changed");
    let device = sandbox.attach(overlay_args(&overlay, &image));
    assert_eq!(sha256(&device), sha256(&copy), "reattached overlay differs");
    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn overlay_keeps_fsynced_writes_after_kill() {
    let Some(sandbox) = Sandbox::new("overlay_keeps_fsynced_writes_after_kill", &[]) else {
        return;
    };
    let image = base_image(&sandbox, "base.img", 2);
    let before = sha256(&image);
    let overlay = sandbox.path("changes.overlay");
    let first = pattern(3 * MIB as usize, 20);
    let second = pattern(100_000, 21);

    let device = sandbox.attach(overlay_args(&overlay, &image));
    let file = OpenOptions::new().write(true).open(&device).unwrap();
    file.write_all_at(&first, 4 * MIB + 512).unwrap();
    file.write_all_at(&second, 40 * MIB + 3).unwrap();
    file.sync_all().unwrap();
    // Written after the last fsync: may or may not survive the kill.
    file.write_all_at(b"unsynced", 30 * MIB).unwrap();
    kill_daemon(&sandbox, "loop0");
    drop(file);
    sandbox.detach("loop0");

    let device = sandbox.attach(overlay_args(&overlay, &image));
    let reader = fs::File::open(&device).unwrap();
    let mut buffer = vec![0u8; first.len()];
    reader.read_exact_at(&mut buffer, 4 * MIB + 512).unwrap();
    assert!(buffer == first, "first fsynced write lost");
    let mut buffer = vec![0u8; second.len()];
    reader.read_exact_at(&mut buffer, 40 * MIB + 3).unwrap();
    assert!(buffer == second, "second fsynced write lost");
    drop(reader);
    let seen = sha256(&device);
    sandbox.detach(&device);
    assert_eq!(sha256(&image), before, "image changed");

    let output = sandbox.run(["commit".as_ref(), overlay.as_os_str(), image.as_os_str()]);
    assert!(
        output.status.success(),
        "commit failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(sha256(&image), seen, "commit wrote other bytes");
    sandbox.assert_clean();
}

/// Attaches a new overlay `changes.overlay` over `base.img` (filled from `seed`) and writes
/// a few bytes through it; returns the image, the overlay and the device.
fn attach_changed_overlay(sandbox: &Sandbox, seed: u64) -> (PathBuf, PathBuf, PathBuf) {
    let image = base_image(sandbox, "base.img", seed);
    let overlay = sandbox.path("changes.overlay");
    let device = sandbox.attach(overlay_args(&overlay, &image));
    OpenOptions::new()
        .write(true)
        .open(&device)
        .unwrap()
        .write_all_at(b"change", MIB)
        .unwrap();
    (image, overlay, device)
}

#[test]
fn commit_rejects_other_image_or_size() {
    let Some(sandbox) = Sandbox::new("commit_rejects_other_image_or_size", &[]) else {
        return;
    };
    let (_image, overlay, device) = attach_changed_overlay(&sandbox, 3);
    sandbox.detach(&device);

    let other = base_image(&sandbox, "other.img", 30);
    let bigger = sandbox.sparse_image("bigger.img", 65 * MIB);
    let cases = [
        (&other, "made for another image"),
        (&bigger, "made for a base image of 67108864 bytes"),
    ];
    for (target, expected) in cases {
        let before = sha256(target);
        let output = sandbox.run(["commit".as_ref(), overlay.as_os_str(), target.as_os_str()]);
        let message = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{message}");
        assert!(message.contains(expected), "{message}");
        assert!(message.contains(overlay.to_str().unwrap()), "{message}");
        assert_eq!(sha256(target), before, "rejected target changed");
    }

    // Attaching the overlay over the other image is rejected the same way.
    let output = sandbox.run([
        "attach".as_ref(),
        "--overlay".as_ref(),
        overlay.as_os_str(),
        other.as_os_str(),
    ]);
    let message = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains("made for another image"), "{message}");
    sandbox.assert_clean();
}

#[test]
fn commit_of_attached_files_names_attachment() {
    let Some(sandbox) = Sandbox::new("commit_of_attached_files_names_attachment", &[]) else {
        return;
    };
    let (image, overlay, device) = attach_changed_overlay(&sandbox, 5);
    let image_before = sha256(&image);

    let output = sandbox.run(["commit".as_ref(), overlay.as_os_str(), image.as_os_str()]);
    let message = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(
        message.contains("as loop0"),
        "names the attachment: {message}"
    );
    assert!(
        message.contains("loopfuse detach loop0"),
        "says how to free it: {message}"
    );
    // Through a symbolic link to the overlay too.
    let link = sandbox.path("link.overlay");
    std::os::unix::fs::symlink(&overlay, &link).unwrap();
    let other = sandbox.sparse_image("other.img", MIB);
    let output = sandbox.run(["commit".as_ref(), link.as_os_str(), other.as_os_str()]);
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("as loop0"),
        "names the attachment: {message}"
    );
    assert_eq!(sha256(&image), image_before, "image changed");

    sandbox.detach(&device);
    sandbox.assert_clean();
}

/// Runs loopfuse with `args`, which must fail with exit status 1 and a message containing
/// `expected`, leaving nothing attached.
fn assert_rejected(sandbox: &Sandbox, args: &[&std::ffi::OsStr], expected: &str) {
    let output = sandbox.run(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    sandbox.assert_clean();
}

#[test]
fn damaged_overlays_are_explained() {
    let Some(sandbox) = Sandbox::new("damaged_overlays_are_explained", &[]) else {
        return;
    };
    let (image, overlay, device) = attach_changed_overlay(&sandbox, 7);
    sandbox.detach(&device);
    let image_before = sha256(&image);
    let attach = "attach".as_ref();
    let commit = "commit".as_ref();
    let with_overlay = "--overlay".as_ref();

    let cut = sandbox.image_with("cut.overlay", &fs::read(&overlay).unwrap()[..100]);
    let args = [attach, with_overlay, cut.as_os_str(), image.as_os_str()];
    assert_rejected(&sandbox, &args, "overlay file is cut short: 100 bytes");
    let empty = sandbox.image_with("empty.overlay", &[]);
    let args = [commit, empty.as_os_str(), image.as_os_str()];
    assert_rejected(&sandbox, &args, "overlay file is empty");
    let args = [commit, image.as_os_str(), overlay.as_os_str()];
    assert_rejected(&sandbox, &args, "the overlay comes first");
    // Cut past its header, an overlay's missing blocks would be committed as zeros.
    let short = sandbox.image_with("short.overlay", &fs::read(&overlay).unwrap()[..70000]);
    let args = [commit, short.as_os_str(), image.as_os_str()];
    assert_rejected(&sandbox, &args, "the overlay is damaged");
    let linked = sandbox.path("linked.img");
    fs::hard_link(&image, &linked).unwrap();
    let args = [attach, with_overlay, linked.as_os_str(), image.as_os_str()];
    assert_rejected(&sandbox, &args, "the same file");

    assert_eq!(sha256(&image), image_before, "image changed");
}

/// A block device cannot tell data from holes (`SEEK_DATA` fails with EINVAL), so an
/// overlay over one copies every block it first writes to in part.
#[test]
fn overlay_over_block_device_takes_small_writes() {
    let test = "overlay_over_block_device_takes_small_writes";
    let Some(sandbox) = Sandbox::new(test, &["losetup"]) else {
        return;
    };
    if !is_root() || !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP {test}: the kernel loop driver needs root and /dev/loop-control");
        return;
    }
    let image = base_image(&sandbox, "base.img", 11);
    let before = sha256(&image);
    let base = common::kernel_loop(&image);
    let overlay = sandbox.path("changes.overlay");
    let device = sandbox.attach(overlay_args(&overlay, Path::new(&base.0)));

    let change = pattern(4096, 12);
    let file = OpenOptions::new().write(true).open(&device).unwrap();
    file.write_all_at(&change, 4096).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let mut expected = fs::read(&image).unwrap();
    expected[4096..8192].copy_from_slice(&change);
    assert!(
        fs::read(&device).unwrap() == expected,
        "device bytes differ"
    );

    sandbox.detach(&device);
    drop(base);
    assert_eq!(sha256(&image), before, "base changed");
    sandbox.assert_clean();
}

#[test]
fn snapshot_leaves_nothing_after_detach() {
    let Some(sandbox) = Sandbox::new("snapshot_leaves_nothing_after_detach", &[]) else {
        return;
    };
    let image = base_image(&sandbox, "base.img", 4);
    let before = sha256(&image);

    let device = sandbox.attach(["--snapshot".as_ref(), image.as_os_str()]);
    let entry = sandbox.list()[0].clone();
    assert_eq!(entry["snapshot"], true);
    let snapshot = entry["overlay"].as_str().unwrap().to_string();
    assert!(
        snapshot.starts_with(sandbox.registry().to_str().unwrap()),
        "{snapshot}"
    );
    let file = OpenOptions::new().write(true).open(&device).unwrap();
    file.write_all_at(&pattern(2 * MIB as usize, 40), 10 * MIB)
        .unwrap();
    file.sync_all().unwrap();
    drop(file);
    sandbox.detach(&device);

    assert!(
        !Path::new(&snapshot).exists(),
        "snapshot overlay left behind"
    );
    assert_eq!(sha256(&image), before, "image changed");
    let leftovers: Vec<_> = fs::read_dir(sandbox.registry()).unwrap().collect();
    assert_eq!(leftovers.len(), 0, "registry not empty: {leftovers:?}");
    sandbox.assert_clean();
}

#[test]
fn overlay_punch_through_partition_reads_zeroes() {
    let test = "overlay_punch_through_partition_reads_zeroes";
    let Some(sandbox) = Sandbox::new(test, &["sfdisk"]) else {
        return;
    };
    let image = sandbox.image_with("disk.img", &pattern(32 * MIB as usize, 5));
    sfdisk(&image, "label: dos\n,8M\n,,\n");
    let before = sha256(&image);
    let overlay = sandbox.path("changes.overlay");

    let device = sandbox.attach([
        "-P".as_ref(),
        "--overlay".as_ref(),
        overlay.as_os_str(),
        image.as_os_str(),
    ]);
    let p2_start = sandbox.list()[0]["partitions"][1]["start"]
        .as_u64()
        .unwrap();
    let p2 = OpenOptions::new()
        .write(true)
        .open(device.with_file_name("p2"))
        .unwrap();
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(p2.as_fd(), punch, (MIB + 1024) as i64, (3 * MIB) as i64).unwrap();
    p2.sync_all().unwrap();
    drop(p2);

    let mut expected = fs::read(&image).unwrap();
    let start = (p2_start + MIB + 1024) as usize;
    expected[start..start + 3 * MIB as usize].fill(0);
    let seen = fs::read(&device).unwrap();
    let differing = seen.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(differing, None, "first differing byte of disk");
    sandbox.detach(&device);

    assert_eq!(sha256(&image), before, "image changed");
    sandbox.assert_clean();
}

#[test]
fn overlay_under_offset_window_writes_window() {
    let Some(sandbox) = Sandbox::new("overlay_under_offset_window_writes_window", &[]) else {
        return;
    };
    let original = pattern(8 * MIB as usize, 6);
    let image = sandbox.image_with("disk.img", &original);
    let overlay = sandbox.path("changes.overlay");
    let data = pattern(2 * MIB as usize, 7);

    let device = sandbox.attach([
        "--offset".as_ref(),
        "1MiB".as_ref(),
        "--sizelimit".as_ref(),
        "2MiB".as_ref(),
        "--overlay".as_ref(),
        overlay.as_os_str(),
        image.as_os_str(),
    ]);
    let file = OpenOptions::new().write(true).open(&device).unwrap();
    file.write_all_at(&data, 0).unwrap();
    let error = file.write_at(b"beyond", 2 * MIB).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
    file.sync_all().unwrap();
    drop(file);
    sandbox.detach(&device);
    assert!(fs::read(&image).unwrap() == original, "image changed");

    // The overlay covers the whole image: seen whole, only the window's bytes differ.
    let device = sandbox.attach([
        "-r".as_ref(),
        "--overlay".as_ref(),
        overlay.as_os_str(),
        image.as_os_str(),
    ]);
    let mut expected = original.clone();
    expected[MIB as usize..3 * MIB as usize].copy_from_slice(&data);
    assert!(
        fs::read(&device).unwrap() == expected,
        "overlay view differs"
    );
    sandbox.detach(&device);
    sandbox.assert_clean();
}

/// Blocks written before the overlay's filesystem filled up survive detach and attach,
/// although the block map is first written when no space is left.
#[test]
fn overlay_full_before_first_flush_keeps_blocks() {
    let test = "overlay_full_before_first_flush_keeps_blocks";
    let Some((sandbox, small, _tmpfs)) = sandbox_with_small_tmpfs(test, &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    let overlay = small.join("changes.overlay");
    let device = sandbox.attach(overlay_args(&overlay, &image));

    // Small writes fill the filesystem to its last page, and no fsync comes in between,
    // so the block map is first written at detach.
    let file = OpenOptions::new().write(true).open(&device).unwrap();
    let data = pattern(16 * MIB as usize, 9);
    let mut written = 0;
    for piece in data.chunks(4096) {
        match file.write_all_at(piece, written) {
            Ok(()) => written += piece.len() as u64,
            Err(error) => {
                assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
                break;
            }
        }
    }
    assert!(written > 0, "nothing was written");
    assert!(written < 16 * MIB, "the filesystem never filled up");
    drop(file);
    sandbox.detach(&device);

    let device = sandbox.attach(overlay_args(&overlay, &image));
    let mut read_back = vec![0u8; written as usize];
    fs::File::open(&device)
        .unwrap()
        .read_exact_at(&mut read_back, 0)
        .unwrap();
    assert!(
        read_back[..] == data[..written as usize],
        "blocks written before the filesystem filled up were lost"
    );
    sandbox.detach(&device);
    sandbox.assert_clean();
}

/// An overlay that cannot be created on a full filesystem leaves no file behind, so the
/// same command works once there is space again.
#[test]
fn overlay_not_created_on_full_filesystem() {
    let test = "overlay_not_created_on_full_filesystem";
    let Some((sandbox, small, _tmpfs)) = sandbox_with_small_tmpfs(test, &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    let filler = small.join("filler");
    let _ = fs::write(&filler, vec![1u8; 8 * MIB as usize]);
    let overlay = small.join("changes.overlay");

    let mut command = sandbox.loopfuse(["attach"]);
    let output = command
        .args(overlay_args(&overlay, &image))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left"), "{stderr}");
    assert!(!overlay.exists(), "a file without a header was left behind");
    sandbox.assert_clean();

    fs::remove_file(&filler).unwrap();
    let device = sandbox.attach(overlay_args(&overlay, &image));
    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn overlay_on_full_filesystem_answers_enospc() {
    let test = "overlay_on_full_filesystem_answers_enospc";
    let Some((sandbox, small, _tmpfs)) = sandbox_with_small_tmpfs(test, &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    let overlay = small.join("changes.overlay");
    let device = sandbox.attach(overlay_args(&overlay, &image));

    let (chunk, written) = write_until_full(&device);

    assert_eq!(sandbox.list()[0]["state"], "attached");
    assert_chunks_intact(&device, &chunk, &written);
    sandbox.detach(&device);
    sandbox.assert_clean();
}

/// Regression: commit stored through the image's mapping, and after the image had been read
/// the filesystem allocated whole cached folios around the written pages: a sparse image
/// took several times the space of the same writes made directly.
#[test]
fn commit_keeps_sparse_image_sparse() {
    let Some(sandbox) = Sandbox::new("commit_keeps_sparse_image_sparse", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 256 * MIB);
    let direct = sandbox.sparse_image("direct.img", 256 * MIB);
    let overlay = sandbox.path("disk.overlay");
    let device = sandbox.attach(overlay_args(&overlay, &image));

    // 4096 scattered 4 KiB writes, the same through the overlay and to a plain copy.
    let offsets: Vec<u64> = pattern(4096 * 2, 77)
        .chunks(2)
        .map(|pair| u64::from(u16::from_le_bytes([pair[0], pair[1]])) * 4096)
        .collect();
    for target in [&device, &direct] {
        let file = OpenOptions::new().write(true).open(target).unwrap();
        for offset in &offsets {
            file.write_all_at(&[0xa5; 4096], *offset).unwrap();
        }
        file.sync_all().unwrap();
    }
    sandbox.detach(&device);
    // Reading the holes of the image caches them as large folios.
    fs::read(&image).unwrap();

    let output = sandbox.run(["commit".as_ref(), overlay.as_os_str(), image.as_os_str()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    assert!(
        fs::read(&image).unwrap() == fs::read(&direct).unwrap(),
        "contents differ"
    );
    let allocated = fs::metadata(&image).unwrap().blocks() * 512;
    let expected = fs::metadata(&direct).unwrap().blocks() * 512;
    assert!(
        allocated <= expected + expected / 10,
        "commit allocated {allocated} bytes, direct writes {expected}"
    );
    sandbox.assert_clean();
}
