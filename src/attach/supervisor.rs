//! Reporting to a service supervisor: the PID file, and readiness through the systemd
//! notification protocol (`sd_notify(3)`: a `READY=1` datagram to the unix socket named by
//! `NOTIFY_SOCKET`, where a leading `@` means an abstract socket).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

use super::lifecycle::LifecycleError;

/// Environment variable through which systemd passes its notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A PID file written for this process, removed again when dropped.
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes the PID of this process to `path`, replacing the file atomically so that a
    /// supervisor never reads a partial number.
    pub fn create(path: &Path) -> Result<Self, LifecycleError> {
        let io_error = |source| LifecycleError::Pidfile {
            path: path.to_path_buf(),
            source,
        };
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);

        let contents = format!("{}\n", std::process::id());
        crate::registry::replace_file(path, &temporary, contents.as_bytes(), 0o644)
            .map_err(io_error)?;

        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            log::warn!(
                "{}: cannot remove the PID file: {error}",
                self.path.display()
            );
        }
    }
}

/// Tells the supervisor named by `NOTIFY_SOCKET` that the device is usable. Does nothing
/// when the variable is unset. A failure is only logged, because the attachment works.
pub fn notify_ready(name: &str) {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    let socket = PathBuf::from(socket);

    match send_notification(&socket, "READY=1") {
        Ok(()) => log::debug!("{name}: sent READY=1 to {}", socket.display()),
        Err(error) => log::warn!(
            "{name}: cannot notify the supervisor through {}: {error}",
            socket.display()
        ),
    }
}

fn send_notification(socket: &Path, message: &str) -> std::io::Result<()> {
    let text = socket.to_string_lossy();
    let address = match text.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
        None => SocketAddr::from_pathname(socket)?,
    };

    let sender = UnixDatagram::unbound()?;
    sender.send_to_addr(message.as_bytes(), &address)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_reaches_path_socket() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();

        send_notification(&path, "READY=1").unwrap();

        let mut buffer = [0; 64];
        let count = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..count], b"READY=1");
    }

    #[test]
    fn notification_reaches_abstract_socket() {
        let name = format!("loopfuse-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();

        send_notification(Path::new(&format!("@{name}")), "READY=1").unwrap();

        let mut buffer = [0; 64];
        let count = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..count], b"READY=1");
    }

    #[test]
    fn pidfile_holds_pid_until_dropped() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("loop.pid");

        let pidfile = PidFile::create(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );

        drop(pidfile);
        assert!(!path.exists());
    }
}
