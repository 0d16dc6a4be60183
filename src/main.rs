//! The `loopfuse` command: parses arguments, sets up logging and runs the library.
#![forbid(unsafe_code)]

use std::ffi::OsString;
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
    let arguments: Vec<OsString> = if losetup::invoked_as_losetup() {
        losetup::losetup_argv()
    } else {
        std::env::args_os().collect()
    };
    let cli = match Cli::try_parse_from(&arguments) {
        Ok(cli) => cli,
        Err(error) => return parse_failure(&error, &arguments),
    };
    init_logging(&cli);
    run(cli)
}

/// Prints a command-line error and returns its exit status: clap's (2 for a usage error)
/// except in the losetup front, where util-linux exits 1 for every usage error.
fn parse_failure(error: &clap::Error, arguments: &[OsString]) -> ExitCode {
    use clap::error::ErrorKind;

    let is_losetup = arguments.get(1).is_some_and(|command| command == "losetup");
    let informational = matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    );
    if !is_losetup || informational {
        error.exit();
    }
    let _ = error.print();
    ExitCode::FAILURE
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
