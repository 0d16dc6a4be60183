//! The user namespace probe: a child process (`loopfuse doctor --probe-namespace DIR`)
//! enters a private user and mount namespace as `loopfuse run` does, tries a FUSE mount on
//! `DIR` inside it, and reports both results on its standard output. A child is used so
//! that the doctor itself never changes namespaces.
//!
//! The report is two lines: `unshare ok` or `unshare failed<TAB>reason`, then
//! `mount ok<TAB>MAJOR.MINOR`, `mount failed<TAB>reason` or `mount skipped<TAB>reason`.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::trial::trial_mount;
use crate::attach::environment::check_fuse_device;
use crate::attach::namespace::{NamespaceError, enter_private_namespace};

/// Longer than the trial mount's own wait for INIT, so that a slow mount is reported as
/// such and not as a hung probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Outcome of the probe, as seen by the doctor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceProbe {
    /// `Err` contains why a user namespace could not be created.
    pub unshare: Result<(), String>,
    /// Result of the FUSE mount inside the namespace: the protocol version, or why it
    /// failed. `None` when it was skipped.
    pub mount: Option<Result<String, String>>,
}

/// Runs in the probe child: enters the namespace, tries the mount and returns the report.
pub fn probe_in_namespace(mountpoint: &Path) -> String {
    if let Err(error) = enter_private_namespace() {
        // The plain errno: the message of the error itself points to this doctor.
        let reason = match &error {
            NamespaceError::Unshare { source } => format!("unshare(2): {source}"),
            other => crate::error_chain(other),
        };
        return format!("unshare failed\t{reason}\n");
    }
    let mut report = "unshare ok\n".to_string();

    if let Err(error) = check_fuse_device() {
        report.push_str(&format!("mount skipped\t{error}\n"));
        return report;
    }
    match trial_mount(mountpoint) {
        Ok(version) => report.push_str(&format!("mount ok\t{version}\n")),
        Err(error) => report.push_str(&format!("mount failed\t{}\n", crate::error_chain(&error))),
    }
    report
}

/// Starts the probe child for `mountpoint` and returns what it found.
pub fn run_probe(mountpoint: &Path) -> NamespaceProbe {
    match spawn_probe(mountpoint) {
        Ok(output) => parse_report(&output),
        Err(reason) => NamespaceProbe {
            unshare: Err(reason),
            mount: None,
        },
    }
}

fn spawn_probe(mountpoint: &Path) -> Result<String, String> {
    let executable = std::env::current_exe().map_err(|error| {
        format!("cannot find the loopfuse executable to start the probe: {error}")
    })?;
    let mut child = Command::new(&executable)
        .args(["doctor", "--probe-namespace"])
        .arg(mountpoint)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|error| format!("cannot start the probe {}: {error}", executable.display()))?;
    let mut stdout = child.stdout.take().expect("stdout is piped");

    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut output = String::new();
        let _ = stdout.read_to_string(&mut output);
        let _ = sender.send(output);
    });

    let output = receiver.recv_timeout(PROBE_TIMEOUT);
    if output.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    output.map_err(|_| {
        format!(
            "the probe gave no answer within {} s",
            PROBE_TIMEOUT.as_secs()
        )
    })
}

fn parse_report(output: &str) -> NamespaceProbe {
    let mut probe = NamespaceProbe {
        unshare: Err(format!("the probe gave no report (output: {output:?})")),
        mount: None,
    };

    for line in output.lines() {
        let (status, detail) = line.split_once('\t').unwrap_or((line, ""));
        match status {
            "unshare ok" => probe.unshare = Ok(()),
            "unshare failed" => probe.unshare = Err(detail.to_string()),
            "mount ok" => probe.mount = Some(Ok(detail.to_string())),
            "mount failed" => probe.mount = Some(Err(detail.to_string())),
            _ => {}
        }
    }
    probe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_with_working_mount_parses() {
        let probe = parse_report("unshare ok\nmount ok\t7.45\n");

        assert_eq!(probe.unshare, Ok(()));
        assert_eq!(probe.mount, Some(Ok("7.45".to_string())));
    }

    #[test]
    fn report_with_failed_unshare_parses() {
        let probe = parse_report("unshare failed\tcannot create a user namespace: ENOSPC\n");

        assert_eq!(
            probe.unshare,
            Err("cannot create a user namespace: ENOSPC".to_string())
        );
        assert_eq!(probe.mount, None);
    }

    #[test]
    fn empty_report_is_a_failure() {
        assert!(parse_report("").unshare.is_err());
    }
}
