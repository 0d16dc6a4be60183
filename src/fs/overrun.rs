//! Write-back requests that cannot be stored. With write-back caching the kernel has already
//! returned success to the writer, so the daemon must stop the writer and bring the kernel's
//! cache back in line with the device.

use std::ffi::OsStr;
use std::sync::atomic::Ordering;

use fuser::{Errno, INodeNo, Notifier};

use super::{DeviceEntry, DeviceFs, OpenFile, ROOT_INODE, failed};
use crate::block::clamp_to_device;

impl DeviceFs {
    /// Writes the part of a write-back request that lies inside the device and returns
    /// `ENOSPC` for the request, which `fsync` and `close` then report.
    ///
    /// The kernel accepted the write past the end into its page cache and grew its cached
    /// file size, because only the daemon has the real size. So every file open for writing
    /// on the inode is marked and the inode's cached attributes are invalidated. The kernel
    /// then sends GETATTR before each marked file's next cached write, and `getattr` fails
    /// it once with `ENOSPC`. A `dd` without a count thus stops at the end instead of
    /// filling the cache forever.
    pub(super) fn reject_write_past_end(&self, file: &OpenFile, offset: u64, data: &[u8]) -> Errno {
        let entry = &file.entry;
        let inside = clamp_to_device(offset, data.len(), entry.device.len());
        if inside > 0 {
            match entry.device.write_at(offset, &data[..inside]) {
                Ok(count) => file.record_write(offset, count as u64),
                Err(error) => return failed("write", entry, offset, &error),
            }
        }

        for writer in self.devices.writers_of(entry.inode) {
            writer.overrun_pending.store(true, Ordering::Relaxed);
        }
        self.invalidate_attributes(entry);
        if !entry.overrun.swap(true, Ordering::Relaxed) {
            log::warn!(
                "{}: a write went past the end of the device (at {:#x}); the files open for writing get ENOSPC on their next write",
                entry.name,
                offset.max(entry.device.len())
            );
            self.replace_grown_inode(entry);
        }
        Errno::ENOSPC
    }

    /// Makes the kernel send GETATTR before the next cached write to `entry`.
    fn invalidate_attributes(&self, entry: &DeviceEntry) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        // Only the attributes (offset -1), because invalidating pages would wait for the
        // write-back that the current request belongs to.
        if let Err(error) = notifier.inval_inode(INodeNo(entry.inode), -1, 0)
            && error.raw_os_error() != Some(libc::ENOENT)
        {
            log::warn!(
                "{}: failed to invalidate cached attributes: {error}",
                entry.name
            );
        }
    }

    /// Gives the device file a new inode, so that files opened from now on see the real
    /// size, while the files open now keep the inode whose size grew.
    fn replace_grown_inode(&self, entry: &DeviceEntry) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        self.devices.renumber(entry.inode);
        // Before the reply: a writer whose close fails with ENOSPC gets no FLUSH request, so
        // only this makes a stat right after that close look the name up again. The kernel
        // takes the directory's lock for it, which no request handler waits on.
        invalidate_names(Some(notifier), entry);

        let grown = entry.clone();
        in_background(notifier, move |notifier| {
            // Pages past the end hold data that never reached the device.
            invalidate_pages(notifier, &grown, grown.device.len(), 0);
        });
    }

    /// Drops the kernel's cached pages of a write-back request that failed, so that reads
    /// return the image's contents instead of data that never reached it.
    pub(super) fn forget_failed_write_back(&self, entry: &DeviceEntry, offset: u64, len: u64) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        let entry = entry.clone();
        in_background(notifier, move |notifier| {
            invalidate_pages(notifier, &entry, offset, len)
        });
    }
}

/// Invalidates the kernel's directory entries of a device file under all its names, so
/// that the next lookup gets the file's current inode.
pub(super) fn invalidate_names(notifier: Option<&Notifier>, entry: &DeviceEntry) {
    let Some(notifier) = notifier else {
        return;
    };
    for name in entry.names() {
        // ENOENT only means the kernel has no cached entry under that name.
        if let Err(error) = notifier.inval_entry(INodeNo(ROOT_INODE), OsStr::new(&name))
            && error.raw_os_error() != Some(libc::ENOENT)
        {
            log::warn!("{name}: failed to invalidate the cached directory entry: {error}");
        }
    }
}

/// Invalidates cached pages of `entry` from `offset`, for `len` bytes or to the end when
/// `len` is 0.
fn invalidate_pages(notifier: &Notifier, entry: &DeviceEntry, offset: u64, len: u64) {
    if let Err(error) = notifier.inval_inode(INodeNo(entry.inode), offset as i64, len as i64)
        && error.raw_os_error() != Some(libc::ENOENT)
    {
        log::warn!("{}: failed to invalidate cached pages: {error}", entry.name);
    }
}

/// Runs `job` on a new thread. The kernel holds locks on the pages of a write-back request
/// until its reply, so invalidations that touch those pages must not run in the handler.
fn in_background(notifier: &Notifier, job: impl FnOnce(&Notifier) + Send + 'static) {
    let notifier = notifier.clone();
    let spawned = std::thread::Builder::new()
        .name("invalidate".to_string())
        .spawn(move || job(&notifier));
    if let Err(error) = spawned {
        log::warn!("failed to start a thread to invalidate cached data: {error}");
    }
}
