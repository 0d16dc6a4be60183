//! Mounting a filesystem inside an image in one step, as `mount -o loop` does with a kernel
//! loop device. `mount` attaches the image, finds the filesystem on the disk or on one
//! partition by its superblock, and serves it with the userspace driver for its type.
//! `umount` undoes all of that.
//!
//! This module builds on [`crate::attach`] and the registry. It does not depend on FUSE
//! internals, image storage or partition formats.
#![forbid(unsafe_code)]

pub mod detect;
pub mod driver;
pub mod driver_log;
pub mod handoff;
mod process;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::attach::{self, AttachError, AttachOptions, DetachError, environment, is_mounted};
use crate::registry::{MountRecord, Registry, RegistryError};
use detect::{Detection, FsType};
use driver::{Driver, Support};

/// How long `umount` waits for a driver to flush and exit after its unmount.
const DRIVER_EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A validated mount request.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// How to attach the image; `partscan` is turned on when a partition is named.
    pub attach: AttachOptions,
    /// Partition to mount, or `None` for the whole device.
    pub partition: Option<u32>,
    /// Filesystem type forced with `-t`, or `None` to detect it.
    pub fstype: Option<FsType>,
    pub directory: PathBuf,
    /// Options for the driver's `-o`, beyond `ro`/`rw`.
    pub driver_options: Vec<String>,
}

/// The image and partition a mount reads, as the user wrote them: `disk.img:2`.
struct Source<'a>(&'a MountOptions);

impl fmt::Display for Source<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.0.attach.image.display())?;
        match self.0.partition {
            Some(number) => write!(formatter, ":{number}"),
            None => Ok(()),
        }
    }
}

