//! Running one command on an attachment: attach, run the command with the device paths in
//! its environment, and detach whatever becomes of the command.
//!
//! SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to this process are forwarded to
//! the command, which is then waited for before the detach. The daemon is tied to this process
//! (`--until-exit`), so even a SIGKILL here leaves no attachment behind once the daemon notices.
//!
//! When the setuid helper is unusable, an unprivileged caller first moves into a private
//! user and mount namespace (see [`super::namespace`]). The daemon and the command inherit
//! it, so the mount is visible to the command and to no process outside.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::{Pid, Uid};

use super::detach::{DetachError, detach};
use super::environment::{self, EnvironmentError};
use super::namespace::{self, NamespaceError};
use super::{AttachError, AttachOptions, Attached, attach};
use crate::registry::{Liveness, Registry, RegistryError};

/// Signals forwarded to the command: those that end or steer a process, which would
/// otherwise end `run` and leave the command without its device.
const FORWARDED_SIGNALS: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Hidden subcommand that unblocks the forwarded signals and executes the command in place.
pub const EXEC_SUBCOMMAND: &str = "exec-unblocked";

/// Unblocks the forwarded signals and replaces this process with `command`, searching
/// `PATH` as a shell does. Returns only when the command cannot be executed, with the exit
/// status a shell would give: 127 when it is not found, 126 otherwise.
///
/// With `parent`, the PID of `run`, the command gets SIGTERM when `run` dies, so that a
/// `kill -9` of `run` does not leave it running on a device that is being detached.
pub fn exec_unblocked(command: &[OsString], parent: Option<i32>) -> u8 {
    let unblocked = SigSet::from_iter(FORWARDED_SIGNALS).thread_unblock();
    if let Err(error) = unblocked {
        log::warn!("cannot unblock the forwarded signals for the command: {error}");
    }
    if let Some(parent) = parent {
        if let Err(error) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
            log::warn!("failed to tie the command to the life of loopfuse run: {error}");
        }
        // run died before the request took effect: the signal will not come.
        if nix::unistd::getppid() != Pid::from_raw(parent) {
            eprintln!("loopfuse: run exited before its command started; not running it");
            return STATUS_SIGNAL_BASE + Signal::SIGTERM as u8;
        }
    }
    exec_in_place(command)
}

/// Replaces this process with `command`, searching `PATH` as a shell does. Returns only
/// when the command cannot be executed, with the exit status a shell would give.
///
/// `Command::exec` also gives the command SIGPIPE's default action back: the Rust runtime
/// ignores SIGPIPE, and a command that inherited that would see `yes | head -1` fail with
/// "Broken pipe" instead of ending quietly.
pub fn exec_in_place(command: &[OsString]) -> u8 {
    use std::os::unix::process::CommandExt;

    let Some((program, arguments)) = command.split_first() else {
        eprintln!("loopfuse: no command to run; give one after '--'");
        return STATUS_NOT_FOUND;
    };
    let error = std::process::Command::new(program).args(arguments).exec();

    let name = PathBuf::from(program);
    let Some(found) = locate(program) else {
        if has_slash(program) {
            eprintln!(
                "loopfuse: {}: no such file (check the path)",
                name.display()
            );
        } else {
            eprintln!(
                "loopfuse: {}: command not found (check its name and PATH)",
                name.display()
            );
        }
        return STATUS_NOT_FOUND;
    };
    if found.is_dir() {
        eprintln!("loopfuse: {}: is a directory", name.display());
        return STATUS_NOT_EXECUTABLE;
    }
    let interpreter = script_interpreter(&found);
    let (status, reason) = match (error.kind(), &interpreter) {
        // The file exists, so what is missing is its interpreter or a file that it needs.
        (io::ErrorKind::NotFound, Some(interpreter)) if !Path::new(interpreter).exists() => (
            STATUS_NOT_FOUND,
            format!(
                "cannot execute: its interpreter '{}' was not found (check the '#!' line)",
                interpreter.escape_debug()
            ),
        ),
        (io::ErrorKind::NotFound, Some(interpreter)) => (
            STATUS_NOT_FOUND,
            format!(
                "cannot execute: a file that its interpreter '{}' needs was not found",
                interpreter.escape_debug()
            ),
        ),
        (io::ErrorKind::NotFound, None) => (
            STATUS_NOT_FOUND,
            "cannot execute: its program loader or a library it needs was not found".to_string(),
        ),
        (io::ErrorKind::PermissionDenied, Some(interpreter)) if is_executable(&found) => (
            STATUS_NOT_EXECUTABLE,
            format!(
                "cannot execute: its interpreter '{}' is not an executable file",
                interpreter.escape_debug()
            ),
        ),
        // A name found in PATH is shown with the directory it was found in.
        _ if !has_slash(program) => (
            STATUS_NOT_EXECUTABLE,
            format!("cannot run {}: {error}", found.display()),
        ),
        _ => (
            STATUS_NOT_EXECUTABLE,
            format!("cannot run the command: {error}"),
        ),
    };
    eprintln!("loopfuse: {}: {reason}", name.display());
    status
}

