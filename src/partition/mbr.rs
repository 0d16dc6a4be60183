//! The MBR (DOS) partition table: four primary entries in sector 0, and extended partitions
//! that hold a chain of extended boot records (EBRs), one per logical partition.
//!
//! Numbering and sizes follow the kernel's `block/partitions/msdos.c`. Primaries are numbered
//! 1 to 4 by slot, and logical partitions from 5 in chain order. An extended entry is listed as
//! a stub of 1 KiB (one sector when sectors are larger), which keeps tools like `mkfs` off the
//! EBRs. This module also parses the protective MBR in front of a GPT.

use std::collections::HashSet;

use super::{
    BOOT_SECTOR_LEN, Disk, MAX_PARTITION_NUMBER, Partition, PartitionError, PartitionTable,
    PartitionWarning, Scheme, le_u16, le_u32, warning::EbrStop,
};

/// Byte offset of the four 16-byte entries in an MBR or EBR.
const ENTRIES_OFFSET: usize = 0x1BE;
const ENTRY_LEN: usize = 16;
/// Byte offset of the boot signature, the bytes 0x55 0xAA (0xAA55 read as little-endian).
const SIGNATURE_OFFSET: usize = 0x1FE;
const SIGNATURE: u16 = 0xAA55;

/// Entry byte 0: the boot indicator, 0x80 for the active partition and 0x00 for the others.
const ENTRY_BOOT_INDICATOR: usize = 0;
/// Entry byte 4: the partition type.
const ENTRY_TYPE: usize = 4;
/// Entry bytes 8..12: the first sector, little-endian. Bytes 1..4 and 5..8 contain CHS
/// addresses, which the kernel ignores and so does this parser.
const ENTRY_FIRST_LBA: usize = 8;
/// Entry bytes 12..16: the number of sectors, little-endian.
const ENTRY_SECTOR_COUNT: usize = 12;

const BOOT_INACTIVE: u8 = 0x00;
const BOOT_ACTIVE: u8 = 0x80;

/// Type of the entry that covers the disk in a protective MBR.
const TYPE_GPT_PROTECTIVE: u8 = 0xEE;
/// A protective entry starts at the primary GPT header, LBA 1.
const PROTECTIVE_FIRST_LBA: u32 = 1;
/// Extended partition types: DOS (CHS), Windows 95 (LBA) and Linux.
const EXTENDED_TYPES: [u8; 3] = [0x05, 0x0F, 0x85];

/// Links followed in a row without a logical partition before the kernel gives up on a chain.
const MAX_EMPTY_LINKS: u32 = 100;
/// Size the kernel gives an extended partition: two 512-byte sectors, or one larger sector.
const EXTENDED_STUB_LEN: u64 = 1024;

/// One 16-byte entry of an MBR or EBR.
#[derive(Debug, Clone, Copy)]
struct Entry {
    boot_indicator: u8,
    kind: u8,
    first_lba: u32,
    sector_count: u32,
}

impl Entry {
    fn parse(bytes: &[u8]) -> Self {
        Self {
            boot_indicator: bytes[ENTRY_BOOT_INDICATOR],
            kind: bytes[ENTRY_TYPE],
            first_lba: le_u32(bytes, ENTRY_FIRST_LBA),
            sector_count: le_u32(bytes, ENTRY_SECTOR_COUNT),
        }
    }

    fn is_extended(&self) -> bool {
        EXTENDED_TYPES.contains(&self.kind)
    }

    fn type_name(&self) -> String {
        format!("0x{:02x}", self.kind)
    }
}

/// Returns whether a partition type as this module names it (`0x05`) is an extended
/// partition: a container of logical partitions rather than a filesystem.
pub fn is_extended_type(type_name: &str) -> bool {
    EXTENDED_TYPES
        .iter()
        .any(|&kind| type_name.eq_ignore_ascii_case(&format!("0x{kind:02x}")))
}

/// The four entries of an MBR or EBR whose boot signature is present.
pub(super) struct BootSector {
    entries: [Entry; 4],
}

impl BootSector {
    /// Parses the first 512 bytes of a sector, or returns `None` when the signature is missing.
    pub(super) fn parse(sector: &[u8]) -> Option<Self> {
        if le_u16(sector, SIGNATURE_OFFSET) != SIGNATURE {
            return None;
        }

        let entry_at = |slot: usize| {
            let offset = ENTRIES_OFFSET + slot * ENTRY_LEN;
            Entry::parse(&sector[offset..offset + ENTRY_LEN])
        };
        Some(Self {
            entries: [entry_at(0), entry_at(1), entry_at(2), entry_at(3)],
        })
    }