/// Errors from mounting and unmounting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    #[error(transparent)]
    Attach(#[from] AttachError),

    #[error(transparent)]
    Detach(#[from] DetachError),

    #[error(transparent)]
    Registry(#[from] RegistryError),

    #[error("{}: mount point does not exist; create it with 'mkdir -p {}'", directory.display(), directory.display())]
    DirectoryMissing { directory: PathBuf },

    #[error("{}: mount point is not a directory", directory.display())]
    NotADirectory { directory: PathBuf },

    #[error("{}: mount point names that are not valid UTF-8 are not supported; use another directory", directory.display())]
    DirectoryNotUtf8 { directory: PathBuf },

    #[error("{}: mount point is not empty, and the mount would hide its files; empty it, or pass '-o nonempty' to mount over them", directory.display())]
    DirectoryNotEmpty { directory: PathBuf },

    #[error("{}: a filesystem is already mounted there; unmount it first", directory.display())]
    AlreadyMounted { directory: PathBuf },

    #[error("{source_name}: already mounted on {}, and a second driver writing the same filesystem would corrupt it; use that directory, or 'loopfuse umount' it first", directory.display())]
    MountedElsewhere {
        source_name: String,
        directory: PathBuf,
    },

    #[error("{source_name}: shares bytes with the filesystem mounted on {} (the partition table changed since, or one contains the other), and a second driver writing them would corrupt it; 'loopfuse umount' that directory first", directory.display())]
    OverlapsMount {
        source_name: String,
        directory: PathBuf,
    },

    #[error("{source_name}: the image is attached for the mount on {} with other options (read-only, offset, size limit or sector size), and cannot be attached twice; mount with the same options, or 'loopfuse umount' it first", directory.display())]
    ImageMounted {
        source_name: String,
        directory: PathBuf,
    },

    #[error(
        "{source_name}: is an extended partition, which holds logical partitions, not a filesystem: {advice}"
    )]
    ExtendedPartition { source_name: String, advice: String },

    #[error("{source_name}: no partition {partition} ({found})")]
    NoPartition {
        source_name: String,
        partition: u32,
        found: String,
    },

    #[error("{}: cannot read the superblock", device.display())]
    ReadDevice {
        device: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "{source_name}: unknown filesystem (first bytes: {signature}); if you know its type, pass -t TYPE (one of: {})",
        type_names()
    )]
    UnknownFilesystem {
        source_name: String,
        signature: String,
    },

    #[error(
        "{source_name}: no filesystem: the first 64 KiB are zeros; format it first, for example with mkfs.ext4 on the device that 'loopfuse attach' prints"
    )]
    Empty { source_name: String },

    #[error(
        "{source_name}: holds a {scheme} partition table, not a filesystem; name a partition, as in '{source_name}:1'"
    )]
    PartitionTable {
        source_name: String,
        scheme: &'static str,
    },

    #[error(
        "{source_name}: holds a {scheme} partition table, not a filesystem, and the table was ignored: {problem}; then name a partition, as in '{source_name}:1'"
    )]
    IgnoredTable {
        source_name: String,
        scheme: &'static str,
        problem: String,
    },

    #[error("{source_name}: {fstype} has no userspace driver: {advice}")]
    NoDriver {
        source_name: String,
        fstype: FsType,
        advice: &'static str,
    },

    #[error("{source_name}: mounting {fstype} needs {program}, which is not installed; install the Debian package {package} ('apt-get install {package}'){}", caveat.map(|text| format!(" (note: {text})")).unwrap_or_default())]
    DriverMissing {
        source_name: String,
        fstype: FsType,
        program: &'static str,
        package: &'static str,
        caveat: Option<&'static str>,
    },

    #[error(
        "{source_name}: {program} is setuid root, so it opens the device as root, and FUSE lets root into another user's mount only with 'user_allow_other' in /etc/fuse.conf; ask an administrator to add that line, or run 'loopfuse mount' as root"
    )]
    DriverRunsAsRoot {
        source_name: String,
        program: &'static str,
    },

    #[error("cannot start {}", program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },

    #[error(transparent)]
    DriverExited(Box<DriverExited>),

    #[error(transparent)]
    Environment(#[from] attach::EnvironmentError),

    #[error("{}: {} could not mount the FUSE connection for the driver: {output}", directory.display(), program.display())]
    Helper {
        program: PathBuf,
        directory: PathBuf,
        output: String,
    },

    #[error("{failure}")]
    Handoff {
        failure: String,
        source: std::io::Error,
    },

    #[error("{}: {program} did not mount it within {} s and was stopped; see its log {}", directory.display(), process::MOUNT_TIMEOUT.as_secs(), log.display())]
    DriverTimeout {
        directory: PathBuf,
        program: &'static str,
        log: PathBuf,
    },

    #[error("{}: not mounted by loopfuse (see 'loopfuse list')", directory.display())]
    NotOurMount { directory: PathBuf },

    #[error("{}: target is busy: a process still uses a file under it (close it, then run 'loopfuse umount' again; 'fuser -vm {}' lists the processes)", directory.display(), directory.display())]
    Busy { directory: PathBuf },

    #[error("{}: {program} (pid {pid}) did not exit within {} s of the unmount, so {name} stays attached; detach it with 'loopfuse detach {name}' once {program} is gone", directory.display(), DRIVER_EXIT_TIMEOUT.as_secs())]
    DriverStuck {
        directory: PathBuf,
        program: String,
        pid: i32,
        name: String,
    },
}

/// A driver that exited before its directory was mounted, with the end of its output.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {program} exited ({status}) before {} was mounted; its output: {output}{}", directory.display(), caveat.map(|text| format!(" (note: {text})")).unwrap_or_default())]
pub struct DriverExited {
    pub source_name: String,
    pub program: &'static str,
    pub directory: PathBuf,
    pub status: String,
    pub output: String,
    pub caveat: Option<&'static str>,
}

fn type_names() -> String {
    let names: Vec<&str> = FsType::ALL.iter().map(|fstype| fstype.name()).collect();
    names.join(", ")
}

