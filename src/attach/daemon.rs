//! The daemon: opens the image, mounts the FUSE filesystem, reports readiness, serves
//! requests until unmounted or signalled, then flushes the image and removes its entry.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{Config, MountOption, SessionACL};
use nix::sys::signal::{SigSet, Signal};

use super::autoclear::{Autoclear, SessionStop, record_autoclear, watch_owner};
use super::partitions::PartitionScanner;
use super::supervisor::PidFile;
use super::{AttachError, AttachOptions, device_range};
use crate::block::overlay::{OverlayMode, open_overlay};
use crate::block::{BlockDevice, Window};
use crate::fs::{DeviceFs, DeviceTable, Owner};
use crate::image::{Access, Image};
use crate::registry::{ProcessId, Registry, Stage};

/// Channel through which the daemon reports that the device is usable.
pub enum Readiness<'a> {
    /// Write `ready` (or `error<TAB>message`) as one line to standard output, a pipe read by
    /// `attach`, then point standard output at `/dev/null`.
    Pipe,
    /// Call this function once mounted.
    Callback(Box<dyn FnOnce() + 'a>),
}

const READY_LINE: &str = "ready";
const ERROR_PREFIX: &str = "error\t";

/// Parses a readiness line written by [`Readiness::Pipe`]; `None` for an empty line (the
/// daemon exited without writing one).
pub(super) fn parse_readiness(line: &str) -> Option<Result<(), String>> {
    let line = line.trim_end_matches('\n');
    if line == READY_LINE {
        return Some(Ok(()));
    }
    line.strip_prefix(ERROR_PREFIX)
        .map(|message| Err(message.to_string()))
}

/// Serves the attachment `name` until it is unmounted or the process receives SIGTERM,
/// SIGINT or SIGHUP. SIGUSR1 rescans the partition table. With `options.lifecycle`, it also
/// ends after the last close (`autoclear`) or once the process `until_exit` names exits.
///
/// With [`Readiness::Pipe`], a failure before the mount is also written to the pipe.
pub fn serve(
    options: &AttachOptions,
    registry: &Registry,
    name: &str,
    readiness: Readiness,
) -> Result<(), AttachError> {
    // Blocked before any thread starts, so that every thread inherits the mask and only the
    // signal thread below receives these signals.
    let signals = stop_signals();
    if let Err(error) = signals.thread_block() {
        log::warn!("{name}: cannot block stop signals: {error}");
    }

    let (_pidfile, session) = match start(options, registry, name) {
        Ok(started) => started,
        Err(error) => {
            if matches!(readiness, Readiness::Pipe) {
                report_to_pipe(&format!("{ERROR_PREFIX}{}", crate::error_chain(&error)));
            }
            return Err(error);
        }
    };
    let Mounted {
        mut session,
        disk,
        image,
        written,
        scanner,
        autoclear,
    } = session;

    match readiness {
        Readiness::Pipe => {
            report_to_pipe(READY_LINE);
            detach_stdout();
        }
        Readiness::Callback(on_ready) => on_ready(),
    }
    log::info!(
        "{name}: attached {} at {}",
        image.display(),
        registry.mountpoint(name).display()
    );

    let mountpoint = registry.mountpoint(name);
    let stop = Arc::new(SessionStop::new(
        name,
        mountpoint.clone(),
        registry.clone(),
        session.unmount_callable(),
    ));
    autoclear.clone().spawn(name.to_string(), mountpoint);
    if let Some(pid) = options.lifecycle.until_exit {
        watch_owner(pid, stop.clone());
    }

    let signal_name = name.to_string();
    let signal_registry = registry.clone();
    std::thread::spawn(move || {
        while let Ok(signal) = signals.wait() {
            if signal == Signal::SIGUSR2 {
                log::info!("{signal_name}: autoclear requested");
                record_autoclear(&signal_registry, &signal_name);
                autoclear.arm();
                continue;
            }
            if signal == Signal::SIGUSR1 {
                match &scanner {
                    Some(scanner) => {
                        log::info!("{signal_name}: rescan requested");
                        scanner.rescan_after_outside_change();
                    }
                    None => {
                        log::warn!("{signal_name}: rescan ignored: attached without --partscan")
                    }
                }
                continue;
            }

            stop.stop(&format!("{signal} received"));
            break;
        }
    });

    let served = session.run();
    if let Err(error) = &served {
        log::error!("{name}: FUSE session ended with an error: {error}");
    }
    // At once, not after the flush: until then, a program opening a partition path would
    // create a file in the bare directory.
    if !super::is_mounted(&registry.mountpoint(name)) {
        registry.retire_mountpoint(name);
    }

    // A snapshot is removed with the registry entry, so flushing it would only cost time.
    let flushed = if options.snapshot {
        Ok(())
    } else {
        disk.flush()
    };
    match &flushed {
        Ok(()) => {
            log::info!("{name}: flushed and detached {}", image.display());
            registry.remove(name);
        }
        // The entry and its log stay, so that `detach` or `list` can report the failure.
        Err(error) => log::error!("{name}: flushing {} failed: {error}", written.display()),
    }

    flushed.map_err(|source| AttachError::Flush {
        path: written,
        source,
    })
}

