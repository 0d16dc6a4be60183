//! The command line: clap definitions, their validation into library options, and output.
//!
//! Options follow `losetup` where it has an equivalent (`-o`, `--sizelimit`, `-r`, `-P`,
//! `-b`, `--show`, `-J`, `-n`). This module only calls the library.
#![forbid(unsafe_code)]

mod doctor;
mod generate;
mod lifecycle;
mod list;
pub mod losetup;
mod mount;
mod progress;
mod run;
mod size;
mod text;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::attach::{self, AttachOptions, SECTOR_SIZES};
use crate::block::overlay::{self, OverlayError};
use crate::fs::CacheMode;
use crate::image::ImageError;
use crate::registry::Registry;
pub use doctor::DoctorArgs;
pub use lifecycle::LifecycleArgs;
pub use run::RunArgs;
pub use size::parse_size;

/// Attach raw disk images as loop-like device files through FUSE, without root and without
/// the kernel loop driver.
#[derive(Debug, Parser)]
#[command(name = "loopfuse", version, propagate_version = true)]
pub struct Cli {
    /// Log more: -v for info, -vv for debug, -vvv for trace (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach an image and print the path of its device file.
    Attach(AttachArgs),
    /// Detach attachments: unmount, flush the image and stop the daemon.
    Detach(DetachArgs),
    /// List attachments and their partitions.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Re-read the partition table of an attachment made with --partscan.
    Rescan(RescanArgs),
    /// Write the changes kept in an overlay into its image, then empty the overlay.
    Commit(CommitArgs),
    /// Attach an image and mount the filesystem on it (or on IMAGE:PARTITION) with its
    /// userspace driver, like 'mount -o loop'.
    Mount(mount::MountArgs),
    /// Unmount a filesystem mounted by 'loopfuse mount', wait for its driver and detach.
    Umount(mount::UmountArgs),
    /// Run the command lines of util-linux losetup on loopfuse attachments (also run when
    /// loopfuse is called through a link named losetup).
    Losetup(losetup::LosetupArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell.
    Completions(generate::CompletionsArgs),
    /// Write man pages generated from these definitions (used by scripts/man.sh).
    #[command(hide = true)]
    Man(generate::ManArgs),
    /// Attach an image, run a command on it, then detach, also when the command fails.
    ///
    /// The command finds the device file in LOOPFUSE_DEV, its directory in LOOPFUSE_DIR and,
    /// with -P, the partitions in LOOPFUSE_P1, LOOPFUSE_P2, ... SIGINT, SIGTERM, SIGHUP,
    /// SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to it. The exit status is the command's, or 128+N when signal N killed
    /// it. Without a usable fusermount3, an unprivileged user's command runs in a private
    /// user namespace, the only place where the mount is visible.
    Run(RunArgs),
    /// Check everything an attachment needs and print the fix for each failure.
    ///
    /// Prints one line per check (ok, warn, FAIL, skip, info) and a verdict, and exits 0
    /// only when 'attach' or 'run' can mount here.
    Doctor(DoctorArgs),
    /// Serve an attachment reserved by 'attach' (internal).
    #[command(hide = true)]
    Daemon(DaemonArgs),
    /// Unblock the signals 'run' forwards, then execute a command (internal).
    #[command(name = "exec-unblocked", hide = true)]
    ExecUnblocked(ExecArgs),
    /// Start a driver that mounts only block devices in its own namespace (internal).
    #[command(name = "exec-driver", hide = true)]
    ExecDriver(ExecDriverArgs),
    /// Copy a driver's output to its log, bounded in size (internal).
    #[command(name = "driver-log", hide = true)]
    DriverLog,
}

/// Options that shape the device, shared by `attach` and the daemon.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Start the device this many bytes into the image (suffixes: K, M, G, KiB, MB, ...).
    #[arg(short = 'o', long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true, default_value = "0")]
    pub offset: u64,

    /// Limit the device to this many bytes (suffixes as for --offset).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub sizelimit: Option<u64>,

    /// Attach read-only: writes fail with EROFS and the image is mapped read-only.
    #[arg(short, long)]
    pub read_only: bool,

    /// Expose the image's partitions as p1, p2, ... beside the disk.
    #[arg(short = 'P', long)]
    pub partscan: bool,

    /// Logical sector size in bytes: 512, 1024, 2048 or 4096.
    #[arg(short = 'b', long, value_name = "SIZE", value_parser = parse_sector_size, default_value = "512")]
    pub sector_size: u32,

    /// How the kernel caches the device's data: writethrough (reads cached, every write
    /// reaches the image before write() returns), writeback (writes cached too: much faster
    /// small writes, but a write past the end or into a full filesystem is reported late,
    /// by a later write, fsync or close), or none (nothing cached).
    #[arg(long, value_name = "MODE", value_parser = parse_cache_mode, default_value = "writethrough")]
    pub cache: CacheMode,

