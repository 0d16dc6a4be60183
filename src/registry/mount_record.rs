//! The record `loopfuse mount` keeps of a filesystem it mounted from an attachment.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ProcessId;

/// A filesystem served by a userspace driver from one device file of an attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Absolute path of the directory the filesystem is mounted on.
    pub directory: PathBuf,
    /// The device file the driver reads: `disk`, or `pN` for a partition.
    pub device: PathBuf,
    /// Partition number, or `None` for the whole disk.
    pub partition: Option<u32>,
    /// Filesystem type, as blkid names it (`ext4`, `vfat`, `iso9660`, ...).
    pub fstype: String,
    /// Program serving the filesystem (`fuse2fs`, `fusefat`, ...).
    pub driver: String,
    /// The driver process; `None` until it has been started.
    pub driver_pid: Option<ProcessId>,
    /// Whether `loopfuse mount` attached the image itself, so `umount` detaches it too.
    pub owns_attachment: bool,
    /// Bytes of the disk device the filesystem occupied when it was mounted. The driver
    /// keeps that range even if the partition table changes. Absent in older records.
    #[serde(default)]
    pub range: Option<DiskRange>,
}

/// A range of bytes of an attachment's disk device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRange {
    pub start: u64,
    pub size: u64,
}

impl DiskRange {
    /// Returns whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &DiskRange) -> bool {
        self.start < other.start.saturating_add(other.size)
            && other.start < self.start.saturating_add(self.size)
    }
}

impl MountRecord {
    /// Returns whether the driver was started and is still running.
    pub fn driver_running(&self) -> bool {
        self.driver_pid
            .as_ref()
            .is_some_and(|driver| driver.is_running())
    }

    /// Returns whether the driver was started and has exited since.
    pub fn driver_exited(&self) -> bool {
        self.driver_pid.is_some() && !self.driver_running()
    }
}
