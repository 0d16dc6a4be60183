//! Block devices: the byte-addressed view that the FUSE layer serves.
//!
//! A [`BlockDevice`] has a fixed length and positional reads and writes. The mapped image
//! implements it, [`Window`] exposes a byte range of another device (an `--offset`
//! attachment or a partition), and [`Overlay`] keeps the writes to a read-only base device in
//! a copy-on-write overlay file. This module does not depend on FUSE or the command line.
#![forbid(unsafe_code)]

use std::io;
use std::sync::Arc;

mod allocation;
mod memory;
pub mod overlay;

pub use allocation::{AllocationCache, allocated_sectors_in};
pub use memory::MemoryDevice;
pub use overlay::Overlay;

/// A fixed-size device with positional I/O.
///
/// Offsets are relative to the start of the device. Reads past the end return 0 bytes and
/// reads that cross it are shortened. Writes that start at or past the end fail with
/// `ENOSPC` and writes that cross it are shortened, as with a block device.
pub trait BlockDevice: Send + Sync {
    /// Length of the device in bytes.
    fn len(&self) -> u64;

    /// Returns whether the device has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns whether writes, discards and zeroing are rejected with `EROFS`.
    fn read_only(&self) -> bool;

    /// Copies bytes at `offset` into `buf` and returns how many were copied.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;

    /// Copies `data` to `offset` and returns how many bytes were written.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<usize>;

    /// Makes every completed write durable in the backing file.
    fn flush(&self) -> io::Result<()>;

    /// Deallocates a range so that it reads as zeroes (punch hole).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes a range read as zeroes, keeping or creating its allocation (zero range).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Allocates backing storage for a range without changing its contents.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Returns the first offset at or after `offset` that contains data, or `ENXIO` when none.
    fn seek_data(&self, offset: u64) -> io::Result<u64>;

    /// Returns the first offset at or after `offset` in a hole; the end counts as a hole.
    fn seek_hole(&self, offset: u64) -> io::Result<u64>;

    /// Bytes of backing storage allocated for this device, in 512-byte units (as `st_blocks`).
    fn allocated_sectors(&self) -> io::Result<u64>;
}

/// Clamps a request of `requested` bytes at `offset` to a device of `device_len` bytes.
///
/// Returns the number of bytes that fit, which is 0 when `offset` is at or past the end.
pub fn clamp_to_device(offset: u64, requested: usize, device_len: u64) -> usize {
    let available = device_len.saturating_sub(offset);

    usize::try_from(available).map_or(requested, |available| requested.min(available))
}

/// Checks that the range `offset..offset + len` lies inside a device of `device_len` bytes.
pub fn check_range(offset: u64, len: u64, device_len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= device_len => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// A byte range of another device, seen as a device of its own.
///
/// Every offset is shifted by `start` and every request is confined to `len` bytes, so a
/// window can never read or change bytes outside its range.
pub struct Window {
    inner: Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
    allocation: AllocationCache,
}

impl Window {
    /// Creates a window of `len` bytes starting at `start` of `inner`.
    ///
    /// Fails with `EINVAL` when the range does not fit inside `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>, start: u64, len: u64) -> io::Result<Self> {
        check_range(start, len, inner.len())?;

        Ok(Self {
            inner,
            start,
            len,
            allocation: AllocationCache::default(),
        })
    }

    /// Offset of the window inside the underlying device.
    pub fn start(&self) -> u64 {
        self.start
    }

    fn inner_offset(&self, offset: u64) -> u64 {
        self.start + offset
    }

    /// Maps an offset returned by the inner device back into the window, clamping to its end.
    fn window_offset(&self, inner_offset: u64) -> u64 {
        inner_offset.saturating_sub(self.start).min(self.len)
    }
}

impl BlockDevice for Window {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let count = clamp_to_device(offset, buf.len(), self.len);
        if count == 0 {
            return Ok(0);
        }

        self.inner
            .read_at(self.inner_offset(offset), &mut buf[..count])
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<usize> {
        let count = clamp_to_device(offset, data.len(), self.len);
        if count == 0 && !data.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }

        self.inner
            .write_at(self.inner_offset(offset), &data[..count])
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.len)?;
        self.inner.discard(self.inner_offset(offset), len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.len)?;
        self.inner.write_zeroes(self.inner_offset(offset), len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.len)?;
        self.inner.allocate(self.inner_offset(offset), len)
    }

    fn seek_data(&self, offset: u64) -> io::Result<u64> {
        if offset >= self.len {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }

        let found = self.inner.seek_data(self.inner_offset(offset))?;
        if found >= self.start + self.len {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }

        Ok(self.window_offset(found))
    }

    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        if offset >= self.len {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }

        let found = self.inner.seek_hole(self.inner_offset(offset))?;

        Ok(self.window_offset(found))
    }

    fn allocated_sectors(&self) -> io::Result<u64> {
        let (start, end) = (self.start, self.start + self.len);
        self.allocation
            .get_or_count(|| allocated_sectors_in(self.inner.as_ref(), start, end))
    }
}

#[cfg(test)]
mod tests;
