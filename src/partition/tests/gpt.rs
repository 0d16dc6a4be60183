use super::*;
use crate::partition::{GptHeaderError, GptProblem, PartitionWarning, Scheme};

/// Header field offsets, as the parser reads them.
const REVISION: usize = 8;
const HEADER_SIZE: usize = 12;
const HEADER_CRC: usize = 16;
const MY_LBA: usize = 24;
const FIRST_USABLE_LBA: usize = 40;
const LAST_USABLE_LBA: usize = 48;
const DISK_GUID: usize = 56;
const ENTRIES_LBA: usize = 72;
const ENTRY_COUNT: usize = 80;
const ENTRY_SIZE: usize = 84;

fn standard_layout_bytes(sector_size: usize) -> Vec<(u32, u64, u64)> {
    let s = |sectors: u64| sectors * sector_size as u64;
    vec![
        (1, s(64), s(960)),
        (2, s(1024), s(512)),
        (4, s(1536), s(464)),
    ]
}

/// Returns the error of scanning `image`, failing the test when the scan succeeds.
fn error_of(image: Vec<u8>, sector_size: usize) -> PartitionError {
    match scan_image(image, sector_size) {
        Ok(table) => panic!("scan succeeded: {table:?}"),
        Err(error) => error,
    }
}

/// Returns the problem with the primary header when neither copy is valid.
fn primary_problem(error: PartitionError) -> GptProblem {
    match error {
        PartitionError::NoValidGpt { primary, .. } => primary.problem,
        other => panic!("expected NoValidGpt, got {other:?}"),
    }
}

/// Breaks the primary with `change`, breaks the backup, and returns the primary's problem.
fn primary_problem_after(sector_size: usize, change: impl FnOnce(&mut Vec<u8>)) -> GptProblem {
    let mut image = standard_gpt(sector_size);
    change(&mut image);
    break_header(&mut image, sector_size, GPT_SECTORS - 1);
    primary_problem(error_of(image, sector_size))
}

#[test]
fn gpt_standard_image_matches_layout() {
    for sector_size in SECTOR_SIZES {
        let table = table_of(standard_gpt(sector_size), sector_size);

        assert_eq!(table.scheme, Scheme::Gpt);
        assert_eq!(table.sector_size, sector_size as u32);
        assert_eq!(layout(&table), standard_layout_bytes(sector_size));
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
fn gpt_name_with_non_ascii_and_full_length_is_decoded() {
    let mut entries = standard_gpt_entries();
    entries[0].name = "Données ✓";
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
    assert_eq!(layout(&table), standard_layout_bytes(512));
}

#[test]
fn gpt_protective_entry_in_last_slot_with_odd_boot_indicator_is_read() {
    // The kernel checks for a protective MBR before the MBR parser looks at boot indicators.
    let mut image = standard_gpt(4096);
    let empty = mbr_entry(0, 0, 0);
    let mut protective = mbr_entry(0xEE, 1, u32::MAX);
    protective.boot_indicator = 0x01;
    write_boot_sector(&mut image, 4096, 0, &[empty, empty, empty, protective]);

    let table = table_of(image, 4096);

    assert_eq!(layout(&table), standard_layout_bytes(4096));
}

#[test]
fn gpt_bad_primary_crc_uses_backup_with_warning() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_gpt(sector_size);
        image[sector_size + HEADER_CRC] ^= 0xFF;

        let table = table_of(image, sector_size);

        assert_eq!(layout(&table), standard_layout_bytes(sector_size));
        let [
            PartitionWarning::BackupGptUsed {
                primary,
                backup_lba,
            },
        ] = &table.warnings[..]
        else {
            panic!("unexpected warnings {:?}", table.warnings);
        };
        assert_eq!(*backup_lba, GPT_SECTORS - 1);
        assert_eq!(primary.lba, 1);
        assert!(
            matches!(primary.problem, GptProblem::HeaderCrc { .. }),
            "{primary}"
        );
    }
}

