//! Partition tables (MBR and GPT) read from a block device.
//!
//! [`scan`] reads the tables at the start (and, for GPT, the end) of a device and returns its
//! partitions as byte ranges, numbered and sized as the Linux kernel numbers and sizes
//! `/dev/loopNpM`. The kernel's own parser (`block/partitions/msdos.c`, `efi.c` and `core.c`)
//! is the reference. Where this module departs from it, a comment at that spot explains why.
//!
//! This module only reads, and it does not depend on FUSE, the mapping or the command line.
//! It is not given the image path either, so callers add the path when they log or report.
//! It logs at `debug` and `trace` only, and returns what a user should see as
//! [`PartitionWarning`]s.
#![forbid(unsafe_code)]

mod crc32;
mod gpt;
mod mbr;
mod warning;

use std::fmt;
use std::io;

use crate::block::BlockDevice;

pub use gpt::{GptHeaderError, GptProblem, check_sector_size};
pub use mbr::is_extended_type;
pub use warning::{EbrStop, PartitionWarning};

/// The highest partition number the kernel creates. It reserves 256 minors per disk
/// (`DISK_MAX_PARTS`), and minor 0 is the whole disk.
pub const MAX_PARTITION_NUMBER: u32 = 255;

/// Smallest and largest accepted logical sector size in bytes.
const MIN_SECTOR_SIZE: u32 = 512;
const MAX_SECTOR_SIZE: u32 = 65536;

/// The kernel measures a disk's capacity in 512-byte units, whatever its logical sector size,
/// and cuts partitions at that capacity.
const KERNEL_SECTOR_SIZE: u64 = 512;

/// The MBR occupies the first 512 bytes of sector 0, whatever the sector size.
const BOOT_SECTOR_LEN: usize = 512;

/// Kind of partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// The DOS partition table: four primary entries in sector 0, plus logical partitions.
    Mbr,
    /// The UEFI GUID partition table, behind a protective or hybrid MBR.
    Gpt,
}

impl fmt::Display for Scheme {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Scheme::Mbr => "MBR",
            Scheme::Gpt => "GPT",
        })
    }
}

/// One partition, as a byte range of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Number of the partition, as in `/dev/loop0p<number>`: 1 to [`MAX_PARTITION_NUMBER`].
    pub number: u32,
    /// Offset of the first byte in the device.
    pub start: u64,
    /// Length in bytes, never 0, and `start + len` never exceeds the device length.
    pub len: u64,
    /// Partition type: `0x83` style for MBR, the type GUID in upper case for GPT.
    pub type_name: String,
    /// GPT partition name, or `None` for MBR partitions and unnamed GPT partitions.
    pub label: Option<String>,
}

impl Partition {
    /// Offset one past the last byte of the partition.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A partition table and the partitions found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    pub scheme: Scheme,
    /// Logical sector size in bytes that the table was read with.
    pub sector_size: u32,
    /// Partitions in ascending order of number. Numbers may have gaps (empty slots).
    pub partitions: Vec<Partition>,
    /// Problems that did not stop the scan, in the order they were found.
    pub warnings: Vec<PartitionWarning>,
}

impl PartitionTable {
    /// Returns the partition with `number`, if the table has one.
    pub fn partition(&self, number: u32) -> Option<&Partition> {
        self.partitions
            .iter()
            .find(|partition| partition.number == number)
    }
}

/// Errors from [`scan`]: I/O failures, and tables that are present but unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PartitionError {
    #[error("sector size {sector_size} is invalid (use a power of two from 512 to 65536)")]
    InvalidSectorSize { sector_size: u32 },

    #[error("read of {len} bytes at {offset:#x} failed")]
    Read {
        offset: u64,
        len: usize,
        source: io::Error,
    },

    #[error("MBR entry {slot} has the GPT type 0xee but starts at LBA {first_lba}, expected LBA 1")]
    ProtectiveMbrNotAtLba1 { slot: u32, first_lba: u32 },

    #[error(
        "the GPT header is where {sector_size}-byte sectors put it, but the disk was read with {scanned}-byte sectors; give '-b {sector_size}'"
    )]
    GptSectorSize { sector_size: u32, scanned: u32 },

    #[error("no valid GPT: primary {primary}, and backup {backup}")]
    NoValidGpt {
        primary: GptHeaderError,
        backup: GptHeaderError,
    },

    #[error("MBR {field} of {sectors} sectors does not fit in a 64-bit byte count")]
    Overflow { field: &'static str, sectors: u64 },
}

