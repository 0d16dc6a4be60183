//! The identity of a base image, recorded in an overlay so that it is never applied to
//! another image or to one that changed.
//!
//! Two kinds of facts are recorded. The size and SHA-256 digests of the first and last MiB
//! survive a copy of the image (`cp`, a CI cache restore), and cover the partition tables and
//! most filesystem superblocks, so a mismatch there rejects the overlay. The file's device,
//! inode and modification time do not survive a copy. A change there only earns a warning,
//! because it also happens when the image was copied unchanged.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::OverlayError;
use crate::block::BlockDevice;

/// Bytes hashed at each end of the base.
pub const EDGE_LEN: u64 = 1 << 20;

/// Facts an overlay records about its base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseIdentity {
    /// Size in bytes.
    pub len: u64,
    /// SHA-256 of the first [`EDGE_LEN`] bytes (all of them when the base is smaller).
    pub head: [u8; 32],
    /// SHA-256 of the last [`EDGE_LEN`] bytes.
    pub tail: [u8; 32],
    /// `st_dev`, `st_ino` and modification time of the base file; zero when unknown.
    pub file: FileIdentity,
}

/// The facts about a base file that change when it is copied or modified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileIdentity {
    pub device: u64,
    pub inode: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

impl FileIdentity {
    /// Takes the identity of the file described by `metadata`.
    pub fn of(metadata: &Metadata) -> Self {
        Self {
            device: metadata.dev(),
            inode: metadata.ino(),
            mtime_sec: metadata.mtime(),
            mtime_nsec: metadata.mtime_nsec() as u32,
        }
    }
}

impl BaseIdentity {
    /// Computes the identity of `base`, whose file is described by `file`.
    pub fn of(base: &dyn BlockDevice, file: FileIdentity) -> io::Result<Self> {
        let len = base.len();
        let edge = EDGE_LEN.min(len);

        Ok(Self {
            len,
            head: digest_of(base, 0, edge)?,
            tail: digest_of(base, len - edge, edge)?,
            file,
        })
    }

    /// Checks that `actual` is the base this identity was recorded for.
    ///
    /// Returns whether the file itself differs (device, inode or modification time) although
    /// the size and contents checked match: a copy, or a file touched since.
    pub fn check(
        &self,
        actual: &BaseIdentity,
        overlay: &Path,
        base: &Path,
    ) -> Result<bool, OverlayError> {
        self.check_len(actual.len, overlay, base)?;
        for (region, found, expected) in [
            ("first MiB", &actual.head, &self.head),
            ("last MiB", &actual.tail, &self.tail),
        ] {
            if found != expected {
                return Err(OverlayError::ContentMismatch {
                    path: overlay.to_path_buf(),
                    base: base.to_path_buf(),
                    region,
                    found: hex(found),
                    expected: hex(expected),
                });
            }
        }

        Ok(actual.file != self.file)
    }

    /// Checks only that a base of `len` bytes has the recorded size.
    pub fn check_len(&self, len: u64, overlay: &Path, base: &Path) -> Result<(), OverlayError> {
        if len != self.len {
            return Err(OverlayError::SizeMismatch {
                path: overlay.to_path_buf(),
                base: base.to_path_buf(),
                found: len,
                expected: self.len,
            });
        }
        Ok(())
    }
}

/// SHA-256 of `len` bytes of `device` at `offset`, read in 64 KiB pieces.
fn digest_of(device: &dyn BlockDevice, offset: u64, len: u64) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 << 10];
    let mut done = 0;

    while done < len {
        let piece = (len - done).min(buffer.len() as u64) as usize;
        let count = device.read_at(offset + done, &mut buffer[..piece])?;
        if count == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        hasher.update(&buffer[..count]);
        done += count as u64;
    }

    Ok(hasher.finalize().into())
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
