//! Every bad attach request gets a one-line error naming the file and the fix, exit status 1
//! (2 for usage errors), leaves nothing mounted or registered, and leaves the image as it was.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use common::{Sandbox, find_tool, have_tool, is_root, pattern, run, sha256};

/// Asserts a failed attach: its status, a single error line naming `subject` and containing
/// every fragment of `expected`.
fn assert_rejected(output: &Output, status: i32, subject: &str, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(status), "stderr: {stderr}");
    assert!(
        output.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    if status == 1 {
        assert_eq!(stderr.lines().count(), 1, "expected one line: {stderr}");
        assert!(stderr.starts_with("loopfuse: "), "{stderr}");
    }
    assert!(
        stderr.contains(subject),
        "error does not name {subject}: {stderr}"
    );
    for fragment in expected {
        assert!(
            stderr.contains(fragment),
            "error lacks '{fragment}': {stderr}"
        );
    }
}

fn attach_rejected(sandbox: &Sandbox, args: &[&str], subject: &Path, expected: &[&str]) {
    let mut command = sandbox.loopfuse(["attach"]);
    command.args(args).arg(subject);
    let output = command.output().unwrap();

    assert_rejected(&output, 1, &subject.display().to_string(), expected);
    sandbox.assert_clean();
}

#[test]
fn missing_and_special_files_are_rejected() {
    let Some(sandbox) = Sandbox::new("missing_and_special_files_are_rejected", &["mkfifo"]) else {
        return;
    };
    let fifo = sandbox.path("fifo");
    run("mkfifo", [&fifo]);
    let socket_path = sandbox.path("socket");
    let _socket = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    let directory = sandbox.path("directory");
    fs::create_dir(&directory).unwrap();
    let empty = sandbox.image_with("empty.img", &[]);

    attach_rejected(&sandbox, &[], &sandbox.path("missing.img"), &["not found"]);
    let dangling = sandbox.path("dangling.img");
    std::os::unix::fs::symlink("no-directory/missing.img", &dangling).unwrap();
    attach_rejected(
        &sandbox,
        &[],
        &dangling,
        &["symbolic link to no-directory/missing.img"],
    );
    // Through a chain of links, the error names the target that is missing.
    let chained = sandbox.path("chained.img");
    std::os::unix::fs::symlink("dangling.img", &chained).unwrap();
    let missing = "no-directory/missing.img, which does not exist";
    attach_rejected(&sandbox, &[], &chained, &[missing]);
    let in_missing_directory = sandbox.path("no-directory/missing.img");
    attach_rejected(
        &sandbox,
        &[],
        &in_missing_directory,
        &["not found", "no-directory does not exist"],
    );
    // The first missing directory is named, not the image's own.
    let deep = sandbox.path("no-directory/inner/missing.img");
    let outer = format!(
        "directory {} does not exist",
        sandbox.path("no-directory").display()
    );
    attach_rejected(&sandbox, &[], &deep, &[&outer]);
    // A directory this user may not enter is named (root may enter any).
    if !is_root() {
        let closed = sandbox.path("closed");
        fs::create_dir(&closed).unwrap();
        let image = closed.join("disk.img");
        fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o600)).unwrap();
        let fragment = format!("may not enter the directory {}", closed.display());
        attach_rejected(&sandbox, &[], &image, &[&fragment]);
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).unwrap();
    }
    attach_rejected(&sandbox, &[], &directory, &["is a directory"]);
    attach_rejected(&sandbox, &[], &fifo, &["is a FIFO"]);
    attach_rejected(&sandbox, &[], &socket_path, &["is a socket"]);
    attach_rejected(&sandbox, &[], &empty, &["empty", "truncate -s"]);

    // The registry keeps paths in JSON, which cannot hold such a name.
    let not_utf8 = sandbox
        .path("")
        .join(std::ffi::OsStr::from_bytes(b"\xff\xfe.img"));
    fs::write(&not_utf8, vec![0u8; 1 << 20]).unwrap();
    attach_rejected(&sandbox, &[], &not_utf8, &["not valid UTF-8", "rename"]);
}

