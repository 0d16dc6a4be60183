//! Mounting for a driver that mounts only block devices. `exfat-fuse` 1.3 always requests a
//! `fuseblk` mount from the kernel, which needs a real block device, and a loopfuse device file
//! is not one.
//!
//! So loopfuse makes the FUSE mount itself, through `fusermount3`, and hands the connection
//! over by the route libfuse has for unprivileged mounts. When its own `mount(2)` fails with
//! EPERM, libfuse runs `fusermount` and receives the open `/dev/fuse` descriptor over the
//! socket named in `_FUSE_COMMFD`. The driver starts in a private user and mount namespace
//! ([`exec_driver`]), where its `mount(2)` fails with EPERM and where every `fusermount` path
//! is this program. Called by that name ([`answer_fusermount`]), it requests the mount from
//! loopfuse and passes on the descriptor that `fusermount3` sends back. The mount itself is made
//! outside the namespace, so every process sees it and `loopfuse umount` unmounts it.

use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::unistd::dup;

use super::MountError;
use crate::attach::environment::find_fusermount;
use crate::attach::namespace::{self, NamespaceError};

/// Hidden subcommand that enters the driver's namespace and executes the driver.
pub const EXEC_DRIVER_SUBCOMMAND: &str = "exec-driver";

/// Environment variable that gives the driver's end of the socket to its `fusermount` call.
pub const CONNECTION_VARIABLE: &str = "LOOPFUSE_FUSE_CONNECTION";

/// The byte the driver's `fusermount` call sends to ask for its connection.
const REQUEST: u8 = b'?';

/// Environment variable, set by libfuse, that names the socket on which libfuse waits for the
/// descriptor.
const COMMFD_VARIABLE: &str = "_FUSE_COMMFD";

/// Paths where libfuse 2 and 3 look for the mount helper. Inside the driver's namespace each
/// of these files is this program.
const HELPER_PATHS: [&str; 4] = [
    "/bin/fusermount",
    "/usr/bin/fusermount",
    "/bin/fusermount3",
    "/usr/bin/fusermount3",
];

/// Options of the FUSE mount made for a driver.
pub struct ConnectionOptions<'a> {
    pub device: &'a Path,
    pub directory: &'a Path,
    /// The driver's name in `/proc/self/mountinfo` (`fuse.SUBTYPE`).
    pub subtype: &'a str,
    pub read_only: bool,
    pub allow_other: bool,
    /// The user's mount options. Those in [`PASSED_OPTIONS`] apply to the mount.
    pub options: &'a [String],
}

/// Mount options that `fusermount3` accepts and applies itself. A driver that mounts only
/// block devices would get them from libfuse, so the mount made for it applies them instead.
/// (`fusermount3` 3.14 rejects `relatime`, `lazytime` and the other atime variants.)
const PASSED_OPTIONS: [&str; 12] = [
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "sync",
    "async",
    "dirsync",
    "atime",
    "noatime",
    "allow_other",
];

/// Creates the socket pair between loopfuse and the driver's `fusermount` call. loopfuse
/// keeps the first end, non-blocking, and the driver inherits the second.
pub fn connection_pair() -> Result<(UnixStream, OwnedFd), MountError> {
    let (ours, drivers) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|errno| handoff_error("cannot create a socket pair", errno.into()))?;
    let ours = UnixStream::from(ours);
    ours.set_nonblocking(true)
        .map_err(|error| handoff_error("cannot set up the socket pair", error))?;
    fcntl(&drivers, FcntlArg::F_SETFD(FdFlag::empty()))
        .map_err(|errno| handoff_error("cannot pass a socket on", errno.into()))?;
    Ok((ours, drivers))
}

/// Returns whether the driver's `fusermount` call has asked for its connection.
pub fn request_arrived(mut ours: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(ours.read(&mut byte), Ok(1)) && byte[0] == REQUEST
}

