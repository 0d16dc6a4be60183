//! The block map of an overlay: which blocks the overlay contains, in memory and on disk.
//!
//! The map in memory is the truth while attached. The map in the file lags behind it: an
//! entry is written there only by [`super::Overlay::flush`], after the data it names is
//! durable, so after a crash the file never claims a block whose data was not written.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use super::error::OverlayError;
use super::format::Layout;
use crate::block::BlockDevice;

/// Source of a block's bytes, stored as one byte per block in the overlay file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockState {
    /// The base image's bytes; the overlay holds nothing for this block.
    Base = 0,
    /// The overlay's bytes, in its data area.
    Data = 1,
    /// Zeroes: the block was discarded or zeroed through the overlay.
    Zeroed = 2,
}

impl BlockState {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Base),
            1 => Some(Self::Data),
            2 => Some(Self::Zeroed),
            _ => None,
        }
    }
}

/// Bytes of the map read or written at a time.
const CHUNK: usize = 1 << 20;

/// The state of every block, and which entries changed since the last flush.
pub struct BlockMap {
    states: Vec<AtomicU8>,
    /// One bit per block, set after its state changed and cleared by [`BlockMap::take_dirty`].
    dirty: Vec<AtomicU64>,
}

impl BlockMap {
    /// Creates a map of `count` blocks that all show the base.
    pub fn new(count: u64) -> Self {
        Self {
            states: (0..count)
                .map(|_| AtomicU8::new(BlockState::Base as u8))
                .collect(),
            dirty: (0..count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Reads the map of the overlay file `path` from `store`.
    pub fn load(
        store: &dyn BlockDevice,
        layout: &Layout,
        path: &Path,
    ) -> Result<Self, OverlayError> {
        let map = Self::new(layout.block_count);
        let mut buffer = vec![0u8; CHUNK];

        for first in (0..layout.block_count).step_by(CHUNK) {
            let count = (layout.block_count - first).min(CHUNK as u64) as usize;
            let offset = layout.map_offset + first;
            read_exact(store, offset, &mut buffer[..count])
                .map_err(|source| OverlayError::io(path, "reading the block map", source))?;

            for (index, &byte) in buffer[..count].iter().enumerate() {
                let block = first + index as u64;
                let state = BlockState::from_byte(byte).ok_or(OverlayError::BadMapEntry {
                    path: path.to_path_buf(),
                    block,
                    offset: layout.map_offset + block,
                    found: byte,
                })?;
                map.states[block as usize].store(state as u8, Ordering::Relaxed);
            }
        }

        Ok(map)
    }

    pub fn len(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn get(&self, block: u64) -> BlockState {
        let byte = self.states[block as usize].load(Ordering::Acquire);
        BlockState::from_byte(byte).expect("only valid states are stored")
    }

    /// Sets the state of `block` and marks its entry for the next flush.
    ///
    /// Callers store the data a state names before setting it, so a reader or a flush
    /// that finds the state also finds the data.
    pub fn set(&self, block: u64, state: BlockState) {
        self.states[block as usize].store(state as u8, Ordering::Release);
        self.mark_dirty(block);
    }

    fn mark_dirty(&self, block: u64) {
        self.dirty[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::AcqRel);
    }

    /// Returns the first block after `block` whose state differs from that of `block`, or the
    /// block count: the end of the run of equal states that `block` starts.
    pub fn run_end(&self, block: u64) -> u64 {
        let state = self.states[block as usize].load(Ordering::Acquire);
        let rest = &self.states[block as usize + 1..];
        let offset = rest
            .iter()
            .position(|other| other.load(Ordering::Acquire) != state)
            .unwrap_or(rest.len());

        block + 1 + offset as u64
    }

    /// Takes the entries changed since the last call, with their states as of now, in block
    /// order.
    pub fn take_dirty(&self) -> Vec<(u64, BlockState)> {
        let mut entries = Vec::new();
        for (index, word) in self.dirty.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let block = index as u64 * 64 + u64::from(bits.trailing_zeros());
                entries.push((block, self.get(block)));
                bits &= bits - 1;
            }
        }
        entries
    }

    /// Marks `entries` for the next flush again, after writing them failed.
    pub fn restore_dirty(&self, entries: &[(u64, BlockState)]) {
        for (block, _) in entries {
            self.mark_dirty(*block);
        }
    }
}

/// Writes `entries` (in block order) into the map area of `store`, one write per run of
/// consecutive blocks.
pub fn write_entries(
    store: &dyn BlockDevice,
    layout: &Layout,
    entries: &[(u64, BlockState)],
) -> io::Result<()> {
    let mut run: Vec<u8> = Vec::new();
    let mut run_start = 0;

    for (index, &(block, state)) in entries.iter().enumerate() {
        if run.is_empty() {
            run_start = block;
        }
        run.push(state as u8);

        let next_follows = entries
            .get(index + 1)
            .is_some_and(|&(next, _)| next == block + 1);
        if !next_follows || run.len() >= CHUNK {
            write_exact(store, layout.map_offset + run_start, &run)?;
            run.clear();
        }
    }
    Ok(())
}

/// Reads exactly `buffer.len()` bytes at `offset`.
pub fn read_exact(device: &dyn BlockDevice, offset: u64, buffer: &mut [u8]) -> io::Result<()> {
    let count = device.read_at(offset, buffer)?;
    if count < buffer.len() {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    Ok(())
}

/// Writes all of `data` at `offset`.
pub fn write_exact(device: &dyn BlockDevice, offset: u64, data: &[u8]) -> io::Result<()> {
    let count = device.write_at(offset, data)?;
    if count < data.len() {
        return Err(io::Error::from_raw_os_error(libc::ENOSPC));
    }
    Ok(())
}
