use std::path::Path;
use std::sync::Arc;

use super::format::{HEADER_LEN, Header, Layout};
use super::*;
use crate::block::MemoryDevice;

/// Small blocks keep the fixtures small; 4 KiB is the smallest size a header may give.
const BLOCK: u32 = 4096;
const BLOCK_LEN: usize = BLOCK as usize;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

struct Fixture {
    base: Arc<MemoryDevice>,
    store: Arc<MemoryDevice>,
    overlay: Overlay,
}

fn identity_of(base: &MemoryDevice) -> BaseIdentity {
    BaseIdentity::of(base, FileIdentity::default()).unwrap()
}

/// Creates an overlay, stored in memory, over a read-only base containing `bytes`.
fn fixture(bytes: Vec<u8>) -> Fixture {
    let base = Arc::new(MemoryDevice::read_only(bytes));
    let layout = Layout::new(base.len(), BLOCK);
    let store = Arc::new(MemoryDevice::new(vec![0; layout.file_len() as usize]));
    let overlay = Overlay::create(
        base.clone(),
        store.clone(),
        Path::new("test.overlay"),
        identity_of(&base),
        BLOCK,
    )
    .unwrap();

    Fixture {
        base,
        store,
        overlay,
    }
}

/// Opens the overlay kept in `store` over `base`, as a new attachment would.
fn open_with(base: Arc<MemoryDevice>, store: MemoryDevice) -> Result<Overlay, OverlayError> {
    let identity = identity_of(&base);
    let opened = Overlay::open(
        base,
        Arc::new(store),
        Path::new("test.overlay"),
        &identity,
        Path::new("base.img"),
    );
    opened.map(|(overlay, _)| overlay)
}

/// Opens the overlay kept in `fixture.store` again, over the same base.
fn reopen(fixture: &Fixture) -> Result<Overlay, OverlayError> {
    let store = MemoryDevice::new(fixture.store.to_vec());
    open_with(fixture.base.clone(), store)
}

fn read_all(device: &dyn BlockDevice) -> Vec<u8> {
    let mut bytes = vec![0u8; device.len() as usize];
    assert_eq!(device.read_at(0, &mut bytes).unwrap(), bytes.len());
    bytes
}

#[test]
fn overlay_partial_write_keeps_rest_of_base_block() {
    let original = pattern(4 * BLOCK_LEN, 1);
    let fixture = fixture(original.clone());

    assert_eq!(
        fixture
            .overlay
            .write_at(BLOCK as u64 + 100, b"hello")
            .unwrap(),
        5
    );

    let mut expected = original.clone();
    expected[BLOCK_LEN + 100..BLOCK_LEN + 105].copy_from_slice(b"hello");
    assert_eq!(read_all(&fixture.overlay), expected);
    assert_eq!(fixture.base.to_vec(), original, "base changed");
}

#[test]
fn overlay_write_across_blocks_reads_back() {
    let original = pattern(4 * BLOCK_LEN, 2);
    let fixture = fixture(original.clone());
    let data = pattern(2 * BLOCK_LEN, 9);

    fixture.overlay.write_at(BLOCK as u64 / 2, &data).unwrap();

    let mut expected = original.clone();
    expected[BLOCK_LEN / 2..BLOCK_LEN / 2 + data.len()].copy_from_slice(&data);
    assert_eq!(read_all(&fixture.overlay), expected);
    assert_eq!(fixture.base.to_vec(), original);
}

#[test]
fn overlay_discard_reads_zeroes_without_touching_base() {
    let original = pattern(4 * BLOCK_LEN, 3);
    let fixture = fixture(original.clone());

    // One whole block and a part of the next.
    fixture
        .overlay
        .discard(BLOCK as u64, BLOCK as u64 + 10)
        .unwrap();
    fixture
        .overlay
        .write_zeroes(3 * BLOCK as u64 + 1, 2)
        .unwrap();

    let mut expected = original.clone();
    expected[BLOCK_LEN..2 * BLOCK_LEN + 10].fill(0);
    expected[3 * BLOCK_LEN + 1..3 * BLOCK_LEN + 3].fill(0);
    assert_eq!(read_all(&fixture.overlay), expected);
    assert_eq!(fixture.base.to_vec(), original);
}

#[test]
fn overlay_write_into_zeroed_block() {
    let fixture = fixture(pattern(2 * BLOCK_LEN, 4));

    fixture.overlay.discard(0, BLOCK as u64).unwrap();
    fixture.overlay.write_at(8, b"xy").unwrap();

    let mut first_block = vec![0u8; BLOCK_LEN];
    fixture.overlay.read_at(0, &mut first_block).unwrap();
    assert_eq!(&first_block[8..10], b"xy");
    assert!(
        first_block[..8]
            .iter()
            .chain(&first_block[10..])
            .all(|&b| b == 0)
    );
}

#[test]
fn overlay_discard_to_end_covers_short_last_block() {
    let original = pattern(2 * BLOCK_LEN + 512, 5);
    let fixture = fixture(original.clone());

    fixture.overlay.discard(0, original.len() as u64).unwrap();

    assert!(read_all(&fixture.overlay).iter().all(|&b| b == 0));
    assert_eq!(fixture.overlay.map.get(2), BlockState::Zeroed);
}

#[test]
fn overlay_flushed_writes_survive_reopen() {
    let original = pattern(4 * BLOCK_LEN, 6);
    let fixture = fixture(original.clone());
    fixture.overlay.write_at(10, b"kept").unwrap();
    fixture
        .overlay
        .discard(2 * BLOCK as u64, BLOCK as u64)
        .unwrap();

    fixture.overlay.flush().unwrap();
    let reopened = reopen(&fixture).unwrap();

    assert_eq!(read_all(&reopened), read_all(&fixture.overlay));
    assert_ne!(read_all(&reopened), original);
}