    /// Let other users open the device files (needs 'user_allow_other' in /etc/fuse.conf
    /// for unprivileged users).
    #[arg(long)]
    pub allow_other: bool,

    /// Keep the image unchanged and write to this overlay file instead. The file is created
    /// when missing or empty, and continued when it contains an overlay of this image.
    #[arg(long, value_name = "FILE", conflicts_with = "snapshot")]
    pub overlay: Option<PathBuf>,

    /// Keep the image unchanged and write to a temporary overlay, removed at detach.
    #[arg(long, conflicts_with = "read_only")]
    pub snapshot: bool,

    /// The raw image file (or block device) to attach.
    pub image: PathBuf,
}

impl DeviceArgs {
    fn to_options(&self) -> AttachOptions {
        AttachOptions {
            image: self.image.clone(),
            offset: self.offset,
            sizelimit: self.sizelimit,
            read_only: self.read_only,
            partscan: self.partscan,
            sector_size: self.sector_size,
            allow_other: self.allow_other,
            cache: self.cache,
            overlay: self.overlay.clone(),
            snapshot: self.snapshot,
            lifecycle: Default::default(),
        }
    }
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub device: DeviceArgs,

    /// Print only the device path (the default output; accepted as with losetup).
    #[arg(long)]
    pub show: bool,

    /// Serve the device from this process until it is detached or interrupted, and send
    /// READY=1 to NOTIFY_SOCKET when it is set (systemd Type=notify).
    #[arg(short, long)]
    pub foreground: bool,

    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

#[derive(Debug, Args)]
#[command(override_usage = "loopfuse detach <TARGET>...\n       loopfuse detach --all")]
pub struct DetachArgs {
    /// Detach every attachment of this user.
    #[arg(short, long, conflicts_with = "targets")]
    pub all: bool,

    /// Attachments to detach: a name (loop0), a device file, its directory, or the image.
    #[arg(required_unless_present = "all")]
    pub targets: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(short = 'J', long)]
    pub json: bool,

    /// Leave out the table heading.
    #[arg(short, long)]
    pub noheadings: bool,
}

#[derive(Debug, Args)]
pub struct RescanArgs {
    /// The attachment: a name (loop0), a device file, its directory, or the image.
    pub target: String,
}

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The overlay file, made by 'attach --overlay'.
    pub overlay: PathBuf,

    /// The image the overlay was made for; it must not be attached.
    pub image: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// PID of the 'run' process, whose death sends SIGTERM to the command.
    #[arg(long, value_name = "PID")]
    pub parent: Option<i32>,

    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
pub struct ExecDriverArgs {
    /// The device file the driver serves.
    #[arg(long)]
    pub device: std::path::PathBuf,
    /// The directory the filesystem is mounted on.
    #[arg(long)]
    pub directory: std::path::PathBuf,
    /// The driver and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Name reserved by 'attach'.
    #[arg(long)]
    pub name: String,

    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

fn parse_cache_mode(text: &str) -> Result<CacheMode, String> {
    match text {
        "writethrough" => Ok(CacheMode::Writethrough),
        "writeback" => Ok(CacheMode::Writeback),
        "none" => Ok(CacheMode::None),
        _ => Err(format!(
            "invalid cache mode '{text}': use writethrough, writeback or none"
        )),
    }
}

fn parse_sector_size(text: &str) -> Result<u32, String> {
    sector_size_of(parse_size(text)?)
}

/// Returns `size` as a sector size, when it is one that loopfuse supports.
fn sector_size_of(size: u64) -> Result<u32, String> {
    SECTOR_SIZES
        .iter()
        .copied()
        .find(|&allowed| u64::from(allowed) == size)
        .ok_or_else(|| format!("invalid sector size {size}: use 512, 1024, 2048 or 4096"))
}

/// Runs a parsed command line and returns the process exit status.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Attach(args) => run_attach(&args),
        Command::Detach(args) => run_detach(&args),
        Command::List(args) => run_list(&args),
        Command::Rescan(args) => run_rescan(&args),
        Command::Commit(args) => run_commit(&args),
        Command::Daemon(args) => run_daemon(&args),
        Command::ExecUnblocked(args) => {
            return ExitCode::from(attach::exec_unblocked(&args.command, args.parent));
        }
        Command::DriverLog => {
            attach::inherited::close_inherited_descriptors(&[]);
            return ExitCode::from(crate::mount::driver_log::run_filter());
        }
        Command::ExecDriver(args) => {
            return ExitCode::from(crate::mount::handoff::exec_driver(
                &args.device,
                &args.directory,
                &args.command,
            ));
        }
        Command::Mount(args) => mount::run_mount(&args),
        Command::Umount(args) => mount::run_umount(&args),
        Command::Losetup(args) => return losetup::run(&args),
        Command::Completions(args) => generate::run_completions(&args),
        Command::Man(args) => generate::run_man(&args),
        Command::Run(args) => return run::run_command(&args),
        Command::Doctor(args) => return doctor::run_doctor(&args),
    };

    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loopfuse: {}", crate::error_chain(error.as_ref()));
            if error.is::<UsageError>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

