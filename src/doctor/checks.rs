//! The individual checks of `doctor`, in the order they are printed, and the conclusion
//! drawn from them.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{major, minor};
use nix::unistd::Uid;

use super::container::{self, Container};
use super::probe::{NamespaceProbe, run_probe};
use super::trial::trial_mount;
use super::{Check, Outcome, Report, Verdict};
use crate::attach::environment::{FUSE_DEVICE, FUSERMOUNT, check_fusermount};
use crate::attach::namespace::user_namespace_restrictions;
use crate::registry::{Registry, RegistryError};

/// Device numbers of `/dev/fuse`, fixed by the kernel (`Documentation/admin-guide/devices.txt`).
const FUSE_MAJOR: u64 = 10;
const FUSE_MINOR: u64 = 229;

/// The first Linux release that allows FUSE mounts inside user namespaces.
const USERNS_FUSE_SINCE: (u32, u32) = (4, 18);

const FUSE_CONF: &str = "/etc/fuse.conf";

/// Runs every check and concludes what will work.
pub(super) fn run_all() -> Report {
    let is_root = Uid::effective().is_root();
    let container = container::detect();
    let mut checks = vec![container_check(container.as_ref())];

    let device = fuse_device(container.as_ref());
    let device_ok = device.verdict == Verdict::Ok;
    checks.push(device);

    let helper = fusermount(is_root);
    let helper_ok = matches!(helper.verdict, Verdict::Ok | Verdict::Skip);
    checks.push(helper);

    let (runtime, registry) = runtime_directory();
    checks.push(runtime);
    // Trial mounts go to the runtime directory, as attachments do, or to the temporary
    // directory when the runtime directory is unusable.
    let scratch = registry
        .as_ref()
        .map_or_else(std::env::temp_dir, |registry| registry.root().to_path_buf());
    let pid = std::process::id();

    let (direct, direct_version) = if !device_ok {
        (
            skipped("trial mount", "not tried, because /dev/fuse is unusable"),
            None,
        )
    } else if !helper_ok {
        (
            skipped("trial mount", "not tried, because fusermount3 is unusable"),
            None,
        )
    } else {
        direct_mount(
            is_root,
            &scratch.join(format!(".doctor-{pid}")),
            container.as_ref(),
        )
    };
    // What the container needs is listed only where it can be the cause: when /dev/fuse is
    // missing or a trial mount failed. A device that exists but cannot be opened, and an
    // unusable fusermount3 (no_new_privs, say), get their fixes from their own checks.
    if let Some(container) = &container {
        let device_present = Path::new(FUSE_DEVICE).exists();
        let line = if direct.verdict == Verdict::Ok {
            Some(container.summary_when_working())
        } else if (device_present && !device_ok) || (device_ok && !helper_ok) {
            Some(container.name())
        } else {
            None
        };
        if let Some(line) = line {
            checks[0] = Check::new(Verdict::Info, "container", line);
        }
    }
    checks.push(direct);

    let probe = run_probe(&scratch.join(format!(".doctor-{pid}-namespace")));
    let needed = namespace_need(is_root, helper_ok);
    checks.push(user_namespaces(&probe, needed, container.as_ref()));
    checks.push(namespace_mount(&probe, needed, container.as_ref()));
    checks.push(fuse_conf(is_root));
    checks.push(protocol(direct_version.as_deref(), &probe));

    let namespace_works = matches!(probe.mount, Some(Ok(_)));
    let outcome = match (
        registry.is_some(),
        direct_version.is_some(),
        namespace_works,
    ) {
        (true, true, _) => Outcome::AttachAndRun,
        (true, false, true) if !is_root => Outcome::RunOnly,
        _ => Outcome::Nothing,
    };
    Report { checks, outcome }
}

fn skipped(subject: &str, reason: &str) -> Check {
    Check::new(Verdict::Skip, subject, reason)
}

fn container_check(container: Option<&Container>) -> Check {
    match container {
        Some(container) => Check::new(Verdict::Info, "container", container.summary()),
        None => Check::new(
            Verdict::Info,
            "container",
            "none detected (no /.dockerenv, no /run/.containerenv, no KUBERNETES_SERVICE_HOST)",
        ),
    }
}

