//! Partition files of an attachment: the scan at attach time and every rescan after it.
//!
//! A rescan runs when a writer of `disk` closes it (as `sfdisk`, `parted` and `sgdisk` do
//! after writing a table), on SIGUSR1 (sent by `loopfuse rescan`), and at attach. It replaces
//! the partition files only when the layout changed, and never touches files already open.

use std::sync::{Arc, Mutex, OnceLock};

use fuser::{INodeNo, Notifier};

use crate::block::{BlockDevice, Window};
use crate::fs::{DeviceTable, ROOT_INODE};
use crate::partition::{self, PartitionTable};
use crate::registry::{PartitionState, Registry};

/// Everything a rescan needs; shared by the FUSE handlers and the signal thread.
pub struct PartitionScanner {
    name: String,
    disk: Arc<dyn BlockDevice>,
    devices: Arc<DeviceTable>,
    notifier: Arc<OnceLock<Notifier>>,
    registry: Registry,
    sector_size: u32,
    /// Serialises rescans, so two closes in a row cannot interleave their updates.
    scanning: Mutex<()>,
}

impl PartitionScanner {
    pub fn new(
        name: &str,
        disk: Arc<dyn BlockDevice>,
        devices: Arc<DeviceTable>,
        notifier: Arc<OnceLock<Notifier>>,
        registry: Registry,
        sector_size: u32,
    ) -> Self {
        Self {
            name: name.to_string(),
            disk,
            devices,
            notifier,
            registry,
            sector_size,
            scanning: Mutex::new(()),
        }
    }

    /// Re-reads the partition table after the image was changed without going through the
    /// device files: first drops every cached page, then rescans.
    pub fn rescan_after_outside_change(&self) {
        self.forget_cached_data();
        self.rescan();
    }

    /// Drops the kernel's cached pages of every device file. `loopfuse rescan` is for tables
    /// written to the image file directly, and such writes bypass the FUSE page cache.
    fn forget_cached_data(&self) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        for entry in self.devices.views() {
            // Offset 0 and length 0 drop every cached page of the file.
            let result = notifier.inval_inode(INodeNo(entry.inode), 0, 0);
            if let Err(error) = result
                && error.raw_os_error() != Some(libc::ENOENT)
            {
                log::warn!(
                    "{}: cannot drop cached pages of {}: {error}",
                    self.name,
                    entry.name
                );
            }
        }
    }

    /// Reads the partition table of the disk and exposes its partitions.
    ///
    /// A table that cannot be read leaves no partition files, as with the kernel, and is
    /// logged. This never fails the caller, because its write already succeeded.
    pub fn rescan(&self) {
        let _scanning = self
            .scanning
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (table, problem) = match partition::scan(self.disk.as_ref(), self.sector_size) {
            Ok(table) => (table, None),
            Err(error) => {
                let problem = crate::error_chain(&error);
                log::warn!("{}: partition table ignored: {problem}", self.name);
                (None, Some(problem))
            }
        };
        if let Some(table) = &table {
            for warning in &table.warnings {
                log::warn!("{}: {warning}", self.name);
            }
        }

        let layout: Vec<(u32, u64, u64)> = table
            .iter()
            .flat_map(|table| &table.partitions)
            .map(|partition| (partition.number, partition.start, partition.len))
            .collect();
        let old_layout = self.devices.partition_layout();
        if layout != old_layout {
            self.replace_partitions(table.as_ref(), &old_layout);
        }
        self.record(table.as_ref(), problem);
    }

    fn replace_partitions(&self, table: Option<&PartitionTable>, old_layout: &[(u32, u64, u64)]) {
        let mut files: Vec<(u32, u64, Arc<dyn BlockDevice>)> = Vec::new();
        for partition in table.iter().flat_map(|table| &table.partitions) {
            match Window::new(self.disk.clone(), partition.start, partition.len) {
                Ok(window) => files.push((partition.number, partition.start, Arc::new(window))),
                Err(error) => log::warn!(
                    "{}: partition {} skipped: {error}",
                    self.name,
                    partition.number
                ),
            }
        }
        let count = files.len();
        let new_numbers: Vec<u32> = files.iter().map(|(number, _, _)| *number).collect();
        self.devices.set_partitions(files);

        log::info!("{}: partition scan found {count} partition(s)", self.name);
        let old_numbers = old_layout.iter().map(|(number, _, _)| *number);
        self.forget_names(old_numbers.chain(new_numbers));
    }

    /// Drops the kernel's cached lookups of `pN` and `diskpN`, so the next open finds the
    /// current partition file instead of a replaced one.
    fn forget_names(&self, numbers: impl Iterator<Item = u32>) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        for number in numbers {
            for name in [format!("p{number}"), format!("diskp{number}")] {
                let result = notifier.inval_entry(INodeNo(ROOT_INODE), name.as_ref());
                if let Err(error) = result
                    && error.raw_os_error() != Some(libc::ENOENT)
                {
                    log::warn!("{}: cannot invalidate the name {name}: {error}", self.name);
                }
            }
        }
    }

    /// Writes the scan result to the state file, with the reason a table was ignored.
    fn record(&self, table: Option<&PartitionTable>, problem: Option<String>) {
        let partitions: Vec<PartitionState> = table
            .iter()
            .flat_map(|table| &table.partitions)
            .map(|partition| PartitionState {
                number: partition.number,
                start: partition.start,
                size: partition.len,
                type_name: partition.type_name.clone(),
                label: partition.label.clone(),
            })
            .collect();
        let scheme = table.map(|table| table.scheme.to_string());

        let recorded = self.registry.update_state(&self.name, |state| {
            state.partition_table = scheme;
            state.partition_problem = problem;
            state.partitions = partitions;
            state.scans += 1;
        });
        if let Err(error) = recorded {
            log::warn!("{}: cannot record the partition scan: {error}", self.name);
        }
    }
}

/// Errors from `loopfuse rescan`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RescanError {
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),

    #[error("{name}: attached without --partscan; detach it and attach again with -P")]
    NoPartscan { name: String },

    #[error("{name}: the daemon is gone (stale attachment); run 'loopfuse detach {name}'")]
    Stale { name: String },

    #[error("{name}: cannot signal the daemon (pid {pid})")]
    Signal {
        name: String,
        pid: i32,
        source: nix::errno::Errno,
    },

    #[error("{name}: the daemon did not finish the rescan within {} s; see its log {}", RESCAN_TIMEOUT.as_secs(), log.display())]
    Timeout {
        name: String,
        log: std::path::PathBuf,
    },
}

/// How long `rescan` waits for the daemon to record a new scan.
const RESCAN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Asks the daemon of the attachment named by `query` to re-read its partition table
/// (SIGUSR1) and waits until the new scan is recorded; returns the updated entry.
pub fn rescan(registry: &Registry, query: &str) -> Result<crate::registry::Entry, RescanError> {
    let entry = registry.find(query)?;
    let name = entry.state.name.clone();
    if !entry.state.partscan {
        return Err(RescanError::NoPartscan { name });
    }
    if entry.liveness == crate::registry::Liveness::Stale {
        return Err(RescanError::Stale { name });
    }

    let pid = entry.state.pid.pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .map_err(|source| RescanError::Signal {
        name: name.clone(),
        pid,
        source,
    })?;

    let started = std::time::Instant::now();
    while started.elapsed() < RESCAN_TIMEOUT {
        let current = registry.find(&name)?;
        if current.state.scans > entry.state.scans {
            return Ok(current);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(RescanError::Timeout {
        log: registry.log_path(&name),
        name,
    })
}