#[test]
fn gpt_rejects_header_with_bad_crc() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_gpt(sector_size);
        image[sector_size + FIRST_USABLE_LBA] ^= 0x01;
        let at = sector_size + HEADER_CRC;
        let stored = u32::from_le_bytes(image[at..at + 4].try_into().unwrap());
        break_header(&mut image, sector_size, GPT_SECTORS - 1);

        let error = error_of(image, sector_size);

        let PartitionError::NoValidGpt { primary, backup } = &error else {
            panic!("expected NoValidGpt, got {error:?}");
        };
        assert!(
            matches!(primary.problem, GptProblem::HeaderCrc { stored: s, computed } if s == stored && computed != stored),
            "{primary}"
        );
        assert_eq!(backup.lba, GPT_SECTORS - 1);
        assert!(
            matches!(backup.problem, GptProblem::Signature { .. }),
            "{backup}"
        );
    }
}

#[test]
fn gpt_error_message_names_lba_offset_and_values() {
    let mut image = standard_gpt(512);
    set_header_u32(&mut image, 512, 1, ENTRY_SIZE, 256);
    break_header(&mut image, 512, GPT_SECTORS - 1);

    let message = error_of(image, 512).to_string();

    assert_eq!(
        message,
        "no valid GPT: primary GPT header at LBA 1 (0x200): entry size 256, expected 128, \
         and backup GPT header at LBA 2047 (0xffe00): signature 0x5452415020544f4e, \
         expected 0x5452415020494645 (\"EFI PART\")"
    );
}

#[test]
fn gpt_rejects_bad_signature() {
    for sector_size in SECTOR_SIZES {
        let problem = primary_problem_after(sector_size, |image| {
            break_header(image, sector_size, 1);
        });

        assert!(matches!(problem, GptProblem::Signature { .. }), "{problem}");
    }
}

#[test]
fn gpt_rejects_header_size_below_92() {
    let problem = primary_problem_after(512, |image| {
        set_header_u32(image, 512, 1, HEADER_SIZE, 91);
    });

    assert_eq!(
        problem,
        GptProblem::HeaderSize {
            found: 91,
            max: 512
        }
    );
}

#[test]
fn gpt_rejects_header_size_above_sector_size() {
    for sector_size in SECTOR_SIZES {
        let too_big = sector_size as u32 + 1;
        let problem = primary_problem_after(sector_size, |image| {
            set_header_u32(image, sector_size, 1, HEADER_SIZE, too_big);
        });

        assert_eq!(
            problem,
            GptProblem::HeaderSize {
                found: too_big,
                max: sector_size as u32
            }
        );
    }
}

#[test]
fn gpt_header_size_above_92_is_covered_by_crc() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_gpt(sector_size);
        image[sector_size + 100] = 0xAB;
        set_header_u32(&mut image, sector_size, 1, HEADER_SIZE, 104);

        let table = table_of(image.clone(), sector_size);
        assert_eq!(table.warnings, []);

        // A byte inside the larger header now breaks the CRC.
        image[sector_size + 100] = 0xAC;
        let table = table_of(image, sector_size);
        assert!(
            matches!(
                &table.warnings[..],
                [PartitionWarning::BackupGptUsed { .. }]
            ),
            "{:?}",
            table.warnings
        );
    }
}

#[test]
fn gpt_rejects_wrong_my_lba() {
    let problem = primary_problem_after(512, |image| {
        set_header_u64(image, 512, 1, MY_LBA, 2);
    });

    assert_eq!(
        problem,
        GptProblem::MyLba {
            found: 2,
            expected: 1
        }
    );
}

#[test]
fn gpt_rejects_usable_range_past_end() {
    for sector_size in SECTOR_SIZES {
        let problem = primary_problem_after(sector_size, |image| {
            set_header_u64(image, sector_size, 1, LAST_USABLE_LBA, GPT_SECTORS);
        });

        assert_eq!(
            problem,
            GptProblem::UsableRange {
                first: 2 + standard_gpt_layout(sector_size).entry_sectors(),
                last: GPT_SECTORS,
                last_lba: GPT_SECTORS - 1
            }
        );
    }
}