    /// Returns the slot (0 to 3) of the entry that makes this a protective or hybrid MBR.
    ///
    /// As in the kernel's `is_pmbr_valid` (`efi.c`), that is an entry of type 0xEE starting at
    /// LBA 1. Its size is not checked: tools disagree on it, and the kernel only logs it.
    pub(super) fn protective_slot(&self) -> Option<usize> {
        self.entries.iter().position(|entry| {
            entry.kind == TYPE_GPT_PROTECTIVE && entry.first_lba == PROTECTIVE_FIRST_LBA
        })
    }

    /// Returns whether entries other than the protective one are in use, as in a hybrid MBR.
    pub(super) fn is_hybrid(&self) -> bool {
        self.entries
            .iter()
            .any(|entry| entry.kind != 0 && entry.kind != TYPE_GPT_PROTECTIVE)
    }

    /// Returns the sector count of the protective entry, for logging.
    pub(super) fn protective_sector_count(&self) -> Option<u32> {
        self.protective_slot()
            .map(|slot| self.entries[slot].sector_count)
    }
}

/// Reads the partitions of an MBR that is not a protective MBR.
///
/// Returns `Ok(None)` when a boot indicator is neither 0x00 nor 0x80, because such a sector
/// is a boot sector without a table (often FAT) and the kernel lists no partitions for it.
pub(super) fn read_table(
    disk: &Disk<'_>,
    mbr: &BootSector,
) -> Result<Option<PartitionTable>, PartitionError> {
    if let Some(slot) = mbr.entries.iter().position(|entry| {
        entry.boot_indicator != BOOT_INACTIVE && entry.boot_indicator != BOOT_ACTIVE
    }) {
        log::debug!(
            "MBR entry {} has boot indicator {:#04x}, so sector 0 is a boot sector without a \
             partition table",
            slot + 1,
            mbr.entries[slot].boot_indicator
        );
        return Ok(None);
    }

    // The kernel's MBR parser skips a disk with a 0xEE entry, leaving it to the GPT parser,
    // which accepts only an entry at LBA 1. Such a disk gets no partitions, so return an error
    // that names the entry.
    if let Some(slot) = mbr
        .entries
        .iter()
        .position(|entry| entry.kind == TYPE_GPT_PROTECTIVE)
    {
        return Err(PartitionError::ProtectiveMbrNotAtLba1 {
            slot: slot as u32 + 1,
            first_lba: mbr.entries[slot].first_lba,
        });
    }

    let mut table = PartitionTable {
        scheme: Scheme::Mbr,
        sector_size: disk.sector_size as u32,
        partitions: Vec::new(),
        warnings: Vec::new(),
    };
    let mut next_logical = 5;

    for (slot, entry) in mbr.entries.iter().enumerate() {
        if entry.sector_count == 0 {
            continue;
        }
        let number = slot as u32 + 1;
        let start = sectors_to_bytes(disk, entry.first_lba, "primary partition start")?;
        let len = sectors_to_bytes(disk, entry.sector_count, "primary partition size")?;

        if !entry.is_extended() {
            table.partitions.push(Partition {
                number,
                start,
                len,
                type_name: entry.type_name(),
                label: None,
            });
            continue;
        }

        table.partitions.push(Partition {
            number,
            start,
            len: len.min(EXTENDED_STUB_LEN.max(disk.sector_size)),
            type_name: entry.type_name(),
            label: None,
        });
        read_logical_chain(disk, start, len, &mut next_logical, &mut table)?;
    }

    Ok(Some(table))
}

