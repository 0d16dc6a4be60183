//! The driver table: which userspace program serves each filesystem type, which Debian
//! package ships it, and the command line that keeps it in the foreground on a device file.
//!
//! Every driver runs in the foreground, so the process `loopfuse mount` starts is the one
//! serving the mount and `umount` can wait for it to exit.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::detect::FsType;

/// A userspace filesystem driver.
#[derive(Debug)]
pub struct Driver {
    /// Program name, looked up in `PATH` and the sbin directories.
    pub program: &'static str,
    /// Debian package that ships the program.
    pub package: &'static str,
    /// Whether the driver can write; read-only drivers get a read-only attachment.
    pub writable: bool,
    /// Known reason the driver may fail on a loopfuse device file, added to its errors.
    pub caveat: Option<&'static str>,
    /// Whether Debian installs the program setuid root: it then opens the device as root,
    /// which a FUSE mount of an unprivileged user lets in only with `allow_other`.
    pub setuid_root: bool,
    /// Whether the driver mounts only as a block device (FUSE `blkdev`). loopfuse then makes
    /// the FUSE mount itself and hands the connection over (see [`super::handoff`]).
    pub block_device_only: bool,
    /// Whether the driver's foreground mode traces every request, so its output goes through
    /// a filter that bounds the log (see [`super::driver_log`]).
    pub traces_requests: bool,
    arguments: fn(&Invocation) -> Vec<OsString>,
}

/// The device, directory, mode and options a driver is started with.
#[derive(Debug)]
pub struct Invocation<'a> {
    pub device: &'a Path,
    pub directory: &'a Path,
    pub read_only: bool,
    /// Mount options for the driver's `-o`, beyond `ro`/`rw`.
    pub options: &'a [String],
}

impl Driver {
    /// Builds the arguments that start this driver in the foreground.
    pub fn arguments(&self, invocation: &Invocation) -> Vec<OsString> {
        (self.arguments)(invocation)
    }

    /// Returns whether `program` will run as root for a caller who is not root: the
    /// driver is one Debian installs setuid root, and this copy is.
    pub fn runs_as_root(&self, program: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;

        if !self.setuid_root || nix::unistd::geteuid().is_root() {
            return false;
        }
        std::fs::metadata(program)
            .is_ok_and(|metadata| metadata.uid() == 0 && metadata.mode() & 0o4000 != 0)
    }

    /// Finds the program in `PATH`, then in `/usr/sbin` and `/sbin`, which an unprivileged
    /// user's `PATH` often lacks (Debian installs `mount.exfat-fuse` in `/sbin`).
    pub fn find_program(&self) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|directory| directory.join(self.program))
            .find(|candidate| candidate.is_file())
    }
}

