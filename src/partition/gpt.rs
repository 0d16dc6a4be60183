//! The GUID partition table (GPT): the primary and backup headers, their CRC-32s, and the
//! partition entry array that a protective or hybrid MBR points to.
//!
//! A header copy is checked as the kernel's `is_gpt_valid` (`block/partitions/efi.c`) checks
//! it, in the same order, and entries are kept or left out as its `is_pte_valid` decides.
//! Field offsets are those of the UEFI specification's GPT header and entry layouts.

use std::fmt;

use crate::block::BlockDevice;

use super::{
    Disk, MAX_PARTITION_NUMBER, Partition, PartitionError, PartitionTable, PartitionWarning,
    Scheme, crc32::crc32, le_u32, le_u64, mbr::BootSector,
};

/// Header bytes 0..8: the signature "EFI PART", here read as a little-endian `u64`.
const SIGNATURE: u64 = u64::from_le_bytes(*b"EFI PART");
/// Header bytes 8..12: the revision, 0x00010000 for GPT 1.0.
const HEADER_REVISION: usize = 8;
const REVISION_1_0: u32 = 0x0001_0000;
/// Header bytes 12..16: the header size, at least 92 and at most one logical sector.
const HEADER_SIZE: usize = 12;
const MIN_HEADER_SIZE: u32 = 92;
/// Header bytes 16..20: CRC-32 of the first header-size bytes, computed with this field zero.
const HEADER_CRC: usize = 16;
/// Header bytes 24..32: the LBA of this copy (MyLBA).
const HEADER_MY_LBA: usize = 24;
/// Header bytes 32..40: the LBA of the other copy (AlternateLBA).
const HEADER_ALTERNATE_LBA: usize = 32;
/// Header bytes 40..48 and 48..56: the first and last LBA that partitions may use.
const HEADER_FIRST_USABLE_LBA: usize = 40;
const HEADER_LAST_USABLE_LBA: usize = 48;
/// Header bytes 56..72: the disk GUID.
const HEADER_DISK_GUID: usize = 56;
/// Header bytes 72..80: the first LBA of the entry array.
const HEADER_ENTRIES_LBA: usize = 72;
/// Header bytes 80..84: the number of entries in the array.
const HEADER_ENTRY_COUNT: usize = 80;
/// Header bytes 84..88: the size of one entry.
const HEADER_ENTRY_SIZE: usize = 84;
/// Header bytes 88..92: CRC-32 of the whole entry array.
const HEADER_ENTRIES_CRC: usize = 88;

/// The only entry size that the kernel (`efi.c`) and libblkid accept. They reject a header with
/// any other size, though UEFI permits larger entries, so this parser does too.
const ENTRY_SIZE: u32 = 128;
/// Entry bytes 0..16: the type GUID, all zeroes in an unused entry.
const ENTRY_TYPE_GUID: usize = 0;
/// Entry bytes 32..40 and 40..48: the first and last LBA, inclusive.
const ENTRY_FIRST_LBA: usize = 32;
const ENTRY_LAST_LBA: usize = 40;
/// Entry bytes 56..128: the name, 36 UTF-16LE code units padded with zeroes.
const ENTRY_NAME: usize = 56;
const ENTRY_NAME_LEN: usize = 72;

/// Largest entry array the kernel reads: it allocates the array with `kmalloc`, whose limit
/// (`KMALLOC_MAX_SIZE`) is 4 MiB on x86-64 with 4 KiB pages. That is 32768 entries.
const MAX_ENTRY_ARRAY_LEN: u64 = 4 << 20;

const PRIMARY_LBA: u64 = 1;

/// Rejection of one GPT header copy or its entry array: where the header was looked for and
/// the check it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptHeaderError {
    /// LBA where the header was looked for.
    pub lba: u64,
    /// Byte offset of that LBA, or `None` when it does not fit in 64 bits.
    pub offset: Option<u64>,
    pub problem: GptProblem,
}

impl fmt::Display for GptHeaderError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "GPT header at LBA {}", self.lba)?;
        if let Some(offset) = self.offset {
            write!(formatter, " ({offset:#x})")?;
        }
        write!(formatter, ": {}", self.problem)
    }
}

impl std::error::Error for GptHeaderError {}

