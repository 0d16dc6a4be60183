//! Tests of GPT partition entries: numbering, types, names, limits and the protective MBR.

use super::*;
use crate::partition::{PartitionWarning, Scheme};

#[test]
fn gpt_standard_image_matches_layout() {
    for sector_size in SECTOR_SIZES {
        let table = table_of(standard_gpt(sector_size), sector_size);

        assert_eq!(table.scheme, Scheme::Gpt);
        assert_eq!(table.sector_size, sector_size as u32);
        assert_eq!(layout(&table), standard_gpt_partitions(sector_size));
        assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    }
}

#[test]
fn gpt_types_and_names_are_decoded() {
    let table = table_of(standard_gpt(512), 512);

    let types: Vec<&str> = table
        .partitions
        .iter()
        .map(|p| p.type_name.as_str())
        .collect();
    assert_eq!(types, [LINUX_FS, EFI_SYSTEM, LINUX_SWAP]);
    let labels: Vec<Option<&str>> = table
        .partitions
        .iter()
        .map(|p| p.label.as_deref())
        .collect();
    assert_eq!(labels, [Some("root"), Some("EFI system"), None]);
}

#[test]
fn gpt_long_unicode_names_are_decoded() {
    let mut entries = standard_gpt_entries();
    entries[0].name = "Donn\u{e9}es \u{2713}";
    entries[1].name = "exactly thirty-six UTF-16 code units";
    assert_eq!(entries[1].name.encode_utf16().count(), 36);

    let table = table_of(build_gpt(standard_gpt_layout(512), &entries), 512);

    assert_eq!(table.partitions[0].label.as_deref(), Some(entries[0].name));
    assert_eq!(table.partitions[1].label.as_deref(), Some(entries[1].name));
}

#[test]
fn gpt_name_with_lone_surrogate_gets_replacement_character() {
    let mut image = standard_gpt(512);
    // Partition 1's name starts with a high surrogate that no low surrogate follows.
    let name = 2 * 512 + 56;
    image[name..name + 2].copy_from_slice(&0xD800u16.to_le_bytes());
    reseal_header(&mut image, 512, 1);

    let table = table_of(image, 512);

    assert_eq!(table.partitions[0].label.as_deref(), Some("\u{FFFD}oot"));
}

#[test]
fn gpt_hybrid_mbr_is_read_as_gpt() {
    let mut image = standard_gpt(512);
    write_boot_sector(
        &mut image,
        512,
        0,
        &[mbr_entry(0xEE, 1, 63), mbr_entry(0x83, 64, 960)],
    );

    let table = table_of(image, 512);

    assert_eq!(table.scheme, Scheme::Gpt);
    assert_eq!(layout(&table), standard_gpt_partitions(512));
}

#[test]
fn gpt_protective_entry_ignores_boot_indicator() {
    // The kernel checks for a protective MBR before the MBR parser looks at boot indicators.
    let mut image = standard_gpt(4096);
    let empty = mbr_entry(0, 0, 0);
    let mut protective = mbr_entry(0xEE, 1, u32::MAX);
    protective.boot_indicator = 0x01;
    write_boot_sector(&mut image, 4096, 0, &[empty, empty, empty, protective]);

    let table = table_of(image, 4096);

    assert_eq!(layout(&table), standard_gpt_partitions(4096));
}

#[test]
fn gpt_non_default_entry_counts_are_read() {
    for sector_size in SECTOR_SIZES {
        for entry_count in [4, 16, 200] {
            let layout_with_count = GptLayout {
                entry_count,
                ..standard_gpt_layout(sector_size)
            };
            let mut entries = standard_gpt_entries();
            entries.truncate(2);
            if entry_count > 4 {
                entries.push(GptEntry {
                    index: entry_count as usize - 1,
                    type_guid: LINUX_SWAP,
                    first_lba: 1536,
                    last_lba: 1899,
                    name: "last",
                });
            }

            let table = table_of(build_gpt(layout_with_count, &entries), sector_size);

            let numbers: Vec<u32> = table.partitions.iter().map(|p| p.number).collect();
            let mut expected = vec![1, 2];
            if entry_count > 4 {
                expected.push(entry_count);
            }
            assert_eq!(numbers, expected, "{entry_count} entries at {sector_size}");
            assert!(table.warnings.is_empty(), "{:?}", table.warnings);
        }
    }
}

#[test]
fn gpt_entries_numbered_above_255_are_left_out() {
    let layout_with_count = GptLayout {
        entry_count: 300,
        ..standard_gpt_layout(512)
    };
    let entry = |index, first_lba| GptEntry {
        index,
        type_guid: LINUX_FS,
        first_lba,
        last_lba: first_lba + 9,
        name: "",
    };
    let entries = [entry(254, 100), entry(255, 200), entry(299, 300)];

    let table = table_of(build_gpt(layout_with_count, &entries), 512);

    assert_eq!(layout(&table), vec![(255, 100 * 512, 10 * 512)]);
    assert_eq!(
        table.warnings,
        [PartitionWarning::PastPartitionLimit { count: Some(2) }]
    );
}

#[test]
fn gpt_entry_past_last_lba_is_left_out() {
    // The kernel drops such an entry (is_pte_valid) rather than cutting it as it does for MBR.
    for sector_size in SECTOR_SIZES {
        let mut entries = standard_gpt_entries();
        entries[2].last_lba = GPT_SECTORS;

        let table = table_of(
            build_gpt(standard_gpt_layout(sector_size), &entries),
            sector_size,
        );

        assert_eq!(layout(&table), standard_gpt_partitions(sector_size)[..2]);
        assert_eq!(
            table.warnings,
            [PartitionWarning::GptEntryPastEnd {
                number: 4,
                first_lba: 1536,
                last_lba: GPT_SECTORS,
                device_last_lba: GPT_SECTORS - 1
            }]
        );
    }
}

#[test]
fn gpt_entry_ending_before_start_is_left_out() {
    let mut entries = standard_gpt_entries();
    entries[1].last_lba = entries[1].first_lba - 2;

    let table = table_of(build_gpt(standard_gpt_layout(512), &entries), 512);

    let numbers: Vec<u32> = table.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 4]);
    assert_eq!(
        table.warnings,
        [PartitionWarning::GptEntryEndsBeforeStart {
            number: 2,
            first_lba: 1024,
            last_lba: 1022
        }]
    );
}

#[test]
fn gpt_entry_outside_usable_range_is_kept() {
    // The kernel checks entries against the device, not against the usable LBAs.
    let mut entries = standard_gpt_entries();
    entries[0].first_lba = 1;

    let table = table_of(build_gpt(standard_gpt_layout(512), &entries), 512);

    assert_eq!(table.partitions[0].start, 512);
    assert!(table.warnings.is_empty());
}
