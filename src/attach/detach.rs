//! Detaching: unmount, wait for the daemon to flush the image and exit, clean the registry.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, umount2};
use nix::unistd::Uid;

use super::environment::{FUSERMOUNT, find_fusermount};
use super::is_mounted;
use super::namespace::in_other_mount_namespace;
use crate::registry::{Entry, Liveness, Registry, RegistryError, Stage};

/// How long `detach` waits for the daemon to flush and exit after the unmount.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a busy device is retried before `detach` reports it. A program that just
/// closed the device may still be exiting: `fuse2fs`, for one, closes it only after its own
/// unmount has returned.
pub(super) const BUSY_RETRY: Duration = Duration::from_millis(1500);

/// Errors from detaching.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetachError {
    #[error(transparent)]
    Registry(#[from] RegistryError),

    #[error(
        "{query}: is a partition of {name}, and a partition cannot be detached on its own; detach the whole device with 'loopfuse detach {name}'"
    )]
    Partition { query: String, name: String },

    #[error("{name}: device is busy: a process still has a file open on {} (close it, then detach again; 'fuser -vm {}' lists the processes)", mountpoint.display(), mountpoint.display())]
    Busy { name: String, mountpoint: PathBuf },

    #[error("{name}: {} was unmounted lazily, and the daemon still serves a device file that a process kept open; the attachment goes by itself after the last close, so stop the process that has it open", mountpoint.display())]
    ServingLazily { name: String, mountpoint: PathBuf },

    #[error("{name}: cannot unmount {}: {reason}", mountpoint.display())]
    Unmount {
        name: String,
        mountpoint: PathBuf,
        reason: String,
    },

    #[error("{name}: the daemon (pid {pid}) did not exit within {} s of the unmount; see its log {}", EXIT_TIMEOUT.as_secs(), log.display())]
    DaemonStuck {
        name: String,
        pid: i32,
        log: PathBuf,
    },

    #[error(
        "{name}: filesystems on it are mounted by 'loopfuse mount' on {directories}; run 'loopfuse umount DIR' for each instead"
    )]
    MountedFrom { name: String, directories: String },

    #[error(
        "{name}: the daemon failed while detaching, and writes may be lost; the end of its log:\n  {log_tail}"
    )]
    DaemonFailed { name: String, log_tail: String },

    #[error(
        "{name}: the daemon stopped while the command ran, so writes it had not flushed may be lost"
    )]
    DiedDuringRun { name: String },

    #[error("{name}: cannot signal the daemon (pid {pid}): {source}")]
    Signal {
        name: String,
        pid: i32,
        source: nix::errno::Errno,
    },

    #[error("{name}: still being attached after {} s; detach it again once 'loopfuse list' shows it attached", START_TIMEOUT.as_secs())]
    StillStarting { name: String },

    #[error("{failed} of {total} attachments failed to detach cleanly (see the errors above)")]
    Several { failed: usize, total: usize },
}

/// Detaches the attachment named by `query` (a name, device file, directory or image) and
/// returns its entry.
///
/// A live attachment is unmounted (non-lazily, so a busy device is reported, not hidden) and
/// its daemon is waited for. A stale one is cleaned: its leftover mount is detached lazily
/// and its registry files are removed.
pub fn detach(registry: &Registry, query: &str) -> Result<Entry, DetachError> {
    let entry = registry.find(query)?;
    if names_partition(&entry, query) {
        return Err(DetachError::Partition {
            query: query.to_string(),
            name: entry.state.name.clone(),
        });
    }
    detach_entry(registry, &entry)?;
    Ok(entry)
}

/// Returns whether `query` names one of the partition files of `entry` rather than the
/// attachment: `losetup -d` of `/dev/loop0p1` fails too, instead of detaching `loop0`.
fn names_partition(entry: &Entry, query: &str) -> bool {
    if query == entry.state.name {
        return false;
    }
    let path = crate::registry::resolve_path(Path::new(query));
    path.parent() == Some(entry.mountpoint.as_path()) && path != entry.device()
}