/// Follows the chain of EBRs in the extended partition at `extended_start` and appends its
/// logical partitions to `table`, numbered from `next_number`.
///
/// Each EBR contains entries for its data partitions, with starts relative to the EBR, and a
/// link to the next EBR, with a start relative to the extended partition. Like the kernel, this
/// reads every entry with a sector count, and checks that entries 3 and 4 lie inside their
/// link's extent and the extended partition, because those two often contain garbage.
fn read_logical_chain(
    disk: &Disk<'_>,
    extended_start: u64,
    extended_len: u64,
    next_number: &mut u32,
    table: &mut PartitionTable,
) -> Result<(), PartitionError> {
    let mut ebr_start = extended_start;
    let mut extent_len = extended_len;
    let mut visited = HashSet::new();
    let mut empty_links = 0;
    let ebr_lba = |offset: u64| offset / disk.sector_size;

    loop {
        empty_links += 1;
        if empty_links > MAX_EMPTY_LINKS {
            table.warnings.push(PartitionWarning::EbrChainStopped {
                lba: ebr_lba(ebr_start),
                reason: EbrStop::TooManyEmptyLinks,
            });
            return Ok(());
        }
        if *next_number > MAX_PARTITION_NUMBER {
            table
                .warnings
                .push(PartitionWarning::PastPartitionLimit { count: None });
            return Ok(());
        }
        // The kernel would read the chain around again until it runs out of partition numbers,
        // listing the same partitions many times. Each is listed once here, as util-linux does.
        if !visited.insert(ebr_start) {
            table.warnings.push(PartitionWarning::EbrChainStopped {
                lba: ebr_lba(ebr_start),
                reason: EbrStop::Loop,
            });
            return Ok(());
        }

        if !disk.contains(ebr_start, BOOT_SECTOR_LEN as u64) {
            table.warnings.push(PartitionWarning::EbrChainStopped {
                lba: ebr_lba(ebr_start),
                reason: EbrStop::PastEnd,
            });
            return Ok(());
        }
        let sector = disk.read(ebr_start, BOOT_SECTOR_LEN)?;
        let Some(ebr) = BootSector::parse(&sector) else {
            // The kernel stops here without a message. A first EBR without a signature only
            // means that there are no logical partitions, but a link that points to a sector
            // without one is damage worth reporting.
            if ebr_start == extended_start {
                log::debug!("extended partition at {extended_start:#x} has no EBR");
            } else {
                table.warnings.push(PartitionWarning::EbrChainStopped {
                    lba: ebr_lba(ebr_start),
                    reason: EbrStop::MissingSignature,
                });
            }
            return Ok(());
        };

        for (index, entry) in ebr.entries.iter().enumerate() {
            if entry.sector_count == 0 || entry.is_extended() {
                continue;
            }
            let relative_start =
                sectors_to_bytes(disk, entry.first_lba, "logical partition start")?;
            let len = sectors_to_bytes(disk, entry.sector_count, "logical partition size")?;
            let start = ebr_start
                .checked_add(relative_start)
                .ok_or(PartitionError::Overflow {
                    field: "logical partition start",
                    sectors: u64::from(entry.first_lba),
                })?;

            let extent = (extent_len, extended_start, extended_len);
            if index >= 2 && !lies_within(relative_start, start, len, extent) {
                log::debug!(
                    "EBR at {ebr_start:#x}: entry {} lies outside its extent, so it is ignored",
                    index + 1
                );
                continue;
            }
            if *next_number > MAX_PARTITION_NUMBER {
                table
                    .warnings
                    .push(PartitionWarning::PastPartitionLimit { count: None });
                return Ok(());
            }

            table.partitions.push(Partition {
                number: *next_number,
                start,
                len,
                type_name: entry.type_name(),
                label: None,
            });
            *next_number += 1;
            empty_links = 0;
        }

        // Only the first link is followed: the chain is a list, not a tree.
        let Some(link) = ebr
            .entries
            .iter()
            .find(|entry| entry.sector_count != 0 && entry.is_extended())
        else {
            return Ok(());
        };
        let link_offset = sectors_to_bytes(disk, link.first_lba, "EBR link")?;
        ebr_start = extended_start
            .checked_add(link_offset)
            .ok_or(PartitionError::Overflow {
                field: "EBR link",
                sectors: u64::from(link.first_lba),
            })?;
        extent_len = sectors_to_bytes(disk, link.sector_count, "EBR link size")?;
    }
}

/// Returns whether a logical partition from entry 3 or 4 of an EBR lies inside both the
/// extent that the link to this EBR gave and the extended partition. The kernel applies this
/// check to those two entries only.
///
/// `extent` is the link's extent length, then the extended partition's start and length.
fn lies_within(relative_start: u64, start: u64, len: u64, extent: (u64, u64, u64)) -> bool {
    let (extent_len, extended_start, extended_len) = extent;
    let relative_end = relative_start.checked_add(len);
    let end = start.checked_add(len);
    let extended_end = extended_start.checked_add(extended_len);

    match (relative_end, end, extended_end) {
        (Some(relative_end), Some(end), Some(extended_end)) => {
            relative_end <= extent_len && start >= extended_start && end <= extended_end
        }
        _ => false,
    }
}

/// Converts a 32-bit sector count or LBA from a table to bytes.
///
/// `scan` rejects sectors larger than 65536 bytes, so the product stays below 2^48 and this
/// cannot fail. It stays checked so that raising that limit cannot make it wrap silently.
fn sectors_to_bytes(
    disk: &Disk<'_>,
    sectors: u32,
    field: &'static str,
) -> Result<u64, PartitionError> {
    u64::from(sectors)
        .checked_mul(disk.sector_size)
        .ok_or(PartitionError::Overflow {
            field,
            sectors: u64::from(sectors),
        })
}
