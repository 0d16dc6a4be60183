//! Attaching and detaching: validating a request, starting the daemon that serves the FUSE
//! session, reporting readiness, and unmounting cleanly.
//!
//! `attach` validates everything it can before anything is created, reserves a name in the
//! registry, and starts the daemon as a child process (the same executable, hidden `daemon`
//! subcommand). The daemon mounts, then writes one readiness line to its standard output,
//! which is a pipe back to `attach`. This module does not depend on partition formats.
#![forbid(unsafe_code)]

mod autoclear;
mod daemon;
mod detach;
pub mod environment;
pub mod inherited;
mod lifecycle;
mod mountinfo;
pub mod namespace;
mod options;
mod partitions;
mod run;
mod supervisor;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) use daemon::session_config;
pub use daemon::{Readiness, serve};
pub use detach::{DetachError, detach, detach_all, detach_when_closed};
pub(crate) use detach::{unmount, unmount_lazily};
pub use environment::EnvironmentError;
pub use lifecycle::{Lifecycle, LifecycleError};
pub use mountinfo::is_mounted;
pub use namespace::NamespaceError;
pub use options::{
    AttachOptions, SECTOR_SIZES, device_range, explain_lock_conflict, read_only_if_write_protected,
    validate,
};
pub use partitions::{RescanError, rescan};
pub use run::{EXEC_SUBCOMMAND, RunError, exec_in_place, exec_unblocked, run_attached};

use crate::block::overlay::OverlayError;
use crate::image::ImageError;
use crate::registry::{AttachmentState, FileId, ProcessId, Registry, RegistryError, Stage};

/// How long `attach` waits for the daemon to report that the device is usable.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Hidden subcommand that runs the daemon.
pub const DAEMON_SUBCOMMAND: &str = "daemon";