/// Returns whether `path` has an execute bit set.
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;

    std::fs::metadata(path).is_ok_and(|metadata| metadata.permissions().mode() & 0o111 != 0)
}

fn has_slash(program: &std::ffi::OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;

    program.as_bytes().contains(&b'/')
}

/// Returns the file `program` names, directly when it contains a slash and otherwise in a
/// directory of `PATH`. `execvp` reports EACCES when a directory of `PATH` cannot be
/// searched, even if the program is nowhere, and a shell reports "not found" then.
fn locate(program: &OsString) -> Option<PathBuf> {
    let program = Path::new(program);
    if has_slash(program.as_os_str()) {
        return program.exists().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|directory| directory.join(program))
        .find(|candidate| candidate.is_file())
}

/// Returns the interpreter that the `#!` line of the script at `path` names, if it has one.
fn script_interpreter(path: &Path) -> Option<String> {
    use std::io::Read;

    let mut head = [0u8; 256];
    let read = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let line = head[..read].strip_prefix(b"#!")?;
    let line = line.split(|&byte| byte == b'\n').next()?;
    // As the kernel reads it: only a space or a tab ends the name, so a '\r' of a file
    // saved with CRLF line ends is part of it.
    let interpreter = line
        .split(|&byte| byte == b' ' || byte == b'\t')
        .find(|word| !word.is_empty())?;
    Some(String::from_utf8_lossy(interpreter).into_owned())
}

/// Exit status of a command that could not be executed, as in shells.
const STATUS_NOT_EXECUTABLE: u8 = 126;
/// Exit status of a command that was not found, as in shells.
const STATUS_NOT_FOUND: u8 = 127;
/// Added to the signal number when the command was killed by a signal, as in shells.
const STATUS_SIGNAL_BASE: u8 = 128;

/// Errors that keep the command from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error(transparent)]
    Attach(#[from] AttachError),

    #[error("{environment}; mounting in a private user namespace instead failed too")]
    NoMountMethod {
        environment: EnvironmentError,
        source: NamespaceError,
    },

    #[error("cannot set up the forwarding of signals to the command")]
    Signals { source: nix::Error },

    #[error("{}: cannot run the command", program.display())]
    Spawn { program: PathBuf, source: io::Error },

    #[error("cannot wait for the command")]
    Wait { source: io::Error },
}

