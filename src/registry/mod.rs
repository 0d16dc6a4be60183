//! Where attachments live and what is known about them.
//!
//! The registry is a directory (`$XDG_RUNTIME_DIR/loopfuse`, or a private 0700 directory
//! under the temporary directory when that variable is unset) holding, for an attachment
//! named `loopN`: the mount point `loopN/`, the state file `loopN.json`, the daemon's log
//! `loopN.log` and, for a `--snapshot`, its overlay `loopN.overlay`. Names are allocated under an `flock` on the directory, lowest number first.
//! This module does not depend on FUSE internals.
#![forbid(unsafe_code)]

mod mount_record;
mod process;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

pub use mount_record::{DiskRange, MountRecord};
pub use process::ProcessId;

/// Name of the device file of the whole disk inside an attachment's mount point.
pub const DISK_FILE: &str = "disk";

/// The file that [`Registry::lock_mounts`] locks. Its leading dot keeps it out of `list`.
const MOUNT_LOCK_FILE: &str = ".mount.lock";

/// Errors from the registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("{}: cannot create the runtime directory", path.display())]
    CreateRoot { path: PathBuf, source: io::Error },

    #[error("{}: runtime directory does not exist; create it (mode 0700, owned by you) or unset XDG_RUNTIME_DIR", path.display())]
    MissingParent { path: PathBuf },

    #[error("{}: runtime directory is not private (owner uid {owner}, mode {mode:o}); remove it or set XDG_RUNTIME_DIR to a directory of your own", path.display())]
    UnsafeRoot {
        path: PathBuf,
        owner: u32,
        mode: u32,
    },

    #[error("{}: cannot access the registry{}", path.display(), if source.kind() == io::ErrorKind::StorageFull { "; free some space on its filesystem" } else { "" })]
    Io { path: PathBuf, source: io::Error },

    #[error("{}: invalid state file (remove it, and unmount {} if it is still mounted)", path.display(), mountpoint.display())]
    BadState {
        path: PathBuf,
        mountpoint: PathBuf,
        source: serde_json::Error,
    },

    #[error("{query}: no such attachment (see 'loopfuse list')")]
    NotFound { query: String },

    #[error("{query}: matches several attachments ({names}); name one of them")]
    Ambiguous { query: String, names: String },
}

/// Lifecycle stage recorded in a state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The name is reserved and `pid` is the attaching process, which is starting a daemon.
    Starting,
    /// The device is mounted and `pid` is the daemon serving it.
    Attached,
}

/// The state file of an attachment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachmentState {
    pub name: String,
    pub stage: Stage,
    /// Absolute path of the image file.
    pub image: PathBuf,
    /// Byte offset of the device inside the image.
    pub offset: u64,
    /// Size of the device in bytes.
    pub size: u64,
    /// The `--sizelimit` given, 0 when none.
    pub sizelimit: u64,
    pub read_only: bool,
    pub partscan: bool,
    /// Logical sector size used for partition tables.
    pub sector_size: u32,
    /// Absolute path of the overlay file that receives the writes, if any.
    #[serde(default)]
    pub overlay: Option<PathBuf>,
    /// Whether the overlay is a snapshot's, removed with the entry.
    #[serde(default)]
    pub snapshot: bool,
    /// Process that owns the entry (see [`Stage`]).
    pub pid: ProcessId,
    /// Partition table found by the last scan: "MBR", "GPT", or `None`.
    #[serde(default)]
    pub partition_table: Option<String>,
    /// Reason the last scan ignored the partition table it found, if it did.
    #[serde(default)]
    pub partition_problem: Option<String>,
    /// Partitions exposed as `p1`, `p2`, ... by the last scan.
    #[serde(default)]
    pub partitions: Vec<PartitionState>,
    /// Number of partition scans done so far; `rescan` waits for it to grow.
    #[serde(default)]
    pub scans: u64,
    /// Cache mode of the device files: "writethrough", "writeback" or "none".
    #[serde(default)]
    pub cache: String,
    /// Filesystems that `loopfuse mount` serves from this attachment.
    #[serde(default)]
    pub mounts: Vec<MountRecord>,
    /// Whether the attachment detaches itself after the last close (`--autoclear`, or a
    /// `losetup -d` of a busy device).
    #[serde(default)]
    pub autoclear: bool,
    /// Absolute path of the `--pidfile` the daemon writes, removed with a dead daemon's entry.
    #[serde(default)]
    pub pidfile: Option<PathBuf>,
    /// Device and inode of the image file when it was attached, which identify it after it
    /// was deleted or replaced, as the kernel loop driver keeps them.
    #[serde(default)]
    pub image_id: Option<FileId>,
}