/// Errors from attaching.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    #[error(transparent)]
    Image(#[from] ImageError),

    #[error("{0} (run 'loopfuse doctor' for every check)")]
    Environment(#[from] EnvironmentError),

    #[error(
        "{source}; 'loopfuse run IMAGE -- COMMAND' can still attach, in a private user namespace whose mounts only COMMAND sees (run 'loopfuse doctor' for every check)"
    )]
    NamespaceOnly { source: EnvironmentError },

    #[error(transparent)]
    Namespace(#[from] NamespaceError),

    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),

    #[error(transparent)]
    Registry(#[from] RegistryError),

    #[error(transparent)]
    Overlay(#[from] OverlayError),

    #[error("{}: file names that are not valid UTF-8 are not supported; rename it, or use another name", path.display())]
    NotUtf8 { path: PathBuf },

    #[error("{}: offset {offset} is at or past the end of the image ({len} bytes); give a smaller --offset", path.display())]
    OffsetPastEnd {
        path: PathBuf,
        offset: u64,
        len: u64,
    },

    #[error("{}: device of {size} bytes is smaller than one {sector_size}-byte sector; grow the image, or give a smaller sector size with -b", path.display())]
    SmallerThanSector {
        path: PathBuf,
        size: u64,
        sector_size: u32,
    },

    #[error("{}: already attached{} as {name} (see 'loopfuse list', or 'loopfuse detach {name}')", path.display(), if *read_only { " read-only" } else { " read-write" })]
    AlreadyAttached {
        path: PathBuf,
        name: String,
        read_only: bool,
    },

    #[error("{}: still attached as {name}, which was unmounted and goes once a process closes its device file; stop that process, or wait", path.display())]
    DetachingWhenClosed { path: PathBuf, name: String },

    #[error("{}: cannot mount at {} (run 'loopfuse doctor' to check the environment)", image.display(), mountpoint.display())]
    Mount {
        image: PathBuf,
        mountpoint: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: flushing failed; writes since the last fsync may be lost", path.display())]
    Flush {
        /// The file that receives the writes: the overlay when there is one, else the image.
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot start the daemon ({})", executable.display())]
    Spawn {
        executable: PathBuf,
        source: std::io::Error,
    },

    #[error("{message}")]
    Daemon { message: String },

    #[error("{}: the daemon exited ({status}) before the device was ready; its log said: {log}", image.display())]
    DaemonExited {
        image: PathBuf,
        status: String,
        log: String,
    },

    #[error("{}: the device was not ready after {} s (see the log {})", image.display(), READY_TIMEOUT.as_secs(), log.display())]
    Timeout { image: PathBuf, log: PathBuf },
}

/// Names and paths created by a successful attach.
#[derive(Debug, Clone)]
pub struct Attached {
    pub name: String,
    /// The whole-disk device file.
    pub device: PathBuf,
    /// The directory holding the device files.
    pub directory: PathBuf,
}

fn initial_state(options: &AttachOptions, offset: u64, size: u64) -> AttachmentState {
    AttachmentState {
        name: String::new(),
        stage: Stage::Starting,
        image: std::path::absolute(&options.image).unwrap_or_else(|_| options.image.clone()),
        offset,
        size,
        sizelimit: options.sizelimit.unwrap_or(0),
        read_only: options.read_only,
        partscan: options.partscan,
        sector_size: options.sector_size,
        overlay: options
            .overlay
            .as_ref()
            .map(|path| std::path::absolute(path).unwrap_or_else(|_| path.clone())),
        snapshot: options.snapshot,
        pid: ProcessId::current(),
        partition_table: None,
        partition_problem: None,
        partitions: Vec::new(),
        scans: 0,
        cache: options.cache.to_string(),
        mounts: Vec::new(),
        autoclear: options.lifecycle.autoclear,
        pidfile: options
            .lifecycle
            .pidfile
            .as_ref()
            .map(|path| std::path::absolute(path).unwrap_or_else(|_| path.clone())),
        image_id: FileId::of(&options.image),
    }
}

/// Attaches an image through a background daemon and returns once the device file is usable.
///
/// On failure nothing is left mounted or registered, and the image is untouched.
pub fn attach(options: &AttachOptions, registry: &Registry) -> Result<Attached, AttachError> {
    let options = &read_only_if_write_protected(options);
    let (offset, size) = validate(options, registry)?;
    let state = initial_state(options, offset, size);
    let image = state.image.clone();

    let reservation = registry.reserve(state)?;
    let name = reservation.name().to_string();
    let log_path = registry.log_path(&name);
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|source| RegistryError::Io {
            path: log_path.clone(),
            source,
        })?;

    let executable = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("loopfuse"));
    let mut command = Command::new(&executable);
    command
        .arg(DAEMON_SUBCOMMAND)
        .arg("--name")
        .arg(&name)
        .args(daemon_arguments(options))
        .env("LOOPFUSE_RUNTIME_ROOT", registry.root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    // Its own process group keeps the daemon out of reach of the terminal's Ctrl-C.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);

    let mut child = command.spawn().map_err(|source| AttachError::Spawn {
        executable: executable.clone(),
        source,
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");

    match wait_for_readiness(stdout) {
        Some(Ok(())) => {
            reservation.keep();
            log::info!(
                "{}: attached as {name} (daemon pid {})",
                image.display(),
                child.id()
            );
            Ok(attached(registry, &name))
        }
        Some(Err(message)) => {
            let _ = child.wait();
            Err(AttachError::Daemon { message })
        }
        None => {
            let status = match child.try_wait() {
                Ok(Some(status)) => status.to_string(),
                _ => {
                    // Still running but silent: kill it. Dropping the reservation then
                    // removes its registry entry.
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(AttachError::Timeout {
                        image,
                        log: log_path,
                    });
                }
            };
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            Err(AttachError::DaemonExited {
                image,
                status,
                log: last_lines(&log, 5),
            })
        }
    }
}

/// Runs an attachment in this process until it is detached or receives SIGTERM or SIGINT.
///
/// `on_ready` is called with the attachment once the device file is usable; then a
/// supervisor named by `NOTIFY_SOCKET` is sent `READY=1`.
pub fn attach_foreground(
    options: &AttachOptions,
    registry: &Registry,
    on_ready: impl FnOnce(&Attached),
) -> Result<(), AttachError> {
    let options = &read_only_if_write_protected(options);
    let (offset, size) = validate(options, registry)?;
    let reservation = registry.reserve(initial_state(options, offset, size))?;
    let name = reservation.name().to_string();

    let result = serve(
        options,
        registry,
        &name,
        Readiness::Callback(Box::new(|| {
            on_ready(&attached(registry, &name));
            supervisor::notify_ready(&name);
        })),
    );
    // `serve` removes the entry itself once it has mounted; this covers earlier failures.
    drop(reservation);
    result
}

fn attached(registry: &Registry, name: &str) -> Attached {
    let directory = registry.mountpoint(name);
    Attached {
        name: name.to_string(),
        device: directory.join(crate::registry::DISK_FILE),
        directory,
    }
}

/// Command-line arguments that pass `options` to the daemon.
fn daemon_arguments(options: &AttachOptions) -> Vec<String> {
    let mut arguments = vec![
        "--offset".to_string(),
        options.offset.to_string(),
        "--sector-size".to_string(),
        options.sector_size.to_string(),
    ];
    if let Some(limit) = options.sizelimit {
        arguments.extend(["--sizelimit".to_string(), limit.to_string()]);
    }
    if let Some(overlay) = &options.overlay {
        arguments.push("--overlay".to_string());
        arguments.push(overlay.to_string_lossy().into_owned());
    }
    for (enabled, flag) in [
        (options.read_only, "--read-only"),
        (options.partscan, "--partscan"),
        (options.allow_other, "--allow-other"),
        (options.snapshot, "--snapshot"),
    ] {
        if enabled {
            arguments.push(flag.to_string());
        }
    }
    arguments.extend(["--cache".to_string(), options.cache.to_string()]);
    arguments.extend(options.lifecycle.daemon_arguments());
    arguments.push("--".to_string());
    arguments.push(options.image.to_string_lossy().into_owned());
    arguments
}

/// Reads the daemon's readiness line: `Some(Ok)` once ready, `Some(Err(message))` when it
/// reported a failure, `None` when the pipe closed or stayed silent too long.
fn wait_for_readiness(stdout: std::process::ChildStdout) -> Option<Result<(), String>> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = sender.send(line);
    });

    let started = Instant::now();
    let line = receiver
        .recv_timeout(READY_TIMEOUT.saturating_sub(started.elapsed()))
        .ok()?;
    daemon::parse_readiness(&line)
}

/// Joins the last `count` non-empty lines of `text` with " | ", or returns "nothing".
pub(crate) fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let start = lines.len().saturating_sub(count);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "nothing".to_string()
    } else {
        tail
    }
}

/// The registry root a daemon was started for, or the current user's default.
pub fn daemon_registry() -> Result<Registry, RegistryError> {
    match std::env::var_os("LOOPFUSE_RUNTIME_ROOT") {
        Some(root) => Registry::at(PathBuf::from(root)),
        None => Registry::for_current_user(),
    }
}