/// Checks that `/dev/fuse` is the FUSE device and opens it, because a device cgroup or a
/// security module can deny the open whatever the mode bits allow.
fn fuse_device(container: Option<&Container>) -> Check {
    let load_module = "as root run 'modprobe fuse'".to_string();
    let give_device = container.map_or(load_module.clone(), Container::device_fix);

    let metadata = match std::fs::metadata(FUSE_DEVICE) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Check::new(Verdict::Fail, FUSE_DEVICE, "not found").with_fix(give_device);
        }
        Err(error) => return Check::new(Verdict::Fail, FUSE_DEVICE, error),
    };
    let device = metadata.rdev();
    if !metadata.file_type().is_char_device()
        || major(device) != FUSE_MAJOR
        || minor(device) != FUSE_MINOR
    {
        return Check::new(
            Verdict::Fail,
            FUSE_DEVICE,
            format!("not the FUSE character device {FUSE_MAJOR}:{FUSE_MINOR}"),
        )
        .with_fix(format!(
            "as root run 'rm {FUSE_DEVICE} && mknod -m 0666 {FUSE_DEVICE} c {FUSE_MAJOR} {FUSE_MINOR}'"
        ));
    }

    let mode = metadata.permissions().mode() & 0o7777;
    match OpenOptions::new().read(true).write(true).open(FUSE_DEVICE) {
        Ok(_) => Check::new(
            Verdict::Ok,
            FUSE_DEVICE,
            format!(
                "character device {FUSE_MAJOR}:{FUSE_MINOR}, mode {mode:o}, opened for reading and writing"
            ),
        ),
        Err(error) => match error.raw_os_error() {
            Some(libc::EACCES) => Check::new(
                Verdict::Fail,
                FUSE_DEVICE,
                format!(
                    "permission denied for uid {} (mode {mode:o})",
                    Uid::current()
                ),
            )
            .with_fix(format!(
                "as root run 'chmod 0666 {FUSE_DEVICE}' (distributions' udev rules do this)"
            )),
            Some(libc::EPERM) => Check::new(
                Verdict::Fail,
                FUSE_DEVICE,
                "opening it is not permitted, so a device cgroup or a security module denies it",
            )
            .with_fix(
                container.map_or(
                    "allow the character device 10:229 in the device cgroup of this process"
                        .to_string(),
                    Container::device_fix,
                ),
            ),
            Some(libc::ENODEV | libc::ENXIO) => {
                Check::new(Verdict::Fail, FUSE_DEVICE, "the FUSE driver is not loaded")
                    .with_fix(load_module)
            }
            _ => Check::new(Verdict::Fail, FUSE_DEVICE, format!("cannot open: {error}")),
        },
    }
}

fn fusermount(is_root: bool) -> Check {
    if is_root {
        return Check::new(
            Verdict::Skip,
            FUSERMOUNT,
            "not needed, because root mounts directly",
        );
    }
    match check_fusermount() {
        Ok(path) => Check::new(
            Verdict::Ok,
            FUSERMOUNT,
            format!("{} is setuid root", path.display()),
        ),
        Err(error) => Check::from_error(Verdict::Fail, &error),
    }
}

/// Opens the registry as `attach` does, which creates the directory when it is missing,
/// and checks that a file can be created in it.
/// Bytes that the runtime directory check writes: a margin over what an attach writes there
/// (a state file written beside the one it replaces, and the daemon's log).
const PROBE_FILE_LEN: usize = 64 << 10;

fn runtime_directory() -> (Check, Option<Registry>) {
    const SUBJECT: &str = "runtime directory";
    let own_directory = "set XDG_RUNTIME_DIR to a directory of your own";
    let origin = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(value) if !value.is_empty() => "under XDG_RUNTIME_DIR",
        _ => "under the temporary directory, because XDG_RUNTIME_DIR is unset",
    };

    let registry = match Registry::create_for_current_user() {
        Ok(registry) => registry,
        Err(error @ RegistryError::UnsafeRoot { .. }) => {
            return (Check::from_error(Verdict::Fail, &error), None);
        }
        Err(error) => {
            return (
                Check::from_error(Verdict::Fail, &error).with_fix(own_directory),
                None,
            );
        }
    };

    let root = registry.root().display().to_string();
    let probe_file = registry
        .root()
        .join(format!(".doctor-{}.tmp", std::process::id()));
    // Data, not an empty file: an empty file needs no data block, so it can be created on a
    // full filesystem where attach then fails.
    let written = std::fs::write(&probe_file, [0u8; PROBE_FILE_LEN]);
    let _ = std::fs::remove_file(&probe_file);

    match written {
        Ok(()) => (
            Check::new(
                Verdict::Ok,
                SUBJECT,
                format!("{root} ({origin}) is private and writable"),
            ),
            Some(registry),
        ),
        Err(error) => {
            let fix = if error.kind() == std::io::ErrorKind::StorageFull {
                "free some space on its filesystem, or set XDG_RUNTIME_DIR to another directory"
            } else {
                own_directory
            };
            (
                Check::new(
                    Verdict::Fail,
                    SUBJECT,
                    format!("{root} is not writable: {error}"),
                )
                .with_fix(fix),
                None,
            )
        }
    }
}