/// `mount` and the losetup front take such names too, and must name them in the error
/// instead of failing in argument parsing or in the registry.
#[test]
fn non_utf8_names_in_mount_and_losetup() {
    let Some(sandbox) = Sandbox::new("non_utf8_names_in_mount_and_losetup", &[]) else {
        return;
    };
    let image = sandbox.image_with("disk.img", &pattern(1 << 20, 3));
    let not_utf8 = sandbox
        .path("")
        .join(std::ffi::OsStr::from_bytes(b"\xff.img"));
    fs::write(&not_utf8, pattern(1 << 20, 3)).unwrap();
    let directory = sandbox
        .path("")
        .join(std::ffi::OsStr::from_bytes(b"mnt\xff"));
    fs::create_dir(&directory).unwrap();
    let good_directory = sandbox.path("mnt");
    fs::create_dir(&good_directory).unwrap();

    let cases = [
        (
            vec![
                "mount".as_ref(),
                not_utf8.as_os_str(),
                good_directory.as_os_str(),
            ],
            &not_utf8,
        ),
        (
            vec!["mount".as_ref(), image.as_os_str(), directory.as_os_str()],
            &directory,
        ),
        (
            vec!["losetup".as_ref(), "-f".as_ref(), not_utf8.as_os_str()],
            &not_utf8,
        ),
        (
            vec![
                "attach".as_ref(),
                "--pidfile".as_ref(),
                not_utf8.as_os_str(),
                image.as_os_str(),
            ],
            &not_utf8,
        ),
    ];
    for (args, subject) in cases {
        let output = sandbox.run(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&subject.display().to_string()), "{stderr}");
        assert!(stderr.contains("not valid UTF-8"), "{stderr}");
        sandbox.assert_clean();
    }
    assert_eq!(fs::read(&not_utf8).unwrap(), pattern(1 << 20, 3));
}

#[test]
fn windows_outside_image_are_rejected() {
    let Some(sandbox) = Sandbox::new("windows_outside_image_are_rejected", &[]) else {
        return;
    };
    let image = sandbox.image_with("disk.img", &pattern(1 << 20, 1));
    let before = sha256(&image);

    attach_rejected(
        &sandbox,
        &["--offset", "1M"],
        &image,
        &["offset 1048576", "past the end"],
    );
    attach_rejected(&sandbox, &["--offset", "2M"], &image, &["past the end"]);
    assert_eq!(sha256(&image), before);
}

#[test]
fn malformed_sizes_are_usage_errors() {
    let Some(sandbox) = Sandbox::new("malformed_sizes_are_usage_errors", &[]) else {
        return;
    };
    let image = sandbox.image_with("disk.img", &pattern(1 << 20, 2));

    for (option, value) in [
        ("--offset", "12Q"),
        ("--sizelimit", "1.5"),
        ("--offset", "-4"),
        ("--sizelimit", "-1M"),
        ("-b", "777"),
    ] {
        let output = sandbox
            .loopfuse(["attach", option, value])
            .arg(&image)
            .output()
            .unwrap();
        // A negative size is a bad size, not an unknown option.
        let expected: &[&str] = if value.starts_with('-') {
            &["invalid size"]
        } else {
            &[]
        };
        assert_rejected(&output, 2, value, expected);
    }
    sandbox.assert_clean();
}

#[test]
fn second_read_write_attach_is_rejected() {
    let Some(sandbox) = Sandbox::new("second_read_write_attach_is_rejected", &[]) else {
        return;
    };
    let image = sandbox.image_with("disk.img", &pattern(1 << 20, 3));
    let device = sandbox.attach([&image]);

    for args in [&[][..], &["-r"][..], &["--offset", "4096"][..]] {
        let output = sandbox
            .loopfuse(["attach"])
            .args(args)
            .arg(&image)
            .output()
            .unwrap();
        assert_rejected(
            &output,
            1,
            &image.display().to_string(),
            &["already attached read-write as loop0"],
        );
    }
    assert_eq!(sandbox.list().len(), 1);

    sandbox.detach(&device);
    sandbox.assert_clean();
}

