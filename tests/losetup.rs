//! The losetup front: a script written for util-linux losetup runs unchanged through a link
//! named `losetup`, and the output formats match losetup's (golden files in tests/golden,
//! captured from util-linux 2.38.1 by tests/golden/capture.sh).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Sandbox, loopfuse_binary, run_ok, sfdisk};

const MIB: u64 = 1 << 20;

/// A CI step written for util-linux losetup, which must not need a change.
const SCRIPT: &str = r#"set -eu
image=$1
dev=$(losetup -fP --show "$image")
mkfs.ext4 -q "${dev}p1"
mkfs.vfat "${dev}p2" >/dev/null
losetup -j "$image"
losetup -d "$dev"
"#;

/// `loopfuse losetup ARGS`, asserting success; returns standard output.
fn losetup(sandbox: &Sandbox, args: &[&str]) -> String {
    let mut command = sandbox.loopfuse(["losetup"]);
    command.args(args);
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "losetup {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn losetup_script_runs_unchanged() {
    let test = "losetup_script_runs_unchanged";
    let tools = [
        "sfdisk",
        "partx",
        "mkfs.ext4",
        "e2fsck",
        "mkfs.vfat",
        "fsck.vfat",
    ];
    let Some(sandbox) = Sandbox::new(test, &tools) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    sfdisk(&image, "label: gpt\n,20M,L\n,,L\n");
    let bin = sandbox.path("bin");
    fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(loopfuse_binary(), bin.join("losetup")).unwrap();
    let script = sandbox.image_with("ci-step.sh", SCRIPT.as_bytes());
    let path = format!(
        "{}:{}:/usr/sbin:/sbin",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let output = Command::new("sh")
        .arg(&script)
        .arg(&image)
        .env("PATH", path)
        .env("XDG_RUNTIME_DIR", sandbox.path("run"))
        .stdin(Stdio::null())
        .output()
        .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "script failed: {stdout}{stderr}");
    let metadata = fs::metadata(&image).unwrap();
    let expected = format!(
        "/loopfuse/loop0/disk: [{:04}]:{} ({})\n",
        metadata.dev(),
        metadata.ino(),
        image.display()
    );
    assert!(stdout.ends_with(&expected), "{stdout}");
    sandbox.assert_clean();

    let starts = run_ok("partx", ["-g", "-o", "START", image.to_str().unwrap()]);
    let starts: Vec<u64> = starts.lines().map(|l| l.trim().parse().unwrap()).collect();
    let ext4 = format!("{}?offset={}", image.display(), starts[0] * 512);
    run_ok("e2fsck", ["-fn", ext4.as_str()]);
    // The FAT partition runs to the backup GPT at the end; fsck.vfat reads only its own size.
    let fat = fs::read(&image).unwrap()[starts[1] as usize * 512..].to_vec();
    let fat_copy = sandbox.image_with("p2.img", &fat);
    run_ok("fsck.vfat", ["-n".as_ref(), fat_copy.as_os_str()]);
}

/// Replaces the parts of losetup output that differ between runs, as capture.sh does.
struct Normaliser {
    replacements: Vec<(String, &'static str)>,
}

impl Normaliser {
    fn apply(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (from, to) in &self.replacements {
            text = text.replace(from.as_str(), to);
        }
        text
    }

    /// Lines sorted, as capture.sh sorts `-a` and `-j` output.
    fn lines(&self, text: &str) -> String {
        let mut lines: Vec<String> = self.apply(text).lines().map(str::to_string).collect();
        lines.sort();
        lines.iter().map(|line| format!("{line}\n")).collect()
    }

