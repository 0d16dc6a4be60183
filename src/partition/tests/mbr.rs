//! Tests of MBR primary entries, boot sector detection and partitions at the device end.

use super::*;
use crate::partition::{PartitionWarning, Scheme};

#[test]
fn mbr_standard_image_matches_layout() {
    for sector_size in SECTOR_SIZES {
        let table = table_of(standard_mbr(sector_size), sector_size);
        let s = |sectors| bytes(sector_size, sectors);
        let stub = 1024u64.max(sector_size as u64);

        assert_eq!(table.scheme, Scheme::Mbr);
        assert_eq!(table.sector_size, sector_size as u32);
        assert_eq!(
            layout(&table),
            vec![
                (1, s(64), s(256)),
                (2, s(320), s(128)),
                (3, s(512), stub),
                (4, s(1600), s(400)),
                (5, s(544), s(128)),
                (6, s(800), s(128)),
                (7, s(1056), s(256)),
            ],
            "sector size {sector_size}"
        );
        assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    }
}

#[test]
fn mbr_type_names_are_hex_bytes() {
    let table = table_of(standard_mbr(512), 512);
    let names: Vec<&str> = table
        .partitions
        .iter()
        .map(|partition| partition.type_name.as_str())
        .collect();

    assert_eq!(
        names,
        ["0x83", "0x82", "0x05", "0x0c", "0x83", "0x07", "0x0b"]
    );
    assert!(
        table
            .partitions
            .iter()
            .all(|partition| partition.label.is_none())
    );
}

#[test]
fn mbr_extended_stub_never_exceeds_the_partition() {
    for sector_size in SECTOR_SIZES {
        let mut image = vec![0; 64 * sector_size];
        write_boot_sector(&mut image, sector_size, 0, &[mbr_entry(0x0F, 8, 1)]);

        let table = table_of(image, sector_size);

        assert_eq!(
            layout(&table),
            vec![(1, bytes(sector_size, 8), sector_size as u64)]
        );
    }
}

#[test]
fn mbr_empty_slots_leave_gaps_in_numbers() {
    for sector_size in SECTOR_SIZES {
        let mut image = vec![0; 64 * sector_size];
        let empty = mbr_entry(0, 0, 0);
        write_boot_sector(
            &mut image,
            sector_size,
            0,
            &[empty, mbr_entry(0x83, 8, 8), empty, mbr_entry(0x83, 16, 8)],
        );

        let table = table_of(image, sector_size);

        let numbers: Vec<u32> = table.partitions.iter().map(|p| p.number).collect();
        assert_eq!(numbers, [2, 4]);
    }
}

#[test]
fn mbr_type_zero_entry_is_listed() {
    // The kernel skips entries by their sector count only, not by type.
    let mut image = vec![0; 64 * 512];
    write_boot_sector(&mut image, 512, 0, &[mbr_entry(0x00, 8, 8)]);

    let table = table_of(image, 512);

    assert_eq!(layout(&table), vec![(1, 8 * 512, 8 * 512)]);
}

#[test]
fn mbr_without_entries_is_empty_table() {
    let mut image = vec![0; 64 * 512];
    write_boot_sector(&mut image, 512, 0, &[]);

    let table = table_of(image, 512);

    assert_eq!(table.scheme, Scheme::Mbr);
    assert!(table.partitions.is_empty());
}

#[test]
fn mbr_without_signature_is_no_table() {
    let mut image = standard_mbr(512);
    image[0x1FF] = 0;

    assert!(scan_image(image, 512).unwrap().is_none());
}

#[test]
fn mbr_with_bad_boot_indicator_is_no_table() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_mbr(sector_size);
        image[0x1BE + 3 * 16] = 0x01;

        assert!(scan_image(image, sector_size).unwrap().is_none());
    }
}

#[test]
fn mbr_active_boot_indicator_is_accepted() {
    let mut image = standard_mbr(512);
    image[0x1BE] = 0x80;

    assert_eq!(table_of(image, 512).partitions.len(), 7);
}

