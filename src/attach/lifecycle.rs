//! Lifecycle options of an attachment: when it detaches itself (`--autoclear`,
//! `--until-exit PID`) and where its PID is published (`--pidfile FILE`). `attach` checks
//! them and passes them on to the daemon.

use std::path::PathBuf;

use crate::registry::ProcessId;

/// Options that decide when an attachment detaches itself and where its PID is published.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    /// Detach once the last open file on the device files is closed, as `losetup`'s
    /// autoclear flag does. An attachment that was never opened stays.
    pub autoclear: bool,
    /// Detach once this process exits.
    pub until_exit: Option<i32>,
    /// File that contains the PID of the serving process while the attachment lives.
    pub pidfile: Option<PathBuf>,
}

/// Errors in lifecycle options.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    #[error("--until-exit {pid}: no such process")]
    NoSuchProcess { pid: i32 },

    #[error("{}: cannot write the PID file", path.display())]
    Pidfile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Lifecycle {
    /// Checks that the process to follow exists.
    pub fn validate(&self) -> Result<(), LifecycleError> {
        if let Some(pid) = self.until_exit
            && ProcessId::of(pid).is_none()
        {
            return Err(LifecycleError::NoSuchProcess { pid });
        }
        Ok(())
    }

    /// Command-line arguments that pass these options to the daemon.
    pub(super) fn daemon_arguments(&self) -> Vec<String> {
        let mut arguments = Vec::new();
        if self.autoclear {
            arguments.push("--autoclear".to_string());
        }
        if let Some(pid) = self.until_exit {
            arguments.extend(["--until-exit".to_string(), pid.to_string()]);
        }
        if let Some(path) = &self.pidfile {
            arguments.extend(["--pidfile".to_string(), path.to_string_lossy().into_owned()]);
        }
        arguments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_passes_every_option_to_daemon() {
        let lifecycle = Lifecycle {
            autoclear: true,
            until_exit: Some(42),
            pidfile: Some(PathBuf::from("/run/disk.pid")),
        };

        assert_eq!(
            lifecycle.daemon_arguments(),
            [
                "--autoclear",
                "--until-exit",
                "42",
                "--pidfile",
                "/run/disk.pid"
            ]
        );
        assert!(Lifecycle::default().daemon_arguments().is_empty());
    }

    #[test]
    fn lifecycle_rejects_missing_process() {
        let lifecycle = Lifecycle {
            until_exit: Some(i32::MAX),
            ..Lifecycle::default()
        };

        assert!(matches!(
            lifecycle.validate(),
            Err(LifecycleError::NoSuchProcess { pid: i32::MAX })
        ));
    }
}