/// Mounts a trial filesystem the way `attach` does and returns the protocol version.
fn direct_mount(
    is_root: bool,
    mountpoint: &Path,
    container: Option<&Container>,
) -> (Check, Option<String>) {
    const SUBJECT: &str = "trial mount";
    let method = if is_root {
        "mount(2) as root"
    } else {
        FUSERMOUNT
    };

    match trial_mount(mountpoint) {
        Ok(version) => (
            Check::new(
                Verdict::Ok,
                SUBJECT,
                format!("mounted and unmounted a test filesystem through {method}"),
            ),
            Some(version.to_string()),
        ),
        Err(error) => {
            let failed = Check::new(
                Verdict::Fail,
                SUBJECT,
                format!("failed through {method}: {}", crate::error_chain(&error)),
            );
            let fix = container.map_or(
                "the kernel log ('dmesg') names the security module or setting that denied the mount"
                    .to_string(),
                Container::mount_fix,
            );
            (failed.with_fix(fix), None)
        }
    }
}

/// How much an unprivileged user needs user namespaces, which sets the verdict of a
/// failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NamespaceNeed {
    /// Root mounts directly.
    NotNeeded,
    /// `run` falls back to them only when fusermount3 breaks.
    Fallback,
    /// fusermount3 is unusable, so `run` needs them.
    Required,
}

fn namespace_need(is_root: bool, helper_ok: bool) -> NamespaceNeed {
    match (is_root, helper_ok) {
        (true, _) => NamespaceNeed::NotNeeded,
        (false, true) => NamespaceNeed::Fallback,
        (false, false) => NamespaceNeed::Required,
    }
}

impl NamespaceNeed {
    fn failure_verdict(self) -> Verdict {
        match self {
            NamespaceNeed::NotNeeded => Verdict::Info,
            NamespaceNeed::Fallback => Verdict::Warn,
            NamespaceNeed::Required => Verdict::Fail,
        }
    }

    fn consequence(self) -> &'static str {
        match self {
            NamespaceNeed::NotNeeded => {
                "root needs them only to 'mount' exFAT, whose driver mounts only block devices"
            }
            NamespaceNeed::Fallback => {
                "'run' needs them only where fusermount3 is unusable, and 'mount' needs them for exFAT"
            }
            NamespaceNeed::Required => {
                "'run' needs them, because fusermount3 is unusable, and 'mount' needs them for exFAT"
            }
        }
    }
}

/// Reports the kernel settings and the result of the probe's trial `unshare(2)`.
fn user_namespaces(
    probe: &NamespaceProbe,
    need: NamespaceNeed,
    container: Option<&Container>,
) -> Check {
    const SUBJECT: &str = "user namespaces";
    let settings = namespace_settings();

    let reason = match &probe.unshare {
        Ok(()) => {
            return Check::new(
                Verdict::Ok,
                SUBJECT,
                format!("allowed ({settings}; a trial unshare succeeded)"),
            );
        }
        Err(reason) => reason,
    };

    let finding = format!(
        "a trial unshare failed: {reason} ({settings}); {}",
        need.consequence()
    );
    let check = Check::new(need.failure_verdict(), SUBJECT, finding);
    match namespace_fix(reason, container) {
        Some(fix) => check.with_fix(fix),
        None => check,
    }
}

/// Returns the values of the kernel settings that govern unprivileged user namespaces.
fn namespace_settings() -> String {
    [
        "/proc/sys/kernel/unprivileged_userns_clone",
        "/proc/sys/user/max_user_namespaces",
    ]
    .iter()
    .map(|path| {
        let name = path.trim_start_matches("/proc/sys/").replace('/', ".");
        match std::fs::read_to_string(path) {
            Ok(value) => format!("{name}={}", value.trim()),
            Err(_) => format!("{name} absent"),
        }
    })
    .collect::<Vec<_>>()
    .join(", ")
}

/// Returns the fix for a failed `unshare(2)`: lifting a restricting kernel setting if there
/// is one, else the seccomp filter of a container when the error is EPERM.
fn namespace_fix(reason: &str, container: Option<&Container>) -> Option<String> {
    if let Some(restriction) = user_namespace_restrictions().first() {
        return Some(format!(
            "{} is {}: {}",
            restriction.setting, restriction.value, restriction.fix
        ));
    }
    if reason.contains("EPERM") {
        return Some(match container.map(|container| container.engine) {
            Some(container::Engine::Kubernetes) => {
                "the pod's seccomp profile denies unshare(2): set 'seccompProfile: {type: Unconfined}' in its securityContext".to_string()
            }
            Some(_) => {
                "the container's seccomp profile denies unshare(2): start it with '--security-opt seccomp=unconfined'".to_string()
            }
            None => "a seccomp filter or security module denies unshare(2) to this process".to_string(),
        });
    }
    None
}

