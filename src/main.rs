//! The `loopfuse` command: parses arguments, sets up logging and runs the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use loopfuse::cli::{Cli, Command, losetup, run};
use loopfuse::mount::handoff;

fn main() -> ExitCode {
    // Inside the namespace of a driver that mounts only block devices, this program replaces
    // fusermount.
    if handoff::invoked_as_fusermount() {
        return ExitCode::from(handoff::answer_fusermount());
    }
    // Called through a link named losetup, the arguments are those of 'loopfuse losetup'.
    let cli = if losetup::invoked_as_losetup() {
        Cli::parse_from(losetup::losetup_argv())
    } else {
        Cli::parse()
    };
    init_logging(&cli);
    run(cli)
}

/// Logs to standard error: warnings by default, more with -v, and `info` for the daemon,
/// whose standard error is its log file. `RUST_LOG` overrides both.
fn init_logging(cli: &Cli) {
    let is_daemon = matches!(cli.command, Command::Daemon(_));
    let level = match cli.verbose {
        0 if is_daemon => "info",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };

    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    if !is_daemon {
        // Messages for the user read like the error line: "loopfuse: warning: ...".
        builder.format(|buffer, record| {
            use std::io::Write;
            let level = record.level().as_str().to_lowercase();
            writeln!(buffer, "loopfuse: {level}: {}", record.args())
        });
    }
    builder.init();
}
