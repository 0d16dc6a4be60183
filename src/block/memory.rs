//! An in-memory block device, for tests and for parsing tables from byte buffers.

use std::io;
use std::sync::RwLock;

use super::{BlockDevice, check_range, clamp_to_device};

/// A device whose bytes live in a vector. Holes are not tracked: every byte counts as data.
pub struct MemoryDevice {
    bytes: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemoryDevice {
    /// Creates a writable device holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
            read_only: false,
        }
    }

    /// Creates a device holding `bytes` that rejects every change with `EROFS`.
    pub fn read_only(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
            read_only: true,
        }
    }

    /// Returns a copy of the device's bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }

    fn fill_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.len())?;

        let mut bytes = self
            .bytes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let start = offset as usize;
        bytes[start..start + len as usize].fill(0);
        Ok(())
    }
}

impl BlockDevice for MemoryDevice {
    fn len(&self) -> u64 {
        self.bytes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let bytes = self
            .bytes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = clamp_to_device(offset, buf.len(), bytes.len() as u64);
        if count > 0 {
            let start = offset as usize;
            buf[..count].copy_from_slice(&bytes[start..start + count]);
        }
        Ok(count)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.check_writable()?;

        let mut bytes = self
            .bytes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = clamp_to_device(offset, data.len(), bytes.len() as u64);
        if count == 0 && !data.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let start = offset as usize;
        bytes[start..start + count].copy_from_slice(&data[..count]);
        Ok(count)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fill_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fill_zeroes(offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.len())
    }

    fn seek_data(&self, offset: u64) -> io::Result<u64> {
        if offset >= self.len() {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        Ok(offset)
    }

    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        if offset >= self.len() {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        Ok(self.len())
    }

    fn allocated_sectors(&self) -> io::Result<u64> {
        Ok(self.len().div_ceil(512))
    }
}
