//! Starting a filesystem driver and waiting until its mount is live, or until it exits.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::driver::{Driver, Invocation};
use super::{DriverExited, MountError, driver_log, handoff};
use crate::attach::{self, is_mounted};
use crate::registry::{ProcessId, RegistryError};

/// How long `mount` waits for a driver to mount its directory.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many lines of a failed driver's output go into the error message.
const OUTPUT_LINES: usize = 5;

/// A driver that has mounted its directory.
pub struct Started {
    pub pid: u32,
}

/// Starts `driver` in its own process group, with its output going to `log`, and returns
/// once `invocation.directory` is mounted and served.
///
/// A driver that exits first is reported with its output; one that neither mounts nor exits
/// within [`MOUNT_TIMEOUT`] is killed and waited for. A driver that mounts only block devices
/// is served a FUSE mount made here when it requests one (see [`handoff`]). A failure after
/// that unmounts it again.
pub fn start(
    driver: &'static Driver,
    program: &Path,
    invocation: &Invocation,
    log: &Path,
    source_name: &str,
) -> Result<Started, MountError> {
    if driver.block_device_only {
        check_empty(invocation)?;
    }
    let (log_file, log_copy) = open_log(log)?;
    let arguments = driver.arguments(invocation);
    log::debug!("{source_name}: running {} {arguments:?}", program.display());

    // The driver's end of the socket, closed here once the driver has it, so that the
    // driver's exit closes the socket.
    let mut drivers_end = None;
    let (mut command, stage) = if driver.block_device_only {
        let (ours, drivers) = handoff::connection_pair()?;
        let mut command = Command::new(own_program()?);
        command
            .arg(handoff::EXEC_DRIVER_SUBCOMMAND)
            .arg("--device")
            .arg(invocation.device)
            .arg("--directory")
            .arg(invocation.directory)
            .arg("--")
            .arg(program)
            .env(
                handoff::CONNECTION_VARIABLE,
                drivers.as_raw_fd().to_string(),
            );
        drivers_end = Some(drivers);
        (command, Stage::Request(ours))
    } else {
        (Command::new(program), Stage::Mount)
    };
    let (stdout, stderr, filter) = if driver.traces_requests {
        let (filter, writer) = start_log_filter(log_file, log)?;
        let writer_copy = writer.try_clone().map_err(|source| RegistryError::Io {
            path: log.to_path_buf(),
            source,
        })?;
        (Stdio::from(writer_copy), Stdio::from(writer), Some(filter))
    } else {
        (Stdio::from(log_copy), Stdio::from(log_file), None)
    };
    command
        .args(&arguments)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        // Its own process group keeps the driver out of reach of the terminal's Ctrl-C,
        // like the attach daemon.
        .process_group(0);
    let child = command.spawn().map_err(|source| MountError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    // The driver has the only write end of the filter's pipe now, so the filter ends
    // with it.
    drop(command);
    drop(drivers_end);

    Startup {
        child,
        driver,
        invocation,
        log,
        source_name,
        premounted: None,
        filter,
    }
    .wait(stage)
}

/// Rejects a mount point with files in it unless the user passed `nonempty`, as libfuse 2
/// does. The driver finds an empty directory in its own root and cannot check this itself.
fn check_empty(invocation: &Invocation) -> Result<(), MountError> {
    let directory = invocation.directory;
    let has_files = std::fs::read_dir(directory).is_ok_and(|mut entries| entries.next().is_some());
    let allowed = invocation.options.iter().any(|option| option == "nonempty");
    if has_files && !allowed {
        return Err(MountError::DirectoryNotEmpty {
            directory: directory.to_path_buf(),
        });
    }
    Ok(())
}

fn open_log(log: &Path) -> Result<(std::fs::File, std::fs::File), MountError> {
    let log_error = |source| RegistryError::Io {
        path: log.to_path_buf(),
        source,
    };
    let log_file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(log)
        .map_err(log_error)?;
    let log_copy = log_file.try_clone().map_err(log_error)?;
    Ok((log_file, log_copy))
}

/// How long a failed start waits for the log filter to write the driver's last lines.
const FILTER_EXIT_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts the filter that copies a driver's output into `log_file` (see
/// [`super::driver_log`]) and returns it with the write end of its input pipe.
fn start_log_filter(
    log_file: std::fs::File,
    log: &Path,
) -> Result<(Child, std::io::PipeWriter), MountError> {
    let io_error = |source| RegistryError::Io {
        path: log.to_path_buf(),
        source,
    };
    let (reader, writer) = std::io::pipe().map_err(io_error)?;
    let program = own_program()?;
    let filter = Command::new(&program)
        .arg(driver_log::FILTER_SUBCOMMAND)
        .stdin(Stdio::from(reader))
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|source| MountError::Spawn { program, source })?;
    Ok((filter, writer))
}