#[test]
fn gpt_rejects_usable_range_that_ends_before_it_starts() {
    let problem = primary_problem_after(512, |image| {
        set_header_u64(image, 512, 1, FIRST_USABLE_LBA, 1000);
        set_header_u64(image, 512, 1, LAST_USABLE_LBA, 999);
    });

    assert!(matches!(
        problem,
        GptProblem::UsableRange {
            first: 1000,
            last: 999,
            ..
        }
    ));
}

#[test]
fn gpt_rejects_entry_size_other_than_128() {
    // UEFI allows 256, but the kernel and libblkid accept only 128.
    for size in [0, 64, 256, 512] {
        let problem = primary_problem_after(512, |image| {
            set_header_u32(image, 512, 1, ENTRY_SIZE, size);
        });

        assert_eq!(problem, GptProblem::EntrySize { found: size });
    }
}

#[test]
fn gpt_rejects_zero_entries() {
    let problem = primary_problem_after(512, |image| {
        set_header_u32(image, 512, 1, ENTRY_COUNT, 0);
    });

    assert_eq!(
        problem,
        GptProblem::EntryCount {
            found: 0,
            max: 32768
        }
    );
}

#[test]
fn gpt_rejects_entry_array_over_4_mib() {
    let problem = primary_problem_after(512, |image| {
        set_header_u32(image, 512, 1, ENTRY_COUNT, 32769);
    });

    assert_eq!(
        problem,
        GptProblem::EntryCount {
            found: 32769,
            max: 32768
        }
    );
}

#[test]
fn gpt_rejects_entry_array_past_end() {
    for sector_size in SECTOR_SIZES {
        for entries_lba in [GPT_SECTORS - 1, u64::MAX / 2, u64::MAX] {
            let problem = primary_problem_after(sector_size, |image| {
                set_header_u64(image, sector_size, 1, ENTRIES_LBA, entries_lba);
            });

            assert_eq!(
                problem,
                GptProblem::EntriesPastEnd {
                    lba: entries_lba,
                    len: 128 * 128
                }
            );
        }
    }
}

#[test]
fn gpt_rejects_bad_entry_array_crc() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_gpt(sector_size);
        // Change partition 1's first LBA without updating the array CRC.
        image[2 * sector_size + 32] = 65;

        let table = table_of(image.clone(), sector_size);
        let [PartitionWarning::BackupGptUsed { primary, .. }] = &table.warnings[..] else {
            panic!("unexpected warnings {:?}", table.warnings);
        };
        assert!(
            matches!(primary.problem, GptProblem::EntriesCrc { .. }),
            "{primary}"
        );
        assert_eq!(layout(&table), standard_layout_bytes(sector_size));

        break_header(&mut image, sector_size, GPT_SECTORS - 1);
        let problem = primary_problem(error_of(image, sector_size));
        assert!(
            matches!(problem, GptProblem::EntriesCrc { .. }),
            "{problem}"
        );
    }
}

#[test]
fn gpt_backup_is_found_at_last_lba_when_primary_is_missing() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_gpt(sector_size);
        image[sector_size..2 * sector_size].fill(0);

        let table = table_of(image, sector_size);

        assert_eq!(layout(&table), standard_layout_bytes(sector_size));
        assert!(matches!(
            &table.warnings[..],
            [PartitionWarning::BackupGptUsed {
                primary: GptHeaderError {
                    lba: 1,
                    problem: GptProblem::Signature { found: 0 },
                    ..
                },
                ..
            }]
        ));
    }
}

#[test]
fn gpt_invalid_backup_is_a_warning() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_gpt(sector_size);
        image[(GPT_SECTORS as usize - 1) * sector_size + HEADER_CRC] ^= 1;

        let table = table_of(image, sector_size);

        assert_eq!(layout(&table), standard_layout_bytes(sector_size));
        let [PartitionWarning::BackupGptInvalid { backup }] = &table.warnings[..] else {
            panic!("unexpected warnings {:?}", table.warnings);
        };
        assert_eq!(backup.lba, GPT_SECTORS - 1);
        assert!(matches!(backup.problem, GptProblem::HeaderCrc { .. }));
    }
}

