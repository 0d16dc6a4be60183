//! Tests of the partition parser, with builders that write valid MBR and GPT images in memory
//! so that each test can break one field.

mod fuzz;
mod gpt;
mod gpt_entries;
mod mbr;
mod mbr_chain;
mod scan;

use super::crc32::crc32;
use super::{PartitionError, PartitionTable, scan};
use crate::block::MemoryDevice;

/// The logical sector sizes every main case runs at.
const SECTOR_SIZES: [usize; 2] = [512, 4096];

/// Scans `image` as a device with `sector_size`-byte sectors.
fn scan_image(
    image: Vec<u8>,
    sector_size: usize,
) -> Result<Option<PartitionTable>, PartitionError> {
    scan(&MemoryDevice::new(image), sector_size as u32)
}

/// Scans `image` and returns its table, failing the test when there is none.
fn table_of(image: Vec<u8>, sector_size: usize) -> PartitionTable {
    scan_image(image, sector_size)
        .expect("scan succeeds")
        .expect("image has a partition table")
}

/// Returns `(number, start, len)` in bytes for every partition of `table`.
fn layout(table: &PartitionTable) -> Vec<(u32, u64, u64)> {
    table
        .partitions
        .iter()
        .map(|partition| (partition.number, partition.start, partition.len))
        .collect()
}

/// Returns the length in bytes of `sectors` sectors of `sector_size` bytes.
fn bytes(sector_size: usize, sectors: u64) -> u64 {
    sectors * sector_size as u64
}

// ----- MBR builders -------------------------------------------------------------------------

/// One MBR or EBR entry, with LBAs in sectors of the image's sector size.
#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    boot_indicator: u8,
    kind: u8,
    first_lba: u32,
    sectors: u32,
}

fn mbr_entry(kind: u8, first_lba: u32, sectors: u32) -> MbrEntry {
    MbrEntry {
        boot_indicator: 0,
        kind,
        first_lba,
        sectors,
    }
}

/// Writes up to four entries and the 0x55AA signature into the sector at `lba`.
fn write_boot_sector(image: &mut [u8], sector_size: usize, lba: u32, entries: &[MbrEntry]) {
    let base = lba as usize * sector_size;
    for (slot, entry) in entries.iter().enumerate() {
        let offset = base + 0x1BE + slot * 16;
        image[offset] = entry.boot_indicator;
        image[offset + 4] = entry.kind;
        image[offset + 8..offset + 12].copy_from_slice(&entry.first_lba.to_le_bytes());
        image[offset + 12..offset + 16].copy_from_slice(&entry.sectors.to_le_bytes());
    }
    image[base + 0x1FE] = 0x55;
    image[base + 0x1FF] = 0xAA;
}

/// One logical partition: its EBR's LBA relative to the extended partition, and its data
/// start relative to that EBR.
#[derive(Debug, Clone, Copy)]
struct Logical {
    ebr_lba: u32,
    data_offset: u32,
    sectors: u32,
    kind: u8,
}

/// Writes a chain of EBRs, linked in the order given, into the extended partition that
/// starts at `extended_lba`.
fn write_chain(image: &mut [u8], sector_size: usize, extended_lba: u32, logicals: &[Logical]) {
    for (index, logical) in logicals.iter().enumerate() {
        let data = mbr_entry(logical.kind, logical.data_offset, logical.sectors);
        let mut entries = vec![data];
        if let Some(next) = logicals.get(index + 1) {
            entries.push(mbr_entry(
                0x05,
                next.ebr_lba,
                next.data_offset + next.sectors,
            ));
        }
        write_boot_sector(image, sector_size, extended_lba + logical.ebr_lba, &entries);
    }
}

/// Sectors in the standard MBR test image.
const MBR_SECTORS: usize = 2048;

/// Builds the standard MBR image, in sectors: p1 0x83 at 64 (256), p2 0x82 at 320 (128),
/// p3 extended at 512 (1024) holding logicals 5, 6 and 7, and p4 0x0c at 1600 (400).
fn standard_mbr(sector_size: usize) -> Vec<u8> {
    let mut image = vec![0; MBR_SECTORS * sector_size];
    write_boot_sector(
        &mut image,
        sector_size,
        0,
        &[
            mbr_entry(0x83, 64, 256),
            mbr_entry(0x82, 320, 128),
            mbr_entry(0x05, 512, 1024),
            mbr_entry(0x0C, 1600, 400),
        ],
    );
    write_chain(&mut image, sector_size, 512, &standard_logicals());
    image
}

