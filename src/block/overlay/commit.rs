//! Folding an overlay back into its base image (`loopfuse commit`).
//!
//! The header's committing flag is set and made durable before the first byte of the base
//! changes. While it is set, attaching is rejected and the base checks are skipped (the base
//! is partly updated), so running the commit again after an interruption finishes it: copying
//! the same blocks twice gives the same bytes.

use std::io;
use std::path::Path;

use super::error::OverlayError;
use super::file::identity_of;
use super::format::{Header, Layout};
use super::map::{BlockMap, BlockState, read_exact, write_exact};
use super::{check_store_len, find_data, read_header, write_zero_bytes};
use crate::block::BlockDevice;
use crate::image::{Access, Image};

/// Bytes copied from the overlay to the base per request.
const COPY_CHUNK: u64 = 1 << 20;

/// Amounts of the base image a commit changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// Bytes copied from the overlay's data.
    pub copied: u64,
    /// Bytes made zero (punched where the base's filesystem can).
    pub zeroed: u64,
}

/// Writes every block the overlay at `overlay_path` holds into the image at `image_path`,
/// then empties the overlay and records the updated image as its base, so the overlay can
/// be attached again on top of it.
///
/// `progress` is called with `(bytes done, bytes to do)` as the commit advances. Both files
/// are locked for writing, so neither may be attached meanwhile.
pub fn commit(
    overlay_path: &Path,
    image_path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CommitReport, OverlayError> {
    if !overlay_path.exists() {
        return Err(OverlayError::NotFound {
            path: overlay_path.to_path_buf(),
        });
    }
    check_distinct(overlay_path, image_path)?;
    if std::fs::metadata(overlay_path).is_ok_and(|metadata| metadata.len() == 0) {
        return Err(OverlayError::EmptyOverlay {
            path: overlay_path.to_path_buf(),
        });
    }
    let base = Image::open(image_path, Access::ReadWrite)?;
    let store = Image::open(overlay_path, Access::ReadWrite)?;
    let io_error = |operation| move |source| OverlayError::io(overlay_path, operation, source);

    let mut header = read_header(&store, overlay_path)?;
    if header.committing {
        log::debug!(
            "{}: finishing an interrupted commit",
            overlay_path.display()
        );
        header
            .base
            .check_len(base.len(), overlay_path, base.path())?;
    } else {
        header
            .base
            .check(&identity_of(&base)?, overlay_path, base.path())?;
    }
    let layout = header.layout();
    // An overlay cut short would read as zeros past its end and overwrite the image.
    check_store_len(&store, &layout, overlay_path)?;
    let map = BlockMap::load(&store, &layout, overlay_path)?;

    header.committing = true;
    write_header(&store, &header).map_err(io_error("marking the commit in the header"))?;
    let failed = |source| OverlayError::CommitFailed {
        path: overlay_path.to_path_buf(),
        base: base.path().to_path_buf(),
        source,
    };
    let report = copy_blocks(&map, &layout, &store, &base, progress).map_err(failed)?;
    base.flush().map_err(failed)?;

    empty_overlay(&store, &layout).map_err(io_error("emptying the overlay"))?;
    header.base = identity_of(&base)?;
    header.committing = false;
    write_header(&store, &header).map_err(io_error("writing the header"))?;

    Ok(report)
}

/// Writes the header and makes it durable.
fn write_header(store: &Image, header: &Header) -> io::Result<()> {
    write_exact(store, 0, &header.encode())?;
    store.flush()
}

/// Copies the data blocks and zeroes the zeroed blocks of `map` into `base`, a run of
/// equal states at a time.
fn copy_blocks(
    map: &BlockMap,
    layout: &Layout,
    store: &Image,
    base: &Image,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<CommitReport> {
    let runs = changed_runs(map, layout);
    let total: u64 = runs.iter().map(|(_, start, end)| end - start).sum();
    let mut report = CommitReport::default();
    progress(0, total);

    let mut advance = |report: &CommitReport| progress(report.copied + report.zeroed, total);
    for (state, start, end) in runs {
        let range = Range { start, end };
        match state {
            BlockState::Data => copy_run(
                store,
                base,
                layout.data_offset,
                range,
                &mut report,
                &mut advance,
            )?,
            _ => {
                zero_base(base, start, end - start)?;
                report.zeroed += end - start;
                advance(&report);
            }
        }
    }
    Ok(report)
}

/// Lists the runs `(state, start, end)` of data and zeroed blocks, in device bytes.
fn changed_runs(map: &BlockMap, layout: &Layout) -> Vec<(BlockState, u64, u64)> {
    let mut runs = Vec::new();
    let mut block = 0;
    while block < map.len() {
        let end_block = map.run_end(block);
        let state = map.get(block);
        if state != BlockState::Base {
            let (start, _) = layout.block_range(block);
            let (_, end) = layout.block_range(end_block - 1);
            runs.push((state, start, end));
        }
        block = end_block;
    }
    runs
}

/// A byte range of the device.
struct Range {
    start: u64,
    end: u64,
}

/// Copies a range of the device from the overlay's data area into the base, calling
/// `advance` after each piece. Holes in the data area (a block cleared and then partly
/// written) become holes in the base.
fn copy_run(
    store: &Image,
    base: &Image,
    data_offset: u64,
    range: Range,
    report: &mut CommitReport,
    advance: &mut dyn FnMut(&CommitReport),
) -> io::Result<()> {
    let mut buffer = vec![0u8; COPY_CHUNK as usize];
    let Range { start, end } = range;
    let mut position = start;

    while position < end {
        let data = find_data(store, data_offset + position, data_offset + end)?
            .map_or(end, |found| found - data_offset);
        if data > position {
            zero_base(base, position, data - position)?;
            report.zeroed += data - position;
            advance(report);
        }
        if data >= end {
            break;
        }

        let hole = (store.seek_hole(data_offset + data)? - data_offset).min(end);
        let mut offset = data;
        while offset < hole {
            let piece = (hole - offset).min(COPY_CHUNK) as usize;
            read_exact(store, data_offset + offset, &mut buffer[..piece])?;
            write_keeping_holes(base, offset, &buffer[..piece])?;
            offset += piece as u64;
            report.copied += piece as u64;
            advance(report);
        }
        position = hole;
    }
    Ok(())
}

/// Rejects an overlay and an image that are the same file, before either is locked, which
/// would report the second lock as an attachment in the way.
pub fn check_distinct(overlay_path: &Path, image_path: &Path) -> Result<(), OverlayError> {
    use std::os::unix::fs::MetadataExt;

    // Device and inode, so that symbolic and hard links to the image are caught too.
    let identity = |path| std::fs::metadata(path).map(|metadata| (metadata.dev(), metadata.ino()));
    let same = match (identity(overlay_path), identity(image_path)) {
        (Ok(overlay), Ok(image)) => overlay == image,
        _ => false,
    };
    if same {
        return Err(OverlayError::SameFile {
            path: overlay_path.to_path_buf(),
        });
    }
    Ok(())
}

/// Granularity at which copied data that is all zeroes becomes a hole in the base.
const ZERO_PAGE: usize = 4096;

/// Writes `data` to the base at `offset`, but punches every all-zero 4 KiB page instead of
/// writing it. The overlay's data area holds whole 64 KiB blocks, mostly zeroes around a
/// small write, and writing those zeroes would allocate space that the same writes made
/// directly to the image never use. The data goes through `pwrite`, not the mapping, for
/// the same reason (see [`Image::write_through_file`]).
fn write_keeping_holes(base: &Image, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut start = 0;
    while start < data.len() {
        let zero = is_zero(&data[start..(start + ZERO_PAGE).min(data.len())]);
        let mut end = start;
        while end < data.len() && is_zero(&data[end..(end + ZERO_PAGE).min(data.len())]) == zero {
            end = (end + ZERO_PAGE).min(data.len());
        }

        let run_offset = offset + start as u64;
        if zero {
            zero_base(base, run_offset, (end - start) as u64)?;
        } else {
            base.write_through_file(run_offset, &data[start..end])?;
        }
        start = end;
    }
    Ok(())
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&byte| byte == 0)
}

/// Makes `offset..offset + len` of the base read as zeroes, as a hole where possible.
fn zero_base(base: &Image, offset: u64, len: u64) -> io::Result<()> {
    match base.discard(offset, len) {
        Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            write_zero_bytes(base, offset, len)
        }
        result => result,
    }
}

/// Clears the block map (all blocks show the base again), then frees the data area.
///
/// The map goes first and is made durable: data freed while the map still named it would
/// read as zeroes if the commit stopped in between and was run again.
fn empty_overlay(store: &Image, layout: &Layout) -> io::Result<()> {
    let map_len = layout.data_offset - layout.map_offset;
    match store.discard(layout.map_offset, map_len) {
        Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            write_zero_bytes(store, layout.map_offset, map_len)?
        }
        result => result?,
    }
    store.flush()?;

    match store.discard(layout.data_offset, layout.base_len) {
        Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        result => result,
    }
}