impl AttachmentState {
    /// Returns the bytes of the disk device that partition `number` covers (the whole
    /// device for `None`), as of the last scan.
    pub fn range_of(&self, number: Option<u32>) -> Option<DiskRange> {
        let Some(number) = number else {
            return Some(DiskRange {
                start: 0,
                size: self.size,
            });
        };
        self.partitions
            .iter()
            .find(|partition| partition.number == number)
            .map(|partition| DiskRange {
                start: partition.start,
                size: partition.size,
            })
    }
}

/// Device and inode numbers of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub device: u64,
    pub inode: u64,
}

impl FileId {
    /// Returns the numbers of the file at `path`, or `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<Self> {
        let metadata = fs::metadata(path).ok()?;
        Some(Self {
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }
}

/// Removes an unmounted device directory: its placeholder, and files that programs created
/// in it after the unmount, whose writes never reached the image (reported as a warning).
/// `original` is its path before it was moved, for the message.
fn remove_device_directory(directory: &Path, original: &Path) {
    let _ = fs::remove_dir(directory.join(DISK_FILE));
    let strays: Vec<PathBuf> = fs::read_dir(directory)
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    for stray in &strays {
        let name = stray.file_name().unwrap_or_default();
        log::warn!(
            "{}: created by a program after the device was unmounted; its writes did not reach the image, and it is removed",
            original.join(name).display()
        );
        let _ = fs::remove_file(stray).or_else(|_| fs::remove_dir_all(stray));
    }
    if let Err(error) = fs::remove_dir(directory)
        && error.kind() != io::ErrorKind::NotFound
    {
        log::warn!("{}: failed to remove: {error}", directory.display());
    }
}

/// A partition as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    pub number: u32,
    /// Offset of the partition inside the device, in bytes.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Partition type: `0x83` style for MBR, the type GUID for GPT.
    pub type_name: String,
    /// GPT partition name.
    pub label: Option<String>,
}

/// Whether the process behind an entry is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Live,
    /// The owning process is gone (crashed, killed) or the mount is no longer connected.
    Stale,
}

/// An attachment found in the registry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub state: AttachmentState,
    pub liveness: Liveness,
    pub mountpoint: PathBuf,
}

impl Entry {
    /// Path of the whole-disk device file.
    pub fn device(&self) -> PathBuf {
        self.mountpoint.join(DISK_FILE)
    }

    /// Returns whether the image of this attachment is the file at `path`. An entry that
    /// recorded the image's device and inode matches by them alone, as the kernel loop
    /// driver does, so a new file put where a deleted image was is another file. An older
    /// entry matches by path, or by the numbers of the file now at its path.
    pub fn is_image(&self, path: &Path) -> bool {
        let found = FileId::of(path);
        match self.state.image_id {
            Some(attached) => found == Some(attached),
            None => {
                let image = &self.state.image;
                (found.is_some() && FileId::of(image) == found)
                    || path == image
                    || fs::canonicalize(path).ok().as_ref() == Some(image)
            }
        }
    }

    /// Returns the image's path as the kernel reports a loop device's file: its current name
    /// after a rename, with ` (deleted)` once removed. When the daemon cannot be asked (it
    /// died), this is the path given at attach, marked deleted if another file is there now.
    pub fn image_path_now(&self) -> PathBuf {
        let attached = self.state.image_id;
        if let Some(path) = attached.and_then(|id| self.state.pid.open_file_path(id)) {
            return path;
        }
        let mut path = self.state.image.clone().into_os_string();
        if attached.is_some() && FileId::of(&self.state.image) != attached {
            path.push(" (deleted)");
        }
        path.into()
    }
}

/// A reserved attachment name, released again unless [`Reservation::keep`] is called.
pub struct Reservation<'a> {
    registry: &'a Registry,
    name: String,
    kept: bool,
}