/// A filesystem mounted by [`mount`].
#[derive(Debug, Clone)]
pub struct Mounted {
    /// Name of the attachment serving the device (`loop0`).
    pub name: String,
    pub directory: PathBuf,
    pub fstype: FsType,
    pub driver: &'static str,
    pub driver_pid: u32,
}

/// Attaches the image, detects the filesystem and mounts it on `options.directory` with its
/// driver; returns once the directory is mounted.
///
/// On failure nothing is left mounted or registered: an attachment made here is detached
/// again, and a driver that did not mount in time is stopped.
pub fn mount(options: &MountOptions, registry: &Registry) -> Result<Mounted, MountError> {
    let source_name = Source(options).to_string();
    let directory = check_directory(&options.directory)?;
    // A forced type is checked before anything is attached.
    let forced = options
        .fstype
        .map(|fstype| find_driver(fstype, &source_name))
        .transpose()?;

    // Held until the driver has mounted, so that a parallel mount of another partition
    // finds this attachment instead of failing on the image lock.
    let _mounts_lock = registry.lock_mounts()?;
    let mut attach_options = options.attach.clone();
    attach_options.partscan |= options.partition.is_some();
    if forced.as_ref().is_some_and(|(driver, _)| !driver.writable) {
        attach_options.read_only = true;
    }
    attach_options = attach::read_only_if_write_protected(&attach_options);

    // A second partition of an image that `mount` already attached is served by the same
    // attachment: the image is locked by it, so a second attachment would be refused.
    let reused = find_mount_attachment(registry, &attach_options);
    let mut attached = match &reused {
        Some(attached) => attached.clone(),
        None => attach::attach(&attach_options, registry).map_err(|error| {
            explain_mounted_image(error, registry, options.partition, &source_name)
        })?,
    };
    let mut guard = DetachOnDrop {
        registry,
        name: reused.is_none().then(|| attached.name.clone()),
        record: None,
    };

    if reused.is_some() && !attach_options.read_only {
        check_not_mounted(registry, &attached.name, options.partition, &source_name)?;
    }
    let mut device = device_file(registry, &attached, options.partition, &source_name)?;
    check_not_extended(registry, &attached.name, options.partition, &source_name)?;
    let fstype = match options.fstype {
        Some(fstype) => fstype,
        None => identify(&device, &source_name).map_err(|error| {
            explain_ignored_table(error, registry, &attached.name, &device, &source_name)
        })?,
    };
    let (driver, program) = match forced {
        Some(found) => found,
        None => find_driver(fstype, &source_name)?,
    };

    // A read-only driver gets a read-only attachment, which maps the image read-only and
    // takes a shared lock, so other read-only attachments of the image stay possible.
    let mut wanted = attach_options.clone();
    wanted.read_only |= !driver.writable;
    if driver.runs_as_root(&program) {
        if !wanted.allow_other && !environment::user_allow_other() {
            return Err(MountError::DriverRunsAsRoot {
                source_name,
                program: driver.program,
            });
        }
        wanted.allow_other = true;
    }
    if reused.is_none()
        && (wanted.read_only != attach_options.read_only
            || wanted.allow_other != attach_options.allow_other)
    {
        log::debug!(
            "{source_name}: attaching again for {} (read-only {}, allow-other {})",
            driver.program,
            wanted.read_only,
            wanted.allow_other
        );
        drop(guard);
        attach_options = wanted;
        attached = attach::attach(&attach_options, registry).map_err(|error| {
            explain_mounted_image(error, registry, options.partition, &source_name)
        })?;
        guard = DetachOnDrop {
            registry,
            name: Some(attached.name.clone()),
            record: None,
        };
        device = device_file(registry, &attached, options.partition, &source_name)?;
    }
    let read_only = attach_options.read_only;

    let range = registry
        .find(&attached.name)?
        .state
        .range_of(options.partition);
    let mut record = MountRecord {
        directory: directory.clone(),
        device: device.clone(),
        partition: options.partition,
        fstype: fstype.name().to_string(),
        driver: driver.program.to_string(),
        driver_pid: None,
        owns_attachment: true,
        range,
    };
    registry.update_state(&attached.name, |state| state.mounts.push(record.clone()))?;
    if reused.is_some() {
        guard.record = Some((attached.name.clone(), directory.clone()));
    }

    let invocation = driver::Invocation {
        device: &device,
        directory: &directory,
        read_only,
        options: &options.driver_options,
    };
    let log = registry.driver_log_path(&attached.name, options.partition);
    let started = process::start(driver, &program, &invocation, &log, &source_name)?;
    let pid = started.pid;

    record.driver_pid = crate::registry::ProcessId::of(pid as i32);
    registry.update_state(&attached.name, |state| {
        if let Some(entry) = state
            .mounts
            .iter_mut()
            .find(|mounted| mounted.directory == directory)
        {
            *entry = record.clone();
        }
    })?;

    log::info!(
        "{}: mounted {source_name} ({fstype}, {}) on {}",
        attached.name,
        driver.program,
        directory.display()
    );
    guard.disarm();
    Ok(Mounted {
        name: attached.name,
        directory,
        fstype,
        driver: driver.program,
        driver_pid: pid,
    })
}