/// Reports the probe's FUSE mount inside the user namespace, which is what `run` does
/// without fusermount3.
fn namespace_mount(
    probe: &NamespaceProbe,
    need: NamespaceNeed,
    container: Option<&Container>,
) -> Check {
    const SUBJECT: &str = "FUSE mount in a user namespace";
    if probe.unshare.is_err() {
        return skipped(
            SUBJECT,
            "not tried, because no user namespace could be created",
        );
    }

    let reason = match &probe.mount {
        None => return skipped(SUBJECT, "not tried, because /dev/fuse is unusable"),
        Some(Ok(_)) => {
            return Check::new(
                Verdict::Ok,
                SUBJECT,
                "works, so 'run' can attach without fusermount3",
            );
        }
        Some(Err(reason)) => reason,
    };

    let check = Check::new(
        need.failure_verdict(),
        SUBJECT,
        format!("failed: {reason}; {}", need.consequence()),
    );
    let release = nix::sys::utsname::uname()
        .map(|uname| uname.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    if kernel_version(&release).is_some_and(|version| version < USERNS_FUSE_SINCE) {
        let (major, minor) = USERNS_FUSE_SINCE;
        return check.with_fix(format!(
            "FUSE mounts in user namespaces need Linux {major}.{minor} or later, and this kernel is {release}"
        ));
    }
    match (namespace_fix(reason, container), container) {
        (Some(fix), _) => check.with_fix(fix),
        (None, Some(container)) => check.with_fix(container.mount_fix()),
        (None, None) => check,
    }
}

/// Parses `MAJOR.MINOR` from the start of a kernel release such as `6.8.0-45-generic`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release
        .split(|character: char| !character.is_ascii_digit())
        .map(str::parse::<u32>);
    let major = numbers.next()?.ok()?;
    let minor = numbers.next()?.ok()?;
    Some((major, minor))
}

/// Checks `user_allow_other`, which unprivileged users need for `--allow-other`.
fn fuse_conf(is_root: bool) -> Check {
    if is_root {
        return Check::new(
            Verdict::Skip,
            FUSE_CONF,
            "user_allow_other is not needed, because root may always use --allow-other",
        );
    }

    let allowed = std::fs::read_to_string(FUSE_CONF)
        .is_ok_and(|text| text.lines().any(|line| line.trim() == "user_allow_other"));
    if allowed {
        return Check::new(
            Verdict::Ok,
            FUSE_CONF,
            "user_allow_other is set, so --allow-other works",
        );
    }
    Check::new(
        Verdict::Warn,
        FUSE_CONF,
        "no 'user_allow_other' line, so --allow-other fails for unprivileged users (attachments without it work)",
    )
    .with_fix(format!("as root add the line 'user_allow_other' to {FUSE_CONF}"))
}

/// Reports the kernel's FUSE protocol version from whichever trial mount worked.
fn protocol(direct_version: Option<&str>, probe: &NamespaceProbe) -> Check {
    const SUBJECT: &str = "FUSE protocol";
    if let Some(version) = direct_version {
        return Check::new(
            Verdict::Info,
            SUBJECT,
            format!("{version} (from the kernel's INIT request to the trial mount)"),
        );
    }
    if let Some(Ok(version)) = &probe.mount {
        return Check::new(
            Verdict::Info,
            SUBJECT,
            format!(
                "{version} (from the kernel's INIT request to the trial mount in a user namespace)"
            ),
        );
    }
    skipped(
        SUBJECT,
        "version unknown, because no trial mount worked and /sys/module/fuse has no version attribute",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_reads_major_and_minor() {
        assert_eq!(kernel_version("6.8.0-45-generic"), Some((6, 8)));
        assert_eq!(kernel_version("4.18.0"), Some((4, 18)));
        assert_eq!(kernel_version("6.18.44-fc-v1147"), Some((6, 18)));
        assert_eq!(kernel_version("unknown"), None);
    }

    #[test]
    fn namespace_failure_verdict_follows_need() {
        assert_eq!(namespace_need(true, false).failure_verdict(), Verdict::Info);
        assert_eq!(namespace_need(false, true).failure_verdict(), Verdict::Warn);
        assert_eq!(
            namespace_need(false, false).failure_verdict(),
            Verdict::Fail
        );
    }

    #[test]
    fn check_line_shows_verdict_finding_and_fix() {
        let check = Check::new(Verdict::Fail, "/dev/fuse", "not found").with_fix("load it");

        assert_eq!(check.to_string(), "FAIL /dev/fuse: not found; load it");
    }
}