fn standard_logicals() -> [Logical; 3] {
    [
        Logical {
            ebr_lba: 0,
            data_offset: 32,
            sectors: 128,
            kind: 0x83,
        },
        Logical {
            ebr_lba: 256,
            data_offset: 32,
            sectors: 128,
            kind: 0x07,
        },
        Logical {
            ebr_lba: 512,
            data_offset: 32,
            sectors: 256,
            kind: 0x0B,
        },
    ]
}

// ----- GPT builders -------------------------------------------------------------------------

const LINUX_FS: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const EFI_SYSTEM: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX_SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";

/// Encodes a GUID written as text in the UEFI mixed-endian layout.
fn guid_bytes(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut bytes = [0; 16];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[index * 2..index * 2 + 2], 16).expect("hex digit");
    }
    bytes[0..4].reverse();
    bytes[4..6].reverse();
    bytes[6..8].reverse();
    bytes
}

/// One used GPT entry, at `index` of the array (partition `index + 1`).
#[derive(Debug, Clone)]
struct GptEntry {
    index: usize,
    type_guid: &'static str,
    first_lba: u64,
    last_lba: u64,
    name: &'static str,
}

/// Where the builder put each part of a GPT image.
#[derive(Debug, Clone, Copy)]
struct GptLayout {
    sector_size: usize,
    sectors: u64,
    entry_count: u32,
}

impl GptLayout {
    fn entry_sectors(&self) -> u64 {
        (u64::from(self.entry_count) * 128).div_ceil(self.sector_size as u64)
    }

    fn last_lba(&self) -> u64 {
        self.sectors - 1
    }

    fn backup_entries_lba(&self) -> u64 {
        self.last_lba() - self.entry_sectors()
    }

    fn header_offset(&self, lba: u64) -> usize {
        lba as usize * self.sector_size
    }
}

/// Sectors in the standard GPT test image.
const GPT_SECTORS: u64 = 2048;

