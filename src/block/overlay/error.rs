//! Errors of overlay files. Each names the overlay file, and a rejected value is shown next
//! to the value expected.

use std::io;
use std::path::PathBuf;

use crate::image::ImageError;

/// Errors from creating, opening or committing an overlay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OverlayError {
    #[error(transparent)]
    Image(#[from] ImageError),

    #[error("{}: overlay file not found (attach with '--overlay {}' to create it)", path.display(), path.display())]
    NotFound { path: PathBuf },

    #[error("{}: overlay file not found, and a read-only attachment cannot create it (attach once without -r to create it)", path.display())]
    NotFoundReadOnly { path: PathBuf },

    #[error("{}: the overlay and the image are the same file; give the overlay a path of its own", path.display())]
    SameFile { path: PathBuf },

    #[error("{}: cannot create the overlay file (does its directory exist and is it writable?)", path.display())]
    Create { path: PathBuf, source: io::Error },

    #[error("{}: {operation} failed", path.display())]
    Io {
        path: PathBuf,
        operation: &'static str,
        source: io::Error,
    },

    #[error("{}: not a loopfuse overlay (first bytes {found}, expected \"{expected}\")", path.display())]
    NotAnOverlay {
        path: PathBuf,
        found: String,
        expected: String,
    },

    #[error("{}: overlay file is cut short: {len} bytes, where its header alone takes {header_len}; it cannot be used, so restore it from a copy or start a new overlay", path.display())]
    Truncated {
        path: PathBuf,
        len: u64,
        header_len: u64,
    },

    #[error("{}: overlay file is empty, so it holds no changes to commit", path.display())]
    EmptyOverlay { path: PathBuf },

    #[error("{}: overlay format version {found} is not supported (expected {expected})", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },

    #[error("{}: invalid overlay header: {field} is {found}, expected {expected}; the overlay is damaged, so restore it from a copy or start a new overlay", path.display())]
    BadHeader {
        path: PathBuf,
        field: &'static str,
        found: String,
        expected: String,
    },

    #[error("{}: block map entry {block} (at {offset:#x}) is {found:#04x}, expected 0x00, 0x01 or 0x02", path.display())]
    BadMapEntry {
        path: PathBuf,
        block: u64,
        offset: u64,
        found: u8,
    },

    #[error("{}: made for a base image of {expected} bytes, but {} has {found} bytes; use the image it was made for, or another overlay", path.display(), base.display())]
    SizeMismatch {
        path: PathBuf,
        base: PathBuf,
        found: u64,
        expected: u64,
    },

    #[error("{}: made for another image: the {region} of {} has SHA-256 {found}, expected {expected}; use the image it was made for, or another overlay", path.display(), base.display())]
    ContentMismatch {
        path: PathBuf,
        base: PathBuf,
        region: &'static str,
        found: String,
        expected: String,
    },

    #[error("{}: writing the overlay into it failed, so the image is partly updated; fix the cause below (free space, for example), then run 'loopfuse commit {} {}' again to finish it", base.display(), path.display(), base.display())]
    CommitFailed {
        path: PathBuf,
        base: PathBuf,
        source: io::Error,
    },

    #[error("{}: a commit into {} was interrupted, so the image is partly updated; run 'loopfuse commit {} {}' again to finish it", path.display(), base.display(), path.display(), base.display())]
    InterruptedCommit { path: PathBuf, base: PathBuf },
}

impl OverlayError {
    /// Wraps an I/O error of `operation` on the overlay file at `path`.
    pub fn io(path: &std::path::Path, operation: &'static str, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            operation,
            source,
        }
    }
}