impl Reservation<'_> {
    /// The reserved name, `loopN`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keeps the entry after this value is dropped: the daemon now owns it.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.registry.remove(&self.name);
        }
    }
}

/// The registry directory.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

impl Registry {
    /// Opens the registry of the current user, creating its directory when missing.
    pub fn create_for_current_user() -> Result<Self, RegistryError> {
        Self::at(default_root())
    }

    /// Opens the registry of the current user without creating anything: a registry that
    /// does not exist yet simply lists no attachments.
    pub fn for_current_user() -> Result<Self, RegistryError> {
        // Resolved as in `at`, also before the directory exists: a later attach creates it.
        let root = resolve_path(&default_root());
        if !root.exists() {
            return Ok(Self { root });
        }
        check_private(&root)?;
        Ok(Self { root })
    }

    /// Opens the registry at `root`, creating it (mode 0700) when missing. Its parent must
    /// exist, because a missing `XDG_RUNTIME_DIR` is a set-up error to report, not to hide.
    pub fn at(root: PathBuf) -> Result<Self, RegistryError> {
        if let Some(parent) = root.parent()
            && !parent.is_dir()
        {
            return Err(RegistryError::MissingParent {
                path: parent.to_path_buf(),
            });
        }
        match fs::DirBuilder::new().mode(0o700).create(&root) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(RegistryError::CreateRoot { path: root, source }),
        }
        // Mount points must be named as the mount table names them, without symbolic links,
        // or detach would not find its mount there.
        let root = resolve_path(&root);
        check_private(&root)?;