/// Detaches every attachment of the registry, reporting each failure as it happens.
pub fn detach_all(
    registry: &Registry,
    mut on_error: impl FnMut(&DetachError),
) -> Result<usize, DetachError> {
    let entries = registry.list()?;
    let total = entries.len();
    let mut failed = 0;

    for entry in &entries {
        if let Err(error) = detach_entry(registry, entry) {
            on_error(&error);
            failed += 1;
        }
    }

    if failed > 0 {
        return Err(DetachError::Several { failed, total });
    }
    Ok(total)
}

fn detach_entry(registry: &Registry, entry: &Entry) -> Result<(), DetachError> {
    if entry.liveness == Liveness::Live && entry.state.stage == Stage::Starting {
        return match wait_until_started(registry, &entry.state.name)? {
            Some(started) => detach_started(registry, &started),
            None => Ok(()),
        };
    }
    detach_started(registry, entry)
}

/// How long detach waits for an attachment that another process is still setting up: as
/// long as `attach` waits for its daemon to be ready.
const START_TIMEOUT: Duration = super::READY_TIMEOUT;

/// Waits until the attachment `name`, which another process is still setting up, is
/// attached or gone, and returns its entry then (`None` once gone). Until it is attached,
/// its entry names the attaching process and nothing is mounted, so detaching it at once
/// would remove the entry of a daemon about to serve and leave that daemon running.
fn wait_until_started(registry: &Registry, name: &str) -> Result<Option<Entry>, DetachError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match registry.find(name) {
            Ok(entry) if entry.state.stage != Stage::Starting => return Ok(Some(entry)),
            Ok(entry) if entry.liveness == Liveness::Stale => return Ok(Some(entry)),
            Ok(_) => {}
            Err(RegistryError::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(error.into()),
        }
        if Instant::now() >= deadline {
            return Err(DetachError::StillStarting {
                name: name.to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn detach_started(registry: &Registry, entry: &Entry) -> Result<(), DetachError> {
    let name = &entry.state.name;

    if entry.liveness == Liveness::Stale {
        log::info!(
            "{name}: cleaning stale attachment of {}",
            entry.state.image.display()
        );
        report_last_words(registry, name);
        remove_stale_pidfile(entry);
        unmount_abandoned_filesystems(entry);
        if is_mounted(&entry.mountpoint) {
            unmount_lazily(&entry.mountpoint);
        }
        registry.remove(name);
        return Ok(());
    }

    // A driver may hold the device through a mount of its own namespace, which the kernel
    // does not count as busy here, so a live driver's mount is checked first.
    let served: Vec<String> = entry
        .state
        .mounts
        .iter()
        .filter(|mounted| mounted.driver_running())
        .map(|mounted| mounted.directory.display().to_string())
        .collect();
    if !served.is_empty() {
        return Err(DetachError::MountedFrom {
            name: name.clone(),
            directories: served.join(", "),
        });
    }
    unmount_abandoned_filesystems(entry);

    if entry.state.stage == Stage::Attached
        && !is_mounted(&entry.mountpoint)
        && in_other_mount_namespace(entry.state.pid.pid)
    {
        stop_namespace_daemon(entry)?;
    } else if entry.state.stage == Stage::Attached && !is_mounted(&entry.mountpoint) {
        wait_for_lazy_exit(entry)?;
    } else if let Err(error) = unmount(name, &entry.mountpoint) {
        // `run` may have unmounted it lazily in the meantime.
        if is_mounted(&entry.mountpoint) {
            return Err(error);
        }
        wait_for_lazy_exit(entry)?;
    }
    wait_for_exit(registry, entry)?;
    // A daemon that flushed the image removes its own entry before it exits, so an entry
    // left behind means the flush failed or the daemon was killed.
    if registry.find(name).is_ok() {
        let log_tail = log_tail(registry, name).unwrap_or_else(|| "(empty)".to_string());
        registry.remove(name);
        return Err(DetachError::DaemonFailed {
            name: name.clone(),
            log_tail,
        });
    }
    log::info!("{name}: detached {}", entry.state.image.display());

    Ok(())
}

/// How long [`detach_when_closed`] waits for the daemon to record autoclear.
const AUTOCLEAR_TIMEOUT: Duration = Duration::from_secs(2);

/// Turns on autoclear for the attachment named by `query`, so that it detaches after the
/// last close, as the kernel does when `losetup -d` meets a busy loop device.
pub fn detach_when_closed(registry: &Registry, query: &str) -> Result<(), DetachError> {
    let entry = registry.find(query)?;
    let name = entry.state.name.clone();
    let pid = entry.state.pid.pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .map_err(|source| DetachError::Signal {
        name: name.clone(),
        pid,
        source,
    })?;

    // `losetup -l` right after shows the flag, as it does for a kernel loop device.
    let started = Instant::now();
    while started.elapsed() < AUTOCLEAR_TIMEOUT {
        match registry.find(&name) {
            Ok(current) if !current.state.autoclear => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => break,
        }
    }
    log::info!("{name}: busy, so it detaches after the last close");
    Ok(())
}

/// Unmounts the filesystems that `loopfuse mount` made on this attachment and whose drivers
/// have exited without unmounting (a driver in a namespace of its own cannot), so that no
/// dead mount outlives its record.
fn unmount_abandoned_filesystems(entry: &Entry) {
    for mounted in &entry.state.mounts {
        if !mounted.driver_running() && is_mounted(&mounted.directory) {
            log::info!(
                "{}: unmounting {}, whose driver has exited",
                entry.state.name,
                mounted.directory.display()
            );
            unmount_lazily(&mounted.directory);
        }
    }
}

/// Removes the `--pidfile` of a daemon that died without removing it, when it still names
/// that daemon, so a supervisor does not find a stale PID.
fn remove_stale_pidfile(entry: &Entry) {
    let Some(path) = &entry.state.pidfile else {
        return;
    };
    let names_daemon = std::fs::read_to_string(path)
        .is_ok_and(|text| text.trim() == entry.state.pid.pid.to_string());
    if names_daemon && let Err(error) = std::fs::remove_file(path) {
        log::warn!(
            "{}: failed to remove the PID file {}: {error}",
            entry.state.name,
            path.display()
        );
    }
}

/// Shows the end of a dead daemon's log before the log is removed with its entry, so the
/// reason it died is not lost.
fn report_last_words(registry: &Registry, name: &str) {
    if let Some(tail) = log_tail(registry, name) {
        log::warn!("{name}: the daemon had stopped; the end of its log:\n  {tail}");
    }
}

/// Returns the last three non-empty lines of an attachment's log, indented for a message.
fn log_tail(registry: &Registry, name: &str) -> Option<String> {
    let log = std::fs::read_to_string(registry.log_path(name)).ok()?;
    let lines: Vec<&str> = log.lines().filter(|line| !line.trim().is_empty()).collect();
    if lines.is_empty() {
        return None;
    }
    Some(lines[lines.len().saturating_sub(3)..].join("\n  "))
}

/// Unmounts the FUSE mount at `mountpoint` (non-lazily), retrying briefly while it is busy;
/// `name` is the subject of the error.
pub(crate) fn unmount(name: &str, mountpoint: &Path) -> Result<(), DetachError> {
    let started = Instant::now();
    loop {
        match unmount_once(name, mountpoint) {
            Err(DetachError::Busy { .. }) if started.elapsed() < BUSY_RETRY => {
                log::debug!("{name}: device busy, retrying the unmount");
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

pub(super) fn unmount_once(name: &str, mountpoint: &Path) -> Result<(), DetachError> {
    if !is_mounted(mountpoint) {
        // Still starting, or already unmounted: the daemon exits by itself.
        return Ok(());
    }

    let result = if Uid::effective().is_root() {
        umount2(mountpoint, MntFlags::empty())
            .map_err(|errno| (errno == nix::errno::Errno::EBUSY, errno.desc().to_string()))
    } else {
        fusermount_unmount(mountpoint)
    };

    match result {
        Ok(()) => Ok(()),
        Err((true, _)) => Err(DetachError::Busy {
            name: name.to_string(),
            mountpoint: mountpoint.to_path_buf(),
        }),
        Err((false, reason)) => Err(DetachError::Unmount {
            name: name.to_string(),
            mountpoint: mountpoint.to_path_buf(),
            reason,
        }),
    }
}

/// Asks the daemon of an attachment mounted in the private namespace of `loopfuse run` to
/// unmount, since the mount cannot be reached from here. The daemon unmounts as it does on
/// SIGTERM.
fn stop_namespace_daemon(entry: &Entry) -> Result<(), DetachError> {
    let name = &entry.state.name;
    log::info!(
        "{name}: mounted in another mount namespace; stopping its daemon (pid {})",
        entry.state.pid.pid
    );

    let daemon = nix::unistd::Pid::from_raw(entry.state.pid.pid);
    match nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGTERM) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(errno) => Err(DetachError::Unmount {
            name: name.clone(),
            mountpoint: entry.mountpoint.clone(),
            reason: format!(
                "cannot signal the daemon (pid {}): {}",
                daemon,
                errno.desc()
            ),
        }),
    }
}

/// Unmounts through the setuid helper; the error is `(busy, message)`.
fn fusermount_unmount(mountpoint: &Path) -> Result<(), (bool, String)> {
    let helper = find_fusermount().unwrap_or_else(|| PathBuf::from(FUSERMOUNT));
    let output = Command::new(&helper)
        .arg("-u")
        .arg("--")
        .arg(mountpoint)
        .output()
        .map_err(|error| (false, format!("cannot run {}: {error}", helper.display())))?;

    if output.status.success() {
        return Ok(());
    }
    let message = String::from_utf8_lossy(&output.stderr).trim().to_string();
    Err((message.contains("busy"), message))
}

pub(crate) fn unmount_lazily(mountpoint: &Path) {
    if Uid::effective().is_root() {
        let _ = umount2(mountpoint, MntFlags::MNT_DETACH);
        return;
    }
    let helper = find_fusermount().unwrap_or_else(|| PathBuf::from(FUSERMOUNT));
    let _ = Command::new(helper)
        .args(["-u", "-z", "--"])
        .arg(mountpoint)
        .output();
}

/// Waits briefly for the daemon of an attachment whose mount is gone. A mount unmounted
/// lazily (by `run`, when its command left a process holding the device) is served until
/// the last close, which may be far off, so that is reported rather than waited for. A
/// daemon that is only finishing its own exit gets a moment.
fn wait_for_lazy_exit(entry: &Entry) -> Result<(), DetachError> {
    if wait_for_exit_within(entry, BUSY_RETRY) {
        return Ok(());
    }
    Err(DetachError::ServingLazily {
        name: entry.state.name.clone(),
        mountpoint: entry.mountpoint.clone(),
    })
}

/// Returns whether the daemon of `entry` has exited within `timeout`: every thread of it,
/// so that the image and its lock are released on return.
fn wait_for_exit_within(entry: &Entry, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    while entry.state.pid.holds_resources() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    true
}

fn wait_for_exit(registry: &Registry, entry: &Entry) -> Result<(), DetachError> {
    if wait_for_exit_within(entry, EXIT_TIMEOUT) {
        return Ok(());
    }
    Err(DetachError::DaemonStuck {
        name: entry.state.name.clone(),
        pid: entry.state.pid.pid,
        log: registry.log_path(&entry.state.name),
    })
}