/// Mounts a FUSE filesystem on `options.directory` through `fusermount3`, which sends the
/// connection's descriptor over `ours` to the driver's end of the socket. Until the driver
/// reads from that connection, every access to the directory waits.
pub fn mount_connection(options: &ConnectionOptions, ours: &UnixStream) -> Result<(), MountError> {
    let helper = find_fusermount().ok_or(MountError::Environment(
        crate::attach::EnvironmentError::NoFusermount,
    ))?;
    // A duplicate has no close-on-exec flag, so fusermount3 inherits it.
    let inherited =
        dup(ours).map_err(|errno| handoff_error("cannot pass a socket on", errno.into()))?;

    let output = Command::new(&helper)
        .arg("-o")
        .arg(mount_options(options))
        .arg("--")
        .arg(options.directory)
        .env(COMMFD_VARIABLE, inherited.as_raw_fd().to_string())
        .output()
        .map_err(|source| MountError::Spawn {
            program: helper.clone(),
            source,
        })?;
    drop(inherited);
    if !output.status.success() {
        return Err(MountError::Helper {
            program: helper,
            directory: options.directory.to_path_buf(),
            output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Builds the `-o` list for `fusermount3`. Commas and backslashes in the device path are
/// escaped as libfuse does.
fn mount_options(options: &ConnectionOptions) -> OsString {
    let mut list = OsString::from(if options.read_only { "ro" } else { "rw" });
    list.push(",nosuid,nodev,default_permissions");
    let user_allow_other = options.options.iter().any(|option| option == "allow_other");
    if options.allow_other && !user_allow_other {
        list.push(",allow_other");
    }
    for option in options
        .options
        .iter()
        .filter(|option| PASSED_OPTIONS.contains(&option.as_str()))
    {
        list.push(format!(",{option}"));
    }
    list.push(format!(",subtype={},fsname=", options.subtype));
    let device = options.device.as_os_str().as_bytes();
    let mut escaped = Vec::with_capacity(device.len());
    for &byte in device {
        if byte == b',' || byte == b'\\' {
            escaped.push(b'\\');
        }
        escaped.push(byte);
    }
    list.push(std::ffi::OsStr::from_bytes(&escaped));
    list
}

fn handoff_error(failure: &str, source: io::Error) -> MountError {
    MountError::Handoff {
        failure: failure.to_string(),
        source,
    }
}

/// Runs as the hidden subcommand before a driver that mounts only block devices: moves into
/// a private user and mount namespace with a root of its own, in which this program replaces
/// `fusermount`, then executes the driver. Returns only on failure, with a shell's
/// exit status.
pub fn exec_driver(device: &Path, directory: &Path, command: &[OsString]) -> u8 {
    let connection: Vec<RawFd> = descriptor_variable(CONNECTION_VARIABLE)
        .into_iter()
        .collect();
    crate::attach::inherited::close_inherited_descriptors(&connection);
    let program = command.first().map(PathBuf::from).unwrap_or_default();
    if let Err(error) = enter_driver_namespace(&program, device, directory) {
        eprintln!(
            "loopfuse: cannot start the driver: {}",
            crate::error_chain(&error)
        );
        return 1;
    }
    crate::attach::exec_in_place(command)
}

/// Reasons the driver's namespace cannot be set up.
#[derive(Debug, thiserror::Error)]
enum NamespaceSetupError {
    #[error(
        "it mounts only block devices, so it must start in a private user namespace, and that failed"
    )]
    Namespace(#[from] NamespaceError),

    #[error("cannot mount {} in the driver's namespace", path.display())]
    Mount { path: PathBuf, source: nix::Error },

    #[error("cannot prepare {} in the driver's namespace", path.display())]
    Prepare { path: PathBuf, source: io::Error },

    #[error("cannot find the loopfuse program")]
    OwnProgram { source: io::Error },
}

/// Top-level directories that contain programs and libraries. The driver's root shows them
/// as they are (directories, or the symbolic links of a merged `/usr`).
const SYSTEM_DIRECTORIES: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32",
];

/// Files the C library and the driver read besides those: the user and group databases, the
/// library cache, the time zone, and the FUSE device, which libfuse opens before it tries to
/// mount.
const SYSTEM_FILES: [&str; 8] = [
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/timezone",
    "/dev/fuse",
    "/dev/null",
];

/// Directory inside the new root where the old root stays until it is detached.
const OLD_ROOT: &str = ".old-root";

/// Enters a new user and mount namespace with the same user and group IDs, so that the
/// driver owns the files it serves as the caller and its `mount(2)` fails with EPERM. Then
/// gives it a root of its own, which binds this program over every `fusermount` path.
///
/// The namespace's capabilities last until `exec`, so all of this happens here. The root is a
/// tmpfs with only what the driver needs, because a copy of every other mount of the system
/// would keep each of them alive after the system unmounts it, for as long as the driver runs.
fn enter_driver_namespace(
    program: &Path,
    device: &Path,
    directory: &Path,
) -> Result<(), NamespaceSetupError> {
    let own_program =
        std::env::current_exe().map_err(|source| NamespaceSetupError::OwnProgram { source })?;
    namespace::enter_namespace_as_caller()?;
    mount_at(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
    )?;
    // Opened before the new root covers the staging directory, where they may lie. A bind
    // needs a source in this mount namespace, so not before the namespace.
    let opened: Vec<(OwnedFd, &Path)> = [own_program.as_path(), program, device]
        .into_iter()
        .map(|path| open_path(path).map(|descriptor| (descriptor, path)))
        .collect::<Result<_, _>>()?;
    let root = staging_directory()?;
    mount_at(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;

    for path in SYSTEM_DIRECTORIES {
        show_directory(root, Path::new(path))?;
    }
    for path in SYSTEM_FILES.iter().map(Path::new) {
        if path.exists() {
            bind_file(root, path, path)?;
        }
    }
    let [(own_descriptor, _), program_file, device_file] = &opened[..] else {
        unreachable!("three paths were opened");
    };
    for (descriptor, path) in [program_file, device_file] {
        bind_file(root, &descriptor_path(descriptor), path)?;
    }
    // The driver checks that the mount point exists and is empty, nothing more: the real
    // mount is made outside.
    create_directories(root, &under(root, directory))?;
    let mut helpers: Vec<PathBuf> = HELPER_PATHS
        .iter()
        .filter_map(|path| std::fs::canonicalize(path).ok())
        .collect();
    helpers.sort();
    helpers.dedup();
    for helper in helpers {
        bind_file(root, &descriptor_path(own_descriptor), &helper)?;
    }

    switch_root(root)
}

/// Directories, world-accessible on common systems, on which the new root can be built.
const STAGING_DIRECTORIES: [&str; 3] = ["/tmp", "/dev/shm", "/run"];

/// Returns the directory to build the new root on: the first that exists.
fn staging_directory() -> Result<&'static Path, NamespaceSetupError> {
    STAGING_DIRECTORIES
        .iter()
        .map(Path::new)
        .find(|path| path.is_dir())
        .ok_or_else(|| NamespaceSetupError::Prepare {
            path: PathBuf::from(STAGING_DIRECTORIES[0]),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
}

/// Opens `path` as a handle for mounting (`O_PATH`).
fn open_path(path: &Path) -> Result<OwnedFd, NamespaceSetupError> {
    nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|errno| NamespaceSetupError::Prepare {
        path: path.to_path_buf(),
        source: errno.into(),
    })
}

/// Returns the `/proc` path through which a mount reaches the file behind `descriptor`.
fn descriptor_path(descriptor: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", descriptor.as_raw_fd()))
}

/// Returns `path` inside the new root.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn mount_at(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
) -> Result<(), NamespaceSetupError> {
    mount(source, target, fstype, flags, None::<&str>).map_err(|source| {
        NamespaceSetupError::Mount {
            path: target.to_path_buf(),
            source,
        }
    })
}

fn prepare_error(path: &Path) -> impl FnOnce(io::Error) -> NamespaceSetupError + '_ {
    move |source| NamespaceSetupError::Prepare {
        path: path.to_path_buf(),
        source,
    }
}

/// Shows a system directory in the new root: a symbolic link as the same link, a directory
/// bound without what is mounted below it, or with it where the kernel requires that.
fn show_directory(root: &Path, path: &Path) -> Result<(), NamespaceSetupError> {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let target = under(root, path);
    if metadata.file_type().is_symlink() {
        let link = std::fs::read_link(path).map_err(prepare_error(path))?;
        return std::os::unix::fs::symlink(link, &target).map_err(prepare_error(&target));
    }
    if !metadata.is_dir() {
        return Ok(());
    }
    std::fs::create_dir(&target).map_err(prepare_error(&target))?;
    // A user namespace rejects the bind of a directory alone (EINVAL) when mounts below it
    // would be uncovered, so then they are bound with it.
    match mount(
        Some(path),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    ) {
        Err(nix::errno::Errno::EINVAL) => mount_at(
            Some(path),
            &target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
        ),
        other => other.map_err(|source| NamespaceSetupError::Mount {
            path: target,
            source,
        }),
    }
}

/// Binds the file `source` at `path` in the new root, creating an empty file to bind onto
/// where the new root has none.
fn bind_file(root: &Path, source: &Path, path: &Path) -> Result<(), NamespaceSetupError> {
    let target = under(root, path);
    if !target.exists() {
        if let Some(parent) = target.parent() {
            create_directories(root, parent)?;
        }
        reject_system_path(root, &target)?;
        std::fs::File::create(&target).map_err(prepare_error(&target))?;
    }
    mount_at(Some(source), &target, None, MsFlags::MS_BIND)
}

/// Creates a directory and its parents in the new root's tmpfs. A path below a bound system
/// directory is rejected, since creating it would change the real system.
fn create_directories(root: &Path, path: &Path) -> Result<(), NamespaceSetupError> {
    if path.is_dir() {
        return Ok(());
    }
    reject_system_path(root, path)?;
    std::fs::create_dir_all(path).map_err(prepare_error(path))
}

fn reject_system_path(root: &Path, path: &Path) -> Result<(), NamespaceSetupError> {
    let relative = path.strip_prefix(root).unwrap_or(path);
    let top = relative
        .components()
        .next()
        .map(|first| Path::new("/").join(first));
    match top {
        Some(top)
            if SYSTEM_DIRECTORIES
                .iter()
                .any(|system| Path::new(system) == top) =>
        {
            Err(NamespaceSetupError::Prepare {
                path: path.to_path_buf(),
                source: io::Error::other("it would lie in a system directory"),
            })
        }
        _ => Ok(()),
    }
}

/// Makes `root` the root directory and detaches the old one, with every mount copied from
/// the system.
fn switch_root(root: &Path) -> Result<(), NamespaceSetupError> {
    let old_root = root.join(OLD_ROOT);
    std::fs::create_dir(&old_root).map_err(prepare_error(&old_root))?;
    nix::unistd::pivot_root(root, &old_root).map_err(|source| NamespaceSetupError::Mount {
        path: root.to_path_buf(),
        source,
    })?;
    std::env::set_current_dir("/").map_err(prepare_error(Path::new("/")))?;
    let old_root = Path::new("/").join(OLD_ROOT);
    umount2(&old_root, MntFlags::MNT_DETACH).map_err(|source| NamespaceSetupError::Mount {
        path: old_root.clone(),
        source,
    })?;
    std::fs::remove_dir(&old_root).map_err(prepare_error(&old_root))
}

/// Returns whether this process was started as `fusermount` inside a driver's namespace.
pub fn invoked_as_fusermount() -> bool {
    let called = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|path| path.file_name().map(|name| name.to_os_string()));
    let is_helper_name = called.is_some_and(|name| name.as_bytes().starts_with(b"fusermount"));
    is_helper_name && std::env::var_os(CONNECTION_VARIABLE).is_some()
}

