//! A copy-on-write overlay: a device that reads a base device and keeps every change in an
//! overlay file, so the base never changes.
//!
//! The device is cut into blocks (64 KiB for new overlays). The first write to a block copies
//! the base's bytes of that block into the overlay's data area, then the block map records
//! that the overlay holds it. Discards and zeroing mark blocks as zeroed, which reads as
//! zeroes without touching the base. The file layout is in [`format`], the map in [`map`],
//! opening files in [`file`], and folding an overlay back into its base in [`commit`].
//!
//! # Crash safety
//! Data goes to the overlay before the map names it, and the map in the file is written
//! only by [`BlockDevice::flush`], after the data is durable. A daemon killed or a machine
//! that crashed leaves an overlay that attaches and contains every write flushed before.
//!
//! # Limitations
//! Writes into blocks that the overlay did not hold yet are lost when the daemon is killed
//! before the next flush, as on a disk with a volatile write cache.

mod commit;
mod error;
mod file;
mod format;
mod identity;
mod map;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{AllocationCache, BlockDevice, allocated_sectors_in, check_range, clamp_to_device};
pub use commit::{CommitReport, commit};
pub use error::OverlayError;
pub use file::{OpenedOverlay, OverlayMode, check_overlay, open_overlay};
pub use format::DEFAULT_BLOCK_SIZE;
use format::{Header, Layout};
pub use identity::{BaseIdentity, FileIdentity};
use map::{BlockMap, BlockState, read_exact, write_exact};

/// Number of locks that serialise copy-on-write per block, chosen by block number. More than
/// the FUSE worker threads, so unrelated writers rarely share one.
const LOCK_STRIPES: usize = 64;

/// A base device seen through an overlay file.
pub struct Overlay {
    base: Arc<dyn BlockDevice>,
    /// The overlay file: header, block map and data area.
    store: Arc<dyn BlockDevice>,
    /// Path of the overlay file, for errors.
    path: PathBuf,
    layout: Layout,
    map: BlockMap,
    /// Held while a block changes state, so two first writes to one block cannot both copy
    /// the base and overwrite each other's bytes.
    locks: Vec<Mutex<()>>,
    allocation: AllocationCache,
}

impl Overlay {
    /// Starts a new, empty overlay of `base` in `store`, which must be at least as long as the
    /// layout needs, and writes its header.
    pub fn create(
        base: Arc<dyn BlockDevice>,
        store: Arc<dyn BlockDevice>,
        path: &Path,
        identity: BaseIdentity,
        block_size: u32,
    ) -> Result<Self, OverlayError> {
        let header = Header {
            block_size,
            base: identity,
            committing: false,
        };
        let layout = header.layout();
        check_store_len(store.as_ref(), &layout, path)?;

        write_exact(store.as_ref(), 0, &header.encode())
            .and_then(|()| store.flush())
            .map_err(|source| OverlayError::io(path, "writing the header", source))?;
        reserve_map(store.as_ref(), &layout, path)?;

        Ok(Self::with_map(
            base,
            store,
            path,
            layout,
            BlockMap::new(layout.block_count),
        ))
    }

    /// Opens the overlay in `store` over `base`, whose identity is `identity`.
    ///
    /// Returns the overlay and whether the base file differs from the one the overlay was made
    /// on although its size and checked contents match (see [`BaseIdentity::check`]).
    pub fn open(
        base: Arc<dyn BlockDevice>,
        store: Arc<dyn BlockDevice>,
        path: &Path,
        identity: &BaseIdentity,
        base_path: &Path,
    ) -> Result<(Self, bool), OverlayError> {
        let header = read_header(store.as_ref(), path)?;
        if header.committing {
            return Err(OverlayError::InterruptedCommit {
                path: path.to_path_buf(),
                base: base_path.to_path_buf(),
            });
        }
        let file_differs = header.base.check(identity, path, base_path)?;
        let layout = header.layout();
        check_store_len(store.as_ref(), &layout, path)?;
        if !store.read_only() {
            reserve_map(store.as_ref(), &layout, path)?;
        }
        let map = BlockMap::load(store.as_ref(), &layout, path)?;

        Ok((Self::with_map(base, store, path, layout, map), file_differs))
    }

