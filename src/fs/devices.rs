//! The device files of an attachment: their names, inode numbers, and open file handles.
//!
//! `disk` is always present; partitions `p1`, `p2`, ... are added by a scan and replaced by a
//! rescan. Each open file keeps the device it opened, so a rescan never changes what an
//! already open file reads or writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use crate::block::BlockDevice;

/// Inode number of the attachment directory.
pub const ROOT_INODE: u64 = 1;
/// Inode number of the whole-disk file.
pub const DISK_INODE: u64 = 2;
/// Name of the whole-disk file.
pub const DISK_NAME: &str = "disk";

/// One device file.
#[derive(Clone)]
pub struct DeviceEntry {
    pub name: String,
    pub inode: u64,
    /// Identity of the device node, which its mode, owner and times belong to. A rescan
    /// that replaces the partition makes a new node, as the kernel makes a new partition
    /// device. A new inode number for the same device keeps the node.
    pub node: u64,
    /// When the node was made: the start of its times, unless it is the disk.
    pub created: SystemTime,
    pub device: Arc<dyn BlockDevice>,
    /// Byte offset of this device inside the whole disk, used to find the overlapping range
    /// of other device files after a write.
    pub disk_offset: u64,
    /// Flag set when, with write-back caching, a write past the end reached the daemon, so
    /// the kernel believes the file is larger than the device. Every clone of the entry
    /// shares it, so all open files of the inode see it.
    pub overrun: Arc<AtomicBool>,
}