/// Builds a GPT image with a protective MBR, both headers and both entry arrays.
fn build_gpt(layout: GptLayout, entries: &[GptEntry]) -> Vec<u8> {
    let sector_size = layout.sector_size;
    let mut image = vec![0; layout.sectors as usize * sector_size];

    let protective_sectors = (layout.sectors - 1).min(u64::from(u32::MAX)) as u32;
    write_boot_sector(
        &mut image,
        sector_size,
        0,
        &[mbr_entry(0xEE, 1, protective_sectors)],
    );

    let mut array = vec![0; layout.entry_count as usize * 128];
    for entry in entries {
        let offset = entry.index * 128;
        let slot = &mut array[offset..offset + 128];
        slot[0..16].copy_from_slice(&guid_bytes(entry.type_guid));
        slot[16..32].copy_from_slice(&[0x5A; 16]);
        slot[32..40].copy_from_slice(&entry.first_lba.to_le_bytes());
        slot[40..48].copy_from_slice(&entry.last_lba.to_le_bytes());
        for (unit_index, unit) in entry.name.encode_utf16().enumerate() {
            slot[56 + unit_index * 2..58 + unit_index * 2].copy_from_slice(&unit.to_le_bytes());
        }
    }

    let primary_entries = 2;
    let backup_entries = layout.backup_entries_lba();
    let at = |lba: u64| lba as usize * sector_size;
    image[at(primary_entries)..at(primary_entries) + array.len()].copy_from_slice(&array);
    image[at(backup_entries)..at(backup_entries) + array.len()].copy_from_slice(&array);

    let first_usable = 2 + layout.entry_sectors();
    let last_usable = backup_entries - 1;
    let header = |my_lba: u64, alternate_lba: u64, entries_lba: u64| {
        let mut header = vec![0u8; 92];
        header[0..8].copy_from_slice(b"EFI PART");
        header[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        header[12..16].copy_from_slice(&92u32.to_le_bytes());
        header[24..32].copy_from_slice(&my_lba.to_le_bytes());
        header[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
        header[40..48].copy_from_slice(&first_usable.to_le_bytes());
        header[48..56].copy_from_slice(&last_usable.to_le_bytes());
        header[56..72].copy_from_slice(&[0xD1; 16]);
        header[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        header[80..84].copy_from_slice(&layout.entry_count.to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        header[88..92].copy_from_slice(&crc32(&array).to_le_bytes());
        let crc = crc32(&header);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        header
    };
    let primary = header(1, layout.last_lba(), primary_entries);
    let backup = header(layout.last_lba(), 1, backup_entries);
    image[at(1)..at(1) + 92].copy_from_slice(&primary);
    let last = at(layout.last_lba());
    image[last..last + 92].copy_from_slice(&backup);

    image
}

fn standard_gpt_layout(sector_size: usize) -> GptLayout {
    GptLayout {
        sector_size,
        sectors: GPT_SECTORS,
        entry_count: 128,
    }
}

/// Entries of the standard GPT image: 1 "root" at 64..=1023, 2 "EFI system" at
/// 1024..=1535, 3 unused, and 4 unnamed swap at 1536..=1999.
fn standard_gpt_entries() -> Vec<GptEntry> {
    vec![
        GptEntry {
            index: 0,
            type_guid: LINUX_FS,
            first_lba: 64,
            last_lba: 1023,
            name: "root",
        },
        GptEntry {
            index: 1,
            type_guid: EFI_SYSTEM,
            first_lba: 1024,
            last_lba: 1535,
            name: "EFI system",
        },
        GptEntry {
            index: 3,
            type_guid: LINUX_SWAP,
            first_lba: 1536,
            last_lba: 1999,
            name: "",
        },
    ]
}

fn standard_gpt(sector_size: usize) -> Vec<u8> {
    build_gpt(standard_gpt_layout(sector_size), &standard_gpt_entries())
}

/// Returns `(number, start, len)` in bytes of the standard GPT image's partitions.
fn standard_gpt_partitions(sector_size: usize) -> Vec<(u32, u64, u64)> {
    let s = |sectors: u64| sectors * sector_size as u64;
    vec![
        (1, s(64), s(960)),
        (2, s(1024), s(512)),
        (4, s(1536), s(464)),
    ]
}

/// Recomputes the CRCs of the header at `lba` after a test changed it or its entries.
///
/// The entry array is found through the header's own fields and sealed only when those point
/// inside the image, so this never panics on a header that a test or the fuzzer garbled.
fn reseal_header(image: &mut [u8], sector_size: usize, lba: u64) {
    let base = lba as usize * sector_size;
    let field_u32 = |image: &[u8], offset: usize| {
        u32::from_le_bytes(image[base + offset..base + offset + 4].try_into().unwrap())
    };
    let field_u64 = |image: &[u8], offset: usize| {
        u64::from_le_bytes(image[base + offset..base + offset + 8].try_into().unwrap())
    };

    let entries_lba = field_u64(image, 72);
    let entries_len = u64::from(field_u32(image, 80)) * u64::from(field_u32(image, 84));
    let entries_start = entries_lba.checked_mul(sector_size as u64);
    if let Some(start) = entries_start
        && entries_len <= 4 << 20
        && start
            .checked_add(entries_len)
            .is_some_and(|end| end <= image.len() as u64)
    {
        let range = start as usize..(start + entries_len) as usize;
        let crc = crc32(&image[range]);
        image[base + 88..base + 92].copy_from_slice(&crc.to_le_bytes());
    }

    let header_size = field_u32(image, 12) as usize;
    let covered = if (92..=sector_size).contains(&header_size) {
        header_size
    } else {
        92
    };
    image[base + 16..base + 20].fill(0);
    let crc = crc32(&image[base..base + covered]);
    image[base + 16..base + 20].copy_from_slice(&crc.to_le_bytes());
}

/// Writes `value` as little-endian at `offset` of the header at `lba`, then reseals it.
fn set_header_u32(image: &mut [u8], sector_size: usize, lba: u64, offset: usize, value: u32) {
    let at = lba as usize * sector_size + offset;
    image[at..at + 4].copy_from_slice(&value.to_le_bytes());
    reseal_header(image, sector_size, lba);
}

/// Writes `value` as little-endian at `offset` of the header at `lba`, then reseals it.
fn set_header_u64(image: &mut [u8], sector_size: usize, lba: u64, offset: usize, value: u64) {
    let at = lba as usize * sector_size + offset;
    image[at..at + 8].copy_from_slice(&value.to_le_bytes());
    reseal_header(image, sector_size, lba);
}

/// Overwrites the signature of the header at `lba`, so that the copy is invalid.
fn break_header(image: &mut [u8], sector_size: usize, lba: u64) {
    let at = lba as usize * sector_size;
    image[at..at + 8].copy_from_slice(b"NOT PART");
}
