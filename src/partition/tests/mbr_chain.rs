//! Tests of MBR logical partitions: the EBR chain, its limits and its damage.

use super::*;
use crate::partition::{EbrStop, PartitionWarning};

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

/// A loop in the chain ends it where it closes: the partitions read so far, primaries
/// included, stay, each listed once as util-linux lists them.
#[test]
fn mbr_logical_chain_that_loops_stops_there() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_mbr(sector_size);
        let before = layout(&table_of(image.clone(), sector_size));
        // The last EBR (at 512 + 512) links back to the second (at 512 + 256).
        let last = (512 + 512) * sector_size + 0x1BE + 16;
        image[last + 4] = 0x05;
        image[last + 8..last + 12].copy_from_slice(&256u32.to_le_bytes());
        image[last + 12..last + 16].copy_from_slice(&200u32.to_le_bytes());

        let table = table_of(image, sector_size);

        assert_eq!(layout(&table), before);
        assert_eq!(
            table.warnings,
            [PartitionWarning::EbrChainStopped {
                lba: 768,
                reason: EbrStop::Loop
            }]
        );
    }
}

#[test]
fn mbr_chain_linking_to_itself_keeps_its_partition() {
    let mut image = vec![0; 64 * 512];
    write_boot_sector(
        &mut image,
        512,
        0,
        &[mbr_entry(0x83, 1, 6), mbr_entry(0x05, 8, 40)],
    );
    // The first EBR links to offset 0 of the extended partition: itself.
    write_boot_sector(
        &mut image,
        512,
        8,
        &[mbr_entry(0x83, 2, 4), mbr_entry(0x05, 0, 40)],
    );

    let table = table_of(image, 512);

    assert_eq!(
        layout(&table),
        [
            (1, 512, 6 * 512),
            (2, 8 * 512, 1024),
            (5, 10 * 512, 4 * 512)
        ]
    );
    assert_eq!(
        table.warnings,
        [PartitionWarning::EbrChainStopped {
            lba: 8,
            reason: EbrStop::Loop
        }]
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
fn mbr_chain_allows_99_empty_links() {
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
fn mbr_extended_without_ebr_is_quiet() {
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
fn mbr_ebr_garbage_entries_are_ignored() {
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
