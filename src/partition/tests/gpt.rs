//! Tests of GPT header checks, the backup header and the entry array CRC.

use super::*;
use crate::partition::{GptHeaderError, GptProblem, PartitionWarning};

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
fn gpt_bad_primary_crc_uses_backup_with_warning() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_gpt(sector_size);
        image[sector_size + HEADER_CRC] ^= 0xFF;

        let table = table_of(image, sector_size);

        assert_eq!(layout(&table), standard_gpt_partitions(sector_size));
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
        let GptProblem::HeaderCrc {
            stored: found,
            computed,
        } = primary.problem
        else {
            panic!("expected a header CRC problem, got {primary}");
        };
        assert_eq!(found, stored);
        assert_ne!(computed, stored);
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
fn gpt_crc_covers_larger_header() {
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
fn gpt_rejects_inverted_usable_range() {
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
        assert_eq!(layout(&table), standard_gpt_partitions(sector_size));

        break_header(&mut image, sector_size, GPT_SECTORS - 1);
        let problem = primary_problem(error_of(image, sector_size));
        assert!(
            matches!(problem, GptProblem::EntriesCrc { .. }),
            "{problem}"
        );
    }
}

#[test]
fn gpt_missing_primary_uses_backup() {
    for sector_size in SECTOR_SIZES {
        let mut image = standard_gpt(sector_size);
        image[sector_size..2 * sector_size].fill(0);

        let table = table_of(image, sector_size);

        assert_eq!(layout(&table), standard_gpt_partitions(sector_size));
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

        assert_eq!(layout(&table), standard_gpt_partitions(sector_size));
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

        assert_eq!(layout(&table), standard_gpt_partitions(sector_size));
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

    assert_eq!(layout(&table), standard_gpt_partitions(512));
    assert_eq!(
        table.warnings,
        [PartitionWarning::UnknownGptRevision {
            revision: 0x0002_0000
        }]
    );
}

/// A GPT made with one logical sector size and read with the other has its header at the
/// other size's LBA 1, and the error names the size to attach with.
#[test]
fn gpt_wrong_sector_size_names_the_right_one() {
    for (made, read) in [(4096, 512), (512, 4096)] {
        let error = error_of(standard_gpt(made), read);

        assert!(
            matches!(
                error,
                PartitionError::GptSectorSize { sector_size, scanned }
                    if sector_size == made as u32 && scanned == read as u32
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains(&format!("-b {made}")), "{error}");
    }
}

/// The quick check gives the scan's error from the first 8 KiB alone, and nothing for a GPT
/// that fits the sector size.
#[test]
fn gpt_sector_size_check_reads_only_head() {
    for (made, read) in [(4096, 512), (512, 4096)] {
        let head = standard_gpt(made)[..8192].to_vec();
        let device = MemoryDevice::new(head.clone());

        let error = crate::partition::check_sector_size(&device, read as u32);

        assert!(
            matches!(
                error,
                Some(PartitionError::GptSectorSize { sector_size, scanned })
                    if sector_size == made as u32 && scanned == read as u32
            ),
            "{error:?}"
        );
        let device = MemoryDevice::new(head);
        assert!(crate::partition::check_sector_size(&device, made as u32).is_none());
    }
}

#[test]
fn gpt_one_sector_device_is_an_error() {
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
