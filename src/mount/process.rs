//! Starting a filesystem driver and waiting until its mount is live, or until it exits.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::driver::{Driver, Invocation};
use super::{DriverExited, MountError};
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
/// once `invocation.directory` is mounted.
///
/// A driver that exits first is reported with its output; one that neither mounts nor exits
/// within [`MOUNT_TIMEOUT`] is killed and waited for.
pub fn start(
    driver: &'static Driver,
    program: &Path,
    invocation: &Invocation,
    log: &Path,
    source_name: &str,
) -> Result<Started, MountError> {
    let log_file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(log)
        .map_err(|source| RegistryError::Io {
            path: log.to_path_buf(),
            source,
        })?;
    let log_copy = log_file.try_clone().map_err(|source| RegistryError::Io {
        path: log.to_path_buf(),
        source,
    })?;

    let arguments = driver.arguments(invocation);
    log::debug!("{source_name}: running {} {arguments:?}", program.display());
    let mut command = Command::new(program);
    command
        .args(&arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_copy))
        .stderr(Stdio::from(log_file))
        // Its own process group keeps the driver out of reach of the terminal's Ctrl-C,
        // like the attach daemon.
        .process_group(0);
    let mut child = command.spawn().map_err(|source| MountError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;

    let started = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if is_mounted(invocation.directory) {
            return Ok(Started { pid: child.id() });
        }
        if let Ok(Some(status)) = child.try_wait() {
            let output = std::fs::read_to_string(log).unwrap_or_default();
            return Err(MountError::DriverExited(Box::new(DriverExited {
                source_name: source_name.to_string(),
                program: driver.program,
                directory: invocation.directory.to_path_buf(),
                status: status.to_string(),
                output: attach::last_lines(&output, OUTPUT_LINES),
                caveat: driver.caveat,
            })));
        }
        if started.elapsed() > MOUNT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(MountError::DriverTimeout {
                directory: invocation.directory.to_path_buf(),
                program: driver.program,
                log: log.to_path_buf(),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
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