    fn with_map(
        base: Arc<dyn BlockDevice>,
        store: Arc<dyn BlockDevice>,
        path: &Path,
        layout: Layout,
        map: BlockMap,
    ) -> Self {
        Self {
            base,
            store,
            path: path.to_path_buf(),
            layout,
            map,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            allocation: AllocationCache::default(),
        }
    }

    /// Path of the overlay file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self, block: u64) -> MutexGuard<'_, ()> {
        self.locks[block as usize % LOCK_STRIPES]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.store.read_only() {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }

    /// Offset in the overlay file of device offset `offset`.
    fn store_offset(&self, offset: u64) -> u64 {
        self.layout.data_offset + offset
    }

    /// Splits `offset..offset + len` at block boundaries: `(block, start, end)` per piece.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let end = offset + len;
        let block_size = self.layout.block_size;
        let first = offset / block_size;
        let last = end.div_ceil(block_size);

        (first..last).map(move |block| {
            let (start, block_end) = self.layout.block_range(block);
            (block, start.max(offset), block_end.min(end))
        })
    }

    fn write_block(&self, block: u64, position: u64, data: &[u8]) -> io::Result<()> {
        if self.map.get(block) == BlockState::Data {
            return write_exact(self.store.as_ref(), self.store_offset(position), data);
        }

        let _locked = self.lock(block);
        let state = self.map.get(block);
        let (start, end) = self.layout.block_range(block);
        let whole_block = position == start && position + data.len() as u64 == end;
        if state == BlockState::Data || whole_block {
            write_exact(self.store.as_ref(), self.store_offset(position), data)?;
        } else {
            self.copy_up(block, state, position, data)?;
        }
        if state != BlockState::Data {
            self.map.set(block, BlockState::Data);
        }
        Ok(())
    }

    /// Fills the overlay's copy of `block` with what the device shows there now, with `data`
    /// at `position` on top. The caller holds the block's lock.
    fn copy_up(&self, block: u64, state: BlockState, position: u64, data: &[u8]) -> io::Result<()> {
        let (start, end) = self.layout.block_range(block);
        // Clearing also covers bytes left in the data area by a write whose map entry was
        // lost in a crash.
        if state == BlockState::Zeroed || !has_data(self.base.as_ref(), start, end)? {
            self.clear_store(start, end)?;
            return write_exact(self.store.as_ref(), self.store_offset(position), data);
        }

        let mut buffer = vec![0u8; (end - start) as usize];
        read_exact(self.base.as_ref(), start, &mut buffer)?;
        let at = (position - start) as usize;
        buffer[at..at + data.len()].copy_from_slice(data);
        write_exact(self.store.as_ref(), self.store_offset(start), &buffer)
    }

    /// Makes `start..end` of the data area read as zeroes, freeing its space where the
    /// overlay file's filesystem can punch holes.
    fn clear_store(&self, start: u64, end: u64) -> io::Result<()> {
        let offset = self.store_offset(start);
        match self.store.discard(offset, end - start) {
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                write_zero_bytes(self.store.as_ref(), offset, end - start)
            }
            result => result,
        }
    }

    /// Makes `offset..offset + len` read as zeroes: whole blocks become zeroed, and parts of
    /// blocks are cleared in the overlay's copy.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.len())?;

        let (first, end) = self.whole_blocks(offset, offset + len);
        if first < end {
            // One call clears the space of all whole blocks; states follow block by block.
            let (start, _) = self.layout.block_range(first);
            let (_, stop) = self.layout.block_range(end - 1);
            self.clear_store(start, stop)?;
            for block in first..end {
                let _locked = self.lock(block);
                if self.map.get(block) != BlockState::Zeroed {
                    self.map.set(block, BlockState::Zeroed);
                }
            }
        }

        for (block, start, end) in self.pieces(offset, len) {
            if self.layout.block_range(block) != (start, end) {
                self.zero_part(block, start, end)?;
            }
        }
        Ok(())
    }

    /// Returns the blocks `first..end` that lie wholly inside `start..stop`.
    fn whole_blocks(&self, start: u64, stop: u64) -> (u64, u64) {
        let block_size = self.layout.block_size;
        let first = start.div_ceil(block_size);
        // The last block may be short; it is whole when the range reaches the device end.
        let end = if stop == self.len() {
            self.layout.block_count
        } else {
            stop / block_size
        };
        (first, end.max(first))
    }

    fn zero_part(&self, block: u64, start: u64, end: u64) -> io::Result<()> {
        let _locked = self.lock(block);
        match self.map.get(block) {
            BlockState::Zeroed => Ok(()),
            BlockState::Base if !has_data(self.base.as_ref(), start, end)? => Ok(()),
            BlockState::Base => {
                self.copy_up(block, BlockState::Base, start, &[])?;
                self.map.set(block, BlockState::Data);
                self.clear_store(start, end)
            }
            BlockState::Data => self.clear_store(start, end),
        }
    }

    /// Finds the first data offset in `position..end`, a run of blocks in `state`.
    fn seek_data_in_run(
        &self,
        state: BlockState,
        position: u64,
        end: u64,
    ) -> io::Result<Option<u64>> {
        match state {
            BlockState::Zeroed => Ok(None),
            BlockState::Base => find_data(self.base.as_ref(), position, end),
            BlockState::Data => {
                let data_offset = self.layout.data_offset;
                let found = find_data(
                    self.store.as_ref(),
                    data_offset + position,
                    data_offset + end,
                )?;
                Ok(found.map(|offset| offset - data_offset))
            }
        }
    }

    /// Finds the first hole offset in `position..end`, a run of blocks in `state`.
    fn seek_hole_in_run(
        &self,
        state: BlockState,
        position: u64,
        end: u64,
    ) -> io::Result<Option<u64>> {
        let found = match state {
            BlockState::Zeroed => return Ok(Some(position)),
            BlockState::Base => self.base.seek_hole(position)?,
            BlockState::Data => {
                let data_offset = self.layout.data_offset;
                self.store.seek_hole(data_offset + position)? - data_offset
            }
        };
        Ok((found < end).then_some(found))
    }

    /// Walks the runs of equal block states from `offset`, returning the first offset that
    /// `seek_in_run` finds.
    fn seek(
        &self,
        offset: u64,
        seek_in_run: impl Fn(BlockState, u64, u64) -> io::Result<Option<u64>>,
    ) -> io::Result<Option<u64>> {
        let mut position = offset;
        while position < self.len() {
            let block = position / self.layout.block_size;
            let run_end = (self.map.run_end(block) * self.layout.block_size).min(self.len());
            if let Some(found) = seek_in_run(self.map.get(block), position, run_end)? {
                return Ok(Some(found));
            }
            position = run_end;
        }
        Ok(None)
    }
}