/// Reads the partition table of `device`, whose logical sectors are `sector_size` bytes.
///
/// Returns `Ok(None)` when the device contains no partition table: no `0x55AA` boot signature,
/// or a boot sector whose entries have boot indicators other than `0x00` and `0x80` (such as
/// a FAT boot sector). A table that is present but unusable is an error: every GPT header
/// copy is invalid, or a protective MBR entry is malformed. Partitions that start past the
/// end of the device are left out and partitions that run past it are cut short, and a
/// chain of logical partitions that loops ends where it closes, with a warning for each.
///
/// # Limitations
///
/// - Only MBR and GPT are read. Kernels built with the matching options also read BSD
///   disklabels, Solaris and Minix slices and UnixWare tables nested in MBR partitions, and
///   formats such as AIX, Mac, Sun and LDM. Those partitions are not listed here.
/// - A GPT whose primary header is invalid is read from the backup header at the last LBA,
///   with a warning. The kernel does this only when booted with the `gpt` option.
pub fn scan(
    device: &dyn BlockDevice,
    sector_size: u32,
) -> Result<Option<PartitionTable>, PartitionError> {
    if !sector_size.is_power_of_two() || !(MIN_SECTOR_SIZE..=MAX_SECTOR_SIZE).contains(&sector_size)
    {
        return Err(PartitionError::InvalidSectorSize { sector_size });
    }

    let disk = Disk::new(device, sector_size);
    if disk.len < u64::from(sector_size) {
        log::debug!(
            "device of {} bytes is shorter than one {sector_size}-byte sector, so it has no table",
            disk.len
        );
        return Ok(None);
    }

    let sector = disk.read(0, BOOT_SECTOR_LEN)?;
    let Some(boot_sector) = mbr::BootSector::parse(&sector) else {
        log::debug!("sector 0 has no 0x55AA boot signature, so there is no partition table");
        return Ok(None);
    };

    let table = if let Some(slot) = boot_sector.protective_slot() {
        let kind = if boot_sector.is_hybrid() {
            "hybrid"
        } else {
            "protective"
        };
        log::debug!(
            "{kind} MBR (type 0xee in entry {}), reading the GPT",
            slot + 1
        );
        gpt::read_table(&disk, &boot_sector)?
    } else {
        match mbr::read_table(&disk, &boot_sector)? {
            Some(table) => table,
            None => return Ok(None),
        }
    };

    let table = fit_to_device(table, disk.len);
    log::debug!(
        "{} table with {} partitions and {} warnings at {sector_size}-byte sectors",
        table.scheme,
        table.partitions.len(),
        table.warnings.len()
    );
    for partition in &table.partitions {
        log::trace!(
            "partition {}: start {:#x}, {} bytes, type {}",
            partition.number,
            partition.start,
            partition.len,
            partition.type_name
        );
    }

    Ok(Some(table))
}

/// Drops partitions that start past the end of the device and cuts those that run past it.
///
/// The kernel does the same when it adds partitions (`blk_add_partition` in `core.c`): it
/// keeps the partitions of broken tables, such as those some camera firmware writes, but
/// limits them to the disk's capacity, counted in whole 512-byte sectors.
fn fit_to_device(mut table: PartitionTable, device_len: u64) -> PartitionTable {
    let capacity = device_len - device_len % KERNEL_SECTOR_SIZE;
    let mut warnings = Vec::new();

    table.partitions.retain_mut(|partition| {
        if partition.start >= capacity {
            warnings.push(PartitionWarning::StartsPastEnd {
                number: partition.number,
                start: partition.start,
                device_len,
            });
            return false;
        }

        let room = capacity - partition.start;
        if partition.len > room {
            warnings.push(PartitionWarning::TruncatedAtEnd {
                number: partition.number,
                len_in_table: partition.len,
                len: room,
            });
            partition.len = room;
        }
        true
    });

    table.partitions.sort_by_key(|partition| partition.number);
    table.warnings.extend(warnings);
    table
}

/// A device seen in logical sectors, with reads that fail cleanly.
struct Disk<'a> {
    device: &'a dyn BlockDevice,
    sector_size: u64,
    /// Device length in bytes, read once so that every check uses the same value.
    len: u64,
}

impl<'a> Disk<'a> {
    fn new(device: &'a dyn BlockDevice, sector_size: u32) -> Self {
        Self {
            device,
            sector_size: u64::from(sector_size),
            len: device.len(),
        }
    }

    /// Returns the LBA of the last whole sector, or 0 when there is none. `scan` returns early
    /// for devices shorter than one sector, so the parsers never see that case.
    fn last_lba(&self) -> u64 {
        (self.len / self.sector_size).saturating_sub(1)
    }

    /// Returns the byte offset of `lba`, or `None` when it does not fit in 64 bits.
    fn offset_of(&self, lba: u64) -> Option<u64> {
        lba.checked_mul(self.sector_size)
    }

    /// Returns whether `len` bytes at `offset` lie inside the device.
    fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// Reads `len` bytes at `offset`. A short read (the device shrank) fails as `UnexpectedEof`.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, PartitionError> {
        let mut buf = vec![0; len];
        let mut filled = 0;

        while filled < len {
            let at = offset + filled as u64;
            let count = self
                .device
                .read_at(at, &mut buf[filled..])
                .map_err(|source| PartitionError::Read {
                    offset,
                    len,
                    source,
                })?;
            if count == 0 {
                return Err(PartitionError::Read {
                    offset,
                    len,
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("device ends at {at:#x}"),
                    ),
                });
            }
            filled += count;
        }

        Ok(buf)
    }
}

/// Reads a little-endian `u16` at `offset` of `bytes`.
fn le_u16(bytes: &[u8], offset: usize) -> u16 {
    let mut field = [0; 2];
    field.copy_from_slice(&bytes[offset..offset + 2]);
    u16::from_le_bytes(field)
}

/// Reads a little-endian `u32` at `offset` of `bytes`.
fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut field = [0; 4];
    field.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(field)
}

/// Reads a little-endian `u64` at `offset` of `bytes`.
fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut field = [0; 8];
    field.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(field)
}

#[cfg(test)]
mod tests;
