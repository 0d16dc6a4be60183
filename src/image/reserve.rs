//! Tracking which pages of an image have backing storage reserved.
//!
//! Storing into a hole through a shared mapping allocates blocks at page-fault time. When the
//! backing filesystem is full, the fault raises `SIGBUS` instead of returning an error. So a
//! write near a hole goes through `pwrite`, which allocates the blocks or fails with `ENOSPC`.
//! The pages it filled are recorded here, and writes where all pages are recorded use the
//! mapping.

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

    /// Returns the range `(start, end)` of the pages that lie wholly inside
    /// `offset..offset + len`. The range is empty when there is none.
    pub fn whole_pages(offset: u64, len: u64) -> (u64, u64) {
        let first = offset.div_ceil(PAGE_SIZE);
        let end = (offset + len) / PAGE_SIZE;
        (first, end.max(first))
    }

    /// Returns whether every page in `first..end` is marked reserved.
    pub fn all_reserved(&self, first: u64, end: u64) -> bool {
        word_masks(first, end).all(|(page, mask)| {
            self.word(page)
                .is_some_and(|word| word.load(Ordering::Acquire) & mask == mask)
        })
    }

    /// Marks the pages `first..end` as reserved.
    pub fn mark(&self, first: u64, end: u64) {
        for (page, mask) in word_masks(first, end) {
            if let Some(word) = self.word_or_allocate(page) {
                word.fetch_or(mask, Ordering::Release);
            }
        }
    }

    /// Marks the pages `first..end` as not reserved, after their blocks were freed.
    pub fn clear(&self, first: u64, end: u64) {
        for (page, mask) in word_masks(first, end) {
            if let Some(word) = self.word(page) {
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

    /// Returns the chunk holding `page` and the index of its word in that chunk.
    fn locate(page: u64) -> (usize, usize) {
        let chunk = (page / PAGES_PER_CHUNK) as usize;
        let in_chunk = page % PAGES_PER_CHUNK;
        (chunk, (in_chunk / 64) as usize)
    }

    fn word(&self, page: u64) -> Option<&AtomicU64> {
        let (chunk, word) = Self::locate(page);
        let words = self.chunks.get(chunk)?.get()?;
        Some(&words[word])
    }

    fn word_or_allocate(&self, page: u64) -> Option<&AtomicU64> {
        let (chunk, word) = Self::locate(page);
        let words = self
            .chunks
            .get(chunk)?
            .get_or_init(|| (0..WORDS_PER_CHUNK).map(|_| AtomicU64::new(0)).collect());
        Some(&words[word])
    }
}

/// Splits the pages `first..end` into the words of bits they fall in: yields a page of each
/// word and the mask of the word's bits inside the range. A word never spans two chunks,
/// because a chunk contains a whole number of words.
fn word_masks(first: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut page = first;
    std::iter::from_fn(move || {
        if page >= end {
            return None;
        }
        let stop = ((page / 64 + 1) * 64).min(end);
        let count = stop - page;
        let bits = if count == 64 {
            u64::MAX
        } else {
            (1u64 << count) - 1
        };
        let item = (page, bits << (page % 64));
        page = stop;
        Some(item)
    })
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

    #[test]
    fn reservation_crosses_words_and_chunks() {
        let map = ReservationMap::new(3 << 30);
        let start = PAGES_PER_CHUNK - 70;
        let end = PAGES_PER_CHUNK + 70;

        map.mark(start, end);
        assert!(map.all_reserved(start, end));
        assert!(map.all_reserved(start + 1, end - 1));
        assert!(!map.all_reserved(start - 1, end));
        assert!(!map.all_reserved(start, end + 1));

        map.clear(PAGES_PER_CHUNK, PAGES_PER_CHUNK + 1);
        assert!(map.all_reserved(start, PAGES_PER_CHUNK));
        assert!(!map.all_reserved(start, end));
        assert!(map.all_reserved(PAGES_PER_CHUNK + 1, end));
        assert!(map.all_reserved(5, 5), "an empty range is reserved");
    }

    #[test]
    fn whole_pages_leave_out_partial_ones() {
        assert_eq!(ReservationMap::whole_pages(0, 8192), (0, 2));
        assert_eq!(ReservationMap::whole_pages(1, 8192), (1, 2));
        assert_eq!(ReservationMap::whole_pages(4095, 2), (1, 1));
        assert_eq!(ReservationMap::whole_pages(4096, 4095), (1, 1));
        assert_eq!(ReservationMap::whole_pages(4096, 0), (1, 1));
    }
}
