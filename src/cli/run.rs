//! `loopfuse run`: its arguments and its exit status, which is the command's.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Args;

use super::DeviceArgs;
use crate::attach;
use crate::registry::Registry;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub device: DeviceArgs,

    /// The command to run and its arguments, after '--'.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Runs `loopfuse run` and returns the command's exit status, or 1 when the attach failed.
pub fn run_command(args: &RunArgs) -> ExitCode {
    let print = |error: &dyn std::error::Error| {
        eprintln!("loopfuse: {}", crate::error_chain(error));
    };
    let registry = match Registry::create_for_current_user() {
        Ok(registry) => registry,
        Err(error) => {
            print(&error);
            return ExitCode::FAILURE;
        }
    };

    match attach::run_attached(&args.device.to_options(), &registry, &args.command, print) {
        Ok(status) => ExitCode::from(status),
        Err(error) => {
            print(&error);
            ExitCode::FAILURE
        }
    }
}
