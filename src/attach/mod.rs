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
mod lifecycle;
pub mod namespace;
mod partitions;
mod run;
mod supervisor;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) use daemon::session_config;
pub use daemon::{Readiness, serve};
pub(crate) use detach::unmount;
pub use detach::{DetachError, detach, detach_all};
pub use environment::EnvironmentError;
pub use lifecycle::{Lifecycle, LifecycleError};
pub use namespace::NamespaceError;
pub use partitions::{RescanError, rescan};
pub use run::{RunError, run_attached};

use crate::block::overlay::{self, OverlayError};
use crate::fs::CacheMode;
use crate::image::{self, Access, ImageError};
use crate::registry::{AttachmentState, ProcessId, Registry, RegistryError, Stage};

/// Sector sizes a device may have, as for `losetup -b`.
pub const SECTOR_SIZES: [u32; 4] = [512, 1024, 2048, 4096];

/// How long `attach` waits for the daemon to report that the device is usable.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Hidden subcommand that runs the daemon.
pub const DAEMON_SUBCOMMAND: &str = "daemon";

/// A validated attach request.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub image: PathBuf,
    /// Byte offset of the device inside the image.
    pub offset: u64,
    /// Maximum size of the device in bytes; `None` means up to the end of the image.
    pub sizelimit: Option<u64>,
    pub read_only: bool,
    /// Whether to expose the partitions of the device as `p1`, `p2`, ...
    pub partscan: bool,
    /// Logical sector size, one of [`SECTOR_SIZES`].
    pub sector_size: u32,
    /// Whether users other than the attaching one may open the device files.
    pub allow_other: bool,
    /// How the kernel caches the device files' data.
    pub cache: CacheMode,
    /// Overlay file that receives every write, leaving the image unchanged.
    pub overlay: Option<PathBuf>,
    /// Whether to write to a new overlay in the registry, removed at detach.
    pub snapshot: bool,
    /// When the attachment detaches itself, and where its PID is published.
    pub lifecycle: Lifecycle,
}

