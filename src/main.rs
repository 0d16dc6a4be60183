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
    let logger = builder.build();
    log::set_max_level(logger.filter());
    if log::set_logger(Box::leak(Box::new(Logger(logger)))).is_err() {
        eprintln!("loopfuse: warning: logging was set up twice");
    }
}

/// Passes records to env_logger, except fuser's warning that it failed to unmount a
/// filesystem that `detach` had already unmounted.
struct Logger(env_logger::Logger);

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if !is_repeated_unmount(record) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Recognizes fuser's warning when its session ends after an outside unmount: it unmounts
/// again and gets EINVAL, because the directory is no longer a mount point.
fn is_repeated_unmount(record: &log::Record) -> bool {
    record.target() == "fuser::session"
        && record.level() == log::Level::Warn
        && record.args().to_string().contains("(os error 22)")
}