impl BlockDevice for Overlay {
    fn len(&self) -> u64 {
        self.layout.base_len
    }

    fn read_only(&self) -> bool {
        self.store.read_only()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let count = clamp_to_device(offset, buf.len(), self.len());

        for (block, start, end) in self.pieces(offset, count as u64) {
            let target = &mut buf[(start - offset) as usize..(end - offset) as usize];
            match self.map.get(block) {
                BlockState::Base => read_exact(self.base.as_ref(), start, target)?,
                BlockState::Data => {
                    read_exact(self.store.as_ref(), self.store_offset(start), target)?
                }
                BlockState::Zeroed => target.fill(0),
            }
        }
        Ok(count)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.check_writable()?;
        let count = clamp_to_device(offset, data.len(), self.len());
        if count == 0 && !data.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }

        for (block, start, end) in self.pieces(offset, count as u64) {
            let piece = &data[(start - offset) as usize..(end - offset) as usize];
            self.write_block(block, start, piece)?;
        }
        Ok(count)
    }

    /// Makes the data durable, then writes the map entries changed before that, then makes
    /// them durable too.
    fn flush(&self) -> io::Result<()> {
        if self.read_only() {
            return Ok(());
        }

        // Taken before the data is synced: every entry taken names data stored before it was
        // set, so the sync below covers that data.
        // NOTE: new blocks written since the last flush are lost if the daemon is killed.
        let entries = self.map.take_dirty();
        let result = self.store.flush().and_then(|()| {
            if entries.is_empty() {
                return Ok(());
            }
            map::write_entries(self.store.as_ref(), &self.layout, &entries)?;
            self.store.flush()
        });
        if result.is_err() {
            self.map.restore_dirty(&entries);
        }
        result
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len)
    }

    /// Reserves space in the overlay file for the range, so later writes there need none.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.len())?;

        self.store.allocate(self.store_offset(offset), len)
    }

    fn seek_data(&self, offset: u64) -> io::Result<u64> {
        let found = self.seek(offset, |state, position, end| {
            self.seek_data_in_run(state, position, end)
        })?;
        found.ok_or_else(|| io::Error::from_raw_os_error(libc::ENXIO))
    }

    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        if offset >= self.len() {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        let found = self.seek(offset, |state, position, end| {
            self.seek_hole_in_run(state, position, end)
        })?;
        Ok(found.unwrap_or(self.len()))
    }

    fn allocated_sectors(&self) -> io::Result<u64> {
        self.allocation
            .get_or_count(|| allocated_sectors_in(self, 0, self.len()))
    }
}