/// Finds a live attachment that [`mount`] made for the same image with the same device
/// options and partitions, so that one more filesystem of that image can be mounted from it.
fn find_mount_attachment(registry: &Registry, options: &AttachOptions) -> Option<attach::Attached> {
    let image = std::fs::canonicalize(&options.image).ok()?;
    let entries = registry.list().ok()?;

    let entry = entries.into_iter().find(|entry| {
        let state = &entry.state;
        entry.liveness == crate::registry::Liveness::Live
            && !state.mounts.is_empty()
            && entry.is_image(&image)
            && state.offset == options.offset
            && state.sizelimit == options.sizelimit.unwrap_or(0)
            && state.read_only == options.read_only
            && state.partscan == options.partscan
            && state.sector_size == options.sector_size
            && state.overlay.is_none()
            && !state.snapshot
    })?;

    log::debug!(
        "{}: serving one more mount of {}",
        entry.state.name,
        image.display()
    );
    Some(attach::Attached {
        name: entry.state.name.clone(),
        device: entry.device(),
        directory: entry.mountpoint.clone(),
    })
}

/// Turns an attach that failed because another attachment has the image into an error
/// naming a directory, when that attachment serves a `loopfuse mount`: `loopfuse detach`,
/// which the attach error suggests, rejects such an attachment. The mount of the same
/// partition is named if there is one, and otherwise a mount made with other options.
fn explain_mounted_image(
    error: AttachError,
    registry: &Registry,
    partition: Option<u32>,
    source_name: &str,
) -> MountError {
    let AttachError::AlreadyAttached { name, .. } = &error else {
        return error.into();
    };
    if let Err(mounted @ (MountError::MountedElsewhere { .. } | MountError::OverlapsMount { .. })) =
        check_not_mounted(registry, name, partition, source_name)
    {
        return mounted;
    }
    let other_mount = registry.find(name).ok().and_then(|entry| {
        entry
            .state
            .mounts
            .first()
            .map(|record| record.directory.clone())
    });
    match other_mount {
        Some(directory) => MountError::ImageMounted {
            source_name: source_name.to_string(),
            directory,
        },
        None => error.into(),
    }
}