#[test]
fn gpt_backup_not_at_end_is_a_warning() {
    // An image grown after partitioning keeps its backup where the old end was.
    for sector_size in SECTOR_SIZES {
        let mut image = standard_gpt(sector_size);
        image.resize(image.len() + 16 * sector_size, 0);

        let table = table_of(image, sector_size);

        assert_eq!(layout(&table), standard_layout_bytes(sector_size));
        assert_eq!(
            table.warnings,
            [PartitionWarning::BackupGptNotAtEnd {
                backup_lba: GPT_SECTORS - 1,
                last_lba: GPT_SECTORS + 15
            }]
        );
    }
}

#[test]
fn gpt_headers_that_differ_are_a_warning() {
    let mut image = standard_gpt(512);
    let backup = GPT_SECTORS - 1;
    let at = backup as usize * 512 + DISK_GUID;
    image[at] ^= 0xFF;
    set_header_u64(&mut image, 512, backup, FIRST_USABLE_LBA, 40);

    let table = table_of(image, 512);

    assert_eq!(
        table.warnings,
        [PartitionWarning::GptHeadersDiffer {
            fields: vec!["FirstUsableLBA", "DiskGUID"]
        }]
    );
}

#[test]
fn gpt_unknown_revision_is_a_warning() {
    let mut image = standard_gpt(512);
    set_header_u32(&mut image, 512, 1, REVISION, 0x0002_0000);
    set_header_u32(&mut image, 512, GPT_SECTORS - 1, REVISION, 0x0002_0000);

    let table = table_of(image, 512);

    assert_eq!(layout(&table), standard_layout_bytes(512));
    assert_eq!(
        table.warnings,
        [PartitionWarning::UnknownGptRevision {
            revision: 0x0002_0000
        }]
    );
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

        assert_eq!(layout(&table), standard_layout_bytes(sector_size)[..2]);
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

#[test]
fn gpt_read_with_wrong_sector_size_is_an_error() {
    // A 4096-byte-sector GPT read as 512-byte sectors has no header at either 512-byte LBA.
    let error = error_of(standard_gpt(4096), 512);

    let PartitionError::NoValidGpt { primary, backup } = error else {
        panic!("expected NoValidGpt, got {error:?}");
    };
    assert!(matches!(
        primary.problem,
        GptProblem::Signature { found: 0 }
    ));
    assert_eq!(backup.lba, GPT_SECTORS * 8 - 1);
}

#[test]
fn gpt_on_device_of_one_sector_is_an_error() {
    let mut image = vec![0; 512];
    write_boot_sector(&mut image, 512, 0, &[mbr_entry(0xEE, 1, 1)]);

    let error = error_of(image, 512);

    let PartitionError::NoValidGpt { primary, backup } = error else {
        panic!("expected NoValidGpt, got {error:?}");
    };
    assert_eq!(primary.problem, GptProblem::PastEnd { last_lba: 0 });
    assert_eq!(backup.lba, 0);
}

#[test]
fn gpt_entry_array_crc_covers_unused_entries() {
    let mut image = standard_gpt(512);
    // A byte in the name of the last, unused entry.
    image[2 * 512 + 127 * 128 + 60] = 1;

    let table = table_of(image, 512);

    let [PartitionWarning::BackupGptUsed { primary, .. }] = &table.warnings[..] else {
        panic!("unexpected warnings {:?}", table.warnings);
    };
    assert!(
        matches!(primary.problem, GptProblem::EntriesCrc { .. }),
        "{primary}"
    );
}

#[test]
fn gpt_entry_arrays_that_differ_are_a_warning() {
    let mut image = standard_gpt(512);
    image[2 * 512 + 127 * 128 + 60] = 1;
    reseal_header(&mut image, 512, 1);

    let table = table_of(image, 512);

    assert_eq!(
        table.warnings,
        [PartitionWarning::GptHeadersDiffer {
            fields: vec!["PartitionEntryArrayCRC32"]
        }]
    );
}