    /// Runs of spaces shrunk to one, as capture.sh does for tables whose column widths
    /// follow the path lengths.
    fn table(&self, text: &str) -> String {
        let mut squeezed = String::new();
        for character in self.apply(text).chars() {
            if !(character == ' ' && squeezed.ends_with(' ')) {
                squeezed.push(character);
            }
        }
        squeezed
    }
}

/// One of the [`Normaliser`] methods, chosen per golden file.
type Normalise = fn(&Normaliser, &str) -> String;

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[test]
fn losetup_output_matches_golden_files() {
    let test = "losetup_output_matches_golden_files";
    let Some(sandbox) = Sandbox::new(test, &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 64 * MIB);
    sfdisk(&image, "label: gpt\n,20M,L\n,,L\n");
    let image_name = image.to_str().unwrap();
    let device0 = losetup(&sandbox, &["-f", "-r", "-P", "--show", image_name]);
    let device1 = losetup(
        &sandbox,
        &[
            "-f",
            "-r",
            "-o",
            "1M",
            "--sizelimit",
            "2M",
            "-b",
            "4096",
            "--show",
            image_name,
        ],
    );
    let (device0, device1) = (device0.trim(), device1.trim());
    let metadata = fs::metadata(&image).unwrap();
    let normaliser = Normaliser {
        replacements: vec![
            (device0.to_string(), "DEVICE0"),
            (device1.to_string(), "DEVICE1"),
            (image_name.to_string(), "IMAGE"),
            (
                format!("[{:04}]:{}", metadata.dev(), metadata.ino()),
                "[DEV]:INO",
            ),
        ],
    };

    let cases: [(&str, Vec<&str>, Normalise); 10] = [
        ("a.txt", vec!["-a"], Normaliser::lines),
        ("j.txt", vec!["-j", image_name], Normaliser::lines),
        (
            "j-offset.txt",
            vec!["-j", image_name, "-o", "1048576"],
            Normaliser::lines,
        ),
        ("show-one.txt", vec![device1], Normaliser::apply),
        ("l.txt", vec!["-l", device0], Normaliser::table),
        ("l-n.txt", vec!["-l", "-n", device1], Normaliser::table),
        (
            "l-O.txt",
            vec![
                "-l",
                "-O",
                "NAME,OFFSET,SIZELIMIT,RO,PARTSCAN,LOG-SEC,BACK-FILE",
                device1,
            ],
            Normaliser::table,
        ),
        ("l-raw.txt", vec!["-l", "--raw", device1], Normaliser::apply),
        ("l-J.txt", vec!["-l", "-J", device0], Normaliser::apply),
        (
            "J-O-j.txt",
            vec![
                "-J",
                "-O",
                "NAME,RO,PARTSCAN,LOG-SEC,BACK-FILE",
                "-j",
                image_name,
                "-o",
                "1048576",
            ],
            Normaliser::apply,
        ),
    ];
    for (file, args, normalise) in cases {
        let output = losetup(&sandbox, &args);
        assert_eq!(
            normalise(&normaliser, &output),
            golden(file),
            "losetup {args:?}"
        );
    }

    // '-b' with a device keeps its size or is rejected, and listing ignores it, as util-linux
    // does.
    assert!(losetup(&sandbox, &["-b", "4096", device1]).is_empty());
    let output = sandbox
        .loopfuse(["losetup", "-b", "4096", device0])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("(512 bytes now)"), "{stderr}");
    assert_eq!(
        normaliser.lines(&losetup(&sandbox, &["-b", "1000", "-a"])),
        golden("a.txt")
    );

    losetup(&sandbox, &["-d", device0, device1]);
    sandbox.assert_clean();
}