/// Waits up to `timeout` for `child` to exit; returns whether it did.
fn wait_for_child(child: &mut Child, timeout: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn own_program() -> Result<std::path::PathBuf, MountError> {
    std::env::current_exe().map_err(|source| MountError::Handoff {
        failure: "cannot find the loopfuse program".to_string(),
        source,
    })
}

/// Step that the start of a driver waits for next.
enum Stage {
    /// Waiting for the driver to mount its directory itself.
    Mount,
    /// Waiting for a driver that mounts only block devices to request its connection.
    Request(UnixStream),
    /// The connection is mounted and handed over: waiting for the `statvfs` of the directory,
    /// which returns once the driver serves it, or fails once the connection ends.
    Serve(mpsc::Receiver<nix::Result<()>>),
}

/// A driver being started, and what a failure must undo.
struct Startup<'a> {
    child: Child,
    driver: &'static Driver,
    invocation: &'a Invocation<'a>,
    log: &'a Path,
    source_name: &'a str,
    /// The FUSE mount made for the driver, unmounted again if the start fails.
    premounted: Option<UnmountOnDrop>,
    /// The filter between the driver and its log, for a driver that traces requests.
    filter: Option<Child>,
}

impl Startup<'_> {
    fn wait(mut self, mut stage: Stage) -> Result<Started, MountError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            // An exit comes first: a connection that ended because its driver died fails the
            // statvfs too, and the driver's output explains it better.
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.exited(status));
            }
            match self.advance(stage)? {
                Progress::Ready => return Ok(self.ready()),
                Progress::Waiting(next) => stage = next,
            }
            if started.elapsed() > MOUNT_TIMEOUT {
                return Err(self.timed_out());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    fn advance(&mut self, stage: Stage) -> Result<Progress, MountError> {
        let directory = self.invocation.directory;
        match stage {
            Stage::Mount if is_mounted(directory) => Ok(Progress::Ready),
            Stage::Request(ours) if handoff::request_arrived(&ours) => {
                if let Err(error) = self.mount_connection(&ours) {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(error);
                }
                self.premounted = Some(UnmountOnDrop(Some(directory.to_path_buf())));
                Ok(Progress::Waiting(Stage::Serve(served(directory))))
            }
            Stage::Serve(receiver) => match receiver.try_recv() {
                Ok(Ok(())) => Ok(Progress::Ready),
                Ok(Err(errno)) => {
                    // The driver is about to exit; its status and output come next.
                    log::debug!("{}: the mount failed ({errno})", self.source_name);
                    Ok(Progress::Waiting(Stage::Serve(receiver)))
                }
                Err(_) => Ok(Progress::Waiting(Stage::Serve(receiver))),
            },
            other => Ok(Progress::Waiting(other)),
        }
    }

    /// Mounts the FUSE connection the driver requested and sends it over `ours`.
    fn mount_connection(&self, ours: &UnixStream) -> Result<(), MountError> {
        let program = self.driver.program;
        let subtype = program.strip_prefix("mount.").unwrap_or(program);
        let subtype = subtype.strip_suffix("-fuse").unwrap_or(subtype);
        // exfat-fuse requests allow_other. Root gets it, and an unprivileged user only where
        // /etc/fuse.conf contains user_allow_other.
        let allow_other =
            nix::unistd::geteuid().is_root() || crate::attach::environment::user_allow_other();
        handoff::mount_connection(
            &handoff::ConnectionOptions {
                device: self.invocation.device,
                directory: self.invocation.directory,
                subtype,
                read_only: self.invocation.read_only,
                allow_other,
                options: self.invocation.options,
            },
            ours,
        )
    }

    fn ready(self) -> Started {
        if let Some(premounted) = self.premounted {
            premounted.disarm();
        }
        Started {
            pid: self.child.id(),
        }
    }

    fn exited(mut self, status: std::process::ExitStatus) -> MountError {
        if let Some(filter) = self.filter.as_mut() {
            // The filter writes the driver's last lines once it reads the end of its output.
            let finished = wait_for_child(filter, FILTER_EXIT_TIMEOUT);
            if !finished {
                log::debug!(
                    "{}: the driver's log filter is still running",
                    self.source_name
                );
            }
        }
        let output = std::fs::read_to_string(self.log).unwrap_or_default();
        MountError::DriverExited(Box::new(DriverExited {
            source_name: self.source_name.to_string(),
            program: self.driver.program,
            directory: self.invocation.directory.to_path_buf(),
            status: status.to_string(),
            output: attach::last_lines(&output, OUTPUT_LINES),
            caveat: self.driver.caveat,
        }))
    }

    fn timed_out(mut self) -> MountError {
        let _ = self.child.kill();
        let _ = self.child.wait();
        MountError::DriverTimeout {
            directory: self.invocation.directory.to_path_buf(),
            program: self.driver.program,
            log: self.log.to_path_buf(),
        }
    }
}

enum Progress {
    Ready,
    Waiting(Stage),
}

/// Calls `statvfs` on the directory in a thread of its own, because the call waits until the
/// driver serves the mount or its connection ends.
fn served(directory: &Path) -> mpsc::Receiver<nix::Result<()>> {
    let (sender, receiver) = mpsc::channel();
    let directory = directory.to_path_buf();
    std::thread::spawn(move || {
        let _ = sender.send(nix::sys::statvfs::statvfs(&directory).map(|_| ()));
    });
    receiver
}

/// Unmounts a FUSE mount made for a driver when dropped, unless disarmed.
struct UnmountOnDrop(Option<std::path::PathBuf>);

impl UnmountOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        if let Some(directory) = self.0.take() {
            log::debug!("unmounting {} after the failed start", directory.display());
            attach::unmount_lazily(&directory);
        }
    }
}

/// Waits for `process` to exit; returns false when it is still running after `timeout`.
pub fn wait_for_exit(process: &ProcessId, timeout: Duration) -> bool {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    while process.is_running() {
        if started.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    true
}
