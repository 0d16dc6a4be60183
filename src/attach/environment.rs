//! Checks that this process can mount a FUSE filesystem, with the fix for each failure.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::statvfs::{FsFlags, statvfs};
use nix::unistd::{AccessFlags, Uid, access};

/// Path of the FUSE device.
pub const FUSE_DEVICE: &str = "/dev/fuse";

/// The setuid helper that mounts FUSE filesystems for unprivileged users.
pub const FUSERMOUNT: &str = "fusermount3";

/// Reasons a mount cannot work here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvironmentError {
    #[error(
        "{FUSE_DEVICE}: not found; load the module with 'modprobe fuse', or in a container pass '--device /dev/fuse'"
    )]
    NoFuseDevice,

    #[error(
        "{FUSE_DEVICE}: permission denied for uid {uid} (mode {mode:o}); as root run 'chmod 0666 {FUSE_DEVICE}' (distributions' udev rules do this), or in a container pass '--device /dev/fuse'"
    )]
    FuseDeviceDenied { uid: u32, mode: u32 },

    #[error(
        "{FUSERMOUNT}: not found in PATH; unprivileged users mount through it: install it with 'apt-get install fuse3' (Debian, Ubuntu) or 'dnf install fuse3' (Fedora)"
    )]
    NoFusermount,

    #[error("{FUSERMOUNT}: installed as {}, but not found in PATH; unprivileged users mount through it: add {} to PATH, or set FUSERMOUNT_PATH={}", path.display(), path.parent().unwrap_or(path).display(), path.display())]
    FusermountOutsidePath { path: PathBuf },

    #[error("{}: not setuid root, so it cannot mount for unprivileged users; reinstall the fuse3 package, or as root run 'chmod u+s {}'", path.display(), path.display())]
    FusermountNotSetuid { path: PathBuf },

    #[error("{}: lies on a filesystem mounted nosuid, so its setuid bit has no effect; install fuse3 where the filesystem allows setuid programs", path.display())]
    FusermountOnNosuid { path: PathBuf },

    #[error("{}: its setuid bit has no effect because this process runs with no_new_privs (NoNewPrivs in /proc/self/status); start it without docker's '--security-opt no-new-privileges' or systemd's 'NoNewPrivileges=yes'", path.display())]
    NoNewPrivileges { path: PathBuf },
}

impl EnvironmentError {
    /// Returns whether the error is about the setuid helper, which a user namespace can replace.
    pub fn is_about_fusermount(&self) -> bool {
        matches!(
            self,
            Self::NoFusermount
                | Self::FusermountOutsidePath { .. }
                | Self::FusermountNotSetuid { .. }
                | Self::FusermountOnNosuid { .. }
                | Self::NoNewPrivileges { .. }
        )
    }
}

/// Checks that the FUSE device can be opened and, for an unprivileged user, that the
/// setuid helper is installed.
pub fn check_mount_possible() -> Result<(), EnvironmentError> {
    check_fuse_device()?;
    if Uid::effective().is_root() {
        return Ok(());
    }
    check_fusermount()?;
    Ok(())
}

/// Checks that this user may open the FUSE device for reading and writing.
pub fn check_fuse_device() -> Result<(), EnvironmentError> {
    let metadata = std::fs::metadata(FUSE_DEVICE).map_err(|_| EnvironmentError::NoFuseDevice)?;
    if access(FUSE_DEVICE, AccessFlags::R_OK | AccessFlags::W_OK).is_err() {
        return Err(EnvironmentError::FuseDeviceDenied {
            uid: Uid::current().as_raw(),
            mode: metadata.permissions().mode() & 0o7777,
        });
    }
    Ok(())
}

/// Checks that the setuid helper is installed and that its setuid bit takes effect here;
/// returns its path.
///
/// When the helper is missing from `PATH` but installed in a standard directory, the error
/// asks for a `PATH` fix rather than an install.
pub fn check_fusermount() -> Result<PathBuf, EnvironmentError> {
    let helper = find_fusermount().ok_or_else(missing_fusermount)?;
    check_setuid_root(&helper)?;

    let on_nosuid = statvfs(&helper).is_ok_and(|stat| stat.flags().contains(FsFlags::ST_NOSUID));
    if on_nosuid {
        return Err(EnvironmentError::FusermountOnNosuid { path: helper });
    }
    if has_no_new_privs() {
        return Err(EnvironmentError::NoNewPrivileges { path: helper });
    }
    Ok(helper)
}

/// Returns whether this process runs with `no_new_privs`, under which `execve` ignores setuid bits.
fn has_no_new_privs() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|line| line.strip_prefix("NoNewPrivs:").map(str::trim) == Some("1"))
    })
}

/// Finds the setuid helper the way `fuser` does: `FUSERMOUNT_PATH`, else `PATH`.
pub fn find_fusermount() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FUSERMOUNT_PATH") {
        return Some(PathBuf::from(path));
    }

    let search_path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&search_path)
        .map(|directory| directory.join(FUSERMOUNT))
        .find(|candidate| candidate.is_file())
}

fn check_setuid_root(helper: &Path) -> Result<(), EnvironmentError> {
    let not_setuid = || EnvironmentError::FusermountNotSetuid {
        path: helper.to_path_buf(),
    };
    let metadata = std::fs::metadata(helper).map_err(|_| not_setuid())?;

    if metadata.uid() != 0 || metadata.permissions().mode() & 0o4000 == 0 {
        return Err(not_setuid());
    }
    Ok(())
}

/// Returns whether `/etc/fuse.conf` lets unprivileged users mount with `allow_other`
/// (a `user_allow_other` line).
pub fn user_allow_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf").is_ok_and(|text| {
        text.lines()
            .any(|line| line.split('#').next().unwrap_or("").trim() == "user_allow_other")
    })
}

/// The error for a helper that `PATH` does not find.
fn missing_fusermount() -> EnvironmentError {
    ["/usr/bin", "/bin", "/usr/local/bin"]
        .into_iter()
        .map(|directory| Path::new(directory).join(FUSERMOUNT))
        .find(|candidate| candidate.is_file())
        .map_or(EnvironmentError::NoFusermount, |path| {
            EnvironmentError::FusermountOutsidePath { path }
        })
}