/// Handles the driver's `fusermount` call: passes the waiting connection to libfuse, or,
/// for an unmount request, leaves the unmount to `loopfuse umount` outside the namespace.
/// Returns the exit status.
pub fn answer_fusermount() -> u8 {
    let arguments: Vec<OsString> = std::env::args_os().skip(1).collect();
    if arguments.iter().any(|argument| argument == "-u") {
        return 0;
    }
    match pass_connection() {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("loopfuse (as fusermount): failed to pass the FUSE connection on: {error}");
            1
        }
    }
}

fn pass_connection() -> io::Result<()> {
    let connection = descriptor_variable(CONNECTION_VARIABLE)?;
    let libfuse = descriptor_variable(COMMFD_VARIABLE)?;

    // Request the mount only now, because libfuse has checked the mount point by this time.
    // A mount made earlier would have blocked that check on this very driver.
    sendmsg::<()>(
        connection,
        &[IoSlice::new(&[REQUEST])],
        &[],
        MsgFlags::empty(),
        None,
    )?;

    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!(RawFd);
    let mut buffers = [IoSliceMut::new(&mut byte)];
    let received = recvmsg::<()>(
        connection,
        &mut buffers,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let descriptors: Vec<RawFd> = received
        .cmsgs()?
        .filter_map(|message| match message {
            ControlMessageOwned::ScmRights(descriptors) => Some(descriptors),
            _ => None,
        })
        .flatten()
        .collect();
    let [descriptor] = descriptors[..] else {
        return Err(io::Error::other(format!(
            "expected one descriptor from loopfuse, got {}",
            descriptors.len()
        )));
    };

    sendmsg::<()>(
        libfuse,
        &[IoSlice::new(&[0])],
        &[ControlMessage::ScmRights(&[descriptor])],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

fn descriptor_variable(name: &str) -> io::Result<RawFd> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| io::Error::other(format!("{name} does not name a descriptor")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(device: &str, read_only: bool, allow_other: bool) -> OsString {
        mount_options(&ConnectionOptions {
            device: Path::new(device),
            directory: Path::new("/mnt"),
            subtype: "exfat",
            read_only,
            allow_other,
            options: &[],
        })
    }

    #[test]
    fn mount_options_among_user_options_reach_the_mount() {
        let user_options = ["noexec", "uid=1000", "relatime", "allow_other"].map(String::from);
        let list = mount_options(&ConnectionOptions {
            device: Path::new("/d"),
            directory: Path::new("/mnt"),
            subtype: "exfat",
            read_only: false,
            allow_other: true,
            options: &user_options,
        });
        assert_eq!(
            list,
            "rw,nosuid,nodev,default_permissions,noexec,allow_other,subtype=exfat,fsname=/d"
        );
    }

    #[test]
    fn options_name_device_and_mode() {
        assert_eq!(
            options("/run/lf/loop0/p1", false, false),
            "rw,nosuid,nodev,default_permissions,subtype=exfat,fsname=/run/lf/loop0/p1"
        );
        assert_eq!(
            options("/d", true, true),
            "ro,nosuid,nodev,default_permissions,allow_other,subtype=exfat,fsname=/d"
        );
    }

    #[test]
    fn commas_in_device_are_escaped() {
        assert_eq!(
            options("/a,b\\c", false, false),
            "rw,nosuid,nodev,default_permissions,subtype=exfat,fsname=/a\\,b\\\\c"
        );
    }
}
