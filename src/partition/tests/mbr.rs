use super::*;
use crate::partition::{EbrStop, PartitionWarning, Scheme};

/// Bytes of `sectors` sectors.
fn bytes(sector_size: usize, sectors: u64) -> u64 {
    sectors * sector_size as u64
}

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
fn mbr_entry_of_type_zero_with_sectors_is_listed() {
    // The kernel skips entries by their sector count only, not by type.
    let mut image = vec![0; 64 * 512];
    write_boot_sector(&mut image, 512, 0, &[mbr_entry(0x00, 8, 8)]);

    let table = table_of(image, 512);

    assert_eq!(layout(&table), vec![(1, 8 * 512, 8 * 512)]);
}

#[test]
fn mbr_with_only_empty_entries_is_an_empty_table() {
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
fn mbr_type_ee_not_at_lba_1_is_an_error() {
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
fn mbr_logical_numbers_follow_chain_not_disk_order() {
    for sector_size in SECTOR_SIZES {
        let mut image = vec![0; 256 * sector_size];
        write_boot_sector(&mut image, sector_size, 0, &[mbr_entry(0x05, 16, 200)]);
        let logical = |ebr_lba, kind| Logical {
            ebr_lba,
            data_offset: 4,
            sectors: 20,
            kind,
        };
        // The first EBR sits at the start of the extended partition, but the chain then jumps
        // to the end and back to the middle.
        write_chain(
            &mut image,
            sector_size,
            16,
            &[logical(0, 0x83), logical(150, 0x82), logical(60, 0x07)],
        );

        let table = table_of(image, sector_size);
        let s = |sectors| bytes(sector_size, sectors);

        assert_eq!(
            layout(&table)[1..],
            [(5, s(20), s(20)), (6, s(170), s(20)), (7, s(80), s(20)),]
        );
    }
}

#[test]
fn mbr_logical_chain_that_loops_is_an_error() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_mbr(sector_size);
        // The last EBR (at 512 + 512) links back to the second (at 512 + 256).
        let last = (512 + 512) * sector_size + 0x1BE + 16;
        image[last + 4] = 0x05;
        image[last + 8..last + 12].copy_from_slice(&256u32.to_le_bytes());
        image[last + 12..last + 16].copy_from_slice(&200u32.to_le_bytes());

        let error = scan_image(image, sector_size).unwrap_err();

        assert!(
            matches!(error, PartitionError::EbrLoop { lba: 768, .. }),
            "{error:?}"
        );
    }
}

#[test]
fn mbr_logical_chain_that_does_not_advance_is_an_error() {
    let mut image = vec![0; 64 * 512];
    write_boot_sector(&mut image, 512, 0, &[mbr_entry(0x05, 8, 40)]);
    // The first EBR links to offset 0 of the extended partition: itself.
    write_boot_sector(
        &mut image,
        512,
        8,
        &[mbr_entry(0x83, 2, 4), mbr_entry(0x05, 0, 40)],
    );

    let error = scan_image(image, 512).unwrap_err();

    assert!(
        matches!(
            error,
            PartitionError::EbrLoop {
                lba: 8,
                offset: 4096
            }
        ),
        "{error:?}"
    );
}

/// Builds an extended partition whose chain has `empty` EBRs without a data partition, then
/// one EBR with a logical partition.
fn chain_with_empty_links(empty: u32) -> Vec<u8> {
    let sectors = empty as usize + 64;
    let mut image = vec![0; sectors * 512];
    write_boot_sector(
        &mut image,
        512,
        0,
        &[mbr_entry(0x05, 8, sectors as u32 - 8)],
    );
    for index in 0..empty {
        write_boot_sector(&mut image, 512, 8 + index, &[mbr_entry(0x05, index + 1, 1)]);
    }
    write_boot_sector(&mut image, 512, 8 + empty, &[mbr_entry(0x83, 1, 8)]);
    image
}

#[test]
fn mbr_chain_with_99_empty_links_reaches_its_partition() {
    let table = table_of(chain_with_empty_links(99), 512);

    assert_eq!(table.partitions.len(), 2);
    assert_eq!(table.partitions[1].number, 5);
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
}

#[test]
fn mbr_chain_stops_after_100_empty_links() {
    let table = table_of(chain_with_empty_links(100), 512);

    assert_eq!(table.partitions.len(), 1);
    assert_eq!(
        table.warnings,
        [PartitionWarning::EbrChainStopped {
            lba: 108,
            reason: EbrStop::TooManyEmptyLinks
        }]
    );
}

