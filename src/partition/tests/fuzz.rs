//! Property tests that feed arbitrary and mutated valid images to `scan`.
//!
//! Every case must return without panicking, and a table it returns must list partitions with
//! unique, ascending numbers from 1 to 255 that lie inside the device. Run them longer with:
//!
//! ```text
//! PROPTEST_CASES=200000 cargo test --release --lib partition::tests::fuzz
//! ```

use proptest::prelude::*;

use super::*;
use crate::partition::MAX_PARTITION_NUMBER;

/// Checks the invariants that every successful scan must keep.
fn assert_sane(
    result: &Result<Option<PartitionTable>, PartitionError>,
    device_len: u64,
    sector_size: usize,
) -> Result<(), TestCaseError> {
    let Ok(Some(table)) = result else {
        return Ok(());
    };

    prop_assert_eq!(table.sector_size, sector_size as u32);
    let mut previous = 0;
    for partition in &table.partitions {
        prop_assert!(
            partition.number > previous,
            "numbers not ascending: {:?}",
            table
        );
        prop_assert!(partition.number <= MAX_PARTITION_NUMBER);
        prop_assert!(partition.len > 0, "empty partition: {:?}", partition);
        let end = partition.start.checked_add(partition.len);
        prop_assert!(
            end.is_some_and(|end| end <= device_len),
            "partition {:?} outside device of {} bytes",
            partition,
            device_len
        );
        previous = partition.number;
    }
    for warning in &table.warnings {
        prop_assert!(!warning.to_string().is_empty());
    }
    Ok(())
}

/// A change to an image: `len` bytes (1, 4 or 8) of `value`, little-endian, written at a
/// position inside one of the image's table regions.
#[derive(Debug, Clone)]
struct Mutation {
    region: usize,
    position: usize,
    value: u64,
    len: usize,
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    // Values near the edges of the test images and of the integer types reach the bounds
    // checks far more often than uniform random values.
    let value = prop_oneof![
        any::<u64>(),
        0u64..4200,
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        (0u64..64).prop_map(|below| (1u64 << 63) - below),
    ];
    let mutation = (
        any::<usize>(),
        any::<usize>(),
        value,
        prop_oneof![Just(1), Just(4), Just(8)],
    )
        .prop_map(|(region, position, value, len)| Mutation {
            region,
            position,
            value,
            len,
        });
    prop::collection::vec(mutation, 1..24)
}

/// Applies `mutations` inside `regions`, given as (start, length) byte ranges of `image`.
fn apply(image: &mut [u8], regions: &[(usize, usize)], mutations: &[Mutation]) {
    for mutation in mutations {
        let (start, len) = regions[mutation.region % regions.len()];
        let at = start + mutation.position % len;
        let end = (at + mutation.len).min(image.len());
        let bytes = mutation.value.to_le_bytes();
        image[at..end].copy_from_slice(&bytes[..end - at]);
    }
}

/// Table regions of the standard MBR image: the sector 0 entries and every EBR's entries.
fn mbr_regions(sector_size: usize) -> Vec<(usize, usize)> {
    [0usize, 512, 768, 1024]
        .iter()
        .map(|lba| (lba * sector_size + 0x1BE, 66))
        .collect()
}

/// Table regions of the standard GPT image: the protective MBR entries, both headers and the
/// first entries of both arrays.
fn gpt_regions(sector_size: usize) -> Vec<(usize, usize)> {
    let layout = standard_gpt_layout(sector_size);
    let last = layout.header_offset(layout.last_lba());
    let backup_entries = layout.header_offset(layout.backup_entries_lba());
    vec![
        (0x1BE, 66),
        (sector_size, 92),
        (2 * sector_size, 512),
        (last, 92),
        (backup_entries, 512),
    ]
}

fn sector_sizes() -> impl Strategy<Value = usize> {
    prop_oneof![Just(512usize), Just(4096usize)]
}

proptest! {
    #[test]
    fn fuzz_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..20_000),
        sector_size in sector_sizes(),
        shape in 0u8..4,
    ) {
        let mut image = bytes;
        // Random bytes almost never carry the boot signature and valid boot indicators, so
        // most cases get them, and some a protective entry too, to reach the MBR and GPT code.
        if image.len() >= 512 {
            if shape >= 1 {
                image[0x1FE] = 0x55;
                image[0x1FF] = 0xAA;
            }
            if shape >= 2 {
                for slot in 0..4 {
                    image[0x1BE + slot * 16] = 0;
                }
            }
            if shape >= 3 {
                image[0x1BE + 4] = 0xEE;
                image[0x1BE + 8..0x1BE + 12].copy_from_slice(&1u32.to_le_bytes());
            }
        }
        let len = image.len() as u64;

        let result = scan_image(image, sector_size);

        assert_sane(&result, len, sector_size)?;
    }

    #[test]
    fn fuzz_mutated_mbr(
        sector_size in sector_sizes(),
        changes in mutations(),
        truncate_to in prop::option::of(0usize..MBR_SECTORS * 4096),
    ) {
        let mut image = standard_mbr(sector_size);
        apply(&mut image, &mbr_regions(sector_size), &changes);
        if let Some(len) = truncate_to {
            image.truncate(len);
        }
        let len = image.len() as u64;

        let result = scan_image(image, sector_size);

        assert_sane(&result, len, sector_size)?;
    }

    #[test]
    fn fuzz_mutated_gpt(
        sector_size in sector_sizes(),
        changes in mutations(),
        reseal in any::<bool>(),
        truncate_to in prop::option::of(0usize..GPT_SECTORS as usize * 4096),
    ) {
        let layout = standard_gpt_layout(sector_size);
        let mut image = standard_gpt(sector_size);
        apply(&mut image, &gpt_regions(sector_size), &changes);
        // Resealing the CRCs lets mutations get past the CRC checks to the fields behind them.
        if reseal {
            reseal_header(&mut image, sector_size, 1);
            reseal_header(&mut image, sector_size, layout.last_lba());
        }
        if let Some(len) = truncate_to {
            image.truncate(len);
        }
        let len = image.len() as u64;

        let result = scan_image(image, sector_size);

        assert_sane(&result, len, sector_size)?;
    }
}