/// Attaches with `options`, runs `command` with `LOOPFUSE_DEV`, `LOOPFUSE_DIR` and, with
/// partitions, `LOOPFUSE_P1`, `LOOPFUSE_P2`, ... in its environment, then detaches.
///
/// Returns the exit status for the caller: the command's, 128 plus the signal number when a
/// signal killed it, 126 or 127 when it could not be started, and 1 when it succeeded but
/// the detach failed. Problems after the attach are passed to `report` as they happen.
/// Must be called while the process has a single thread, because entering a user
/// namespace requires that.
pub fn run_attached(
    options: &AttachOptions,
    registry: &Registry,
    command: &[OsString],
    mut report: impl FnMut(&dyn std::error::Error),
) -> Result<u8, RunError> {
    let signals = ForwardedSignals::block()?;
    choose_mount_method()?;

    let mut options = options.clone();
    options.lifecycle.until_exit = Some(std::process::id() as i32);
    let attached = attach(&options, registry)?;

    let mut status = match signals.take_pending() {
        Some(signal) => {
            log::info!(
                "{}: {signal} received before the command started",
                attached.name
            );
            STATUS_SIGNAL_BASE + signal as i32 as u8
        }
        None => run_command(&attached, registry, command, signals, &mut report),
    };

    if let Err(error) = detach_after_run(registry, &attached.name) {
        report(&error);
        if status == 0 {
            status = 1;
        }
    }
    Ok(status)
}

/// Keeps the default mount method when it works. When the setuid helper is the only
/// problem for an unprivileged user, enters a private user namespace instead.
fn choose_mount_method() -> Result<(), RunError> {
    let error = match environment::check_mount_possible() {
        Ok(()) => return Ok(()),
        Err(error) => error,
    };
    if Uid::effective().is_root() || !error.is_about_fusermount() {
        return Err(AttachError::Environment(error).into());
    }

    // NOTE: 'loopfuse list' outside the namespace still shows such an attachment, with a
    // device path that exists only inside the namespace.
    match namespace::enter_private_namespace() {
        Ok(()) => {
            log::info!("{error}; mounting in a private user namespace instead");
            Ok(())
        }
        Err(source) => Err(RunError::NoMountMethod {
            environment: error,
            source,
        }),
    }
}

/// Starts the command, forwards signals to it until it ends, and returns the exit status
/// for the caller.
fn run_command(
    attached: &Attached,
    registry: &Registry,
    command: &[OsString],
    signals: ForwardedSignals,
    report: &mut impl FnMut(&dyn std::error::Error),
) -> u8 {
    let program = PathBuf::from(&command[0]);
    // The forwarded signals are blocked in this process, and std's Command passes the mask
    // on to the child. So the command starts through a copy of this program that unblocks
    // them and then executes the command in place, under the same PID.
    let trampoline = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("loopfuse"));
    let mut child = match Command::new(&trampoline)
        .arg(EXEC_SUBCOMMAND)
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--")
        .args(command)
        .envs(device_environment(attached, registry))
        .spawn()
    {
        Ok(child) => child,
        Err(source) => {
            let status = match source.kind() {
                io::ErrorKind::NotFound => STATUS_NOT_FOUND,
                _ => STATUS_NOT_EXECUTABLE,
            };
            report(&RunError::Spawn { program, source });
            return status;
        }
    };

    let running = Arc::new(Mutex::new(Some(Pid::from_raw(child.id() as i32))));
    signals.forward_to(running.clone());

    match wait_for_exit(&mut child, &running) {
        Ok(status) => status,
        Err(source) => {
            report(&RunError::Wait { source });
            1
        }
    }
}

/// Returns the variables that point the command at the device files.
fn device_environment(attached: &Attached, registry: &Registry) -> Vec<(String, PathBuf)> {
    let mut variables = vec![
        ("LOOPFUSE_DEV".to_string(), attached.device.clone()),
        ("LOOPFUSE_DIR".to_string(), attached.directory.clone()),
    ];
    let partitions = registry
        .find(&attached.name)
        .map(|entry| entry.state.partitions)
        .unwrap_or_default();
    for partition in partitions {
        variables.push((
            format!("LOOPFUSE_P{}", partition.number),
            attached.directory.join(format!("p{}", partition.number)),
        ));
    }
    variables
}