#[test]
fn mbr_link_to_sector_without_signature_stops_chain() {
    let mut image = standard_mbr(512);
    image[(512 + 512) * 512 + 0x1FE] = 0;

    let table = table_of(image, 512);

    let numbers: Vec<u32> = table.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        table.warnings,
        [PartitionWarning::EbrChainStopped {
            lba: 1024,
            reason: EbrStop::MissingSignature
        }]
    );
}

#[test]
fn mbr_extended_without_first_ebr_has_no_logicals_and_no_warning() {
    let mut image = vec![0; 64 * 512];
    write_boot_sector(&mut image, 512, 0, &[mbr_entry(0x05, 8, 40)]);

    let table = table_of(image, 512);

    assert_eq!(layout(&table), vec![(1, 8 * 512, 1024)]);
    assert!(table.warnings.is_empty());
}

#[test]
fn mbr_link_past_end_stops_chain() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_mbr(sector_size);
        // The second EBR links to a sector far past the end of the 2048-sector image.
        let link = (512 + 256) * sector_size + 0x1BE + 16;
        image[link + 8..link + 12].copy_from_slice(&100_000u32.to_le_bytes());

        let table = table_of(image, sector_size);

        assert_eq!(table.partitions.len(), 6);
        assert_eq!(
            table.warnings,
            [PartitionWarning::EbrChainStopped {
                lba: 100_512,
                reason: EbrStop::PastEnd
            }]
        );
    }
}

#[test]
fn mbr_ebr_with_two_data_entries_lists_both() {
    let mut image = vec![0; 128 * 512];
    write_boot_sector(&mut image, 512, 0, &[mbr_entry(0x05, 8, 100)]);
    write_boot_sector(
        &mut image,
        512,
        8,
        &[mbr_entry(0x83, 2, 10), mbr_entry(0x82, 20, 10)],
    );

    let table = table_of(image, 512);

    assert_eq!(
        layout(&table)[1..],
        [(5, 10 * 512, 10 * 512), (6, 28 * 512, 10 * 512)]
    );
}

#[test]
fn mbr_ebr_entries_3_and_4_outside_their_extent_are_ignored() {
    let mut image = vec![0; 256 * 512];
    write_boot_sector(&mut image, 512, 0, &[mbr_entry(0x05, 8, 100)]);
    let empty = mbr_entry(0, 0, 0);
    write_boot_sector(
        &mut image,
        512,
        8,
        &[
            mbr_entry(0x83, 2, 10),
            empty,
            // Inside the extended partition: kept.
            mbr_entry(0x83, 40, 10),
            // Reaches past the extended partition's end at sector 108: ignored.
            mbr_entry(0x83, 90, 20),
        ],
    );

    let table = table_of(image, 512);

    assert_eq!(
        layout(&table)[1..],
        [(5, 10 * 512, 10 * 512), (6, 48 * 512, 10 * 512)]
    );
}

#[test]
fn mbr_second_extended_partition_continues_numbering() {
    let mut image = vec![0; 256 * 512];
    write_boot_sector(
        &mut image,
        512,
        0,
        &[mbr_entry(0x05, 8, 50), mbr_entry(0x85, 100, 50)],
    );
    write_boot_sector(&mut image, 512, 8, &[mbr_entry(0x83, 2, 10)]);
    write_boot_sector(&mut image, 512, 100, &[mbr_entry(0x83, 2, 10)]);

    let table = table_of(image, 512);

    assert_eq!(
        layout(&table),
        vec![
            (1, 8 * 512, 1024),
            (2, 100 * 512, 1024),
            (5, 10 * 512, 10 * 512),
            (6, 102 * 512, 10 * 512),
        ]
    );
}

#[test]
fn mbr_logical_numbers_stop_at_255() {
    let logicals = 260u32;
    let sectors = logicals as usize * 2 + 16;
    let mut image = vec![0; sectors * 512];
    write_boot_sector(
        &mut image,
        512,
        0,
        &[mbr_entry(0x05, 8, sectors as u32 - 8)],
    );
    let chain: Vec<Logical> = (0..logicals)
        .map(|index| Logical {
            ebr_lba: index * 2,
            data_offset: 1,
            sectors: 1,
            kind: 0x83,
        })
        .collect();
    write_chain(&mut image, 512, 8, &chain);

    let table = table_of(image, 512);

    assert_eq!(table.partitions.len(), 1 + 251);
    assert_eq!(table.partitions.last().unwrap().number, 255);
    assert_eq!(
        table.warnings,
        [PartitionWarning::PastPartitionLimit { count: None }]
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