/// The way a filesystem type can be served.
#[derive(Debug)]
pub enum Support {
    Driver(&'static Driver),
    /// No FUSE driver exists in Debian. The text is the advice for the user.
    NoDriver(&'static str),
}

/// `-o` value: `ro` or `rw` (or the driver's spelling of it) followed by the user's options.
fn option_list(mode: &str, invocation: &Invocation) -> OsString {
    let mut options = vec![mode.to_string()];
    options.extend(invocation.options.iter().cloned());
    options.join(",").into()
}

/// `-o LIST` of the user's options alone; empty when the user gave none.
fn extra_options(invocation: &Invocation) -> Vec<OsString> {
    if invocation.options.is_empty() {
        return Vec::new();
    }
    vec!["-o".into(), invocation.options.join(",").into()]
}

fn read_write_mode(invocation: &Invocation) -> &'static str {
    if invocation.read_only { "ro" } else { "rw" }
}

// NOTE: fuse2fs 1.47 keeps `ro` to itself, so /proc/mounts shows a read-only mount as rw,
// although its writes fail with EROFS.
static FUSE2FS: Driver = Driver {
    program: "fuse2fs",
    package: "fuse2fs",
    writable: true,
    caveat: None,
    setuid_root: false,
    block_device_only: false,
    traces_requests: false,
    arguments: |invocation| {
        vec![
            invocation.device.into(),
            invocation.directory.into(),
            "-f".into(),
            "-o".into(),
            option_list(read_write_mode(invocation), invocation),
        ]
    },
};

static FUSEFAT: Driver = Driver {
    program: "fusefat",
    package: "fusefat",
    writable: true,
    setuid_root: false,
    block_device_only: false,
    traces_requests: false,
    caveat: None,
    // fusefat mounts read-only unless given its own "rw+" (which its manual calls
    // experimental).
    arguments: |invocation| {
        let mode = if invocation.read_only { "ro" } else { "rw+" };
        vec![
            "-f".into(),
            "-o".into(),
            option_list(mode, invocation),
            invocation.device.into(),
            invocation.directory.into(),
        ]
    },
};

static EXFAT_FUSE: Driver = Driver {
    program: "mount.exfat-fuse",
    package: "exfat-fuse",
    writable: true,
    setuid_root: false,
    block_device_only: true,
    traces_requests: true,
    caveat: None,
    // -d is the only way to keep exfat-fuse in the foreground, and it also traces every
    // request.
    arguments: |invocation| {
        vec![
            "-d".into(),
            "-o".into(),
            option_list(read_write_mode(invocation), invocation),
            invocation.device.into(),
            invocation.directory.into(),
        ]
    },
};

static NTFS_3G: Driver = Driver {
    program: "ntfs-3g",
    package: "ntfs-3g",
    writable: true,
    caveat: None,
    setuid_root: true,
    block_device_only: false,
    traces_requests: false,
    arguments: |invocation| {
        let mode = if invocation.read_only {
            "no_detach,ro"
        } else {
            "no_detach"
        };
        vec![
            "-o".into(),
            option_list(mode, invocation),
            invocation.device.into(),
            invocation.directory.into(),
        ]
    },
};

static SQUASHFUSE: Driver = Driver {
    program: "squashfuse",
    package: "squashfuse",
    writable: false,
    caveat: None,
    setuid_root: false,
    block_device_only: false,
    traces_requests: false,
    arguments: |invocation| {
        // "ro" also makes /proc/mounts show the mount as read-only.
        vec![
            "-f".into(),
            "-o".into(),
            option_list("ro", invocation),
            invocation.device.into(),
            invocation.directory.into(),
        ]
    },
};

static FUSEISO: Driver = Driver {
    program: "fuseiso",
    package: "fuseiso",
    writable: false,
    setuid_root: false,
    block_device_only: false,
    traces_requests: false,
    caveat: None,
    // fuseiso takes FUSE options (-f) only after the mount point; -n keeps it from writing
    // ~/.mtab.fuseiso.
    arguments: |invocation| {
        vec![
            "-n".into(),
            invocation.device.into(),
            invocation.directory.into(),
            "-f".into(),
            "-o".into(),
            option_list("ro", invocation),
        ]
    },
};

// NOTE: erofsfuse is not in Debian 12, so this command line has not been run here.
static EROFSFUSE: Driver = Driver {
    program: "erofsfuse",
    package: "erofsfuse",
    writable: false,
    setuid_root: false,
    block_device_only: false,
    traces_requests: false,
    caveat: Some(
        "Debian 12 has no erofsfuse package; erofs-utils there ships only mkfs, fsck and dump tools",
    ),
    arguments: |invocation| {
        let mut arguments: Vec<OsString> = vec!["-f".into()];
        arguments.extend(extra_options(invocation));
        arguments.extend([invocation.device.into(), invocation.directory.into()]);
        arguments
    },
};

/// Returns how `fstype` can be served.
pub fn support(fstype: FsType) -> Support {
    match fstype {
        FsType::Ext2 | FsType::Ext3 | FsType::Ext4 => Support::Driver(&FUSE2FS),
        FsType::Vfat => Support::Driver(&FUSEFAT),
        FsType::Exfat => Support::Driver(&EXFAT_FUSE),
        FsType::Ntfs => Support::Driver(&NTFS_3G),
        FsType::Squashfs => Support::Driver(&SQUASHFUSE),
        FsType::Iso9660 => Support::Driver(&FUSEISO),
        FsType::Erofs => Support::Driver(&EROFSFUSE),
        FsType::Xfs => Support::NoDriver(
            "only the kernel mounts it; read files out with xfs_db from the Debian package \
             xfsprogs, or use a kernel loop device",
        ),
        FsType::Btrfs => Support::NoDriver(
            "only the kernel mounts it; copy files out with 'btrfs restore DEVICE DIR' from the \
             Debian package btrfs-progs",
        ),
        FsType::F2fs => Support::NoDriver(
            "only the kernel mounts it; use a kernel loop device, or format the device with \
             another filesystem",
        ),
        FsType::Swap => Support::NoDriver("swap space holds no files to mount"),
        FsType::Luks => Support::NoDriver(
            "open it with cryptsetup (Debian package cryptsetup-bin), which needs device-mapper \
             and root",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation<'a>(read_only: bool, options: &'a [String]) -> Invocation<'a> {
        Invocation {
            device: Path::new("/run/lf/loop0/p1"),
            directory: Path::new("/mnt"),
            read_only,
            options,
        }
    }

    fn arguments(fstype: FsType, read_only: bool, options: &[String]) -> Vec<String> {
        let Support::Driver(driver) = support(fstype) else {
            panic!("{fstype} has no driver");
        };
        driver
            .arguments(&invocation(read_only, options))
            .into_iter()
            .map(|argument| argument.into_string().unwrap())
            .collect()
    }

    #[test]
    fn fuse2fs_runs_in_foreground_with_mode() {
        assert_eq!(
            arguments(FsType::Ext4, false, &["fakeroot".to_string()]),
            ["/run/lf/loop0/p1", "/mnt", "-f", "-o", "rw,fakeroot"]
        );
        assert_eq!(
            arguments(FsType::Ext2, true, &[]),
            ["/run/lf/loop0/p1", "/mnt", "-f", "-o", "ro"]
        );
    }

    #[test]
    fn fusefat_writes_only_with_rw_plus() {
        assert_eq!(
            arguments(FsType::Vfat, false, &[]),
            ["-f", "-o", "rw+", "/run/lf/loop0/p1", "/mnt"]
        );
        assert_eq!(arguments(FsType::Vfat, true, &[])[2], "ro");
    }

    #[test]
    fn read_only_drivers_get_ro_and_given_options() {
        assert_eq!(
            arguments(FsType::Squashfs, true, &[]),
            ["-f", "-o", "ro", "/run/lf/loop0/p1", "/mnt"]
        );
        assert_eq!(
            arguments(FsType::Iso9660, true, &["uid=0".to_string()]),
            ["-n", "/run/lf/loop0/p1", "/mnt", "-f", "-o", "ro,uid=0"]
        );
    }

    #[test]
    fn every_type_has_driver_or_advice() {
        for fstype in FsType::ALL {
            match support(fstype) {
                Support::Driver(driver) => assert!(!driver.package.is_empty()),
                Support::NoDriver(advice) => assert!(!advice.is_empty()),
            }
        }
    }
}