#[test]
fn container_formats_are_rejected() {
    let Some(sandbox) = Sandbox::new("container_formats_are_rejected", &["qemu-img", "gzip"])
    else {
        return;
    };
    for format in ["qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed"] {
        let image = sandbox.path(&format!("disk.{format}"));
        let qemu_img = find_tool("qemu-img").unwrap();
        let output = std::process::Command::new(qemu_img)
            .args(["create", "-q", "-f", format])
            .arg(&image)
            .arg("64M")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "qemu-img create -f {format}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let before = sha256(&image);

        attach_rejected(
            &sandbox,
            &[],
            &image,
            &[&format!("is a {format} image"), "qemu-img convert -O raw"],
        );
        assert_eq!(sha256(&image), before, "{format} image changed");
    }

    let compressed = sandbox.image_with("disk.img", &pattern(1 << 20, 4));
    common::run_ok("gzip", ["-k".as_ref(), compressed.as_os_str()]);
    attach_rejected(
        &sandbox,
        &[],
        &sandbox.path("disk.img.gz"),
        &["gzip compressed", "decompress"],
    );
}

#[test]
fn unusable_fuse_device_is_explained() {
    let test = "unusable_fuse_device_is_explained";
    if !is_root() || !have_tool("unshare") {
        eprintln!(
            "SKIP {test}: replacing /dev in a private mount namespace needs root and unshare"
        );
        return;
    }
    let Some(sandbox) = Sandbox::new(test, &["setpriv"]) else {
        return;
    };
    let image = sandbox.image_with("disk.img", &pattern(1 << 20, 5));
    fs::set_permissions(&image, fs::Permissions::from_mode(0o666)).unwrap();
    let runtime = sandbox.path("nobody-run");
    fs::create_dir(&runtime).unwrap();
    nix::unistd::chown(&runtime, Some(65534.into()), Some(65534.into())).unwrap();
    fs::set_permissions(sandbox.path(""), fs::Permissions::from_mode(0o755)).unwrap();
    let binary = common::loopfuse_binary();
    let binary = binary.display();

    // No /dev/fuse at all, as in a container started without '--device /dev/fuse'.
    let script = format!(
        "mount -t tmpfs none /dev && exec {binary} attach {}",
        image.display()
    );
    let output = run("unshare", ["-m", "sh", "-c", &script]);
    assert_rejected(
        &output,
        1,
        "/dev/fuse",
        &["not found", "modprobe fuse", "--device /dev/fuse"],
    );

    // A /dev/fuse that the user cannot open, as on a system without udev rules.
    let script = format!(
        "mount -t tmpfs none /dev && mknod -m 600 /dev/fuse c 10 229 && mknod -m 666 /dev/null c 1 3 && \
         XDG_RUNTIME_DIR={} exec setpriv --reuid=65534 --regid=65534 --clear-groups {binary} attach {}",
        runtime.display(),
        image.display()
    );
    let output = run("unshare", ["-m", "sh", "-c", &script]);
    assert_rejected(
        &output,
        1,
        "/dev/fuse",
        &["permission denied", "chmod 0666 /dev/fuse"],
    );
    sandbox.assert_clean();
}

#[test]
fn missing_fusermount_is_explained() {
    let test = "missing_fusermount_is_explained";
    if is_root() {
        eprintln!("SKIP {test}: root mounts without fusermount3; the unprivileged run covers this");
        return;
    }
    let Some(sandbox) = Sandbox::new(test, &[]) else {
        return;
    };
    let image = sandbox.image_with("disk.img", &pattern(1 << 20, 6));

    let output = sandbox
        .loopfuse(["attach"])
        .arg(&image)
        .env("PATH", "/nonexistent")
        .env_remove("FUSERMOUNT_PATH")
        .output()
        .unwrap();
    assert_rejected(
        &output,
        1,
        "fusermount3",
        // /usr/bin/fusermount3 exists here, so the fix is to repair PATH, not to install.
        &["not found in PATH", "add /usr/bin to PATH"],
    );
    sandbox.assert_clean();
}
