//! Counting the allocated bytes of a device range, for the `st_blocks` of views that are not a
//! whole file: partitions and `--offset` windows, and copy-on-write overlays.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::BlockDevice;

/// How long a count is reused. `stat` comes often (each `ls -l`, each tool that opens the
/// device), and a count costs two `lseek` calls per data extent of the range.
const MAX_AGE: Duration = Duration::from_secs(1);

/// Returns how much of `start..end` of `device` contains data, in 512-byte units rounded up (the
/// unit of `st_blocks`), by walking the range with `seek_data` and `seek_hole`.
///
/// Ranges that the backing file has allocated but never written (`fallocate` without data)
/// count as holes, as `SEEK_DATA` reports them.
pub fn allocated_sectors_in(device: &dyn BlockDevice, start: u64, end: u64) -> io::Result<u64> {
    let mut position = start;
    let mut bytes = 0;

    while position < end {
        let data = match device.seek_data(position) {
            Ok(data) if data < end => data,
            Ok(_) => break,
            Err(error) if error.raw_os_error() == Some(libc::ENXIO) => break,
            Err(error) => return Err(error),
        };
        let hole = device.seek_hole(data)?.min(end);
        if hole <= data {
            // A hole cannot start inside the data just found unless the file changed
            // between the two calls; stop rather than loop.
            break;
        }
        bytes += hole - data;
        position = hole;
    }

    Ok(bytes.div_ceil(512))
}

/// The last count of a view and when it was made, so repeated `stat` calls within
/// [`MAX_AGE`] do not walk the range again.
#[derive(Default)]
pub struct AllocationCache {
    last: Mutex<Option<(Instant, u64)>>,
}

impl AllocationCache {
    /// Returns the cached count when it is recent enough, else runs `count` and caches it.
    ///
    /// Callers that arrive while a count runs wait for it and share its result.
    pub fn get_or_count(&self, count: impl FnOnce() -> io::Result<u64>) -> io::Result<u64> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((when, sectors)) = *last
            && when.elapsed() < MAX_AGE
        {
            return Ok(sectors);
        }

        let sectors = count()?;
        *last = Some((Instant::now(), sectors));
        Ok(sectors)
    }
}
