//! Mounting without a setuid helper: a private user and mount namespace in which the caller
//! is root, so that it may mount FUSE filesystems itself. Linux allows FUSE mounts in user
//! namespaces since 4.18.
//!
//! Mounts made there are visible only to processes inside the namespace, so only
//! `loopfuse run` uses it: the daemon and the command both start inside. The new mount
//! namespace is owned by a less privileged user namespace, so the kernel turns every shared
//! mount into a slave mount and nothing mounted inside propagates out.

use std::path::PathBuf;

use nix::sched::{CloneFlags, unshare};
use nix::unistd::{getgid, getuid};

/// Errors from entering a private namespace.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NamespaceError {
    #[error("cannot create a user namespace (run 'loopfuse doctor' to see why)")]
    Unshare { source: nix::Error },

    #[error("{}: cannot write the ID map of the new user namespace", path.display())]
    IdMap {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A kernel setting that keeps unprivileged users from creating user namespaces, or from
/// using capabilities inside one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restriction {
    /// The file under `/proc/sys`.
    pub setting: &'static str,
    pub value: String,
    /// The command that lifts the restriction.
    pub fix: &'static str,
}

/// Settings checked by [`user_namespace_restrictions`], with the value that restricts and
/// the fix. `max_user_namespaces` also limits root.
const RESTRICTING_SETTINGS: [(&str, &str, &str); 3] = [
    (
        "/proc/sys/kernel/unprivileged_userns_clone",
        "0",
        "as root on the host run 'sysctl -w kernel.unprivileged_userns_clone=1'",
    ),
    (
        "/proc/sys/user/max_user_namespaces",
        "0",
        "as root on the host run 'sysctl -w user.max_user_namespaces=10000'",
    ),
    (
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
        "1",
        "as root on the host run 'sysctl -w kernel.apparmor_restrict_unprivileged_userns=0', or give loopfuse an AppArmor profile with the 'userns,' rule",
    ),
];

/// Returns the kernel settings that restrict unprivileged user namespaces here. An empty
/// list means the settings allow them, but a container's seccomp filter may still deny them.
pub fn user_namespace_restrictions() -> Vec<Restriction> {
    RESTRICTING_SETTINGS
        .iter()
        .filter_map(|&(setting, restricting, fix)| {
            let value = std::fs::read_to_string(setting).ok()?.trim().to_string();
            (value == restricting).then_some(Restriction {
                setting,
                value,
                fix,
            })
        })
        .collect()
}

/// Moves this process into a new user and mount namespace in which its user and group are
/// root.
///
/// Mapping to root, rather than to the same IDs, keeps the capabilities of the namespace
/// across `exec`, so the daemon started next can mount, and so can the command (`fuse2fs`,
/// for one). Must be called while the process has a single thread, as `unshare(2)` requires.
pub fn enter_private_namespace() -> Result<(), NamespaceError> {
    enter_namespace(Inside::Root)
}

/// Moves this process into a new user and mount namespace in which its user and group keep
/// their IDs. It keeps the namespace's capabilities only until `exec`, unless it is root.
/// Must be called while the process has a single thread.
pub fn enter_namespace_as_caller() -> Result<(), NamespaceError> {
    enter_namespace(Inside::SameIds)
}

/// The IDs the caller's user and group get inside a new user namespace.
enum Inside {
    Root,
    SameIds,
}

fn enter_namespace(inside: Inside) -> Result<(), NamespaceError> {
    let uid = getuid();
    let gid = getgid();
    let (inside_uid, inside_gid) = match inside {
        Inside::Root => (0, 0),
        Inside::SameIds => (uid.as_raw(), gid.as_raw()),
    };

    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
        .map_err(|source| NamespaceError::Unshare { source })?;

    // An unprivileged process must give up setgroups(2) before it may write its gid_map.
    write_id_file("/proc/self/setgroups", "deny")?;
    write_id_file("/proc/self/uid_map", &format!("{inside_uid} {uid} 1"))?;
    write_id_file("/proc/self/gid_map", &format!("{inside_gid} {gid} 1"))?;

    log::debug!(
        "entered a private user and mount namespace as uid {inside_uid} (uid {uid}, gid {gid} outside)"
    );
    Ok(())
}

fn write_id_file(path: &str, content: &str) -> Result<(), NamespaceError> {
    std::fs::write(path, content).map_err(|source| NamespaceError::IdMap {
        path: PathBuf::from(path),
        source,
    })
}

/// Returns whether process `pid` lives in another mount namespace than this process, so that its
/// mounts are invisible here. False when either namespace cannot be read.
pub fn in_other_mount_namespace(pid: i32) -> bool {
    let own = std::fs::read_link("/proc/self/ns/mnt");
    let other = std::fs::read_link(format!("/proc/{pid}/ns/mnt"));

    matches!((own, other), (Ok(own), Ok(other)) if own != other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_shares_mount_namespace() {
        assert!(!in_other_mount_namespace(std::process::id() as i32));
    }

    #[test]
    fn missing_process_counts_as_same_namespace() {
        assert!(!in_other_mount_namespace(i32::MAX));
    }
}
