//! Mounting for a driver that mounts only block devices. `exfat-fuse` 1.3 always asks the
//! kernel for a `fuseblk` mount, which needs a real block device, and a loopfuse device file
//! is not one.
//!
//! So loopfuse makes the FUSE mount itself, through `fusermount3`, and hands the connection
//! over by the route libfuse has for unprivileged mounts. When its own `mount(2)` fails with
//! EPERM, libfuse runs `fusermount` and receives the open `/dev/fuse` descriptor over the
//! socket named in `_FUSE_COMMFD`. The driver starts in a private user and mount namespace
//! ([`exec_driver`]), where its `mount(2)` fails with EPERM and where every `fusermount` path
//! is this program. Called by that name ([`answer_fusermount`]), it asks loopfuse to mount
//! and passes on the descriptor that `fusermount3` sends back. The mount itself is made
//! outside the namespace, so every process sees it and `loopfuse umount` unmounts it.

use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::mount::{MsFlags, mount};
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

/// What the FUSE mount made for a driver looks like.
pub struct ConnectionOptions<'a> {
    pub device: &'a Path,
    pub directory: &'a Path,
    /// The driver's name in `/proc/self/mountinfo` (`fuse.SUBTYPE`).
    pub subtype: &'a str,
    pub read_only: bool,
    pub allow_other: bool,
}

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

/// The `-o` list for `fusermount3`. Commas and backslashes in the device path are escaped
/// as libfuse does.
fn mount_options(options: &ConnectionOptions) -> OsString {
    let mut list = OsString::from(if options.read_only { "ro" } else { "rw" });
    list.push(",nosuid,nodev,default_permissions");
    if options.allow_other {
        list.push(",allow_other");
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

fn handoff_error(what: &str, source: io::Error) -> MountError {
    MountError::Handoff {
        what: what.to_string(),
        source,
    }
}

/// Runs as the hidden subcommand before a driver that mounts only block devices: moves into
/// a private user and mount namespace in which this program stands in for `fusermount`, then
/// executes the driver. Returns only on failure, with a shell's exit status.
pub fn exec_driver(command: &[OsString]) -> u8 {
    if let Err(error) = enter_driver_namespace() {
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

    #[error("cannot bind loopfuse over {} in its namespace", path.display())]
    Bind { path: PathBuf, source: nix::Error },

    #[error("cannot find the loopfuse program")]
    OwnProgram { source: io::Error },
}

/// Enters a new user and mount namespace with the same user and group IDs, so that the
/// driver owns the files it serves as the caller and its `mount(2)` fails with EPERM. Then
/// binds this program over every `fusermount` path.
///
/// The namespace's capabilities last until `exec`, so the bind mounts are made here. Its
/// mount namespace is owned by a less privileged user namespace, so the kernel turns every
/// shared mount into a slave mount and the bind mounts stay inside.
fn enter_driver_namespace() -> Result<(), NamespaceSetupError> {
    let program =
        std::env::current_exe().map_err(|source| NamespaceSetupError::OwnProgram { source })?;
    namespace::enter_namespace_as_caller()?;

    let mut targets: Vec<PathBuf> = HELPER_PATHS
        .iter()
        .filter_map(|path| std::fs::canonicalize(path).ok())
        .collect();
    targets.sort();
    targets.dedup();
    for target in targets {
        mount(
            Some(&program),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| NamespaceSetupError::Bind {
            path: target.clone(),
            source,
        })?;
    }
    Ok(())
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

/// Answers the driver's `fusermount` call: passes the waiting connection to libfuse, or,
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
            eprintln!("loopfuse (as fusermount): cannot pass the FUSE connection on: {error}");
            1
        }
    }
}

fn pass_connection() -> io::Result<()> {
    let connection = descriptor_variable(CONNECTION_VARIABLE)?;
    let libfuse = descriptor_variable(COMMFD_VARIABLE)?;

    // Ask loopfuse to mount now: libfuse has checked the mount point, which a mount made
    // earlier would have kept waiting for this very driver.
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
        })
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
