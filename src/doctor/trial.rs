//! A trial FUSE mount: mounts an empty filesystem the way an attachment does (directly as
//! root, through `fusermount3` otherwise), records the protocol version that the kernel
//! sends in its INIT request, and unmounts again.
//!
//! The INIT request is the reliable source of the kernel's FUSE protocol version:
//! `/sys/module/fuse` has no version attribute, whether FUSE is built in or a module.

use std::path::Path;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use fuser::{Filesystem, KernelConfig, Request, Version};

use crate::attach::{AttachOptions, session_config};

/// How long the trial waits for the kernel's INIT request after mounting.
const INIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of a trial mount.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrialError {
    #[error("{}: cannot create the trial mount point", path.display())]
    MountPoint {
        path: std::path::PathBuf,
        source: std::io::Error,
    },

    #[error("mount failed")]
    Mount { source: std::io::Error },

    #[error("the kernel sent no INIT request within {} s of the mount", INIT_TIMEOUT.as_secs())]
    NoInit,

    #[error("unmount failed")]
    Unmount { source: std::io::Error },
}

/// An empty filesystem that reports the kernel's protocol version.
struct TrialFs {
    version: Sender<Version>,
}

impl Filesystem for TrialFs {
    fn init(&mut self, _request: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = self.version.send(config.kernel_abi());
        Ok(())
    }
}

/// Mounts a trial filesystem on `mountpoint`, a directory this function creates and
/// removes, and returns the kernel's FUSE protocol version.
pub fn trial_mount(mountpoint: &Path) -> Result<Version, TrialError> {
    std::fs::create_dir(mountpoint).map_err(|source| TrialError::MountPoint {
        path: mountpoint.to_path_buf(),
        source,
    })?;

    let result = mount_and_unmount(mountpoint);
    let _ = std::fs::remove_dir(mountpoint);
    result
}

fn mount_and_unmount(mountpoint: &Path) -> Result<Version, TrialError> {
    let (sender, receiver) = channel();
    // The mount options of a read-only attachment, so the trial meets what one would meet.
    let mut config = session_config(&AttachOptions {
        read_only: true,
        ..AttachOptions::new(mountpoint)
    });
    config.n_threads = Some(1);

    let session = fuser::Session::new(TrialFs { version: sender }, mountpoint, &config)
        .map_err(|source| TrialError::Mount { source })?;
    let background = session
        .spawn()
        .map_err(|source| TrialError::Mount { source })?;

    let version = receiver.recv_timeout(INIT_TIMEOUT);
    background
        .umount_and_join()
        .map_err(|source| TrialError::Unmount { source })?;

    version.map_err(|_| TrialError::NoInit)
}
