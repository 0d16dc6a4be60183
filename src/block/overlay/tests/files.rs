//! Overlays on real files: creation, reopening, commit, and the checks of the base.

use std::fs;
use std::path::{Path, PathBuf};

use super::pattern;
use crate::block::BlockDevice;
use crate::block::overlay::format::Header;
use crate::block::overlay::{OverlayError, OverlayMode, commit, open_overlay};

const MIB: usize = 1 << 20;

struct Files {
    directory: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            directory: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, bytes).unwrap();
        path
    }
}

/// Writes `data` at `offset` through a new or continued overlay, flushes and closes it.
fn write_through(base: &Path, overlay: &Path, offset: u64, data: &[u8]) {
    let opened = open_overlay(base, overlay, OverlayMode::OpenOrCreate, false).unwrap();
    opened.overlay.write_at(offset, data).unwrap();
    opened.overlay.flush().unwrap();
}

fn read_through(base: &Path, overlay: &Path) -> Vec<u8> {
    let opened = open_overlay(base, overlay, OverlayMode::OpenOrCreate, true).unwrap();
    super::read_all(&opened.overlay)
}

#[test]
fn overlay_file_is_created_then_continued() {
    let files = Files::new();
    let original = pattern(3 * MIB, 1);
    let base = files.write("base.img", &original);
    let overlay = files.path("changes.overlay");

    write_through(&base, &overlay, 5, b"first");
    write_through(&base, &overlay, 2 * MIB as u64, b"second");

    let mut expected = original.clone();
    expected[5..10].copy_from_slice(b"first");
    expected[2 * MIB..2 * MIB + 6].copy_from_slice(b"second");
    assert_eq!(read_through(&base, &overlay), expected);
    assert_eq!(fs::read(&base).unwrap(), original, "base changed");
}

#[test]
fn overlay_over_base_hole_stays_sparse() {
    let files = Files::new();
    let base = files.path("sparse.img");
    fs::File::create(&base)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let overlay = files.path("sparse.overlay");

    write_through(&base, &overlay, 32 * MIB as u64 + 4096, &[0xab; 4096]);

    let opened = open_overlay(&base, &overlay, OverlayMode::OpenOrCreate, true).unwrap();
    let device = &opened.overlay;
    assert_eq!(device.seek_data(0).unwrap(), 32 * MIB as u64 + 4096);
    assert_eq!(
        device.seek_hole(32 * MIB as u64 + 4096).unwrap(),
        32 * MIB as u64 + 8192
    );
    // One page of data, not the whole 64 KiB block, is allocated for the device.
    assert_eq!(device.allocated_sectors().unwrap(), 8);
}

#[test]
fn overlay_snapshot_mode_starts_empty() {
    let files = Files::new();
    let original = pattern(MIB, 2);
    let base = files.write("base.img", &original);
    let overlay = files.path("snapshot.overlay");
    write_through(&base, &overlay, 0, b"old run");

    let opened = open_overlay(&base, &overlay, OverlayMode::Replace, false).unwrap();

    assert!(opened.created);
    assert_eq!(super::read_all(&opened.overlay), original);
}

#[test]
fn overlay_on_copied_base_is_accepted_and_reported() {
    let files = Files::new();
    let base = files.write("base.img", &pattern(2 * MIB, 3));
    let overlay = files.path("changes.overlay");
    write_through(&base, &overlay, 0, b"data");
    let copy = files.path("copy.img");
    fs::copy(&base, &copy).unwrap();

    let opened = open_overlay(&copy, &overlay, OverlayMode::OpenOrCreate, false).unwrap();

    assert!(opened.base_file_differs);
    let mut head = [0u8; 4];
    opened.overlay.read_at(0, &mut head).unwrap();
    assert_eq!(&head, b"data");
}

#[test]
fn commit_writes_overlay_into_base_and_empties_it() {
    let files = Files::new();
    let original = pattern(3 * MIB, 4);
    let base = files.write("base.img", &original);
    let overlay = files.path("changes.overlay");
    let opened = open_overlay(&base, &overlay, OverlayMode::OpenOrCreate, false).unwrap();
    opened.overlay.write_at(1000, b"committed").unwrap();
    opened.overlay.discard(MIB as u64, MIB as u64).unwrap();
    opened.overlay.flush().unwrap();
    let expected = super::read_all(&opened.overlay);
    drop(opened);

    let mut calls = Vec::new();
    let report = commit(&overlay, &base, &mut |done, total| {
        calls.push((done, total))
    })
    .unwrap();

    assert_eq!(fs::read(&base).unwrap(), expected);
    assert_eq!(report.zeroed, MIB as u64);
    assert!(report.copied >= 9);
    assert_eq!(calls.last().map(|&(done, total)| done == total), Some(true));
    // The emptied overlay fits the updated base and shows it unchanged.
    assert_eq!(read_through(&base, &overlay), expected);
}

#[test]
fn commit_rejects_image_of_other_size_or_content() {
    let files = Files::new();
    let base = files.write("base.img", &pattern(2 * MIB, 5));
    let overlay = files.path("changes.overlay");
    write_through(&base, &overlay, 0, b"data");
    let bigger = files.write("bigger.img", &pattern(3 * MIB, 5));
    let other = files.write("other.img", &pattern(2 * MIB, 6));

    let error = commit(&overlay, &bigger, &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(error, OverlayError::SizeMismatch { .. }),
        "{error}"
    );
    let error = commit(&overlay, &other, &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(error, OverlayError::ContentMismatch { .. }),
        "{error}"
    );

    assert_eq!(fs::read(&other).unwrap(), pattern(2 * MIB, 6));
}

#[test]
fn interrupted_commit_blocks_attach_until_finished() {
    let files = Files::new();
    let base = files.write("base.img", &pattern(2 * MIB, 7));
    let overlay = files.path("changes.overlay");
    write_through(&base, &overlay, MIB as u64, b"late");
    // Mark the header as a commit that stopped after changing the base's first MiB.
    let mut bytes = fs::read(&overlay).unwrap();
    let mut header = Header::decode(&bytes, &overlay).unwrap();
    header.committing = true;
    bytes[..4096].copy_from_slice(&header.encode());
    fs::write(&overlay, &bytes).unwrap();
    let mut image = fs::read(&base).unwrap();
    image[0] ^= 0xff;
    fs::write(&base, &image).unwrap();

    let error = open_overlay(&base, &overlay, OverlayMode::OpenOrCreate, false)
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(error, OverlayError::InterruptedCommit { .. }),
        "{error}"
    );

    commit(&overlay, &base, &mut |_, _| {}).unwrap();
    assert_eq!(&fs::read(&base).unwrap()[MIB..MIB + 4], b"late");
    assert!(open_overlay(&base, &overlay, OverlayMode::OpenOrCreate, false).is_ok());
}