/// Waits for the child to end and returns its exit status as a shell reports it.
///
/// The child is reaped only after `running` is cleared, so the signal thread can never
/// send a forwarded signal to a recycled PID.
fn wait_for_exit(child: &mut Child, running: &Mutex<Option<Pid>>) -> io::Result<u8> {
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
    }
    *running
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;

    let status = child.wait()?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => STATUS_SIGNAL_BASE + signal as u8,
        (None, None) => 1,
    })
}

/// How long `run` waits for its daemon's lazy unmount after the command.
const LAZY_UNMOUNT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Detaches after the command. A device still held open by a process the command left
/// behind is detached lazily by stopping its daemon, so that nothing stays mounted.
fn detach_after_run(registry: &Registry, name: &str) -> Result<(), DetachError> {
    // A daemon that died under the command is a failure of loopfuse, not of the command.
    let died = registry
        .find(name)
        .is_ok_and(|entry| entry.liveness == Liveness::Stale);
    match detach(registry, name) {
        Ok(_) if died => Err(DetachError::DiedDuringRun {
            name: name.to_string(),
        }),
        Ok(_) => Ok(()),
        // Detached already, by the command itself or by another 'loopfuse detach'.
        Err(DetachError::Registry(RegistryError::NotFound { .. })) => Ok(()),
        Err(DetachError::Busy { mountpoint, .. }) => {
            // NOTE: the daemon then serves the lazily detached mount until that process
            // closes the device, and its registry entry stays until then.
            log::warn!(
                "{name}: a process the command left behind still has a file open on {} ('fuser -vm {}' lists it); unmounting lazily, so the attachment goes once it closes the file",
                mountpoint.display(),
                mountpoint.display()
            );
            let entry = registry.find(name)?;
            let _ = kill(Pid::from_raw(entry.state.pid.pid), Signal::SIGTERM);
            // The daemon unmounts lazily on SIGTERM. Waiting for that lets a `detach` right
            // after `run` find the mount gone, as it will be.
            let deadline = std::time::Instant::now() + LAZY_UNMOUNT_TIMEOUT;
            while super::is_mounted(&entry.mountpoint) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// The forwarded signals, blocked in every thread and read through a signalfd.
struct ForwardedSignals {
    fd: SignalFd,
}

impl ForwardedSignals {
    /// Blocks the forwarded signals in this thread and every thread started after it. A
    /// signal that arrives before the command starts stays pending until then.
    fn block() -> Result<Self, RunError> {
        let signals = SigSet::from_iter(FORWARDED_SIGNALS);
        let to_error = |source| RunError::Signals { source };

        signals.thread_block().map_err(to_error)?;
        let fd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(to_error)?;
        Ok(Self { fd })
    }

    /// Returns a signal that arrived and is still pending, without waiting.
    fn take_pending(&self) -> Option<Signal> {
        let info = self.fd.read_signal().ok()??;
        Signal::try_from(info.ssi_signo as i32).ok()
    }

    /// Starts a thread that forwards every signal to the process in `running`, until the
    /// process exits.
    fn forward_to(self, running: Arc<Mutex<Option<Pid>>>) {
        // Blocking reads from here on; the thread sleeps until a signal arrives.
        if let Err(error) = fcntl(self.fd.as_fd(), FcntlArg::F_SETFL(OFlag::empty())) {
            log::warn!("cannot make the signal descriptor blocking: {error}");
        }

        std::thread::spawn(move || {
            loop {
                let info = match self.fd.read_signal() {
                    Ok(Some(info)) => info,
                    Ok(None) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(error) => {
                        log::warn!("signals are no longer forwarded to the command: {error}");
                        return;
                    }
                };
                let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                    continue;
                };
                // A signal from the kernel comes from the terminal (Ctrl-C, hangup), which
                // signals the whole foreground process group, so the command has its copy.
                if info.ssi_code == libc::SI_KERNEL {
                    log::debug!("{signal} came from the terminal, which sent the command one too");
                    continue;
                }

                let guard = running
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Some(pid) = *guard {
                    log::info!("{signal} received; forwarding it to the command (pid {pid})");
                    let _ = kill(pid, signal);
                }
            }
        });
    }
}