/// The check that a GPT header copy failed, with the value found and the value expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GptProblem {
    #[error("lies past the last LBA {last_lba} of the device")]
    PastEnd { last_lba: u64 },

    #[error("signature {found:#018x}, expected {SIGNATURE:#018x} (\"EFI PART\")")]
    Signature { found: u64 },

    #[error("header size {found}, expected {MIN_HEADER_SIZE} to {max} bytes")]
    HeaderSize { found: u32, max: u32 },

    #[error("header CRC {stored:#010x}, expected {computed:#010x}")]
    HeaderCrc { stored: u32, computed: u32 },

    #[error("MyLBA {found}, expected {expected}")]
    MyLba { found: u64, expected: u64 },

    #[error(
        "usable LBAs {first} to {last} are not a range inside the device (last LBA {last_lba})"
    )]
    UsableRange {
        first: u64,
        last: u64,
        last_lba: u64,
    },

    #[error("entry size {found}, expected {ENTRY_SIZE}")]
    EntrySize { found: u32 },

    #[error("entry count {found}, expected 1 to {max}")]
    EntryCount { found: u32, max: u64 },

    #[error("entry array of {len} bytes at LBA {lba} reaches past the end of the device")]
    EntriesPastEnd { lba: u64, len: u64 },

    #[error("entry array CRC {stored:#010x}, expected {computed:#010x}")]
    EntriesCrc { stored: u32, computed: u32 },
}

/// A header copy that passed every check, with its entry array.
struct GptCopy {
    lba: u64,
    revision: u32,
    alternate_lba: u64,
    first_usable_lba: u64,
    last_usable_lba: u64,
    disk_guid: [u8; 16],
    entry_count: u32,
    entries_crc: u32,
    entries: Vec<u8>,
}

/// Reads the GPT behind a protective or hybrid MBR.
///
/// The primary header at LBA 1 is used when it is valid, and the backup it names is checked
/// for warnings. Otherwise the backup header at the last LBA is used, with a warning.
pub(super) fn read_table(
    disk: &Disk<'_>,
    mbr: &BootSector,
) -> Result<PartitionTable, PartitionError> {
    let last_lba = disk.last_lba();
    if let Some(count) = mbr.protective_sector_count() {
        let expected = last_lba.min(u64::from(u32::MAX));
        if u64::from(count) != expected {
            log::debug!(
                "protective MBR entry covers {count} sectors, not {expected}, which the kernel \
                 also ignores"
            );
        }
    }

    let mut warnings = Vec::new();
    let copy = match read_copy(disk, PRIMARY_LBA)? {
        Ok(primary) => {
            check_backup(disk, &primary, &mut warnings)?;
            primary
        }
        // NOTE: the kernel looks for the backup at the last LBA only when booted with the
        // `gpt` option, to guard against disks that misreport their size, and otherwise lists
        // no partitions. An image file's size is exact, so the backup is used here, with a
        // warning, as libblkid does.
        Err(primary_error) => match read_copy(disk, last_lba)? {
            Ok(backup) => {
                log::debug!("{primary_error}, using the backup header at LBA {last_lba}");
                warnings.push(PartitionWarning::BackupGptUsed {
                    primary: primary_error,
                    backup_lba: last_lba,
                });
                backup
            }
            Err(backup_error) => {
                if let Some(sector_size) = other_sector_size(disk) {
                    return Err(PartitionError::GptSectorSize {
                        sector_size,
                        scanned: disk.sector_size as u32,
                    });
                }
                return Err(PartitionError::NoValidGpt {
                    primary: primary_error,
                    backup: backup_error,
                });
            }
        },
    };

    if copy.revision != REVISION_1_0 {
        warnings.push(PartitionWarning::UnknownGptRevision {
            revision: copy.revision,
        });
    }
    let partitions = read_entries(&copy, disk, &mut warnings);

    Ok(PartitionTable {
        scheme: Scheme::Gpt,
        sector_size: disk.sector_size as u32,
        partitions,
        warnings,
    })
}

/// Returns the error a scan with `sector_size` gives when `device` has no GPT signature at
/// LBA 1 but has one where the other sector size puts it. It is cheaper than a scan, for a
/// device that was not scanned.
pub fn check_sector_size(device: &dyn BlockDevice, sector_size: u32) -> Option<PartitionError> {
    let disk = Disk::new(device, sector_size);
    let offset = u64::from(sector_size);
    let signed = disk.contains(offset, 8)
        && disk
            .read(offset, 8)
            .is_ok_and(|bytes| le_u64(&bytes, 0) == SIGNATURE);
    if signed {
        return None;
    }
    other_sector_size(&disk).map(|other| PartitionError::GptSectorSize {
        sector_size: other,
        scanned: sector_size,
    })
}

/// Returns the other logical sector size (512 or 4096) whose LBA 1 contains a GPT signature:
/// a disk partitioned with that sector size, scanned with the wrong one.
fn other_sector_size(disk: &Disk<'_>) -> Option<u32> {
    let other = match disk.sector_size {
        512 => 4096,
        _ => 512,
    };
    if !disk.contains(other, 8) {
        return None;
    }
    let bytes = disk.read(other, 8).ok()?;
    (le_u64(&bytes, 0) == SIGNATURE).then_some(other as u32)
}

