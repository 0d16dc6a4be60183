use clap::Parser;

use super::*;
use crate::cli::{Cli, Command};

fn parse(arguments: &[&str]) -> LosetupArgs {
    let cli = Cli::try_parse_from(["loopfuse", "losetup"].iter().chain(arguments)).unwrap();
    match cli.command {
        Command::Losetup(args) => args,
        other => panic!("parsed as {other:?}"),
    }
}

fn action(arguments: &[&str]) -> Result<Action, String> {
    parse(arguments).action()
}

#[test]
fn find_with_file_attaches() {
    assert_eq!(
        action(&["-fP", "--show", "disk.img"]),
        Ok(Action::Attach {
            file: PathBuf::from("disk.img")
        })
    );
    assert_eq!(action(&["-f"]), Ok(Action::FindFree));
}

#[test]
fn detach_takes_more_devices() {
    assert_eq!(
        action(&["-d", "/a/disk", "/b/disk"]),
        Ok(Action::Detach {
            devices: vec!["/a/disk".to_string(), "/b/disk".to_string()]
        })
    );
    assert_eq!(action(&["-D"]), Ok(Action::DetachAll));
}

#[test]
fn listing_actions_follow_losetup() {
    assert_eq!(action(&[]), Ok(Action::Show { file: None }));
    assert_eq!(action(&["-a"]), Ok(Action::Show { file: None }));
    assert_eq!(action(&["-l"]), Ok(Action::Show { file: None }));
    assert_eq!(
        action(&["-j", "disk.img", "-o", "512"]),
        Ok(Action::Show {
            file: Some(PathBuf::from("disk.img"))
        })
    );
    assert_eq!(
        action(&["-l", "/r/loop0/disk"]),
        Ok(Action::ShowOne {
            device: "/r/loop0/disk".to_string()
        })
    );
}

#[test]
fn list_style_follows_losetup() {
    assert!(parse(&[]).lists());
    assert!(parse(&["-J"]).lists());
    assert!(parse(&["-O", "NAME"]).lists());
    // losetup prints -a lines for -J with a device or -j: JSON needs --list.
    assert!(!parse(&["-J", "/r/loop0/disk"]).lists());
    assert!(!parse(&["-a"]).lists());
}

#[test]
fn setup_options_outside_setup_are_rejected() {
    let error = action(&["-a", "--show"]).unwrap_err();
    assert!(
        error.contains("allowed during loop device setup only"),
        "{error}"
    );

    let error = action(&["-a", "-o", "512"]).unwrap_err();
    assert!(error.contains("--offset is not allowed"), "{error}");
}

#[test]
fn sector_size_checked_where_used() {
    assert_eq!(
        action(&["-b", "4096", "-a"]),
        Ok(Action::Show { file: None })
    );
    assert_eq!(
        action(&["-b", "1000", "-a"]),
        Ok(Action::Show { file: None })
    );
    assert_eq!(
        action(&["-b", "4096", "/r/loop0/disk"]),
        Ok(Action::KeepSectorSize {
            device: "/r/loop0/disk".to_string(),
            sector_size: 4096
        })
    );
    let error = action(&["-b", "1000", "-f", "x.img"]).unwrap_err();
    assert!(error.contains("invalid sector size 1000"), "{error}");
}

#[test]
fn unsupported_requests_say_why() {
    assert!(
        action(&["/dev/loop0", "disk.img"])
            .unwrap_err()
            .contains("-f --show")
    );
    assert!(
        action(&["-c", "/r/loop0/disk"])
            .unwrap_err()
            .contains("set-capacity")
    );
    assert!(
        action(&["--direct-io", "-f", "x.img"])
            .unwrap_err()
            .contains("direct-io")
    );
    assert!(action(&["-f", "--direct-io=off", "x.img"]).is_ok());
}

#[test]
fn exclusive_options_are_usage_errors() {
    let cli = Cli::try_parse_from(["loopfuse", "losetup", "-a", "-d", "x"]);
    assert!(cli.is_err());
    let cli = Cli::try_parse_from(["loopfuse", "losetup", "-J", "--raw"]);
    assert!(cli.is_err());
}

#[test]
fn associated_file_may_start_with_dash() {
    assert_eq!(
        action(&["-j", "-x.img"]),
        Ok(Action::Show {
            file: Some(PathBuf::from("-x.img"))
        })
    );
}