impl DeviceEntry {
    fn new(name: String, inode: u64, device: Arc<dyn BlockDevice>, disk_offset: u64) -> Self {
        Self {
            name,
            inode,
            node: inode,
            created: SystemTime::now(),
            device,
            disk_offset,
            overrun: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Returns every name the kernel may have looked this file up by, because `pN` is
    /// also found as `diskpN` and `diskN` (see [`DeviceTable::find_by_name`]).
    pub fn names(&self) -> Vec<String> {
        match self.name.strip_prefix('p') {
            Some(number) => vec![
                self.name.clone(),
                format!("{DISK_NAME}p{number}"),
                format!("{DISK_NAME}{number}"),
            ],
            None => vec![self.name.clone()],
        }
    }
}

/// An open file: the device it was opened on and the byte range written through it since
/// the last flush, kept as `start..end` in two atomics so writers do not take a lock.
pub struct OpenFile {
    pub entry: DeviceEntry,
    /// Opened for writing (`O_WRONLY` or `O_RDWR`).
    pub writable: bool,
    /// Set when a cached write went past the end while this file was open for writing, and
    /// cleared once the file's next write has failed with `ENOSPC` (see `fs::overrun`).
    pub overrun_pending: AtomicBool,
    written_start: AtomicU64,
    written_end: AtomicU64,
    /// Set by every write and cleared by [`OpenFile::take_changed`], which runs on close.
    changed_since_close: AtomicBool,
}

impl OpenFile {
    fn new(entry: DeviceEntry, writable: bool) -> Self {
        Self {
            entry,
            writable,
            overrun_pending: AtomicBool::new(false),
            written_start: AtomicU64::new(u64::MAX),
            written_end: AtomicU64::new(0),
            changed_since_close: AtomicBool::new(false),
        }
    }

    /// Records that `len` bytes at `offset` were written through this file.
    pub fn record_write(&self, offset: u64, len: u64) {
        self.written_start.fetch_min(offset, Ordering::Relaxed);
        self.written_end
            .fetch_max(offset.saturating_add(len), Ordering::Relaxed);
        self.changed_since_close.store(true, Ordering::Relaxed);
    }

    /// Returns whether anything was written since the last call.
    pub fn take_changed(&self) -> bool {
        self.changed_since_close.swap(false, Ordering::Relaxed)
    }

    /// Takes the range written since the last call, in device offsets.
    pub fn take_written(&self) -> Option<(u64, u64)> {
        let start = self.written_start.swap(u64::MAX, Ordering::Relaxed);
        let end = self.written_end.swap(0, Ordering::Relaxed);
        (start < end).then_some((start, end))
    }
}

/// Device files of an attachment and the handles of their open files.
pub struct DeviceTable {
    entries: RwLock<Vec<DeviceEntry>>,
    handles: RwLock<HashMap<u64, Arc<OpenFile>>>,
    next_handle: AtomicU64,
    next_inode: AtomicU64,
}

impl DeviceTable {
    /// Creates a table holding only the whole-disk file.
    pub fn new(disk: Arc<dyn BlockDevice>) -> Self {
        let entry = DeviceEntry::new(DISK_NAME.to_string(), DISK_INODE, disk, 0);

        Self {
            entries: RwLock::new(vec![entry]),
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            next_inode: AtomicU64::new(DISK_INODE + 1),
        }
    }

    /// Returns the whole-disk device.
    pub fn disk(&self) -> Arc<dyn BlockDevice> {
        self.read_entries()[0].device.clone()
    }

    /// Returns the `(number, disk offset, length)` of each partition file.
    pub fn partition_layout(&self) -> Vec<(u32, u64, u64)> {
        self.read_entries()[1..]
            .iter()
            .filter_map(|entry| {
                let number = entry.name.strip_prefix('p')?.parse().ok()?;
                Some((number, entry.disk_offset, entry.device.len()))
            })
            .collect()
    }

    /// Replaces the partition files with `partitions`, given as `(number, disk offset, device)`.
    ///
    /// A partition whose number, offset and length are unchanged keeps its entry and inode.
    /// Every other partition gets a fresh inode number, so the kernel never mixes cached pages
    /// or attributes of an old partition with those of a new one.
    pub fn set_partitions(&self, partitions: Vec<(u32, u64, Arc<dyn BlockDevice>)>) {
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old: Vec<DeviceEntry> = entries.drain(1..).collect();

        for (number, disk_offset, device) in partitions {
            let name = format!("p{number}");
            let unchanged = old.iter().find(|entry| {
                entry.name == name
                    && entry.disk_offset == disk_offset
                    && entry.device.len() == device.len()
            });
            let entry = match unchanged {
                Some(entry) => entry.clone(),
                None => DeviceEntry::new(
                    name,
                    self.next_inode.fetch_add(1, Ordering::Relaxed),
                    device,
                    disk_offset,
                ),
            };
            entries.push(entry);
        }
    }

    /// Returns a snapshot of the current device files, `disk` first.
    pub fn entries(&self) -> Vec<DeviceEntry> {
        self.read_entries().clone()
    }

    /// Finds a device file by name. `diskpN` and `diskN` are accepted as aliases of `pN`:
    /// scripts written for `losetup` append `pN` to the device path, and `sfdisk` and `fdisk`
    /// name the partitions of a device whose name ends in a letter by appending `N`.
    pub fn find_by_name(&self, name: &str) -> Option<DeviceEntry> {
        let alias = match name.strip_prefix(DISK_NAME) {
            Some(suffix) if suffix.starts_with('p') => Some(suffix.to_string()),
            Some(suffix) if suffix.starts_with(|c: char| c.is_ascii_digit()) => {
                Some(format!("p{suffix}"))
            }
            _ => None,
        };
        let name = alias.as_deref().unwrap_or(name);

        self.read_entries()
            .iter()
            .find(|entry| entry.name == name)
            .cloned()
    }

    /// Finds the device file of `inode` among the open files, for a partition file that a
    /// rescan replaced while it was open.
    pub fn find_open_by_inode(&self, inode: u64) -> Option<DeviceEntry> {
        self.handles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .find(|file| file.entry.inode == inode)
            .map(|file| file.entry.clone())
    }

    /// Finds a current device file by inode number.
    pub fn find_by_inode(&self, inode: u64) -> Option<DeviceEntry> {
        self.read_entries()
            .iter()
            .find(|entry| entry.inode == inode)
            .cloned()
    }

    /// Registers an open file of `entry` and returns its handle.
    pub fn open(&self, entry: DeviceEntry, writable: bool) -> u64 {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let file = Arc::new(OpenFile::new(entry, writable));
        self.write_handles().insert(handle, file);
        handle
    }

    /// Returns the open file behind `handle`.
    pub fn handle(&self, handle: u64) -> Option<Arc<OpenFile>> {
        self.handles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&handle)
            .cloned()
    }

    /// Forgets an open file's handle and returns it.
    pub fn release(&self, handle: u64) -> Option<Arc<OpenFile>> {
        self.write_handles().remove(&handle)
    }

    fn write_handles(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<OpenFile>>> {
        self.handles
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the files of `inode` that are open for writing.
    pub fn writers_of(&self, inode: u64) -> Vec<Arc<OpenFile>> {
        self.handles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .filter(|file| file.writable && file.entry.inode == inode)
            .cloned()
            .collect()
    }

    /// Returns the current device files and the files of replaced entries that are still
    /// open, one entry per inode, which are all the inodes whose cached pages may show the
    /// disk.
    pub fn views(&self) -> Vec<DeviceEntry> {
        let mut views = self.entries();
        let handles = self
            .handles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for file in handles.values() {
            if !views.iter().any(|view| view.inode == file.entry.inode) {
                views.push(file.entry.clone());
            }
        }
        views
    }

    /// Gives the current device file of `inode` a fresh inode number. Files already open
    /// keep the old entry, so the kernel drops the old inode once they are closed, and the
    /// next lookup creates a new one from the daemon's attributes.
    pub fn renumber(&self, inode: u64) {
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(entry) = entries.iter_mut().find(|entry| entry.inode == inode) {
            let (node, created) = (entry.node, entry.created);
            *entry = DeviceEntry::new(
                entry.name.clone(),
                self.next_inode.fetch_add(1, Ordering::Relaxed),
                entry.device.clone(),
                entry.disk_offset,
            );
            entry.node = node;
            entry.created = created;
        }
    }

    /// Number of files currently open.
    pub fn open_count(&self) -> usize {
        self.handles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    fn read_entries(&self) -> std::sync::RwLockReadGuard<'_, Vec<DeviceEntry>> {
        self.entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