/// Rejects a second mount of a filesystem that attachment `name` already serves: two
/// drivers writing one filesystem would corrupt it, where the kernel shares one mount.
/// Mounts are compared by the bytes they cover. So a mounted partition under a new number,
/// or the disk around a mounted partition, is rejected too, as the kernel rejects a block
/// device that overlaps one in use.
fn check_not_mounted(
    registry: &Registry,
    name: &str,
    partition: Option<u32>,
    source_name: &str,
) -> Result<(), MountError> {
    let entry = registry.find(name)?;
    let requested = entry.state.range_of(partition);
    let mounted = entry
        .state
        .mounts
        .iter()
        .find(|record| match (record.range, requested) {
            (Some(held), Some(requested)) => held.overlaps(&requested),
            _ => record.partition == partition,
        });
    match mounted {
        // The same filesystem only when the bytes are the same, not merely the number.
        Some(record)
            if record.partition == partition
                && record.range.is_none_or(|held| Some(held) == requested) =>
        {
            Err(MountError::MountedElsewhere {
                source_name: source_name.to_string(),
                directory: record.directory.clone(),
            })
        }
        Some(record) => Err(MountError::OverlapsMount {
            source_name: source_name.to_string(),
            directory: record.directory.clone(),
        }),
        None => Ok(()),
    }
}

/// Detaches an attachment made by [`mount`] when dropped, unless disarmed: every failure
/// after the attach leaves nothing behind.
struct DetachOnDrop<'a> {
    registry: &'a Registry,
    name: Option<String>,
    /// The attachment and mount point of a mount record to remove again, for a mount that
    /// failed on an attachment it shares with other mounts.
    record: Option<(String, PathBuf)>,
}

impl DetachOnDrop<'_> {
    fn disarm(mut self) {
        self.name = None;
        self.record = None;
    }
}

impl Drop for DetachOnDrop<'_> {
    fn drop(&mut self) {
        if let Some((name, directory)) = self.record.take() {
            let removed = self.registry.update_state(&name, |state| {
                state
                    .mounts
                    .retain(|mounted| mounted.directory != directory)
            });
            if let Err(error) = removed {
                log::error!("{name}: cannot forget the failed mount: {error}");
            }
        }
        let Some(name) = self.name.take() else {
            return;
        };
        if let Err(error) = attach::detach(self.registry, &name) {
            log::error!(
                "{name}: cannot detach after the failed mount: {}",
                crate::error_chain(&error)
            );
        }
    }
}

/// Checks that the mount point is an existing directory with nothing mounted on it and
/// returns its canonical path, the form `/proc/self/mountinfo` lists.
fn check_directory(directory: &Path) -> Result<PathBuf, MountError> {
    let canonical = std::fs::canonicalize(directory).map_err(|_| MountError::DirectoryMissing {
        directory: directory.to_path_buf(),
    })?;
    if !canonical.is_dir() {
        return Err(MountError::NotADirectory {
            directory: directory.to_path_buf(),
        });
    }
    // The mount record stores the directory in JSON, which can contain only UTF-8.
    if canonical.to_str().is_none() {
        return Err(MountError::DirectoryNotUtf8 {
            directory: directory.to_path_buf(),
        });
    }
    if is_mounted(&canonical) {
        return Err(MountError::AlreadyMounted {
            directory: canonical,
        });
    }
    Ok(canonical)
}

/// Returns the device file to mount: the disk, or partition `pN` when the table has it.
fn device_file(
    registry: &Registry,
    attached: &attach::Attached,
    partition: Option<u32>,
    source_name: &str,
) -> Result<PathBuf, MountError> {
    let Some(number) = partition else {
        return Ok(attached.device.clone());
    };
    let path = attached.directory.join(format!("p{number}"));
    if path.is_file() {
        return Ok(path);
    }

    let state = registry.find(&attached.name)?.state;
    let numbers: Vec<String> = state
        .partitions
        .iter()
        .map(|partition| partition.number.to_string())
        .collect();
    // A FAT or exFAT boot sector ends with the MBR signature, so such a disk reads as an
    // empty MBR table while it is one filesystem.
    let whole_disk = if numbers.is_empty() {
        identify(&attached.device, source_name).ok()
    } else {
        None
    };
    let found = match (state.partition_table, whole_disk) {
        (Some(scheme), _) if !numbers.is_empty() => {
            format!("the {scheme} table has partitions {}", numbers.join(", "))
        }
        (_, Some(fstype)) => {
            let image = source_name
                .rsplit_once(':')
                .map_or(source_name, |(image, _)| image);
            format!(
                "the whole image is one {fstype} filesystem; mount '{image}' without a partition number"
            )
        }
        (Some(scheme), None) => format!("the {scheme} table has no partitions"),
        (None, None) => match state.partition_problem {
            Some(problem) => format!("the partition table was ignored: {problem}"),
            None => "no partition table found".to_string(),
        },
    };
    Err(MountError::NoPartition {
        source_name: source_name.to_string(),
        partition: number,
        found,
    })
}