        Ok(Self { root })
    }

    /// The registry directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Mount point of the attachment `name`.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Log file of the daemon of `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.log"))
    }

    /// Overlay file of the attachment `name` when it was made with `--snapshot`.
    pub fn snapshot_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.overlay"))
    }

    /// Log file of the filesystem driver that `loopfuse mount` starts on the disk of `name`
    /// (`loopN.driver.log`) or on one of its partitions (`loopN.pM.driver.log`).
    pub fn driver_log_path(&self, name: &str, partition: Option<u32>) -> PathBuf {
        match partition {
            Some(number) => self.root.join(format!("{name}.p{number}.driver.log")),
            None => self.root.join(format!("{name}.driver.log")),
        }
    }

    /// Returns the driver logs of `name` that exist.
    fn driver_logs(&self, name: &str) -> Vec<PathBuf> {
        let prefix = format!("{name}.");
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|file| file.starts_with(&prefix) && file.ends_with(".driver.log"))
            .map(|file| self.root.join(file))
            .collect()
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.json"))
    }

    /// Reserves the lowest free name and records `state` (with its name filled in) for it,
    /// creating the mount point.
    pub fn reserve(&self, mut state: AttachmentState) -> Result<Reservation<'_>, RegistryError> {
        let _lock = self.lock()?;

        let name = self.free_name();

        let mountpoint = self.mountpoint(&name);
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RegistryError::Io { path, source }
        };
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&mountpoint)
            .map_err(io_error(&mountpoint))?;
        let reservation = Reservation {
            registry: self,
            name: name.clone(),
            kept: false,
        };
        // Hidden by the mount while attached. Once unmounted, a program that still opens
        // the device path to write gets EISDIR instead of creating a file there.
        let placeholder = mountpoint.join(DISK_FILE);
        fs::DirBuilder::new()
            .mode(0o500)
            .create(&placeholder)
            .map_err(io_error(&placeholder))?;

        state.name = name;
        self.write_state(&state)?;

        Ok(reservation)
    }

    /// The lowest name that no attachment uses, which the next [`Registry::reserve`] takes
    /// unless another attach comes first.
    pub fn free_name(&self) -> String {
        (0u32..)
            .map(|number| format!("loop{number}"))
            .find(|name| !self.state_path(name).exists() && !self.mountpoint(name).exists())
            .expect("an unbounded range always has a free name")
    }

    /// Applies `change` to the state file of attachment `name` under the registry lock, so
    /// that two processes changing different fields (a mount record and a partition scan)
    /// do not lose each other's change.
    pub fn update_state(
        &self,
        name: &str,
        change: impl FnOnce(&mut AttachmentState),
    ) -> Result<(), RegistryError> {
        let _lock = self.lock()?;
        let mut state = self.find(name)?.state;
        change(&mut state);
        self.write_state(&state)
    }

    /// Writes the state file of `state.name`, replacing it atomically.
    pub fn write_state(&self, state: &AttachmentState) -> Result<(), RegistryError> {
        let path = self.state_path(&state.name);
        let temporary = self.root.join(format!(".{}.json.tmp", state.name));
        let io_error = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };

        let text = serde_json::to_string_pretty(state)
            .map_err(io::Error::other)
            .map_err(io_error)?;
        replace_file(&path, &temporary, text.as_bytes(), 0o600).map_err(io_error)
    }

    /// Removes the state, log, snapshot overlay and mount point of `name`, ignoring parts
    /// already gone.
    ///
    /// The mount point is only removed when it is an empty directory, so this never touches
    /// a mounted filesystem.
    pub fn remove(&self, name: &str) {
        let mut files = vec![
            self.state_path(name),
            self.log_path(name),
            self.snapshot_path(name),
        ];
        files.extend(self.driver_logs(name));
        for path in files {
            if let Err(error) = fs::remove_file(&path)
                && error.kind() != io::ErrorKind::NotFound
            {
                log::warn!("{}: cannot remove: {error}", path.display());
            }
        }
        self.retire_mountpoint(name);
    }

    /// Moves the directory of attachment `name` out of the way and removes it, once it is
    /// unmounted. After the rename, opening a device path fails with ENOENT, as a detached
    /// loop device fails, instead of creating a file in the bare directory.
    pub fn retire_mountpoint(&self, name: &str) {
        let mountpoint = self.mountpoint(name);
        let retired = self
            .root
            .join(format!(".{name}.removed.{}", std::process::id()));
        match fs::rename(&mountpoint, &retired) {
            Ok(()) => remove_device_directory(&retired, &mountpoint),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            // Still mounted (EBUSY), or not renamable: only an empty directory is removed.
            Err(error) => {
                log::debug!("{}: cannot rename: {error}", mountpoint.display());
                let _ = fs::remove_dir(mountpoint.join(DISK_FILE));
                let _ = fs::remove_dir(&mountpoint);
            }
        }
    }

    /// Reads every attachment, sorted by number.
    pub fn list(&self) -> Result<Vec<Entry>, RegistryError> {
        let read_dir = match fs::read_dir(&self.root) {
            Ok(read_dir) => read_dir,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(RegistryError::Io {
                    path: self.root.clone(),
                    source,
                });
            }
        };

        let mut entries = Vec::new();
        for dir_entry in read_dir.flatten() {
            let file_name = dir_entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            match self.read_entry(name) {
                Ok(entry) => entries.push(entry),
                Err(RegistryError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }

        entries.sort_by_key(|entry| attachment_number(&entry.state.name));
        Ok(entries)
    }

    fn read_entry(&self, name: &str) -> Result<Entry, RegistryError> {
        let path = self.state_path(name);
        let mountpoint = self.mountpoint(name);
        let text = fs::read_to_string(&path).map_err(|source| RegistryError::Io {
            path: path.clone(),
            source,
        })?;
        let state: AttachmentState =
            serde_json::from_str(&text).map_err(|source| RegistryError::BadState {
                path,
                mountpoint: mountpoint.clone(),
                source,
            })?;

        let liveness = liveness_of(&state, &mountpoint);
        Ok(Entry {
            state,
            liveness,
            mountpoint,
        })
    }

    /// Finds the attachment named by `query`: a name (`loop0`), its directory, a device file
    /// inside it (`.../loop0/disk`, `.../loop0/p1`), or the image it serves.
    pub fn find(&self, query: &str) -> Result<Entry, RegistryError> {
        let entries = self.list()?;
        // A name wins over a path: `loop1` typed inside the directory of loop0 is loop1.
        if let Some(named) = entries.iter().find(|entry| entry.state.name == query) {
            return Ok(named.clone());
        }
        // A bare word is a path only when such a file exists, so that a mistyped name is
        // not taken for a file in the current directory.
        if !query.contains('/') && !Path::new(query).exists() {
            return Err(RegistryError::NotFound {
                query: query.to_string(),
            });
        }
        let query_path = resolve_path(Path::new(query));

        let matches: Vec<Entry> = entries
            .into_iter()
            .filter(|entry| {
                entry.mountpoint == query_path
                    || query_path.parent() == Some(entry.mountpoint.as_path())
                    || entry.is_image(&query_path)
            })
            .collect();

        match matches.len() {
            0 => Err(RegistryError::NotFound {
                query: query.to_string(),
            }),
            1 => Ok(matches.into_iter().next().expect("one match")),
            _ => {
                let names: Vec<&str> = matches
                    .iter()
                    .map(|entry| entry.state.name.as_str())
                    .collect();
                Err(RegistryError::Ambiguous {
                    query: query.to_string(),
                    names: names.join(", "),
                })
            }
        }
    }

    /// Takes the lock that `mount` and `umount` hold from start to end. Two mounts of one
    /// image then share its attachment in turn, instead of racing to attach it twice.
    pub fn lock_mounts(&self) -> Result<Flock<File>, RegistryError> {
        if !self.root.exists() {
            Self::at(self.root.clone())?;
        }
        let path = self.root.join(MOUNT_LOCK_FILE);
        let io_error = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error)?;

        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_error(io::Error::from(errno)))
    }

    /// Takes the registry lock, creating the registry directory first when a registry
    /// opened with [`Registry::for_current_user`] did not exist yet.
    fn lock(&self) -> Result<Flock<File>, RegistryError> {
        if !self.root.exists() {
            Self::at(self.root.clone())?;
        }
        let io_error = |source| RegistryError::Io {
            path: self.root.clone(),
            source,
        };
        let directory = File::open(&self.root).map_err(io_error)?;

        Flock::lock(directory, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_error(io::Error::from(errno)))
    }
}