#[test]
fn losetup_failures_use_exit_status() {
    let test = "losetup_failures_use_exit_status";
    let Some(sandbox) = Sandbox::new(test, &[]) else {
        return;
    };
    let missing = sandbox.path("run/loopfuse/loop9/disk");

    let output = sandbox.run(["losetup".as_ref(), "-d".as_ref(), missing.as_os_str()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("detach failed"), "{stderr}");

    // util-linux exits 1 for usage errors too, whether it or its parser finds them.
    let output = sandbox.run(["losetup", "-a", "--show"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("allowed during loop device setup only"),
        "{stderr}"
    );
    for arguments in [&["-o", "abc", "-f", "x.img"][..], &["--bogus"]] {
        let output = sandbox
            .loopfuse(["losetup"])
            .args(arguments)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{arguments:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{arguments:?}");
    }
    let help = sandbox.run(["losetup", "--help"]);
    assert!(help.status.success(), "--help");

    let output = sandbox.run(["losetup", "-f"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        stdout.trim_end().ends_with("/loopfuse/loop0/disk"),
        "{stdout}"
    );
    sandbox.assert_clean();
}

/// `losetup -d` of a device that is still open succeeds and detaches it after the last
/// close, as the kernel does with its autoclear flag, instead of failing as busy.
#[test]
fn losetup_detach_of_busy_device_autoclears() {
    let Some(sandbox) = Sandbox::new("losetup_detach_of_busy_device_autoclears", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let image_path = image.to_str().unwrap();
    let device = losetup(&sandbox, &["-f", "--show", image_path]);
    let device = device.trim();

    let holder = fs::File::open(device).unwrap();
    losetup(&sandbox, &["-d", device]);
    let autoclear = losetup(&sandbox, &["-l", "-n", "-O", "AUTOCLEAR", device]);
    assert_eq!(autoclear.trim(), "1");
    assert_eq!(sandbox.list().len(), 1, "detached while still open");

    drop(holder);
    let detached = common::wait_until(std::time::Duration::from_secs(5), || {
        sandbox.list().is_empty()
    });
    assert!(detached, "still attached after the last close");
    sandbox.assert_clean();
}

/// Partition files and images are not loop devices: util-linux rejects `losetup
/// /dev/loop0p1` and `losetup -d IMAGE`, so the front must neither print nor detach the disk.
#[test]
fn losetup_rejects_non_device_arguments() {
    let Some(sandbox) = Sandbox::new("losetup_rejects_non_device_arguments", &["sfdisk"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 16 * MIB);
    sfdisk(&image, "label: dos\n,4M,L\n,,L\n");
    let device = losetup(&sandbox, &["-fP", "--show", image.to_str().unwrap()]);
    let device = device.trim();
    let directory = Path::new(device).parent().unwrap();

    let arguments = [
        (format!("{device}p1"), "it is a partition of loop0"),
        (
            directory.join("p2").display().to_string(),
            "it is a partition of loop0",
        ),
        (image.display().to_string(), "it is the image of loop0"),
        (
            directory.display().to_string(),
            "it is the directory of loop0",
        ),
    ];
    for (argument, expected) in &arguments {
        for args in [vec![argument.as_str()], vec!["-d", argument.as_str()]] {
            let mut command = sandbox.loopfuse(["losetup"]);
            let output = command.args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(output.stdout.is_empty(), "{args:?} printed a device");
            assert!(stderr.contains(expected), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
        }
    }
    assert_eq!(
        sandbox.list().len(),
        1,
        "an argument that is not a device detached it"
    );

    losetup(&sandbox, &["-d", device]);

    // An image attached twice (read-only, so both share it) is rejected the same way.
    let image_name = image.to_str().unwrap();
    let first = losetup(&sandbox, &["-fr", "--show", image_name]);
    let second = losetup(&sandbox, &["-fr", "--show", "-o", "4096", image_name]);
    let output = sandbox
        .loopfuse(["losetup", "-d", image_name])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("it is the image of loop0 and loop1"),
        "{stderr}"
    );
    assert_eq!(sandbox.list().len(), 2, "-d IMAGE detached something");
    losetup(&sandbox, &["-d", first.trim(), second.trim()]);
    sandbox.assert_clean();
}

/// Listings follow the attached file as the kernel does: a renamed image shows its new
/// name, a deleted one `(deleted)`, a new file at its path is not taken for it, and a device
/// whose daemon died is left out.
#[test]
fn losetup_lists_attached_file_and_live_devices() {
    let test = "losetup_lists_attached_file_and_live_devices";
    let Some(sandbox) = Sandbox::new(test, &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let image_path = image.to_str().unwrap();
    let inode = fs::metadata(&image).unwrap().ino();
    let device = losetup(&sandbox, &["-f", "--show", image_path]);
    let device = device.trim();

    let renamed = sandbox.path("renamed.img");
    fs::rename(&image, &renamed).unwrap();
    let listed = losetup(&sandbox, &["-a"]);
    let renamed_path = renamed.to_str().unwrap();
    assert!(
        listed.contains(&format!(":{inode} ({renamed_path})")),
        "{listed}"
    );

    fs::remove_file(&renamed).unwrap();
    let listed = losetup(&sandbox, &["-a"]);
    assert!(
        listed.contains(&format!(":{inode} ({renamed_path} (deleted))")),
        "{listed}"
    );

    sandbox.sparse_image("disk.img", 8 * MIB);
    assert_eq!(losetup(&sandbox, &["-j", image_path]), "");

    let pid = sandbox.daemon_pid("loop0");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let unlisted = common::wait_until(std::time::Duration::from_secs(5), || {
        losetup(&sandbox, &["-a"]).is_empty()
    });
    assert!(unlisted, "a device whose daemon died is still listed");
    let mut command = sandbox.loopfuse(["losetup"]);
    let output = command.arg(device).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "a dead device is shown");

    losetup(&sandbox, &["-d", device]);
    sandbox.assert_clean();
}