#[test]
fn overlay_map_is_written_only_by_flush() {
    let original = pattern(2 * BLOCK_LEN, 7);
    let fixture = fixture(original.clone());

    fixture.overlay.write_at(0, b"unflushed").unwrap();
    let reopened = reopen(&fixture).unwrap();

    // The data reached the overlay file, but no map entry names it yet: a crash here
    // shows the base, never a block the map claims without its data.
    assert_eq!(read_all(&reopened), original);
}

#[test]
fn overlay_write_past_end_is_enospc() {
    let fixture = fixture(pattern(BLOCK_LEN, 8));

    let error = fixture.overlay.write_at(BLOCK as u64, b"x").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(
        fixture.overlay.write_at(BLOCK as u64 - 2, b"xyz").unwrap(),
        2
    );
}

#[test]
fn read_only_overlay_rejects_writes() {
    let fixture = fixture(pattern(BLOCK_LEN, 9));
    fixture.overlay.flush().unwrap();
    let store = MemoryDevice::read_only(fixture.store.to_vec());
    let overlay = open_with(fixture.base.clone(), store).unwrap();

    for error in [
        overlay.write_at(0, b"x").unwrap_err(),
        overlay.discard(0, 512).unwrap_err(),
    ] {
        assert_eq!(error.raw_os_error(), Some(libc::EROFS));
    }
}

#[test]
fn overlay_seek_treats_zeroed_blocks_as_holes() {
    let fixture = fixture(pattern(4 * BLOCK_LEN, 10));
    let block = BLOCK as u64;

    fixture.overlay.discard(block, 2 * block).unwrap();

    assert_eq!(fixture.overlay.seek_hole(0).unwrap(), block);
    assert_eq!(fixture.overlay.seek_data(block).unwrap(), 3 * block);
    assert_eq!(fixture.overlay.seek_hole(3 * block).unwrap(), 4 * block);
    assert_eq!(
        fixture.overlay.allocated_sectors().unwrap(),
        2 * block / 512
    );
    let error = fixture.overlay.seek_data(4 * block).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENXIO));
}

#[test]
fn overlay_open_rejects_base_of_other_size() {
    let fixture = fixture(pattern(2 * BLOCK_LEN, 11));
    let other = MemoryDevice::read_only(pattern(3 * BLOCK_LEN, 11));
    let store = MemoryDevice::new(fixture.store.to_vec());

    let error = open_with(Arc::new(other), store).map(|_| ()).unwrap_err();
    assert!(
        matches!(
            error,
            OverlayError::SizeMismatch {
                found: 12288,
                expected: 8192,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn overlay_open_rejects_base_with_other_content() {
    let fixture = fixture(pattern(2 * BLOCK_LEN, 12));
    let other = MemoryDevice::read_only(pattern(2 * BLOCK_LEN, 13));
    let store = MemoryDevice::new(fixture.store.to_vec());

    let error = open_with(Arc::new(other), store).map(|_| ()).unwrap_err();
    assert!(
        matches!(
            error,
            OverlayError::ContentMismatch {
                region: "first MiB",
                ..
            }
        ),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.starts_with("test.overlay: made for another image"),
        "{message}"
    );
    assert!(message.contains("base.img"), "{message}");
}

#[test]
fn header_round_trips() {
    let base = MemoryDevice::read_only(pattern(3 * BLOCK_LEN, 14));
    let header = Header {
        block_size: DEFAULT_BLOCK_SIZE,
        base: identity_of(&base),
        committing: true,
    };

    let decoded = Header::decode(&header.encode(), Path::new("x.overlay")).unwrap();
    assert_eq!(decoded, header);
}

#[test]
fn header_rejects_each_broken_field() {
    let base = MemoryDevice::read_only(pattern(BLOCK_LEN, 15));
    let good = Header {
        block_size: BLOCK,
        base: identity_of(&base),
        committing: false,
    }
    .encode();
    let path = Path::new("x.overlay");

    let mut magic = good.clone();
    magic[0] = b'L';
    assert!(matches!(
        Header::decode(&magic, path),
        Err(OverlayError::NotAnOverlay { .. })
    ));

    let mut version = good.clone();
    version[16] = 9;
    assert!(matches!(
        Header::decode(&version, path),
        Err(OverlayError::UnsupportedVersion { found: 9, .. })
    ));

    let mut torn = good.clone();
    torn[33] ^= 1;
    assert!(matches!(
        Header::decode(&torn, path),
        Err(OverlayError::BadHeader {
            field: "header SHA-256",
            ..
        })
    ));

    assert!(matches!(
        Header::decode(&good[..HEADER_LEN as usize - 1], path),
        Err(OverlayError::Truncated { len, .. }) if len == HEADER_LEN - 1
    ));
}

#[test]
fn map_rejects_unknown_state_byte() {
    let fixture = fixture(pattern(2 * BLOCK_LEN, 16));
    fixture.overlay.flush().unwrap();
    fixture.store.write_at(HEADER_LEN + 1, &[7]).unwrap();

    let error = reopen(&fixture).map(|_| ()).unwrap_err();
    assert!(
        matches!(
            error,
            OverlayError::BadMapEntry {
                block: 1,
                found: 7,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn layout_aligns_data_to_block_size() {
    let layout = Layout::new(100 << 30, DEFAULT_BLOCK_SIZE);

    assert_eq!(layout.block_count, 1_638_400);
    assert_eq!(layout.data_offset % u64::from(DEFAULT_BLOCK_SIZE), 0);
    assert!(layout.data_offset >= HEADER_LEN + layout.block_count);
    assert_eq!(layout.file_len(), layout.data_offset + (100 << 30));
}

mod files;
