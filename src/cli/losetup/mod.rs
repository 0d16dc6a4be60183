//! `loopfuse losetup`, also run when the binary is called through a link named `losetup`:
//! the command lines of util-linux `losetup` that scripts use, acting on loopfuse
//! attachments and printing their device paths in losetup's formats.
//!
//! Actions are chosen from the options as losetup 2.38 chooses them: `-f FILE` attaches,
//! `-d`/`-D` detach, `-a`/`-j`/`-l`/`-O` list, a lone device shows it, and no argument at all
//! lists every device.

mod format;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::{UsageError, parse_size, sector_size_of};
use crate::attach::{self, AttachOptions};
use crate::registry::{DISK_FILE, Entry, Liveness, Registry, resolve_path};
use format::{Column, LoopInfo, Style};

/// Set up and control loop devices, as util-linux losetup does, with loopfuse attachments
/// in place of kernel loop devices.
#[derive(Debug, Args)]
#[command(after_help = format!("Available output columns:\n{}", format::column_help()))]
pub struct LosetupArgs {
    /// List all used devices.
    #[arg(short = 'a', long = "all", conflicts_with_all = ["set_capacity", "detach", "find", "associated"])]
    pub all: bool,

    /// Detach one or more devices (more may follow as arguments).
    #[arg(short = 'd', long = "detach", value_name = "LOOPDEV", conflicts_with_all = ["find", "associated", "list", "output", "output_all"])]
    pub detach: Option<OsString>,

    /// Detach all used devices.
    #[arg(short = 'D', long = "detach-all", conflicts_with_all = ["all", "set_capacity", "detach", "find", "associated", "list", "output", "output_all"])]
    pub detach_all: bool,

    /// Find the first unused device; with FILE, attach it there.
    #[arg(short = 'f', long = "find", conflicts_with_all = ["associated", "list", "output", "output_all"])]
    pub find: bool,

    /// Resize the device (not supported: the size is fixed at attach time).
    #[arg(short = 'c', long = "set-capacity", value_name = "LOOPDEV", conflicts_with_all = ["detach", "find", "associated", "list", "output", "output_all"])]
    pub set_capacity: Option<String>,

    /// List all devices associated with FILE.
    #[arg(
        short = 'j',
        long = "associated",
        value_name = "FILE",
        allow_hyphen_values = true
    )]
    pub associated: Option<PathBuf>,

    /// Reuse a device with the same file, offset and size limit instead of adding one.
    #[arg(short = 'L', long = "nooverlap")]
    pub nooverlap: bool,

    /// Start at offset NUM into the file.
    #[arg(short = 'o', long, value_name = "NUM", value_parser = parse_size, allow_hyphen_values = true)]
    pub offset: Option<u64>,

    /// Limit the device to NUM bytes of the file.
    #[arg(long, value_name = "NUM", value_parser = parse_size, allow_hyphen_values = true)]
    pub sizelimit: Option<u64>,

    /// Set the logical sector size to NUM.
    // Checked only where it is used, as losetup does, so listing ignores it.
    #[arg(short = 'b', long = "sector-size", value_name = "NUM", value_parser = parse_size)]
    pub sector_size: Option<u64>,

    /// Create a partitioned device: partitions are DEVICEp1, DEVICEp2, ...
    #[arg(short = 'P', long)]
    pub partscan: bool,

    /// Set up a read-only device.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,

    /// Accepted for compatibility; only "off" is possible, since pages go through the
    /// image's page cache.
    #[arg(long = "direct-io", value_name = "on|off", num_args = 0..=1, default_missing_value = "on")]
    pub direct_io: Option<String>,

    /// Print the device name after setup (with -f).
    #[arg(long)]
    pub show: bool,

    /// Use JSON --list output format.
    #[arg(short = 'J', long, conflicts_with = "raw")]
    pub json: bool,

    /// List info about all or the given device.
    #[arg(short = 'l', long)]
    pub list: bool,

    /// Leave out the headings of --list output.
    #[arg(short = 'n', long)]
    pub noheadings: bool,

    /// Columns to print for --list, comma-separated.
    #[arg(short = 'O', long, value_name = "COLUMNS")]
    pub output: Option<String>,

    /// Print all columns.
    #[arg(long = "output-all")]
    pub output_all: bool,

    /// Use raw --list output format.
    #[arg(long)]
    pub raw: bool,

    /// A device to show, or the device and file of 'losetup LOOPDEV FILE', or the FILE of -f.
    #[arg(value_name = "ARGS")]
    pub arguments: Vec<OsString>,
}