/// Adds to the error for a disk with a partition table the reason the scan ignored that
/// table, if it did, because suggesting `IMG:1` alone would only lead to "no partition 1".
/// `device` is the file the table was found on.
fn explain_ignored_table(
    error: MountError,
    registry: &Registry,
    name: &str,
    device: &Path,
    source_name: &str,
) -> MountError {
    let MountError::PartitionTable { scheme, .. } = error else {
        return error;
    };
    let Ok(entry) = registry.find(name) else {
        return error;
    };
    let state = entry.state;
    let problem = state
        .partition_problem
        .or_else(|| gpt_sector_size_problem(device, state.sector_size));
    match problem {
        Some(problem) => MountError::IgnoredTable {
            source_name: source_name.to_string(),
            scheme,
            problem,
        },
        None => error,
    }
}

/// Returns the problem a partition scan reports when the GPT header of `device` lies where
/// another sector size than `sector_size` puts it. A whole disk attached without `-P` was
/// not scanned, so its mount checks this here, on the first 8 KiB, which hold LBA 1 for
/// both sector sizes.
fn gpt_sector_size_problem(device: &Path, sector_size: u32) -> Option<String> {
    let mut head = vec![0u8; 8192];
    let file = std::fs::File::open(device).ok()?;
    let read = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0).ok()?;
    head.truncate(read);
    let head = crate::block::MemoryDevice::read_only(head);
    crate::partition::check_sector_size(&head, sector_size).map(|problem| problem.to_string())
}

/// Rejects an MBR extended partition, a container of logical partitions rather than a
/// filesystem, and names those partitions.
fn check_not_extended(
    registry: &Registry,
    name: &str,
    partition: Option<u32>,
    source_name: &str,
) -> Result<(), MountError> {
    let Some(number) = partition else {
        return Ok(());
    };
    let state = registry.find(name)?.state;
    let Some(extended) = state.partitions.iter().find(|found| {
        found.number == number && crate::partition::is_extended_type(&found.type_name)
    }) else {
        return Ok(());
    };
    // The state keeps only the extended partition's first sector or two, as the kernel
    // exposes it, so its logical partitions are those up to the next extended partition.
    let next_extended = state
        .partitions
        .iter()
        .filter(|found| {
            found.start > extended.start && crate::partition::is_extended_type(&found.type_name)
        })
        .map(|found| found.start)
        .min()
        .unwrap_or(u64::MAX);
    let logical: Vec<String> = state
        .partitions
        .iter()
        .filter(|found| {
            found.number >= 5 && found.start > extended.start && found.start < next_extended
        })
        .map(|found| found.number.to_string())
        .collect();
    let image = source_name
        .rsplit_once(':')
        .map_or(source_name, |(image, _)| image);
    let advice = match logical.first() {
        Some(first) => format!(
            "its logical partitions are {}; mount one of those, as in '{image}:{first}'",
            logical.join(", ")
        ),
        None => "it holds no logical partition".to_string(),
    };
    Err(MountError::ExtendedPartition {
        source_name: source_name.to_string(),
        advice,
    })
}