/// Returns `path` made absolute, with symbolic links, `.` and `..` resolved as far as it
/// exists. The rest is appended as given, so a device file of an attachment whose daemon
/// died (which cannot be resolved, ENOTCONN) still gets its mount point's real path.
pub fn resolve_path(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut base = absolute.as_path();
    loop {
        if let Ok(resolved) = fs::canonicalize(base) {
            return rest
                .iter()
                .rev()
                .fold(resolved, |path, name| path.join(name));
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                base = parent;
            }
            _ => return absolute,
        }
    }
}

/// Replaces `path` with a file containing `contents` by writing `temporary` and renaming it,
/// so that a reader never sees part of it. A failed write leaves no temporary file behind.
pub fn replace_file(path: &Path, temporary: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(temporary)
        .and_then(|mut file| file.write_all(contents))
        .and_then(|()| fs::rename(temporary, path));
    if written.is_err() {
        let _ = fs::remove_file(temporary);
    }
    written
}

fn attachment_number(name: &str) -> u64 {
    name.strip_prefix("loop")
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

/// `$XDG_RUNTIME_DIR/loopfuse`, or `$TMPDIR/loopfuse-UID` when the variable is unset.
fn default_root() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(runtime) if !runtime.is_empty() => PathBuf::from(runtime).join("loopfuse"),
        _ => std::env::temp_dir().join(format!("loopfuse-{}", nix::unistd::getuid())),
    }
}

/// Rejects a registry directory that another user owns or could write to, since its state
/// files decide what `detach` unmounts.
fn check_private(root: &Path) -> Result<(), RegistryError> {
    let metadata = fs::symlink_metadata(root).map_err(|source| RegistryError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let owner = metadata.uid();
    let mode = metadata.permissions().mode() & 0o7777;

    if !metadata.is_dir() || owner != nix::unistd::getuid().as_raw() || mode & 0o022 != 0 {
        return Err(RegistryError::UnsafeRoot {
            path: root.to_path_buf(),
            owner,
            mode,
        });
    }
    Ok(())
}

fn liveness_of(state: &AttachmentState, mountpoint: &Path) -> Liveness {
    if !state.pid.is_running() {
        return Liveness::Stale;
    }
    // A daemon that stopped responding leaves "Transport endpoint is not connected".
    if state.stage == Stage::Attached
        && let Err(error) = fs::metadata(mountpoint)
        && error.raw_os_error() == Some(libc::ENOTCONN)
    {
        return Liveness::Stale;
    }
    Liveness::Live
}

#[cfg(test)]
mod tests;
