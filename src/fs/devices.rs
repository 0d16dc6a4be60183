//! The device files of an attachment: their names, inode numbers, and open file handles.
//!
//! `disk` is always present; partitions `p1`, `p2`, ... are added by a scan and replaced by a
//! rescan. Each open file keeps the device it opened, so a rescan never changes what an
//! already open file reads or writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

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
    pub device: Arc<dyn BlockDevice>,
    /// Byte offset of this device inside the whole disk, used to find the overlapping range
    /// of other device files after a write.
    pub disk_offset: u64,
}

/// Device files of an attachment and the handles of their open files.
pub struct DeviceTable {
    entries: RwLock<Vec<DeviceEntry>>,
    handles: RwLock<HashMap<u64, DeviceEntry>>,
    next_handle: AtomicU64,
    next_inode: AtomicU64,
}

impl DeviceTable {
    /// Creates a table holding only the whole-disk file.
    pub fn new(disk: Arc<dyn BlockDevice>) -> Self {
        let entry = DeviceEntry {
            name: DISK_NAME.to_string(),
            inode: DISK_INODE,
            device: disk,
            disk_offset: 0,
        };

        Self {
            entries: RwLock::new(vec![entry]),
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            next_inode: AtomicU64::new(DISK_INODE + 1),
        }
    }

    /// The whole-disk device.
    pub fn disk(&self) -> Arc<dyn BlockDevice> {
        self.read_entries()[0].device.clone()
    }

    /// Replaces the partition files with `partitions`, given as `(number, disk offset, device)`.
    ///
    /// Every partition gets a fresh inode number, so the kernel never mixes cached pages or
    /// attributes of an old partition with those of a new one.
    pub fn set_partitions(&self, partitions: Vec<(u32, u64, Arc<dyn BlockDevice>)>) {
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.truncate(1);

        for (number, disk_offset, device) in partitions {
            entries.push(DeviceEntry {
                name: format!("p{number}"),
                inode: self.next_inode.fetch_add(1, Ordering::Relaxed),
                device,
                disk_offset,
            });
        }
    }

    /// A snapshot of the current device files, `disk` first.
    pub fn entries(&self) -> Vec<DeviceEntry> {
        self.read_entries().clone()
    }

    /// Finds a device file by name. `diskpN` is accepted as an alias of `pN`, because scripts
    /// written for `losetup` derive partition paths by appending `pN` to the device path.
    pub fn find_by_name(&self, name: &str) -> Option<DeviceEntry> {
        let name = match name.strip_prefix(DISK_NAME) {
            Some(suffix) if suffix.starts_with('p') => suffix,
            _ => name,
        };

        self.read_entries()
            .iter()
            .find(|entry| entry.name == name)
            .cloned()
    }

    /// Finds a current device file by inode number.
    pub fn find_by_inode(&self, inode: u64) -> Option<DeviceEntry> {
        self.read_entries()
            .iter()
            .find(|entry| entry.inode == inode)
            .cloned()
    }

    /// Registers an open file of `entry` and returns its handle.
    pub fn open(&self, entry: DeviceEntry) -> u64 {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(handle, entry);
        handle
    }

    /// Returns the device file that `handle` was opened on.
    pub fn handle(&self, handle: u64) -> Option<DeviceEntry> {
        self.handles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&handle)
            .cloned()
    }

    /// Forgets an open file's handle.
    pub fn release(&self, handle: u64) {
        self.handles
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&handle);
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