struct Mounted {
    session: fuser::Session<DeviceFs>,
    disk: Arc<dyn BlockDevice>,
    image: std::path::PathBuf,
    /// The file that receives the writes: the overlay when there is one, else the image.
    written: std::path::PathBuf,
    /// Present when the attachment exposes partitions.
    scanner: Option<Arc<PartitionScanner>>,
    /// Watcher that detaches the attachment after the last close, once armed.
    autoclear: Autoclear,
}

fn stop_signals() -> SigSet {
    let mut signals = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        signals.add(signal);
    }
    signals
}

/// Writes the PID file, then mounts. A failed mount removes the PID file again.
fn start(
    options: &AttachOptions,
    registry: &Registry,
    name: &str,
) -> Result<(Option<PidFile>, Mounted), AttachError> {
    let pidfile = match &options.lifecycle.pidfile {
        Some(path) => Some(PidFile::create(path)?),
        None => None,
    };
    let mounted = mount(options, registry, name)?;

    Ok((pidfile, mounted))
}

/// Opens the image (and its overlay), builds the device files and mounts them; updates the
/// state file.
fn mount(options: &AttachOptions, registry: &Registry, name: &str) -> Result<Mounted, AttachError> {
    let overlay_path = overlay_path(options, registry, name);
    let image = open_device(options, overlay_path.as_deref(), name)?;
    let image_path = std::path::absolute(&options.image).unwrap_or_else(|_| options.image.clone());
    let (offset, size, _) = device_range(options, image.len())?;

    let disk: Arc<dyn BlockDevice> = if offset == 0 && size == image.len() {
        image.clone()
    } else {
        let window =
            Window::new(image.clone(), offset, size).map_err(|source| AttachError::Mount {
                image: image_path.clone(),
                mountpoint: registry.mountpoint(name),
                source,
            })?;
        Arc::new(window)
    };

    let devices = Arc::new(DeviceTable::new(disk.clone()));
    let notifier = Arc::new(OnceLock::new());
    let mut filesystem = DeviceFs::new(
        devices.clone(),
        notifier.clone(),
        current_owner(),
        image_mtime(&image_path),
    )
    .with_cache(options.cache)
    .with_sector_size(options.sector_size);
    // Installed always, because `losetup -d` of a busy device turns autoclear on later.
    let (hooked, autoclear) =
        Autoclear::install(filesystem, devices.clone(), options.lifecycle.autoclear);
    filesystem = hooked;

    let scanner = options.partscan.then(|| {
        Arc::new(PartitionScanner::new(
            name,
            disk.clone(),
            devices,
            notifier.clone(),
            registry.clone(),
            options.sector_size,
        ))
    });
    if let Some(scanner) = &scanner {
        scanner.rescan();
        let on_close = scanner.clone();
        filesystem = filesystem.on_disk_changed(Box::new(move || on_close.rescan()));
    }

    let mountpoint = registry.mountpoint(name);
    let session = fuser::Session::new(filesystem, &mountpoint, &session_config(options)).map_err(
        |source| AttachError::Mount {
            image: image_path.clone(),
            mountpoint: mountpoint.clone(),
            source,
        },
    )?;

    let _ = notifier.set(session.notifier());
    let written = overlay_path.clone();
    record_attached(registry, name, overlay_path)?;

    Ok(Mounted {
        session,
        disk,
        written: written.unwrap_or_else(|| image_path.clone()),
        image: image_path,
        scanner,
        autoclear,
    })
}

