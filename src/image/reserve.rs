//! Tracking which pages of an image have backing storage reserved.
//!
//! Storing into a hole through a shared mapping allocates blocks at page-fault time. When the
//! backing filesystem is full, the fault raises `SIGBUS` instead of returning an error. Before
//! the first write to a page, the image reserves its blocks with `fallocate` and records the
//! page here, so a full filesystem shows up as `ENOSPC` on the write request.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Granularity of the map: one bit for each 4 KiB page of the image.
pub const PAGE_SIZE: u64 = 4096;

/// Pages covered by one lazily allocated chunk of bits (1 GiB of image, 32 KiB of bits).
const PAGES_PER_CHUNK: u64 = 1 << 18;
const WORDS_PER_CHUNK: usize = (PAGES_PER_CHUNK / 64) as usize;

/// A bitmap of reserved pages whose memory grows with the regions written, not with the
/// image size: a chunk of bits is allocated on the first write into its gigabyte.
pub struct ReservationMap {
    chunks: Vec<OnceLock<Box<[AtomicU64]>>>,
}

impl ReservationMap {
    /// Creates an empty map for an image of `len` bytes.
    pub fn new(len: u64) -> Self {
        let pages = len.div_ceil(PAGE_SIZE);
        let chunk_count = pages.div_ceil(PAGES_PER_CHUNK) as usize;

        Self {
            chunks: (0..chunk_count).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Returns the page-aligned range `(start, end)` of pages covering `offset..offset + len`.
    pub fn page_span(offset: u64, len: u64) -> (u64, u64) {
        let first = offset / PAGE_SIZE;
        let end = (offset + len).div_ceil(PAGE_SIZE);
        (first, end)
    }

    /// Returns whether every page in `first..end` is marked reserved.
    pub fn all_reserved(&self, first: u64, end: u64) -> bool {
        (first..end).all(|page| {
            self.bit(page)
                .is_some_and(|(word, mask)| word.load(Ordering::Acquire) & mask != 0)
        })
    }

    /// Marks the pages `first..end` as reserved.
    pub fn mark(&self, first: u64, end: u64) {
        for page in first..end {
            if let Some((word, mask)) = self.bit_or_allocate(page) {
                word.fetch_or(mask, Ordering::Release);
            }
        }
    }

    /// Marks the pages `first..end` as not reserved, after their blocks were freed.
    pub fn clear(&self, first: u64, end: u64) {
        for page in first..end {
            if let Some((word, mask)) = self.bit(page) {
                word.fetch_and(!mask, Ordering::Release);
            }
        }
    }

    /// Bytes of memory held by allocated chunks, for diagnostics.
    pub fn memory_bytes(&self) -> usize {
        let allocated = self
            .chunks
            .iter()
            .filter(|chunk| chunk.get().is_some())
            .count();
        allocated * WORDS_PER_CHUNK * std::mem::size_of::<AtomicU64>()
    }

    fn locate(page: u64) -> (usize, usize, u64) {
        let chunk = (page / PAGES_PER_CHUNK) as usize;
        let in_chunk = page % PAGES_PER_CHUNK;
        (chunk, (in_chunk / 64) as usize, 1u64 << (in_chunk % 64))
    }

    fn bit(&self, page: u64) -> Option<(&AtomicU64, u64)> {
        let (chunk, word, mask) = Self::locate(page);
        let words = self.chunks.get(chunk)?.get()?;
        Some((&words[word], mask))
    }

    fn bit_or_allocate(&self, page: u64) -> Option<(&AtomicU64, u64)> {
        let (chunk, word, mask) = Self::locate(page);
        let words = self
            .chunks
            .get(chunk)?
            .get_or_init(|| (0..WORDS_PER_CHUNK).map(|_| AtomicU64::new(0)).collect());
        Some((&words[word], mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_mark_then_clear() {
        let map = ReservationMap::new(3 << 30);

        assert!(!map.all_reserved(10, 12));
        map.mark(10, 12);
        assert!(map.all_reserved(10, 12));
        assert!(!map.all_reserved(9, 12));

        map.clear(11, 12);
        assert!(map.all_reserved(10, 11));
        assert!(!map.all_reserved(10, 12));
    }

    #[test]
    fn reservation_memory_follows_written_regions() {
        let map = ReservationMap::new(100 << 30);
        assert_eq!(map.memory_bytes(), 0);

        let (first, end) = ReservationMap::page_span(50 << 30, 8192);
        map.mark(first, end);
        assert_eq!(map.memory_bytes(), WORDS_PER_CHUNK * 8);
    }

    #[test]
    fn reservation_span_covers_partial_pages() {
        assert_eq!(ReservationMap::page_span(4095, 2), (0, 2));
        assert_eq!(ReservationMap::page_span(4096, 4096), (1, 2));
        assert_eq!(ReservationMap::page_span(0, 0), (0, 0));
    }
}