/// Reads and checks the header copy at `lba` and its entry array.
///
/// The outer `Result` carries I/O errors. The inner one is `Err` when the copy is invalid.
fn read_copy(disk: &Disk<'_>, lba: u64) -> Result<Result<GptCopy, GptHeaderError>, PartitionError> {
    let reject = |problem| {
        log::debug!("GPT header at LBA {lba} rejected: {problem}");
        Ok(Err(GptHeaderError {
            lba,
            offset: disk.offset_of(lba),
            problem,
        }))
    };

    let last_lba = disk.last_lba();
    let offset = match disk.offset_of(lba) {
        Some(offset) if lba <= last_lba => offset,
        _ => return reject(GptProblem::PastEnd { last_lba }),
    };
    let header = disk.read(offset, disk.sector_size as usize)?;

    let signature = le_u64(&header, 0);
    if signature != SIGNATURE {
        return reject(GptProblem::Signature { found: signature });
    }

    let header_size = le_u32(&header, HEADER_SIZE);
    let max = disk.sector_size as u32;
    if !(MIN_HEADER_SIZE..=max).contains(&header_size) {
        return reject(GptProblem::HeaderSize {
            found: header_size,
            max,
        });
    }

    let stored = le_u32(&header, HEADER_CRC);
    let mut covered = header[..header_size as usize].to_vec();
    covered[HEADER_CRC..HEADER_CRC + 4].fill(0);
    let computed = crc32(&covered);
    if stored != computed {
        return reject(GptProblem::HeaderCrc { stored, computed });
    }

    let my_lba = le_u64(&header, HEADER_MY_LBA);
    if my_lba != lba {
        return reject(GptProblem::MyLba {
            found: my_lba,
            expected: lba,
        });
    }

    let first = le_u64(&header, HEADER_FIRST_USABLE_LBA);
    let last = le_u64(&header, HEADER_LAST_USABLE_LBA);
    if first > last_lba || last > last_lba || last < first {
        return reject(GptProblem::UsableRange {
            first,
            last,
            last_lba,
        });
    }

    let entry_size = le_u32(&header, HEADER_ENTRY_SIZE);
    if entry_size != ENTRY_SIZE {
        return reject(GptProblem::EntrySize { found: entry_size });
    }

    let entry_count = le_u32(&header, HEADER_ENTRY_COUNT);
    let entries_len = u64::from(entry_count) * u64::from(ENTRY_SIZE);
    if entry_count == 0 || entries_len > MAX_ENTRY_ARRAY_LEN {
        return reject(GptProblem::EntryCount {
            found: entry_count,
            max: MAX_ENTRY_ARRAY_LEN / u64::from(ENTRY_SIZE),
        });
    }

    let entries_lba = le_u64(&header, HEADER_ENTRIES_LBA);
    let entries_offset = match disk.offset_of(entries_lba) {
        Some(offset) if disk.contains(offset, entries_len) => offset,
        _ => {
            return reject(GptProblem::EntriesPastEnd {
                lba: entries_lba,
                len: entries_len,
            });
        }
    };
    // entries_len is at most MAX_ENTRY_ARRAY_LEN, so it fits in usize.
    let entries = disk.read(entries_offset, entries_len as usize)?;

    let stored = le_u32(&header, HEADER_ENTRIES_CRC);
    let computed = crc32(&entries);
    if stored != computed {
        return reject(GptProblem::EntriesCrc { stored, computed });
    }

    let mut disk_guid = [0; 16];
    disk_guid.copy_from_slice(&header[HEADER_DISK_GUID..HEADER_DISK_GUID + 16]);

    Ok(Ok(GptCopy {
        lba,
        revision: le_u32(&header, HEADER_REVISION),
        alternate_lba: le_u64(&header, HEADER_ALTERNATE_LBA),
        first_usable_lba: first,
        last_usable_lba: last,
        disk_guid,
        entry_count,
        entries_crc: stored,
        entries,
    }))
}