/// Returns the overlay file of the attachment: the one given, or the snapshot's in the
/// registry.
fn overlay_path(options: &AttachOptions, registry: &Registry, name: &str) -> Option<PathBuf> {
    if options.snapshot {
        return Some(registry.snapshot_path(name));
    }
    let path = options.overlay.as_ref()?;
    Some(std::path::absolute(path).unwrap_or_else(|_| path.clone()))
}

/// Opens the whole device: the image, or the image seen through its overlay.
fn open_device(
    options: &AttachOptions,
    overlay_path: Option<&Path>,
    name: &str,
) -> Result<Arc<dyn BlockDevice>, AttachError> {
    let Some(overlay_path) = overlay_path else {
        let access = if options.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        return Ok(Arc::new(Image::open(&options.image, access)?));
    };

    let mode = if options.snapshot {
        OverlayMode::Replace
    } else {
        OverlayMode::OpenOrCreate
    };
    let opened = open_overlay(&options.image, overlay_path, mode, options.read_only)?;
    if opened.base_file_differs {
        log::warn!(
            "{name}: {} is not the file the overlay {} was made on, but its size and first and last MiB match",
            options.image.display(),
            overlay_path.display()
        );
    }
    log::info!(
        "{name}: writes go to the overlay {} ({})",
        overlay_path.display(),
        if opened.created { "new" } else { "continued" }
    );
    Ok(Arc::new(opened.overlay))
}

fn record_attached(
    registry: &Registry,
    name: &str,
    overlay_path: Option<PathBuf>,
) -> Result<(), AttachError> {
    let mut state = registry.find(name)?.state;
    state.stage = Stage::Attached;
    state.pid = ProcessId::current();
    state.overlay = overlay_path;
    registry.write_state(&state)?;
    Ok(())
}

/// Builds the FUSE session configuration of an attachment: mount options, access, threads.
pub(crate) fn session_config(options: &AttachOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("loopfuse".to_string()),
        MountOption::Subtype("loopfuse".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::NoAtime,
    ];
    if options.read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(worker_threads());
    config.clone_fd = true;
    config
}

/// Worker threads of the FUSE session. More threads than cores pay off because a request can
/// block on a page fault into the image while another is served.
fn worker_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores * 2).clamp(4, 16)
}

fn current_owner() -> Owner {
    Owner {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    }
}

fn image_mtime(path: &std::path::Path) -> SystemTime {
    std::fs::metadata(path)
        .map(|metadata| {
            SystemTime::UNIX_EPOCH
                + Duration::new(metadata.mtime() as u64, metadata.mtime_nsec() as u32)
        })
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn report_to_pipe(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Points standard output at `/dev/null`, closing the readiness pipe so `attach` can exit.
fn detach_stdout() {
    match std::fs::OpenOptions::new().write(true).open("/dev/null") {
        Ok(null) => {
            if let Err(error) = nix::unistd::dup2_stdout(&null) {
                log::warn!("cannot close the readiness pipe: {error}");
            }
        }
        Err(error) => log::warn!("cannot open /dev/null: {error}"),
    }
}
