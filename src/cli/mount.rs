//! `loopfuse mount` and `loopfuse umount`: clap definitions and their validation into
//! [`MountOptions`].

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use clap::Args;

use super::{CommandResult, parse_sector_size, parse_size};
use crate::attach::AttachOptions;
use crate::mount::detect::FsType;
use crate::mount::{self, MountOptions};
use crate::registry::Registry;

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Mount options, comma-separated: ro, rw, offset=SIZE, sizelimit=SIZE; any other
    /// option goes to the driver's -o (for example fakeroot for fuse2fs).
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Vec<String>,

    /// Filesystem type, instead of detecting it: ext2, ext3, ext4, vfat, exfat, ntfs,
    /// squashfs, iso9660 or erofs.
    #[arg(short = 't', long = "types", value_name = "TYPE", value_parser = parse_fstype)]
    pub fstype: Option<FsType>,

    /// Start the device this many bytes into the image (as -o offset=SIZE).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub offset: Option<u64>,

    /// Limit the device to this many bytes (as -o sizelimit=SIZE).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub sizelimit: Option<u64>,

    /// Mount read-only (as -o ro); the image is attached read-only.
    #[arg(short, long)]
    pub read_only: bool,

    /// Expose the image's partitions (implied by IMAGE:PARTITION).
    #[arg(short = 'P', long)]
    pub partscan: bool,

    /// Logical sector size in bytes: 512, 1024, 2048 or 4096.
    #[arg(short = 'b', long, value_name = "SIZE", value_parser = parse_sector_size, default_value = "512")]
    pub sector_size: u32,

    /// Let other users open the device files (needs 'user_allow_other' in /etc/fuse.conf
    /// for unprivileged users).
    #[arg(long)]
    pub allow_other: bool,

    /// The image, optionally with a partition number: disk.img or disk.img:2.
    #[arg(value_name = "IMAGE[:PARTITION]")]
    pub source: OsString,

    /// Existing directory to mount the filesystem on.
    pub directory: PathBuf,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    /// Directory that 'loopfuse mount' mounted a filesystem on.
    pub directory: PathBuf,
}

fn parse_fstype(text: &str) -> Result<FsType, String> {
    FsType::from_name(text).ok_or_else(|| {
        let names: Vec<&str> = FsType::ALL.iter().map(|fstype| fstype.name()).collect();
        format!(
            "unknown filesystem type '{text}' (known: {})",
            names.join(", ")
        )
    })
}

/// Splits `disk.img:2` into the image and partition 2. A name whose suffix is not a number,
/// or a file that exists under the whole name, is an image without a partition.
fn split_source(source: &OsStr) -> Result<(PathBuf, Option<u32>), String> {
    let bytes = source.as_bytes();
    let whole = || Ok((PathBuf::from(source), None));
    let Some(colon) = bytes.iter().rposition(|&byte| byte == b':') else {
        return whole();
    };
    let (image, suffix) = (&bytes[..colon], &bytes[colon + 1..]);
    if Path::new(source).exists() || suffix.is_empty() || !suffix.iter().all(u8::is_ascii_digit) {
        return whole();
    }

    // Only ASCII digits are left, so the suffix is valid UTF-8.
    let suffix = String::from_utf8_lossy(suffix);
    match suffix.parse::<u32>() {
        Ok(number) if number > 0 => Ok((PathBuf::from(OsStr::from_bytes(image)), Some(number))),
        _ => Err(format!(
            "{}: invalid partition number '{suffix}': partitions count from 1",
            source.to_string_lossy()
        )),
    }
}

impl MountArgs {
    /// Validates the command line into mount options; an error is a usage error.
    fn to_options(&self) -> Result<MountOptions, String> {
        let (image, partition) = split_source(&self.source)?;
        let mut attach = AttachOptions {
            offset: self.offset.unwrap_or(0),
            sizelimit: self.sizelimit,
            read_only: self.read_only,
            partscan: self.partscan,
            sector_size: self.sector_size,
            allow_other: self.allow_other,
            ..AttachOptions::new(image)
        };
        let mut driver_options = Vec::new();

        for option in self.options.iter().flat_map(|list| list.split(',')) {
            match option.split_once('=') {
                _ if option.is_empty() || option == "loop" => {}
                None if option == "ro" => attach.read_only = true,
                None if option == "rw" => attach.read_only = false,
                Some(("offset", value)) => {
                    attach.offset =
                        parse_size(value).map_err(|error| format!("-o offset={value}: {error}"))?
                }
                Some(("sizelimit", value)) => {
                    let limit = parse_size(value)
                        .map_err(|error| format!("-o sizelimit={value}: {error}"))?;
                    attach.sizelimit = Some(limit);
                }
                _ => driver_options.push(option.to_string()),
            }
        }

        Ok(MountOptions {
            attach,
            partition,
            fstype: self.fstype,
            directory: self.directory.clone(),
            driver_options,
        })
    }
}

pub fn run_mount(args: &MountArgs) -> CommandResult {
    let options = args.to_options().map_err(super::UsageError)?;
    let registry = Registry::for_current_user()?;
    mount::mount(&options, &registry)?;
    Ok(())
}

pub fn run_umount(args: &UmountArgs) -> CommandResult {
    let registry = Registry::for_current_user()?;
    mount::umount(&registry, &args.directory)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(arguments: &[&str]) -> MountOptions {
        let cli =
            super::super::Cli::try_parse_from(["loopfuse", "mount"].iter().chain(arguments.iter()))
                .unwrap();
        let super::super::Command::Mount(args) = cli.command else {
            panic!("not a mount command");
        };
        args.to_options().unwrap()
    }

    #[test]
    fn source_names_partition_after_colon() {
        assert_eq!(
            split_source("disk.img:2".as_ref()).unwrap(),
            (PathBuf::from("disk.img"), Some(2))
        );
        assert_eq!(
            split_source("a:b.img".as_ref()).unwrap(),
            (PathBuf::from("a:b.img"), None)
        );
        assert_eq!(
            split_source("disk.img".as_ref()).unwrap(),
            (PathBuf::from("disk.img"), None)
        );
        assert!(split_source("disk.img:0".as_ref()).is_err());
    }

    #[test]
    fn source_may_be_any_bytes() {
        let source = OsStr::from_bytes(b"d\xffisk.img:3");
        assert_eq!(
            split_source(source).unwrap(),
            (PathBuf::from(OsStr::from_bytes(b"d\xffisk.img")), Some(3))
        );
    }

    #[test]
    fn mount_options_split_into_attach_and_driver() {
        let options = parse(&["-o", "ro,offset=1M,fakeroot", "-o", "loop", "d.img", "/mnt"]);

        assert!(options.attach.read_only);
        assert_eq!(options.attach.offset, 1 << 20);
        assert_eq!(options.driver_options, ["fakeroot"]);
        assert_eq!(options.partition, None);
    }

    #[test]
    fn mount_partition_and_type_are_parsed() {
        let options = parse(&["-t", "msdos", "--sizelimit", "4K", "d.img:3", "/mnt"]);

        assert_eq!(options.partition, Some(3));
        assert_eq!(options.fstype, Some(FsType::Vfat));
        assert_eq!(options.attach.sizelimit, Some(4096));
    }
}
