//! Detaching without a `detach` command: after the last close of the device files
//! (`--autoclear`), or once the process the attachment is tied to exits (`--until-exit`).
//!
//! FUSE sends RELEASE asynchronously, after `close(2)` has returned to the program, and a
//! new open can race with it. So a last close only starts an attempt: the watcher waits a
//! moment, checks that nothing was opened since, and then unmounts non-lazily. The kernel
//! rejects that unmount with EBUSY while any file on the mount is open or being opened, so
//! autoclear never pulls the device from under a program that is using it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fuser::SessionUnmounter;
use nix::mount::{MntFlags, umount2};

use super::detach::{BUSY_RETRY, DetachError, unmount_once};
use crate::fs::{DeviceFs, DeviceTable};
use crate::registry::{ProcessId, Registry};

/// Pause between a last close and the unmount attempt, during which the kernel finishes
/// the close and a program that reopens at once gets its file first.
const SETTLE: Duration = Duration::from_millis(20);

/// Pause between two retries of an unmount refused as busy.
const BUSY_PAUSE: Duration = Duration::from_millis(50);

/// Interval at which `--until-exit` checks the process. Polling `/proc` is used because a
/// pidfd would need `unsafe` code outside the `image` module.
const OWNER_POLL: Duration = Duration::from_millis(200);

/// Ends a FUSE session by unmounting it, from whichever thread requests it first.
pub(super) struct SessionStop {
    name: String,
    mountpoint: PathBuf,
    registry: Registry,
    /// Taken by the first stop, so a second request does nothing.
    unmounter: Mutex<Option<SessionUnmounter>>,
}

impl SessionStop {
    pub(super) fn new(
        name: &str,
        mountpoint: PathBuf,
        registry: Registry,
        unmounter: SessionUnmounter,
    ) -> Self {
        Self {
            name: name.to_string(),
            mountpoint,
            registry,
            unmounter: Mutex::new(Some(unmounter)),
        }
    }

    /// Unmounts for `reason`, lazily when a plain unmount fails, so the session always ends.
    pub(super) fn stop(&self, reason: &str) {
        let taken = self
            .unmounter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(mut unmounter) = taken else {
            return;
        };

        log::info!("{}: {reason}, unmounting", self.name);
        // A plain unmount first: fuser's own unmount is lazy for unprivileged users, which
        // would hide that the device is still open.
        match unmount_once(&self.name, &self.mountpoint) {
            Ok(()) => return,
            Err(DetachError::Busy { .. }) => {
                log::warn!(
                    "{}: device busy; unmounting lazily, so it goes after the last close",
                    self.name
                );
                // Served until the last close, like a busy kernel loop device after
                // `losetup -d`, which shows autoclear meanwhile. Recorded before the lazy
                // unmount, so that a process that finds the mount gone also finds the flag.
                record_autoclear(&self.registry, &self.name);
            }
            Err(error) => log::debug!("{error}; unmounting through the session"),
        }
        if let Err(error) = unmounter.unmount() {
            log::warn!("{}: unmount failed ({error}); detaching lazily", self.name);
            let _ = umount2(&self.mountpoint, MntFlags::MNT_DETACH);
        }
    }
}

/// Records in the state file that the attachment goes after its last close.
pub(super) fn record_autoclear(registry: &Registry, name: &str) {
    if let Err(error) = registry.update_state(name, |state| state.autoclear = true) {
        log::warn!("{name}: failed to record autoclear: {error}");
    }
}

/// A flag set by the FUSE release handler when the last open file is gone, and waited for
/// by the autoclear thread.
#[derive(Default)]
struct LastClose {
    released: Mutex<bool>,
    wake: Condvar,
}

impl LastClose {
    fn notify(&self) {
        *self
            .released
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
        self.wake.notify_one();
    }

    fn wait(&self) {
        let mut released = self
            .released
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while !*released {
            released = self
                .wake
                .wait(released)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        *released = false;
    }
}

/// Everything the autoclear thread needs: the open-file table, the flag its release
/// handler sets, and whether autoclear is on.
#[derive(Clone)]
pub(super) struct Autoclear {
    devices: Arc<DeviceTable>,
    last_close: Arc<LastClose>,
    /// Off until `--autoclear` or [`Autoclear::arm`] turns it on.
    armed: Arc<AtomicBool>,
}

impl Autoclear {
    /// Hooks autoclear into `filesystem`, whose release handler then wakes the watcher.
    /// Unless `armed`, the watcher ignores last closes until [`Autoclear::arm`] is called.
    pub(super) fn install(
        filesystem: DeviceFs,
        devices: Arc<DeviceTable>,
        armed: bool,
    ) -> (DeviceFs, Self) {
        let last_close = Arc::new(LastClose::default());
        let notified = last_close.clone();
        let filesystem = filesystem.on_last_close(Box::new(move || notified.notify()));

        (
            filesystem,
            Self {
                devices,
                last_close,
                armed: Arc::new(AtomicBool::new(armed)),
            },
        )
    }

    /// Turns autoclear on, as the kernel does for `losetup -d` of a busy loop device. The
    /// attachment then detaches after the last close, or at once when nothing is open.
    pub(super) fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
        if self.devices.open_count() == 0 {
            self.last_close.notify();
        }
    }

    /// Starts the thread that unmounts the attachment `name` after the last close.
    pub(super) fn spawn(self, name: String, mountpoint: PathBuf) {
        std::thread::spawn(move || {
            loop {
                self.last_close.wait();
                if self.armed.load(Ordering::SeqCst) && self.try_unmount(&name, &mountpoint) {
                    return;
                }
            }
        });
    }

    /// Unmounts unless a file was opened again; returns whether the mount is gone.
    fn try_unmount(&self, name: &str, mountpoint: &std::path::Path) -> bool {
        let started = Instant::now();
        std::thread::sleep(SETTLE);

        loop {
            if self.devices.open_count() > 0 {
                log::debug!("{name}: opened again; autoclear waits for the next last close");
                return false;
            }
            match unmount_once(name, mountpoint) {
                Ok(()) => {
                    log::info!("{name}: last open file closed, detached (autoclear)");
                    return true;
                }
                Err(DetachError::Busy { .. }) if started.elapsed() < BUSY_RETRY => {
                    std::thread::sleep(BUSY_PAUSE);
                }
                Err(DetachError::Busy { .. }) => {
                    // NOTE: a process whose working directory is inside the mount keeps it
                    // busy without an open device file; autoclear then waits for the next close.
                    log::debug!("{name}: still busy; autoclear waits for the next last close");
                    return false;
                }
                Err(error) => {
                    log::warn!(
                        "{name}: autoclear cannot unmount: {}",
                        crate::error_chain(&error)
                    );
                    return false;
                }
            }
        }
    }
}

/// Starts a thread that stops the session once process `pid` has exited. A process that
/// is already gone stops it at once.
pub(super) fn watch_owner(pid: i32, stop: Arc<SessionStop>) {
    let owner = ProcessId::of(pid);
    std::thread::spawn(move || {
        if let Some(owner) = owner {
            while owner.is_running() {
                std::thread::sleep(OWNER_POLL);
            }
        }
        stop.stop(&format!(
            "process {pid}, which the attachment is tied to, exited"
        ));
    });
}
