//! The layout of an overlay file and the encoding of its header.
//!
//! ```text
//! 0x0000       header (4 KiB): magic, version, block size, flags, base identity, digest
//! 0x1000       block map: one byte per block of the base, see `super::map::BlockState`
//! data_offset  data area, aligned to the block size: byte N of the device is at
//!              data_offset + N, so the file is as long as the base plus this prefix
//! ```
//!
//! Integers are little-endian. The header ends with a SHA-256 of the bytes before it, so a
//! torn or foreign header is rejected instead of being half trusted.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::OverlayError;
use super::identity::{BaseIdentity, FileIdentity};

/// Bytes 0..16 of every overlay file.
pub const MAGIC: &[u8; 16] = b"loopfuse overlay";
/// Version written at byte 16; bumped on any change of this layout.
pub const VERSION: u32 = 1;
/// Bytes reserved for the header; the block map starts here.
pub const HEADER_LEN: u64 = 4096;
/// Block size of new overlays: the unit of copy-on-write, as qcow2's default cluster size.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;

/// Smallest and largest block sizes accepted from a header; powers of two only.
const MIN_BLOCK_SIZE: u32 = 4096;
const MAX_BLOCK_SIZE: u32 = 16 << 20;

/// Bit of the flags field (byte 24) set while `commit` is writing the overlay into its base.
const FLAG_COMMITTING: u32 = 1;

/// Bytes covered by the header digest; the digest is stored right after them.
const DIGEST_OFFSET: usize = 136;

/// Offsets and sizes of the parts of an overlay file, derived from the base size and the
/// block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub block_size: u64,
    pub base_len: u64,
    pub block_count: u64,
    pub map_offset: u64,
    pub data_offset: u64,
}

impl Layout {
    pub fn new(base_len: u64, block_size: u32) -> Self {
        let block_size = u64::from(block_size);
        let block_count = base_len.div_ceil(block_size);
        let map_offset = HEADER_LEN;
        let data_offset = (map_offset + block_count).div_ceil(block_size) * block_size;

        Self {
            block_size,
            base_len,
            block_count,
            map_offset,
            data_offset,
        }
    }

    /// Length of the overlay file: the data area ends where the base does.
    pub fn file_len(&self) -> u64 {
        self.data_offset + self.base_len
    }

    /// Byte range `(start, end)` of `block` in the device.
    pub fn block_range(&self, block: u64) -> (u64, u64) {
        let start = block * self.block_size;
        (start, (start + self.block_size).min(self.base_len))
    }
}

/// The decoded header of an overlay file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub block_size: u32,
    pub base: BaseIdentity,
    /// Set while a commit is writing into the base, which is then partly updated.
    pub committing: bool,
}

impl Header {
    pub fn layout(&self) -> Layout {
        Layout::new(self.base.len, self.block_size)
    }

    /// Encodes the header as the first [`HEADER_LEN`] bytes of an overlay file.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_LEN as usize];
        let file = &self.base.file;
        let flags = if self.committing { FLAG_COMMITTING } else { 0 };

        bytes[0..16].copy_from_slice(MAGIC);
        bytes[16..20].copy_from_slice(&VERSION.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.block_size.to_le_bytes());
        bytes[24..28].copy_from_slice(&flags.to_le_bytes());
        // Bytes 28..32 are reserved and zero.
        bytes[32..40].copy_from_slice(&self.base.len.to_le_bytes());
        bytes[40..48].copy_from_slice(&file.device.to_le_bytes());
        bytes[48..56].copy_from_slice(&file.inode.to_le_bytes());
        bytes[56..64].copy_from_slice(&file.mtime_sec.to_le_bytes());
        bytes[64..68].copy_from_slice(&file.mtime_nsec.to_le_bytes());
        // Bytes 68..72 are reserved and zero.
        bytes[72..104].copy_from_slice(&self.base.head);
        bytes[104..136].copy_from_slice(&self.base.tail);
        let digest: [u8; 32] = Sha256::digest(&bytes[..DIGEST_OFFSET]).into();
        bytes[DIGEST_OFFSET..DIGEST_OFFSET + 32].copy_from_slice(&digest);

        bytes
    }

    /// Decodes and checks the header of the overlay file at `path` from its first bytes.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self, OverlayError> {
        let bad = |field: &'static str, found: String, expected: String| OverlayError::BadHeader {
            path: path.to_path_buf(),
            field,
            found,
            expected,
        };
        if bytes.len() < HEADER_LEN as usize && bytes.starts_with(MAGIC) {
            return Err(OverlayError::Truncated {
                path: path.to_path_buf(),
                len: bytes.len() as u64,
                header_len: HEADER_LEN,
            });
        }
        if bytes.len() < HEADER_LEN as usize || &bytes[0..16] != MAGIC {
            let found = &bytes[..bytes.len().min(16)];
            return Err(OverlayError::NotAnOverlay {
                path: path.to_path_buf(),
                found: found
                    .iter()
                    .map(|byte| format!("{byte:02x}"))
                    .collect::<String>(),
                expected: String::from_utf8_lossy(MAGIC).into_owned(),
            });
        }
        let version = u32_at(bytes, 16);
        if version != VERSION {
            return Err(OverlayError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                expected: VERSION,
            });
        }
        let digest: [u8; 32] = Sha256::digest(&bytes[..DIGEST_OFFSET]).into();
        if bytes[DIGEST_OFFSET..DIGEST_OFFSET + 32] != digest {
            return Err(bad(
                "header SHA-256",
                super::identity::hex(&bytes[DIGEST_OFFSET..DIGEST_OFFSET + 32]),
                super::identity::hex(&digest),
            ));
        }

        let block_size = u32_at(bytes, 20);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(bad(
                "block size",
                block_size.to_string(),
                format!("a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"),
            ));
        }
        let flags = u32_at(bytes, 24);
        if flags & !FLAG_COMMITTING != 0 {
            return Err(bad(
                "flags",
                format!("{flags:#x}"),
                format!("{FLAG_COMMITTING:#x} or 0"),
            ));
        }
        let len = u64_at(bytes, 32);
        if len == 0 {
            return Err(bad("base size", "0".into(), "more than 0".into()));
        }

        Ok(Self {
            block_size,
            base: BaseIdentity {
                len,
                head: bytes[72..104].try_into().expect("32 bytes"),
                tail: bytes[104..136].try_into().expect("32 bytes"),
                file: FileIdentity {
                    device: u64_at(bytes, 40),
                    inode: u64_at(bytes, 48),
                    mtime_sec: u64_at(bytes, 56) as i64,
                    mtime_nsec: u32_at(bytes, 64),
                },
            },
            committing: flags & FLAG_COMMITTING != 0,
        })
    }
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"))
}