/// The action a losetup command line requests.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Attach {
        file: PathBuf,
    },
    Detach {
        devices: Vec<String>,
    },
    DetachAll,
    FindFree,
    /// List devices, all or those of `file`.
    Show {
        file: Option<PathBuf>,
    },
    ShowOne {
        device: String,
    },
    /// `-b N DEVICE`: set the sector size of a device, which works only when it already
    /// has that size.
    KeepSectorSize {
        device: String,
        sector_size: u64,
    },
}

/// Returns whether this process was started through a link (or copy) named `losetup`.
///
/// A daemon started by `attach` from such a copy is still the daemon: `attach` runs the
/// current executable with the hidden daemon subcommand first.
pub fn invoked_as_losetup() -> bool {
    let mut arguments = std::env::args_os();
    let named_losetup = arguments
        .next()
        .is_some_and(|argv0| Path::new(&argv0).file_name() == Some("losetup".as_ref()));
    named_losetup && arguments.next() != Some(attach::DAEMON_SUBCOMMAND.into())
}

/// Rewrites the process arguments as `loopfuse losetup ARGS...`, for parsing with the
/// `loopfuse` command line when run as `losetup ARGS...`.
pub fn losetup_argv() -> Vec<OsString> {
    let mut arguments: Vec<OsString> = vec!["loopfuse".into(), "losetup".into()];
    arguments.extend(std::env::args_os().skip(1));
    arguments
}

impl LosetupArgs {
    /// True when no option or argument was given: plain `losetup` lists everything.
    fn is_empty(&self) -> bool {
        self.arguments.is_empty() && self.only_style_options(false)
    }

    /// True when nothing but output-style options (-J, --raw when `allow_style`) is set.
    fn only_style_options(&self, allow_style: bool) -> bool {
        let style_set = self.json || self.raw;
        !(self.all
            || self.detach.is_some()
            || self.detach_all
            || self.find
            || self.set_capacity.is_some()
            || self.associated.is_some()
            || self.nooverlap
            || self.offset.is_some()
            || self.sizelimit.is_some()
            || self.sector_size.is_some()
            || self.partscan
            || self.read_only
            || self.direct_io.is_some()
            || self.show
            || self.list
            || self.noheadings
            || self.output.is_some()
            || self.output_all
            || (style_set && !allow_style))
    }

    /// `losetup -J` or `losetup --raw` alone, which losetup takes as `--list`.
    fn only_style(&self) -> bool {
        self.arguments.is_empty() && (self.json || self.raw) && self.only_style_options(true)
    }

    /// Returns whether devices are printed as a `--list` table rather than as `-a` lines.
    fn lists(&self) -> bool {
        self.list
            || self.output.is_some()
            || self.output_all
            || self.is_empty()
            || self.only_style()
    }

    /// Chooses the action as losetup does, rejecting what cannot work here.
    fn action(&self) -> Result<Action, String> {
        if self.set_capacity.is_some() {
            return Err(
                "--set-capacity is not supported: a loopfuse device keeps the size \
                        it was attached with; detach it and attach it again"
                    .to_string(),
            );
        }
        if self.direct_io.as_deref().is_some_and(|mode| mode != "off") {
            return Err(
                "--direct-io is not supported: loopfuse reads and writes the image \
                        through its page cache"
                    .to_string(),
            );
        }

        let mut arguments = self.arguments.iter();
        let action = if self.is_empty() || self.only_style() {
            Action::Show { file: None }
        } else if let Some(first) = &self.detach {
            let mut devices = vec![device_name(first)];
            devices.extend(arguments.by_ref().map(device_name));
            Action::Detach { devices }
        } else if self.detach_all {
            Action::DetachAll
        } else if self.find {
            match arguments.next() {
                Some(file) => Action::Attach {
                    file: PathBuf::from(file),
                },
                None => Action::FindFree,
            }
        } else if self.all {
            Action::Show { file: None }
        } else if let Some(file) = &self.associated {
            Action::Show {
                file: Some(file.clone()),
            }
        } else if self.arguments.len() == 1 {
            Action::ShowOne {
                device: arguments.next().map(device_name).unwrap_or_default(),
            }
        } else if self.arguments.is_empty() && self.lists() {
            Action::Show { file: None }
        } else if self.arguments.len() == 2 {
            return Err(
                "choosing the device is not supported: loopfuse names devices itself; use \
                 'losetup -f --show FILE' and use the path it prints"
                    .to_string(),
            );
        } else if self.arguments.is_empty() {
            return Err("no loop device specified".to_string());
        } else {
            return Err("unexpected arguments".to_string());
        };
        if arguments.next().is_some() {
            return Err("unexpected arguments".to_string());
        }

        let setup_only = self.sizelimit.is_some() || self.partscan || self.read_only || self.show;
        let attaching = matches!(action, Action::Attach { .. });
        if setup_only && !attaching {
            return Err(
                "the options --{sizelimit,partscan,read-only,show} are allowed during loop \
                 device setup only"
                    .to_string(),
            );
        }
        let lists_file = matches!(action, Action::Show { file: Some(_) });
        if self.offset.is_some() && !attaching && !lists_file {
            return Err("the option --offset is not allowed in this context".to_string());
        }
        // With a device alone, `-b` sets its sector size in losetup. Listing and detaching
        // ignore it, as losetup does.
        match (action, self.sector_size) {
            (Action::ShowOne { device }, Some(sector_size)) => Ok(Action::KeepSectorSize {
                device,
                sector_size,
            }),
            (Action::Attach { file }, Some(sector_size)) => {
                sector_size_of(sector_size)?;
                Ok(Action::Attach { file })
            }
            (action, _) => Ok(action),
        }
    }

