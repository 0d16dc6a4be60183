//! Options of `attach` that decide when an attachment ends by itself and where its PID is
//! published for a supervisor.

use std::path::PathBuf;

use clap::Args;

use crate::attach::Lifecycle;

/// `--autoclear`, `--until-exit` and `--pidfile`, shared by `attach` and the daemon.
#[derive(Debug, Clone, Args)]
pub struct LifecycleArgs {
    /// Detach once the last open file on the device is closed, as losetup's autoclear flag
    /// does. An attachment that was never opened stays.
    #[arg(long)]
    pub autoclear: bool,

    /// Detach once the process PID exits, e.g. the CI job that attached.
    #[arg(long, value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
    pub until_exit: Option<i32>,

    /// Write the PID of the serving process to FILE while attached (removed on detach).
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
}

impl LifecycleArgs {
    pub fn to_lifecycle(&self) -> Lifecycle {
        Lifecycle {
            autoclear: self.autoclear,
            until_exit: self.until_exit,
            pidfile: self.pidfile.clone(),
        }
    }
}