/// Reads the start of `device` and names the filesystem there.
fn identify(device: &Path, source_name: &str) -> Result<FsType, MountError> {
    let read_error = |source| MountError::ReadDevice {
        device: device.to_path_buf(),
        source,
    };
    let mut bytes = Vec::with_capacity(detect::PROBE_LEN);
    let file = std::fs::File::open(device).map_err(read_error)?;
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, detect::PROBE_LEN as u64),
        &mut bytes,
    )
    .map_err(read_error)?;

    let source_name = source_name.to_string();
    match detect::detect(&bytes) {
        Detection::Filesystem(fstype) => {
            log::debug!("{source_name}: found {fstype}");
            Ok(fstype)
        }
        Detection::PartitionTable(scheme) => Err(MountError::PartitionTable {
            source_name,
            scheme,
        }),
        Detection::Empty => Err(MountError::Empty { source_name }),
        Detection::Unknown(head) => Err(MountError::UnknownFilesystem {
            source_name,
            signature: detect::signature(&head),
        }),
    }
}

/// Finds the driver for `fstype` and the path of its program.
fn find_driver(
    fstype: FsType,
    source_name: &str,
) -> Result<(&'static Driver, PathBuf), MountError> {
    let driver = match driver::support(fstype) {
        Support::Driver(driver) => driver,
        Support::NoDriver(advice) => {
            return Err(MountError::NoDriver {
                source_name: source_name.to_string(),
                fstype,
                advice,
            });
        }
    };
    let program = driver
        .find_program()
        .ok_or_else(|| MountError::DriverMissing {
            source_name: source_name.to_string(),
            fstype,
            program: driver.program,
            package: driver.package,
            caveat: driver.caveat,
        })?;

    Ok((driver, program))
}

/// The result of [`umount`].
#[derive(Debug, Clone)]
pub struct Unmounted {
    /// The attachment that served the device, and whether it was detached.
    pub name: String,
    pub detached: bool,
}

/// Unmounts a filesystem mounted by [`mount`], waits for its driver to flush and exit, and
/// detaches the attachment that `mount` made for it.
pub fn umount(registry: &Registry, directory: &Path) -> Result<Unmounted, MountError> {
    let _mounts_lock = registry.lock_mounts()?;
    // A mount whose driver died fails to canonicalize (ENOTCONN); its absolute path is
    // still the one recorded.
    let wanted = std::fs::canonicalize(directory)
        .or_else(|_| std::path::absolute(directory))
        .unwrap_or_else(|_| directory.to_path_buf());
    let found = registry.list()?.into_iter().find_map(|entry| {
        let record = entry
            .state
            .mounts
            .iter()
            .find(|record| record.directory == wanted)
            .cloned()?;
        Some((entry, record))
    });
    let Some((entry, record)) = found else {
        return Err(MountError::NotOurMount {
            directory: directory.to_path_buf(),
        });
    };
    let name = entry.state.name.clone();

    if is_mounted(&wanted) {
        attach::unmount(&name, &wanted).map_err(|error| match error {
            DetachError::Busy { .. } => MountError::Busy {
                directory: wanted.clone(),
            },
            other => other.into(),
        })?;
    }
    if let Some(pid) = record.driver_pid
        && !process::wait_for_exit(&pid, DRIVER_EXIT_TIMEOUT)
    {
        return Err(MountError::DriverStuck {
            directory: wanted,
            program: record.driver,
            pid: pid.pid,
            name,
        });
    }
    log::info!("{name}: unmounted {}", wanted.display());

    registry.update_state(&name, |state| {
        state.mounts.retain(|mounted| mounted.directory != wanted)
    })?;
    // The attachment goes with the last filesystem mounted from it.
    let remaining = registry.find(&name)?.state.mounts.len();
    let detached = record.owns_attachment && remaining == 0;
    if detached {
        attach::detach(registry, &name)?;
    }

    Ok(Unmounted { name, detached })
}