impl AttachOptions {
    /// Options for attaching the whole of `image` read-write.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        Self {
            image: image.into(),
            offset: 0,
            sizelimit: None,
            read_only: false,
            partscan: false,
            sector_size: 512,
            allow_other: false,
            cache: CacheMode::default(),
            overlay: None,
            snapshot: false,
            lifecycle: Lifecycle::default(),
        }
    }

    /// Returns whether writes go to an overlay instead of the image.
    pub fn uses_overlay(&self) -> bool {
        self.overlay.is_some() || self.snapshot
    }

    /// Access to the image itself: read-only under an overlay, which takes the writes.
    fn image_access(&self) -> Access {
        if self.read_only || self.uses_overlay() {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        }
    }
}

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

    #[error("{}: offset {offset} is at or past the end of the image ({len} bytes); give a smaller --offset", path.display())]
    OffsetPastEnd {
        path: PathBuf,
        offset: u64,
        len: u64,
    },

    #[error("{}: offset {offset} plus size limit {sizelimit} ends past the end of the image ({len} bytes); give a smaller --sizelimit", path.display())]
    SizeLimitPastEnd {
        path: PathBuf,
        offset: u64,
        sizelimit: u64,
        len: u64,
    },

    #[error("{}: device of {size} bytes is smaller than one {sector_size}-byte sector", path.display())]
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

    #[error("{}: cannot mount at {} (run 'loopfuse doctor' to check the environment)", image.display(), mountpoint.display())]
    Mount {
        image: PathBuf,
        mountpoint: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: flushing the image failed; writes since the last fsync may be lost", image.display())]
    Flush {
        image: PathBuf,
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

/// The device range of an image: `(offset, size)` in bytes.
///
/// The size is rounded down to whole sectors, as the kernel loop driver does. The returned
/// `bool` is true when a partial sector at the end was left out.
pub fn device_range(
    options: &AttachOptions,
    image_len: u64,
) -> Result<(u64, u64, bool), AttachError> {
    let path = options.image.clone();
    if options.offset >= image_len {
        return Err(AttachError::OffsetPastEnd {
            path,
            offset: options.offset,
            len: image_len,
        });
    }

    let available = image_len - options.offset;
    let size = match options.sizelimit {
        Some(limit) if limit > available => {
            return Err(AttachError::SizeLimitPastEnd {
                path,
                offset: options.offset,
                sizelimit: limit,
                len: image_len,
            });
        }
        Some(limit) if limit > 0 => limit,
        _ => available,
    };

    let sector = u64::from(options.sector_size);
    let whole_sectors = size - size % sector;
    if whole_sectors == 0 {
        return Err(AttachError::SmallerThanSector {
            path,
            size,
            sector_size: options.sector_size,
        });
    }

    Ok((options.offset, whole_sectors, whole_sectors != size))
}

/// Checks an attach request against the image and the environment, without changing
/// anything, and returns the device range.
pub fn validate(options: &AttachOptions, registry: &Registry) -> Result<(u64, u64), AttachError> {
    let info = image::probe(&options.image)?;
    let options = &AttachOptions {
        image: info.path.clone(),
        ..options.clone()
    };
    let (offset, size, cut) = device_range(options, info.len)?;
    if let Err(error) = image::check_unlocked(&info.path, options.image_access()) {
        return Err(explain_lock_conflict(error, registry));
    }
    if let Some(overlay_path) = &options.overlay {
        check_overlay(&info.path, overlay_path, options.read_only, registry)?;
    }
    environment::check_mount_possible().map_err(explain_environment)?;
    options.lifecycle.validate()?;

    if cut {
        log::warn!(
            "{}: device size {} is not a whole number of {}-byte sectors; the last {} bytes are left out",
            info.path.display(),
            info.len - offset,
            options.sector_size,
            (info.len - offset).min(options.sizelimit.unwrap_or(u64::MAX)) - size
        );
    }

    Ok((offset, size))
}

/// Adds to an environment error that `loopfuse run` still works, when the setuid helper is
/// the only problem and the kernel settings allow user namespaces.
fn explain_environment(error: EnvironmentError) -> AttachError {
    if error.is_about_fusermount() && namespace::user_namespace_restrictions().is_empty() {
        AttachError::NamespaceOnly { source: error }
    } else {
        AttachError::Environment(error)
    }
}

/// Checks that the overlay at `overlay_path` fits the image and is not in use, and warns when
/// the image file is another one than the overlay was made on (a copy, or a touched file).
fn check_overlay(
    image_path: &Path,
    overlay_path: &Path,
    read_only: bool,
    registry: &Registry,
) -> Result<(), AttachError> {
    match overlay::check_overlay(image_path, overlay_path, read_only) {
        Ok(false) => Ok(()),
        Ok(true) => {
            log::warn!(
                "{}: not the file the overlay {} was made on, but its size and first and last MiB match; continuing as if it were an unchanged copy",
                image_path.display(),
                overlay_path.display()
            );
            Ok(())
        }
        Err(OverlayError::Image(error)) => Err(explain_lock_conflict(error, registry)),
        Err(error) => Err(error.into()),
    }
}

/// Replaces a lock conflict with one naming the attachment that holds the lock, when the
/// registry lists it as the image or the overlay of an attachment.
fn explain_lock_conflict(error: ImageError, registry: &Registry) -> AttachError {
    let ImageError::Locked { path, .. } = &error else {
        return error.into();
    };
    let holder = registry.list().ok().and_then(|entries| {
        entries
            .into_iter()
            .find(|entry| &entry.state.image == path || entry.state.overlay.as_ref() == Some(path))
    });

    match holder {
        Some(entry) => AttachError::AlreadyAttached {
            path: path.clone(),
            // An image under an overlay is opened read-only, whatever the device allows.
            read_only: entry.state.read_only
                || (&entry.state.image == path && entry.state.overlay.is_some()),
            name: entry.state.name,
        },
        None => error.into(),
    }
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
        partitions: Vec::new(),
        scans: 0,
        cache: options.cache.to_string(),
        mounts: Vec::new(),
    }
}

/// Attaches an image through a background daemon and returns once the device file is usable.
///
/// On failure nothing is left mounted or registered, and the image is untouched.
pub fn attach(options: &AttachOptions, registry: &Registry) -> Result<Attached, AttachError> {
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
                    // Still running but silent: stop it so that nothing is left behind.
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

/// Whether `path` is currently a mount point, according to `/proc/self/mountinfo`.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = escape_mount_path(&path.to_string_lossy());

    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

/// Escapes a path as `/proc/self/mountinfo` writes it (space, tab, newline, backslash).
fn escape_mount_path(path: &str) -> String {
    let mut escaped = String::with_capacity(path.len());
    for character in path.chars() {
        match character {
            ' ' => escaped.push_str("\\040"),
            '\t' => escaped.push_str("\\011"),
            '\n' => escaped.push_str("\\012"),
            '\\' => escaped.push_str("\\134"),
            other => escaped.push(other),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(offset: u64, sizelimit: Option<u64>) -> AttachOptions {
        AttachOptions {
            offset,
            sizelimit,
            ..AttachOptions::new("disk.img")
        }
    }

    #[test]
    fn device_range_covers_rest_of_image() {
        assert_eq!(
            device_range(&options(0, None), 1 << 20).unwrap(),
            (0, 1 << 20, false)
        );
        assert_eq!(
            device_range(&options(4096, None), 1 << 20).unwrap(),
            (4096, (1 << 20) - 4096, false)
        );
    }

    #[test]
    fn device_range_honours_sizelimit() {
        assert_eq!(
            device_range(&options(512, Some(1024)), 4096).unwrap(),
            (512, 1024, false)
        );
    }

    #[test]
    fn device_range_drops_partial_sector() {
        assert_eq!(
            device_range(&options(0, None), 1000).unwrap(),
            (0, 512, true)
        );
    }

    #[test]
    fn device_range_rejects_bad_windows() {
        assert!(matches!(
            device_range(&options(4096, None), 4096),
            Err(AttachError::OffsetPastEnd { .. })
        ));
        assert!(matches!(
            device_range(&options(512, Some(4096)), 4096),
            Err(AttachError::SizeLimitPastEnd { .. })
        ));
        assert!(matches!(
            device_range(&options(0, None), 100),
            Err(AttachError::SmallerThanSector { .. })
        ));
    }

    #[test]
    fn mount_paths_are_escaped_like_mountinfo() {
        assert_eq!(escape_mount_path("/run/a b\\c"), "/run/a\\040b\\134c");
    }
}
