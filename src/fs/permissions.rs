//! Mode and ownership of the device files. Each starts as the attaching user's, mode 0600
//! (0400 read-only). Its owner may `chmod` it and root may `chown` it, as an administrator
//! does with `/dev/loopN`, and the kernel checks who may (`default_permissions`).

use super::Owner;
use super::per_node::PerNode;

/// Mode bits and owner of one device file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilePermissions {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
}

/// The permissions of every device file.
pub struct PermissionTable {
    initial: FilePermissions,
    files: PerNode<FilePermissions>,
}

impl PermissionTable {
    pub fn new(owner: Owner, read_only: bool) -> Self {
        Self {
            initial: FilePermissions {
                perm: if read_only { 0o400 } else { 0o600 },
                uid: owner.uid,
                gid: owner.gid,
            },
            files: PerNode::new(),
        }
    }

    /// Returns the permissions of the device node `node`.
    pub fn of(&self, node: u64) -> FilePermissions {
        self.files.get(node).unwrap_or(self.initial)
    }

    /// Applies a `chmod` (`mode`) or `chown` (`uid`, `gid`) to the device node `node`. The
    /// set-user-ID, set-group-ID and sticky bits are kept, as a device node keeps them.
    pub fn change(&self, node: u64, mode: Option<u32>, uid: Option<u32>, gid: Option<u32>) {
        self.files.update(node, self.initial, |permissions| {
            if let Some(mode) = mode {
                permissions.perm = (mode & 0o7777) as u16;
            }
            if let Some(uid) = uid {
                permissions.uid = uid;
            }
            if let Some(gid) = gid {
                permissions.gid = gid;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_apply_to_one_file() {
        let table = PermissionTable::new(
            Owner {
                uid: 1000,
                gid: 100,
            },
            false,
        );
        table.change(3, Some(0o104640), None, Some(6));

        let changed = FilePermissions {
            perm: 0o4640,
            uid: 1000,
            gid: 6,
        };
        assert_eq!(table.of(3), changed);
        assert_eq!(table.of(2).perm, 0o600);
    }

    #[test]
    fn read_only_files_start_at_0400() {
        let table = PermissionTable::new(Owner { uid: 0, gid: 0 }, true);
        assert_eq!(table.of(2).perm, 0o400);
    }
}