/// Checks the backup copy that a valid primary names, and records what is wrong with it.
///
/// Like the kernel's `compare_gpts`, this only warns: the primary is used either way.
fn check_backup(
    disk: &Disk<'_>,
    primary: &GptCopy,
    warnings: &mut Vec<PartitionWarning>,
) -> Result<(), PartitionError> {
    let backup = match read_copy(disk, primary.alternate_lba)? {
        Ok(backup) => backup,
        Err(backup_error) => {
            warnings.push(PartitionWarning::BackupGptInvalid {
                backup: backup_error,
            });
            return Ok(());
        }
    };

    let mut fields = Vec::new();
    if backup.alternate_lba != primary.lba {
        fields.push("AlternateLBA");
    }
    if backup.first_usable_lba != primary.first_usable_lba {
        fields.push("FirstUsableLBA");
    }
    if backup.last_usable_lba != primary.last_usable_lba {
        fields.push("LastUsableLBA");
    }
    if backup.disk_guid != primary.disk_guid {
        fields.push("DiskGUID");
    }
    if backup.entry_count != primary.entry_count {
        fields.push("NumberOfPartitionEntries");
    }
    if backup.entries_crc != primary.entries_crc {
        fields.push("PartitionEntryArrayCRC32");
    }
    if !fields.is_empty() {
        warnings.push(PartitionWarning::GptHeadersDiffer { fields });
    }

    let last_lba = disk.last_lba();
    if backup.lba != last_lba {
        warnings.push(PartitionWarning::BackupGptNotAtEnd {
            backup_lba: backup.lba,
            last_lba,
        });
    }

    Ok(())
}

/// Turns the used entries of a valid copy into partitions numbered by entry index, from 1.
fn read_entries(
    copy: &GptCopy,
    disk: &Disk<'_>,
    warnings: &mut Vec<PartitionWarning>,
) -> Vec<Partition> {
    let device_last_lba = disk.last_lba();
    let mut partitions = Vec::new();
    let mut past_limit = 0;

    for (index, entry) in copy.entries.chunks_exact(ENTRY_SIZE as usize).enumerate() {
        let type_guid = &entry[ENTRY_TYPE_GUID..ENTRY_TYPE_GUID + 16];
        if type_guid.iter().all(|&byte| byte == 0) {
            continue;
        }
        // index < 32768 because the array is at most MAX_ENTRY_ARRAY_LEN bytes.
        let number = index as u32 + 1;
        if number > MAX_PARTITION_NUMBER {
            past_limit += 1;
            continue;
        }

        let first_lba = le_u64(entry, ENTRY_FIRST_LBA);
        let last_lba = le_u64(entry, ENTRY_LAST_LBA);
        // The kernel leaves out an entry that reaches past the last LBA, where for MBR it cuts
        // the partition at the end of the disk. Entries outside the header's usable range are
        // kept, as the kernel keeps them.
        if first_lba > device_last_lba || last_lba > device_last_lba {
            warnings.push(PartitionWarning::GptEntryPastEnd {
                number,
                first_lba,
                last_lba,
                device_last_lba,
            });
            continue;
        }
        // The kernel computes the size as last - first + 1 without a check, so an entry that
        // ends before it starts wraps to a huge size there. It is left out here.
        if last_lba < first_lba {
            warnings.push(PartitionWarning::GptEntryEndsBeforeStart {
                number,
                first_lba,
                last_lba,
            });
            continue;
        }

        // Both LBAs are at most device_last_lba, whose sector lies inside the device, so
        // neither product can overflow.
        partitions.push(Partition {
            number,
            start: first_lba * disk.sector_size,
            len: (last_lba - first_lba + 1) * disk.sector_size,
            type_name: format_guid(type_guid),
            label: decode_name(&entry[ENTRY_NAME..ENTRY_NAME + ENTRY_NAME_LEN]),
        });
    }

    if past_limit > 0 {
        warnings.push(PartitionWarning::PastPartitionLimit {
            count: Some(past_limit),
        });
    }
    partitions
}

/// Formats a GUID stored in the UEFI mixed-endian layout as upper-case text, as sfdisk and
/// sgdisk print it. The first three fields are little-endian, the last eight bytes in order.
fn format_guid(bytes: &[u8]) -> String {
    let time_low = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let time_mid = u16::from_le_bytes([bytes[4], bytes[5]]);
    let time_high = u16::from_le_bytes([bytes[6], bytes[7]]);
    let mut text = format!("{time_low:08X}-{time_mid:04X}-{time_high:04X}-");
    for (index, byte) in bytes[8..16].iter().enumerate() {
        if index == 2 {
            text.push('-');
        }
        text.push_str(&format!("{byte:02X}"));
    }
    text
}

/// Decodes a partition name from UTF-16LE up to the first NUL, replacing invalid code units
/// with U+FFFD. Returns `None` for an empty name.
fn decode_name(bytes: &[u8]) -> Option<String> {
    let units = bytes
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
        .take_while(|&unit| unit != 0);
    let name: String = char::decode_utf16(units)
        .map(|unit| unit.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect();

    (!name.is_empty()).then_some(name)
}