type CommandResult = Result<(), Box<dyn std::error::Error>>;

/// A command line that clap accepts but that is still invalid; exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn run_attach(args: &AttachArgs) -> CommandResult {
    let registry = Registry::create_for_current_user()?;
    let options = AttachOptions {
        lifecycle: args.lifecycle.to_lifecycle(),
        ..args.device.to_options()
    };

    if args.foreground {
        // No registry read here: listing stats the mount, which is served only after this
        // returns. The daemon's own warning about an ignored table reaches this terminal.
        attach::attach_foreground(&options, &registry, |attached| {
            println!("{}", attached.device.display());
        })?;
        return Ok(());
    }

    let attached = attach::attach(&options, &registry)?;
    println!("{}", attached.device.display());
    warn_if_table_ignored(&registry, &attached.name);
    Ok(())
}

/// Warns when the partition scan of attachment `name` found a table and ignored it, whose
/// reason is otherwise only in the daemon's log.
fn warn_if_table_ignored(registry: &Registry, name: &str) {
    let problem = registry
        .find(name)
        .ok()
        .and_then(|entry| entry.state.partition_problem);
    if let Some(problem) = problem {
        log::warn!("{name}: partition table ignored: {problem}");
    }
}

fn run_detach(args: &DetachArgs) -> CommandResult {
    let registry = Registry::for_current_user()?;

    if args.all {
        attach::detach_all(&registry, |error| {
            eprintln!("loopfuse: {}", crate::error_chain(error))
        })?;
        return Ok(());
    }

    if let [target] = args.targets.as_slice() {
        attach::detach(&registry, target)?;
        return Ok(());
    }

    let mut failures = 0;
    for target in &args.targets {
        if let Err(error) = attach::detach(&registry, target) {
            eprintln!("loopfuse: {}", crate::error_chain(&error));
            failures += 1;
        }
    }
    if failures > 0 {
        return Err(format!("{failures} of {} detaches failed", args.targets.len()).into());
    }
    Ok(())
}

fn run_list(args: &ListArgs) -> CommandResult {
    let registry = Registry::for_current_user()?;
    let entries = registry.list()?;

    let output = if args.json {
        list::to_json(&entries)?
    } else {
        list::to_table(&entries, !args.noheadings)
    };
    print!("{output}");
    Ok(())
}

fn run_rescan(args: &RescanArgs) -> CommandResult {
    let registry = Registry::for_current_user()?;
    let entry = attach::rescan(&registry, &args.target)?;
    // As after `blockdev --rereadpt`, the scan succeeded, perhaps without a usable table.
    warn_if_table_ignored(&registry, &entry.state.name);
    Ok(())
}

fn run_commit(args: &CommitArgs) -> CommandResult {
    let mut bar = progress::Progress::on_stderr("committing");
    let result = overlay::commit(&args.overlay, &args.image, &mut |done, total| {
        bar.update(done, total)
    });
    bar.finish();

    let report = match result {
        // The files are attached: name the attachment, as attach does.
        Err(OverlayError::Image(error @ ImageError::Locked { .. })) => {
            let registry = Registry::for_current_user()?;
            return Err(attach::explain_lock_conflict(error, &registry).into());
        }
        Err(error @ OverlayError::NotAnOverlay { .. }) => {
            return Err(format!(
                "{error}; the overlay comes first: 'loopfuse commit OVERLAY IMAGE'"
            )
            .into());
        }
        result => result?,
    };
    println!(
        "{}: committed into {}: {} of data written, {} made zero (as holes where possible)",
        args.overlay.display(),
        args.image.display(),
        human_size(report.copied),
        human_size(report.zeroed),
    );
    Ok(())
}

/// Formats a byte count with a binary unit: `512 B`, `4.0 KiB`, `1.5 GiB`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn run_daemon(args: &DaemonArgs) -> CommandResult {
    attach::inherited::close_inherited_descriptors(&[]);
    let registry = attach::daemon_registry()?;
    let options = AttachOptions {
        lifecycle: args.lifecycle.to_lifecycle(),
        ..args.device.to_options()
    };
    attach::serve(&options, &registry, &args.name, attach::Readiness::Pipe)?;
    Ok(())
}