/// Reads and decodes the header of the overlay file `path` held by `store`.
fn read_header(store: &dyn BlockDevice, path: &Path) -> Result<Header, OverlayError> {
    let mut bytes = vec![0u8; format::HEADER_LEN as usize];
    let count = store
        .read_at(0, &mut bytes)
        .map_err(|source| OverlayError::io(path, "reading the header", source))?;
    bytes.truncate(count);

    Header::decode(&bytes, path)
}

fn check_store_len(
    store: &dyn BlockDevice,
    layout: &Layout,
    path: &Path,
) -> Result<(), OverlayError> {
    if store.len() < layout.file_len() {
        return Err(OverlayError::BadHeader {
            path: path.to_path_buf(),
            field: "file size",
            found: store.len().to_string(),
            expected: format!("at least {} for its base size", layout.file_len()),
        });
    }
    Ok(())
}

/// Allocates the block map's space in the overlay file, so that a full filesystem cannot
/// keep `flush` from storing the entries of data blocks it already holds. The map takes one
/// byte per block: 1.6 MB for a 100 GiB base with 64 KiB blocks.
fn reserve_map(store: &dyn BlockDevice, layout: &Layout, path: &Path) -> Result<(), OverlayError> {
    let map_len = layout.data_offset - layout.map_offset;
    match store.allocate(layout.map_offset, map_len) {
        Ok(()) => Ok(()),
        // Without fallocate, the map's space is allocated when `flush` writes it.
        Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(source) => Err(OverlayError::io(
            path,
            "reserving space for the block map",
            source,
        )),
    }
}

/// Returns whether `start..end` of `device` contains any data.
fn has_data(device: &dyn BlockDevice, start: u64, end: u64) -> io::Result<bool> {
    Ok(find_data(device, start, end)?.is_some())
}

/// Returns the first data offset of `device` in `start..end`, if any. A device that cannot
/// tell data from holes (a block device fails `SEEK_DATA` with EINVAL) is all data.
fn find_data(device: &dyn BlockDevice, start: u64, end: u64) -> io::Result<Option<u64>> {
    match device.seek_data(start) {
        Ok(found) => Ok((found < end).then_some(found)),
        Err(error) if error.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            Ok((start < end).then_some(start))
        }
        Err(error) => Err(error),
    }
}

/// Writes `len` zero bytes at `offset`, for files that cannot punch holes.
fn write_zero_bytes(device: &dyn BlockDevice, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let piece = (len - done).min(zeroes.len() as u64) as usize;
        write_exact(device, offset + done, &zeroes[..piece])?;
        done += piece as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