    fn columns(&self) -> Result<Vec<Column>, String> {
        if self.output_all {
            return Ok(Column::ALL.to_vec());
        }
        match &self.output {
            Some(text) => format::parse_columns(text),
            None => Ok(Column::DEFAULT.to_vec()),
        }
    }

    fn style(&self) -> Style {
        if self.json {
            Style::Json
        } else if self.raw {
            Style::Raw
        } else {
            Style::Table
        }
    }
}

/// A `-d` that failed for some of its devices, each already reported.
#[derive(Debug, thiserror::Error)]
#[error("some devices were not detached")]
struct NotAllDetached;

/// Returns a device argument as text. No attachment has a path that is not UTF-8, so a
/// replacement character only makes the lookup fail with the name shown as it can be.
fn device_name(argument: &OsString) -> String {
    argument.to_string_lossy().into_owned()
}

/// Runs a losetup command line and returns its exit status: 0 on success, 1 on failure,
/// including an invalid command line, as util-linux exits.
pub fn run(args: &LosetupArgs) -> ExitCode {
    match execute(args) {
        Ok(()) => ExitCode::SUCCESS,
        // Each failed detach was reported as it happened, as util-linux does.
        Err(error) if error.is::<NotAllDetached>() => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("losetup: {}", crate::error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn execute(args: &LosetupArgs) -> super::CommandResult {
    let action = args.action().map_err(UsageError)?;
    let columns = args.columns().map_err(UsageError)?;
    let registry = Registry::for_current_user()?;

    match action {
        Action::Attach { file } => attach_file(args, &registry, file),
        Action::Detach { devices } => detach_devices(&registry, &devices),
        Action::DetachAll => {
            let names: Vec<String> = registry
                .list()?
                .into_iter()
                .map(|entry| entry.state.name)
                .collect();
            detach_devices(&registry, &names)
        }
        Action::FindFree => {
            let name = registry.free_name();
            println!("{}", registry.mountpoint(&name).join(DISK_FILE).display());
            Ok(())
        }
        Action::Show { file } => {
            let entries = match &file {
                Some(file) => associated(&registry, file, args.offset)?,
                None => live_entries(&registry)?,
            };
            print_entries(args, &entries, &columns);
            Ok(())
        }
        Action::ShowOne { device } => {
            let entry = registry.find(&device)?;
            check_device_argument(&entry, &device)?;
            if entry.liveness != Liveness::Live {
                return Err(format!(
                    "{device}: failed to use device: its daemon has exited; detach it with \
                     'losetup -d {device}'"
                )
                .into());
            }
            print_entries(args, &[entry], &columns);
            Ok(())
        }
        Action::KeepSectorSize {
            device,
            sector_size,
        } => {
            let entry = registry.find(&device)?;
            check_device_argument(&entry, &device)?;
            keep_sector_size(&entry, &device, sector_size)
        }
    }
}

/// Accepts `-b N DEVICE` when the device already has N-byte sectors, as losetup then
/// succeeds without a change, and rejects any other size.
fn keep_sector_size(entry: &Entry, device: &str, sector_size: u64) -> super::CommandResult {
    if u64::from(entry.state.sector_size) == sector_size {
        return Ok(());
    }
    Err(format!(
        "{device}: changing the sector size of a device is not supported ({} bytes now): \
         detach it and attach it again with -b {sector_size}",
        entry.state.sector_size
    )
    .into())
}

fn print_entries(args: &LosetupArgs, entries: &[Entry], columns: &[Column]) {
    let rows: Vec<LoopInfo> = entries.iter().map(LoopInfo::of).collect();
    if args.lists() {
        print!(
            "{}",
            format::render(&rows, columns, args.style(), !args.noheadings)
        );
        return;
    }
    for row in &rows {
        println!("{}", format::info_line(row));
    }
}

fn attach_file(args: &LosetupArgs, registry: &Registry, file: PathBuf) -> super::CommandResult {
    let options = AttachOptions {
        offset: args.offset.unwrap_or(0),
        sizelimit: args.sizelimit,
        read_only: args.read_only,
        partscan: args.partscan,
        sector_size: args.sector_size.map_or(Ok(512), sector_size_of)?,
        ..AttachOptions::new(file)
    };

    if args.nooverlap
        && let Some(entry) = overlapping(registry, &options)?
    {
        if entry.state.read_only && !options.read_only {
            return Err(format!(
                "{}: overlapping read-only loop device exists",
                options.image.display()
            )
            .into());
        }
        if args.show {
            println!("{}", entry.device().display());
        }
        return Ok(());
    }

    let attached = attach::attach(&options, registry)?;
    if args.show {
        println!("{}", attached.device.display());
    }
    Ok(())
}

/// Finds the attachment of the same image with the same offset and size limit, for `-L`.
fn overlapping(
    registry: &Registry,
    options: &AttachOptions,
) -> Result<Option<Entry>, crate::registry::RegistryError> {
    let entries = associated(registry, &options.image, Some(options.offset))?;
    Ok(entries
        .into_iter()
        .find(|entry| entry.state.sizelimit == options.sizelimit.unwrap_or(0)))
}

fn detach_devices(registry: &Registry, devices: &[String]) -> super::CommandResult {
    let mut failed = 0;
    for device in devices {
        if let Err(error) = detach_device(registry, device) {
            eprintln!("losetup: {}", crate::error_chain(error.as_ref()));
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(NotAllDetached.into());
    }
    Ok(())
}

fn detach_device(registry: &Registry, device: &str) -> super::CommandResult {
    let failed = |error: &dyn std::error::Error| {
        format!("{device}: detach failed: {}", crate::error_chain(error))
    };
    reject_image_of_several(registry, device)?;
    let entry = registry.find(device).map_err(|error| failed(&error))?;
    check_device_argument(&entry, device)?;
    let result = match attach::detach(registry, device) {
        // Unmounted lazily already: the attachment goes after the last close by itself.
        Err(attach::DetachError::ServingLazily { .. }) => Ok(()),
        // The kernel turns a busy detach into autoclear, and losetup succeeds.
        Err(attach::DetachError::Busy { .. } | attach::DetachError::MountedFrom { .. }) => {
            attach::detach_when_closed(registry, device)
        }
        result => result.map(|_| ()),
    };
    Ok(result.map_err(|error| failed(&error))?)
}

/// Rejects an argument that names the attachment `entry` but not as a device: a partition
/// file (`p1`, `diskp1`), its directory or the image. util-linux rejects `/dev/loop0p1` and image files
/// where it expects a loop device, rather than acting on the disk they belong to.
fn check_device_argument(entry: &Entry, device: &str) -> Result<(), String> {
    let path = resolve_path(Path::new(device));
    if device == entry.state.name || path == entry.device() {
        return Ok(());
    }
    let name = &entry.state.name;
    let reason = if path == entry.mountpoint {
        format!("it is the directory of {name}")
    } else if path.parent() == Some(entry.mountpoint.as_path()) {
        format!("it is a partition of {name}")
    } else {
        format!("it is the image of {name}")
    };
    Err(format!(
        "{device}: failed to use device: {reason}; use {}",
        entry.device().display()
    ))
}

/// Rejects an image file attached more than once, which `find` would report as a name
/// matching several attachments, as if an image were accepted where a device is expected.
fn reject_image_of_several(registry: &Registry, device: &str) -> Result<(), String> {
    let path = resolve_path(Path::new(device));
    let entries = registry.list().unwrap_or_default();
    let names: Vec<&str> = entries
        .iter()
        .filter(|entry| entry.is_image(&path))
        .map(|entry| entry.state.name.as_str())
        .collect();
    if names.len() < 2 {
        return Ok(());
    }
    Err(format!(
        "{device}: failed to use device: it is the image of {}; use one of their devices (see 'losetup -j {device}')",
        names.join(" and ")
    ))
}

/// Returns the live attachments of `file` (see [`Entry::is_image`]), with `offset` when
/// given.
fn associated(
    registry: &Registry,
    file: &Path,
    offset: Option<u64>,
) -> Result<Vec<Entry>, crate::registry::RegistryError> {
    let entries = live_entries(registry)?.into_iter().filter(|entry| {
        entry.is_image(file) && offset.is_none_or(|offset| entry.state.offset == offset)
    });
    Ok(entries.collect())
}

/// Returns the attachments whose daemon is alive. One that died is no loop device any more,
/// so listings leave it out, while `-D` still detaches it and `loopfuse list` shows it.
fn live_entries(registry: &Registry) -> Result<Vec<Entry>, crate::registry::RegistryError> {
    let mut entries = registry.list()?;
    entries.retain(|entry| entry.liveness == Liveness::Live);
    Ok(entries)
}

#[cfg(test)]
mod tests;
