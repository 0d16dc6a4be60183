//! `loopfuse doctor`: prints one line per check and the verdict.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::doctor;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Enter a private user namespace and try a FUSE mount on DIR there (internal: the
    /// doctor runs this in a child process).
    #[arg(long, value_name = "DIR", hide = true)]
    pub probe_namespace: Option<PathBuf>,
}

/// Prints the report; exits 0 only when an attachment will work.
pub fn run_doctor(args: &DoctorArgs) -> ExitCode {
    if let Some(mountpoint) = &args.probe_namespace {
        print!("{}", doctor::probe_in_namespace(mountpoint));
        return ExitCode::SUCCESS;
    }

    let report = doctor::diagnose();
    for check in &report.checks {
        println!("{check}");
    }
    println!("{}", report.conclusion());

    if report.attachment_works() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