#[test]
fn mbr_fat_boot_sector_is_no_table() {
    // A FAT boot sector: jump, OEM name, 512 bytes per sector, 4 sectors per cluster and boot
    // code that runs into the entry area.
    let mut image = vec![0; 64 * 512];
    image[0..3].copy_from_slice(&[0xEB, 0x3C, 0x90]);
    image[3..11].copy_from_slice(b"mkfs.fat");
    image[11..13].copy_from_slice(&512u16.to_le_bytes());
    image[13] = 4;
    image[0x1BE..0x1FE].fill(0xF4);
    image[0x1FE] = 0x55;
    image[0x1FF] = 0xAA;

    assert!(scan_image(image, 512).unwrap().is_none());
}

#[test]
fn mbr_misplaced_gpt_entry_is_an_error() {
    let mut image = vec![0; 64 * 512];
    write_boot_sector(
        &mut image,
        512,
        0,
        &[mbr_entry(0x83, 8, 8), mbr_entry(0xEE, 2, 60)],
    );

    let error = scan_image(image, 512).unwrap_err();

    assert!(
        matches!(
            error,
            PartitionError::ProtectiveMbrNotAtLba1 {
                slot: 2,
                first_lba: 2
            }
        ),
        "{error:?}"
    );
}

#[test]
fn mbr_partition_past_end_is_truncated() {
    for sector_size in SECTOR_SIZES {
        let mut image = vec![0; 64 * sector_size];
        write_boot_sector(&mut image, sector_size, 0, &[mbr_entry(0x83, 8, 100)]);

        let table = table_of(image, sector_size);

        assert_eq!(
            layout(&table),
            vec![(1, bytes(sector_size, 8), bytes(sector_size, 56))]
        );
        assert_eq!(
            table.warnings,
            [PartitionWarning::TruncatedAtEnd {
                number: 1,
                len_in_table: bytes(sector_size, 100),
                len: bytes(sector_size, 56),
            }]
        );
    }
}

#[test]
fn mbr_truncation_keeps_whole_512_byte_sectors() {
    // The kernel counts capacity in 512-byte sectors, so a ragged tail is not part of it.
    let mut image = vec![0; 64 * 512 + 100];
    write_boot_sector(&mut image, 512, 0, &[mbr_entry(0x83, 8, 100)]);

    let table = table_of(image, 512);

    assert_eq!(layout(&table), vec![(1, 8 * 512, 56 * 512)]);
}

#[test]
fn mbr_partition_starting_past_end_is_left_out() {
    for sector_size in SECTOR_SIZES {
        let mut image = vec![0; 64 * sector_size];
        write_boot_sector(
            &mut image,
            sector_size,
            0,
            &[mbr_entry(0x83, 8, 8), mbr_entry(0x83, 64, 8)],
        );

        let table = table_of(image, sector_size);

        assert_eq!(
            layout(&table),
            vec![(1, bytes(sector_size, 8), bytes(sector_size, 8))]
        );
        assert_eq!(
            table.warnings,
            [PartitionWarning::StartsPastEnd {
                number: 2,
                start: bytes(sector_size, 64),
                device_len: bytes(sector_size, 64),
            }]
        );
    }
}

#[test]
fn mbr_largest_values_do_not_overflow() {
    for sector_size in [512usize, 4096, 65536] {
        let mut image = vec![0; 4 * sector_size];
        write_boot_sector(
            &mut image,
            sector_size,
            0,
            &[
                mbr_entry(0x83, u32::MAX, u32::MAX),
                mbr_entry(0x05, 1, u32::MAX),
            ],
        );
        write_boot_sector(
            &mut image,
            sector_size,
            1,
            &[
                mbr_entry(0x83, u32::MAX, u32::MAX),
                mbr_entry(0x05, u32::MAX, u32::MAX),
            ],
        );

        let table = table_of(image, sector_size);

        let sector = sector_size as u64;
        assert_eq!(layout(&table), vec![(2, sector, sector.max(1024))]);
    }
}
