//! Attachments that end by themselves: `loopfuse run` whatever becomes of its command,
//! `--autoclear` after the last close, `--until-exit` when a process exits, and the PID
//! file and readiness notification of `attach --foreground`. Every test checks that no
//! mount, registry entry or daemon is left.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::unprivileged::Unprivileged;
use common::{Sandbox, find_tool, pattern, wait_until};
use loopfuse::registry::{AttachmentState, ProcessId};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const MIB: u64 = 1 << 20;

/// Shell lines that copy the state file of the attachment to `$OUT/state.json`, so the test
/// learns the daemon's PID and start time.
const SAVE_STATE: &str = r#"cp "$LOOPFUSE_DIR.json" "$OUT/state.json" || exit 90"#;

/// Starts `loopfuse run IMAGE -- sh -c SCRIPT` with `$OUT` set to the sandbox directory.
fn run_command(sandbox: &Sandbox, options: &[&str], image: &Path, script: &str) -> Command {
    let mut command = sandbox.loopfuse(["run"]);
    command
        .args(options)
        .arg(image)
        .args(["--", "sh", "-c", script])
        .env("OUT", sandbox.path(""));
    command
}

/// Reads the state file saved by [`SAVE_STATE`].
fn saved_state(sandbox: &Sandbox) -> AttachmentState {
    let text = fs::read_to_string(sandbox.path("state.json")).expect("the command saved state");
    serde_json::from_str(&text).unwrap()
}

/// Asserts that nothing of the run is left: no mount, no entry, no daemon.
fn assert_run_left_nothing(sandbox: &Sandbox) {
    let daemon = saved_state(sandbox).pid;
    assert!(
        wait_until(Duration::from_secs(2), || !daemon.is_running()),
        "daemon {} still runs",
        daemon.pid
    );
    sandbox.assert_clean();
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits for the file `ready` that a command creates once it runs.
fn wait_for_ready(sandbox: &Sandbox, child: &mut Child) {
    let ready = sandbox.path("ready");
    let started = wait_until(Duration::from_secs(10), || {
        ready.exists() || child.try_wait().unwrap().is_some()
    });
    assert!(started, "the command did not start within 10 s");
    assert!(ready.exists(), "the command exited before it was ready");
}

#[test]
fn run_success_exports_device_and_cleans_up() {
    let test = "run_success_exports_device_and_cleans_up";
    let Some(sandbox) = Sandbox::new(test, &["dd", "cp"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let script = format!(
        r#"test "$LOOPFUSE_DEV" = "$LOOPFUSE_DIR/disk" || exit 91
        test -f "$LOOPFUSE_DEV" || exit 92
        printf hello | dd of="$LOOPFUSE_DEV" conv=notrunc status=none || exit 93
        {SAVE_STATE}"#
    );

    let output = run_command(&sandbox, &[], &image, &script)
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    assert_eq!(&fs::read(&image).unwrap()[..5], b"hello");
    assert_run_left_nothing(&sandbox);
}

#[test]
fn run_failure_keeps_command_status() {
    let Some(sandbox) = Sandbox::new("run_failure_keeps_command_status", &["cp"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let script = format!("{SAVE_STATE}\nexit 3");

    let output = run_command(&sandbox, &[], &image, &script)
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(3), "{}", stderr_of(&output));
    assert_run_left_nothing(&sandbox);
}

#[test]
fn run_forwards_ending_signals() {
    let Some(sandbox) = Sandbox::new("run_forwards_ending_signals", &["cp", "sleep"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    // The device stays open in the command until the signal ends it.
    let script = format!(
        r#"exec 3<>"$LOOPFUSE_DEV"
        {SAVE_STATE}
        touch "$OUT/ready"
        exec sleep 60"#
    );

    let signals = [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
    ];
    for signal in signals {
        let _ = fs::remove_file(sandbox.path("ready"));
        let mut child = run_command(&sandbox, &[], &image, &script)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_ready(&sandbox, &mut child);

        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let output = child.wait_with_output().unwrap();

        assert_eq!(
            output.status.code(),
            Some(128 + signal as i32),
            "{signal}: {}",
            stderr_of(&output)
        );
        assert_run_left_nothing(&sandbox);
    }
}

/// A daemon killed while the command runs may have lost writes, so run reports it and exits 1,
/// even though the command succeeded.
#[test]
fn run_fails_when_daemon_dies() {
    let Some(sandbox) = Sandbox::new("run_fails_when_daemon_dies", &["cp", "sleep"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let script = format!(
        r#"{SAVE_STATE}
        touch "$OUT/ready"
        while [ ! -e "$OUT/go" ]; do sleep 0.05; done"#
    );
    let mut child = run_command(&sandbox, &[], &image, &script)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_ready(&sandbox, &mut child);

    let daemon = saved_state(&sandbox).pid;
    kill(Pid::from_raw(daemon.pid), Signal::SIGKILL).unwrap();
    assert!(wait_until(Duration::from_secs(3), || !daemon.is_running()));
    fs::write(sandbox.path("go"), b"").unwrap();
    let output = child.wait_with_output().unwrap();

    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stopped while the command ran"), "{stderr}");
    sandbox.assert_clean();
}

#[test]
fn run_killed_by_sigkill_leaves_nothing() {
    let Some(sandbox) = Sandbox::new("run_killed_by_sigkill_leaves_nothing", &["cp", "sleep"])
    else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let script = format!(
        r#"{SAVE_STATE}
        echo $$ > "$OUT/command.pid"
        touch "$OUT/ready"
        exec sleep 60"#
    );
    let mut child = run_command(&sandbox, &[], &image, &script).spawn().unwrap();
    wait_for_ready(&sandbox, &mut child);

    let command: i32 = fs::read_to_string(sandbox.path("command.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let command = ProcessId::of(command).expect("the command runs");

    // SIGKILL cannot be forwarded; the daemon notices that run is gone and detaches, and
    // the command gets SIGTERM from the kernel as run dies.
    child.kill().unwrap();
    child.wait().unwrap();
    let daemon = saved_state(&sandbox).pid;
    let detached = wait_until(Duration::from_secs(3), || !daemon.is_running());
    let command_ended = wait_until(Duration::from_secs(3), || !command.is_running());

    let _ = kill(Pid::from_raw(command.pid), Signal::SIGKILL);
    assert!(detached, "daemon {} still runs", daemon.pid);
    assert!(command_ended, "command {} still runs", command.pid);
    sandbox.assert_clean();
}

#[test]
fn run_with_partscan_exports_partitions() {
    let test = "run_with_partscan_exports_partitions";
    let Some(sandbox) = Sandbox::new(test, &["sfdisk", "stat", "cp"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 16 * MIB);
    let mut sfdisk = Command::new(find_tool("sfdisk").unwrap())
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&image)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\n,4MiB,L\n,,L\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let script = format!(
        r#"test "$LOOPFUSE_P1" = "$LOOPFUSE_DIR/p1" || exit 91
        stat -c %s "$LOOPFUSE_P1" "$LOOPFUSE_P2" > "$OUT/sizes" || exit 92
        {SAVE_STATE}"#
    );

    let output = run_command(&sandbox, &["-P"], &image, &script)
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let sizes = fs::read_to_string(sandbox.path("sizes")).unwrap();
    let sizes: Vec<&str> = sizes.lines().collect();
    assert_eq!(sizes[0], (4 * MIB).to_string());
    assert_eq!(sizes.len(), 2, "two partitions: {sizes:?}");
    assert_run_left_nothing(&sandbox);
}

#[test]
fn run_of_missing_command_exits_127() {
    let Some(sandbox) = Sandbox::new("run_of_missing_command_exits_127", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);

    let output = sandbox
        .loopfuse(["run".as_ref(), image.as_os_str(), "--".as_ref()])
        .arg("loopfuse-no-such-command")
        .output()
        .unwrap();

    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(127), "{stderr}");
    assert!(
        stderr.contains("loopfuse-no-such-command: command not found"),
        "{stderr}"
    );

    // execvp fails with EACCES when a directory of PATH cannot be searched, and with EACCES
    // too for a file found there without execute permission: only the second is 126.
    let closed = sandbox.path("closed");
    let tools = sandbox.path("tools");
    fs::create_dir(&closed).unwrap();
    fs::create_dir(&tools).unwrap();
    fs::write(tools.join("loopfuse-not-executable"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o000)).unwrap();
    let system_path = std::env::var_os("PATH").unwrap_or_default();
    let mut search_path = vec![closed.clone(), tools.clone()];
    search_path.extend(std::env::split_paths(&system_path));
    let search_path = std::env::join_paths(search_path).unwrap();
    for (command, expected) in [
        ("loopfuse-no-such-command", 127),
        ("loopfuse-not-executable", 126),
    ] {
        let output = sandbox
            .loopfuse(["run".as_ref(), image.as_os_str(), "--".as_ref()])
            .arg(command)
            .env("PATH", &search_path)
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(expected),
            "{command}: {}",
            stderr_of(&output)
        );
    }
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o755)).unwrap();

    // A missing or non-executable interpreter, a path to no file and a directory fail with
    // bash's status, each with its own reason.
    let script = tools.join("loopfuse-bad-interpreter");
    fs::write(&script, "#!/nonexistent/interpreter -e\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let crlf = tools.join("loopfuse-crlf");
    fs::write(&crlf, "#!/bin/sh\r\ntrue\r\n").unwrap();
    fs::set_permissions(&crlf, fs::Permissions::from_mode(0o755)).unwrap();
    let plain_file = tools.join("plain-file");
    fs::write(&plain_file, "text\n").unwrap();
    let wrong_interpreter = tools.join("loopfuse-interpreter-not-executable");
    fs::write(&wrong_interpreter, format!("#!{}\n", plain_file.display())).unwrap();
    fs::set_permissions(&wrong_interpreter, fs::Permissions::from_mode(0o755)).unwrap();
    let missing = sandbox.path("no-such-file");
    for (command, status, reason) in [
        (
            script.as_os_str(),
            127,
            "interpreter '/nonexistent/interpreter' was not found",
        ),
        (
            crlf.as_os_str(),
            127,
            "interpreter '/bin/sh\\r' was not found",
        ),
        (missing.as_os_str(), 127, "no such file"),
        (
            wrong_interpreter.as_os_str(),
            126,
            "plain-file' is not an executable",
        ),
        (tools.as_os_str(), 126, "is a directory"),
    ] {
        let output = sandbox
            .loopfuse(["run".as_ref(), image.as_os_str(), "--".as_ref(), command])
            .output()
            .unwrap();
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(status), "{stderr}");
        assert!(stderr.contains(reason), "{reason}: {stderr}");
    }
    sandbox.assert_clean();
}

#[test]
fn run_without_command_is_usage_error() {
    let Some(sandbox) = Sandbox::new("run_without_command_is_usage_error", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);

    let output = sandbox
        .loopfuse(["run".as_ref(), image.as_os_str()])
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
    sandbox.assert_clean();
}

#[test]
fn run_without_fusermount_uses_user_namespace() {
    let test = "run_without_fusermount_uses_user_namespace";
    let Some(sandbox) = Sandbox::new(test, &["setpriv", "unshare", "dd", "cp"]) else {
        return;
    };
    let user = Unprivileged::new(&sandbox, &["env", "sh", "dd", "cp", "grep"]);
    let image = user.image_with("disk.img", &pattern(MIB as usize, 1));
    let out = user.writable_directory("out");
    // The command saves the state file and its own mount table.
    let script = r#"cp "$LOOPFUSE_DIR.json" "$OUT/state.json" || exit 90
        grep " $LOOPFUSE_DIR " /proc/self/mountinfo > "$OUT/mountinfo" || exit 91
        printf hello | dd of="$LOOPFUSE_DEV" conv=notrunc status=none || exit 92"#;
    let run = |user: &Unprivileged| {
        let mut command = user.loopfuse(["run".as_ref(), image.as_os_str()]);
        command.args([
            "--",
            "env",
            &format!("OUT={}", out.display()),
            "sh",
            "-c",
            script,
        ]);
        command.output().unwrap()
    };

    if !user.may_create_user_namespace() {
        // Where the kernel or a seccomp filter forbids user namespaces, run and doctor
        // report that.
        let output = run(&user);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("not found in PATH"), "{stderr}");
        assert!(
            stderr.contains("mounting in a private user namespace instead failed too"),
            "{stderr}"
        );
        let doctor = user.loopfuse(["doctor"]).output().unwrap();
        let report = String::from_utf8_lossy(&doctor.stdout);
        assert_eq!(doctor.status.code(), Some(1), "{report}");
        assert!(
            report.contains("FAIL user namespaces: a trial unshare failed"),
            "{report}"
        );
        eprintln!("NOTE {test}: user namespaces are not allowed here; checked the explanation");
        return;
    }

    let output = run(&user);

    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    assert_eq!(&fs::read(&image).unwrap()[..5], b"hello");
    let mountinfo = fs::read_to_string(out.join("mountinfo")).unwrap();
    assert!(mountinfo.contains(" - fuse loopfuse "), "{mountinfo}");
    assert_eq!(
        sandbox.mounts(),
        Vec::<String>::new(),
        "mount visible outside"
    );
    let state: AttachmentState =
        serde_json::from_str(&fs::read_to_string(out.join("state.json")).unwrap()).unwrap();
    assert!(wait_until(Duration::from_secs(2), || !state
        .pid
        .is_running()));
    assert_eq!(user.list(), Vec::<serde_json::Value>::new());

    // attach cannot use the namespace, and its error points to run.
    let output = user
        .loopfuse(["attach".as_ref(), image.as_os_str()])
        .output()
        .unwrap();
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("'loopfuse run IMAGE -- COMMAND' can still attach"),
        "{stderr}"
    );
    assert!(stderr.contains("loopfuse doctor"), "{stderr}");
    assert_eq!(user.list(), Vec::<serde_json::Value>::new());
}

/// Asserts that an autoclear attachment is gone within a second of its last close.
fn assert_autoclear_detached(sandbox: &Sandbox) {
    let unmounted = wait_until(Duration::from_secs(1), || sandbox.mounts().is_empty());
    assert!(unmounted, "still mounted a second after the last close");
    let unregistered = wait_until(Duration::from_secs(1), || sandbox.list().is_empty());
    assert!(unregistered, "still registered after the unmount");
    sandbox.assert_clean();
}

#[test]
fn autoclear_detaches_after_last_close() {
    let Some(sandbox) = Sandbox::new("autoclear_detaches_after_last_close", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let device = sandbox.attach(["--autoclear".as_ref(), image.as_os_str()]);

    // Never opened: the attachment stays.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sandbox.list().len(), 1, "detached before any open");

    drop(File::open(&device).unwrap());

    assert_autoclear_detached(&sandbox);
}

#[test]
fn autoclear_waits_for_every_close() {
    let Some(sandbox) = Sandbox::new("autoclear_waits_for_every_close", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let device = sandbox.attach(["--autoclear".as_ref(), image.as_os_str()]);
    let first = File::open(&device).unwrap();
    let second = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .unwrap();

    drop(first);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sandbox.mounts().len(), 1, "detached while a file was open");
    assert_eq!(sandbox.list().len(), 1);

    drop(second);
    assert_autoclear_detached(&sandbox);
}

#[test]
fn until_exit_detaches_when_process_exits() {
    let Some(sandbox) = Sandbox::new("until_exit_detaches_when_process_exits", &["sleep"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let mut owner = Command::new(find_tool("sleep").unwrap())
        .arg("60")
        .spawn()
        .unwrap();
    let owner_pid = owner.id().to_string();
    sandbox.attach([
        "--until-exit".as_ref(),
        owner_pid.as_ref(),
        image.as_os_str(),
    ]);
    assert_eq!(sandbox.list().len(), 1);

    owner.kill().unwrap();
    owner.wait().unwrap();

    let gone = wait_until(Duration::from_secs(2), || sandbox.list().is_empty());
    assert!(gone, "still attached after the process exited");
    sandbox.assert_clean();
}

#[test]
fn until_exit_rejects_missing_process() {
    let Some(sandbox) = Sandbox::new("until_exit_rejects_missing_process", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let missing = i32::MAX.to_string();

    let output = sandbox
        .loopfuse(["attach", "--until-exit", &missing])
        .arg(&image)
        .output()
        .unwrap();

    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("--until-exit {missing}: no such process")),
        "{stderr}"
    );
    sandbox.assert_clean();
}

/// Binds a notification socket at a path or under an abstract name and returns it with
/// the `NOTIFY_SOCKET` value that names it.
fn notification_socket(sandbox: &Sandbox, abstract_name: bool) -> (UnixDatagram, String) {
    if abstract_name {
        let name = format!("loopfuse-test-notify-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        (
            UnixDatagram::bind_addr(&address).unwrap(),
            format!("@{name}"),
        )
    } else {
        let path = sandbox.path("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        (socket, path.display().to_string())
    }
}

#[test]
fn foreground_writes_pidfile_and_notifies() {
    let Some(sandbox) = Sandbox::new("foreground_writes_pidfile_and_notifies", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let pidfile = sandbox.path("loop.pid");

    for abstract_name in [false, true] {
        let (socket, address) = notification_socket(&sandbox, abstract_name);
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let child = sandbox
            .loopfuse(["attach", "--foreground", "--pidfile"])
            .arg(&pidfile)
            .arg(&image)
            .env("NOTIFY_SOCKET", &address)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();

        let mut message = [0; 64];
        let count = socket.recv(&mut message).expect("READY=1 within 10 s");
        assert_eq!(&message[..count], b"READY=1", "{address}");
        assert_eq!(
            fs::read_to_string(&pidfile).unwrap(),
            format!("{}\n", child.id())
        );
        assert_eq!(sandbox.list().len(), 1);

        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{address}: {:?}", output.status);
        let device = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
        assert!(device.ends_with("loop0/disk"), "{}", device.display());
        assert!(!pidfile.exists(), "PID file left behind");
        sandbox.assert_clean();
    }
}

#[test]
fn background_attach_writes_pidfile_of_daemon() {
    let Some(sandbox) = Sandbox::new("background_attach_writes_pidfile_of_daemon", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let pidfile = sandbox.path("loop.pid");

    let device = sandbox.attach(["--pidfile".as_ref(), pidfile.as_os_str(), image.as_os_str()]);
    let written: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(written, sandbox.daemon_pid("loop0"));

    sandbox.detach(&device);
    assert!(!pidfile.exists(), "PID file left behind");
    sandbox.assert_clean();
}

/// A PID file that cannot be written fails the attach and leaves no temporary file.
#[test]
fn unwritable_pidfile_leaves_nothing() {
    let Some(sandbox) = Sandbox::new("unwritable_pidfile_leaves_nothing", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let directory = sandbox.path("pid-directory");
    fs::create_dir(&directory).unwrap();

    let mut command = sandbox.loopfuse(["attach", "--pidfile"]);
    let output = command.arg(&directory).arg(&image).output().unwrap();

    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    assert!(stderr_of(&output).contains("cannot write the PID file"));
    let mut temporary = directory.clone().into_os_string();
    temporary.push(".tmp");
    assert!(
        !Path::new(&temporary).exists(),
        "temporary PID file left behind"
    );
    sandbox.assert_clean();
}

/// Regression: the command inherited the signal mask that `run` uses to catch the signals it
/// forwards, so a SIGTERM for a command like `sleep` stayed pending until it ended by itself.
/// A shell resets its mask at start, so the command here is `grep` itself. It must not
/// inherit an ignored SIGPIPE either.
#[test]
fn run_command_starts_with_signals_unblocked() {
    let Some(sandbox) = Sandbox::new("run_command_starts_with_signals_unblocked", &["grep"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);

    let mut command = sandbox.loopfuse(["run"]);
    command
        .arg(&image)
        .args(["--", "grep", "-E", "SigBlk|SigIgn", "/proc/self/status"]);
    let output = command.output().unwrap();

    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("SigBlk:\t0000000000000000"), "{stdout}");
    // The Rust runtime ignores SIGPIPE; the command must get its default action back, or
    // `yes | head -1` fails with "Broken pipe" inside `run` only.
    let ignored = stdout
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:\t"))
        .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        ignored & (1 << (libc::SIGPIPE - 1)),
        0,
        "SIGPIPE is ignored: {stdout}"
    );
    sandbox.assert_clean();
}

/// A PID file of a daemon killed with SIGKILL is removed when `detach` cleans up after it.
#[test]
fn detach_removes_dead_daemons_pidfile() {
    let Some(sandbox) = Sandbox::new("detach_removes_dead_daemons_pidfile", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let pidfile = sandbox.path("loop.pid");
    let mut arguments = vec![std::ffi::OsStr::new("--pidfile"), pidfile.as_os_str()];
    arguments.push(image.as_os_str());
    sandbox.attach(arguments);

    let daemon = sandbox.daemon_pid("loop0");
    assert_eq!(
        fs::read_to_string(&pidfile).unwrap().trim(),
        daemon.to_string()
    );
    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    let stale = wait_until(Duration::from_secs(3), || {
        sandbox.list()[0]["state"] == "stale"
    });
    assert!(stale, "the daemon still looks alive");

    sandbox.detach("loop0");
    assert!(!pidfile.exists(), "PID file left behind");
    sandbox.assert_clean();
}

/// A new file put where an attached image was deleted is another file, as for the kernel
/// loop driver: errors and `detach IMAGE` name the attachment of the new file.
#[test]
fn replaced_image_is_another_file() {
    let Some(sandbox) = Sandbox::new("replaced_image_is_another_file", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let first = sandbox.attach([image.as_os_str()]);
    fs::remove_file(&image).unwrap();
    sandbox.sparse_image("disk.img", 8 * MIB);
    let listed = sandbox.list()[0]["image"].as_str().unwrap().to_string();
    assert_eq!(listed, format!("{} (deleted)", image.display()));

    let mut command = sandbox.loopfuse(["detach"]);
    let output = command.arg(&image).output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "detached the deleted file's attachment"
    );
    assert_eq!(sandbox.list().len(), 1);

    sandbox.attach([image.as_os_str()]);
    let mut command = sandbox.loopfuse(["attach"]);
    let output = command.arg(&image).output().unwrap();
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("as loop1"), "{stderr}");

    sandbox.detach(image.as_os_str());
    assert_eq!(
        sandbox.list().len(),
        1,
        "detach IMAGE took the wrong attachment"
    );
    assert_eq!(sandbox.list()[0]["name"], "loop0");
    sandbox.detach(&first);
    sandbox.assert_clean();
}

/// Paths through symbolic links and `..` reach the same attachment. With a runtime directory
/// given through a link, detach used to look for the mount under the link's name and wait
/// 120 s for a daemon that nothing had stopped. Device paths may contain `..` or links.
#[test]
fn linked_paths_reach_attachment() {
    let Some(sandbox) = Sandbox::new("linked_paths_reach_attachment", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let linked_runtime = sandbox.path("run-link");
    std::os::unix::fs::symlink(sandbox.path("run"), &linked_runtime).unwrap();
    let through_link = |args: &[&std::ffi::OsStr]| {
        let mut command = sandbox.loopfuse(args);
        command.env("XDG_RUNTIME_DIR", &linked_runtime);
        command
    };

    let output = through_link(&["attach".as_ref(), image.as_os_str()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let device = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
    assert!(
        device.starts_with(sandbox.path("run")),
        "{}",
        device.display()
    );

    let mut detach = through_link(&["detach".as_ref(), "loop0".as_ref()])
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(20), || {
        detach.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = detach.kill();
    }
    assert!(exited, "detach through a linked runtime directory hangs");
    assert!(detach.wait().unwrap().success());
    sandbox.assert_clean();

    // A device path with `..` in it, and one through a link to the device's directory.
    let linked_directory = sandbox.path("device-link");
    for attempt in 0..2 {
        let device = sandbox.attach([image.as_os_str()]);
        let directory = device.parent().unwrap();
        let target = if attempt == 0 {
            directory.join("../loop0/disk")
        } else {
            std::os::unix::fs::symlink(directory, &linked_directory).unwrap();
            linked_directory.join("disk")
        };
        sandbox.detach(&target);
        sandbox.assert_clean();
    }
}

/// `detach --all` while another process is still attaching waits for that attachment and
/// detaches it. Removing its entry at once left the new daemon serving, mounted and holding
/// the image lock, where no loopfuse command could see or stop it.
#[test]
fn detach_all_during_attach_leaks_nothing() {
    let Some(sandbox) = Sandbox::new("detach_all_during_attach_leaks_nothing", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);

    for round in 0..10 {
        let mut attach = sandbox.loopfuse(["attach".as_ref(), image.as_os_str()]);
        let attaching = attach
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(round));
        let detach = sandbox.loopfuse(["detach", "--all"]).output().unwrap();
        let attach_status = attaching.wait_with_output().unwrap().status;

        // Whatever the order, nothing may stay mounted without an entry.
        if !sandbox.list().is_empty() {
            sandbox.detach("loop0");
        }
        assert_eq!(
            sandbox.mounts(),
            Vec::<String>::new(),
            "round {round}: mount leaked"
        );
        assert!(
            detach.status.success(),
            "round {round}: {}",
            stderr_of(&detach)
        );
        assert!(attach_status.success(), "round {round}: attach failed");
    }
    sandbox.assert_clean();
}

/// When the command of `run` leaves a process holding the device, `run` unmounts lazily and
/// the daemon serves that process until it closes the device. `detach` then reports that at once
/// (it used to wait 120 s for the daemon), and the attachment goes after the last close.
/// A program that opens the device path while the device is being detached must fail, as
/// with a detached kernel loop device, instead of creating a file in the bare directory
/// that then keeps the name in use.
#[test]
fn writes_racing_detach_create_nothing() {
    let Some(sandbox) = Sandbox::new("writes_racing_detach_create_nothing", &[]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let before = common::sha256(&image);
    for _ in 0..10 {
        let device = sandbox.attach([image.as_os_str()]);
        assert!(device.ends_with("loop0/disk"), "{}", device.display());
        let writing = std::sync::atomic::AtomicBool::new(true);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                // As `echo x > DEVICE` opens it: created when missing. The pause lets the
                // unmount find the device closed, which it needs.
                while writing.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&device);
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            let detach = sandbox.loopfuse(["detach"]).arg(&device).output();
            writing.store(false, std::sync::atomic::Ordering::Relaxed);
            let detach = detach.unwrap();
            assert!(detach.status.success(), "{}", stderr_of(&detach));
        });
        assert!(!device.exists(), "{} was created", device.display());
        sandbox.assert_clean();
    }
    assert_eq!(common::sha256(&image), before, "image changed");
}

/// A name is a name wherever it is typed: inside the directory of loop0, `loop1` is not the
/// path `loop0/loop1`, and neither is `loop0` itself.
#[test]
fn names_work_inside_device_directory() {
    let Some(sandbox) = Sandbox::new("names_work_inside_device_directory", &[]) else {
        return;
    };
    let first = sandbox.sparse_image("first.img", 8 * MIB);
    let second = sandbox.sparse_image("second.img", 8 * MIB);
    let device = sandbox.attach([first.as_os_str()]);
    sandbox.attach([second.as_os_str()]);
    let inside = device.parent().unwrap();

    let detach_inside = |name: &str| {
        sandbox
            .loopfuse(["detach", name])
            .current_dir(inside)
            .output()
            .unwrap()
    };
    let output = detach_inside("loop1");
    assert!(output.status.success(), "loop1: {}", stderr_of(&output));
    // The working directory keeps loop0 busy, as a kernel mount would be.
    let output = detach_inside("loop0");
    assert!(
        stderr_of(&output).contains("device is busy"),
        "loop0: {}",
        stderr_of(&output)
    );
    sandbox.detach("loop0");
    sandbox.assert_clean();
}

#[test]
fn detach_after_lazy_run_reports_holder() {
    let test = "detach_after_lazy_run_reports_holder";
    let Some(sandbox) = Sandbox::new(test, &["sh", "sleep"]) else {
        return;
    };
    let image = sandbox.sparse_image("disk.img", 8 * MIB);
    let holder_pid = sandbox.path("holder.pid");
    let script = format!(
        // The shell opens the device before it forks, so the holder has it from the start.
        "exec 3< \"$LOOPFUSE_DEV\"; sleep 300 <&3 3<&- > /dev/null 2>&1 & echo $! > '{}'",
        holder_pid.display()
    );

    let mut run = sandbox.loopfuse(["run"]);
    let output = run
        .arg(&image)
        .args(["--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let holder: i32 = fs::read_to_string(&holder_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let holder = nix::unistd::Pid::from_raw(holder);
    let warning = stderr_of(&output);
    assert!(
        warning.contains("goes once it closes") && !warning.contains("detach again"),
        "{warning}"
    );

    // Like a busy kernel loop device after `losetup -d`: listed with autoclear until closed.
    let listed = sandbox.list();
    assert_eq!(listed[0]["autoclear"], true, "{listed:?}");
    let attach = sandbox.loopfuse(["attach"]).arg(&image).output().unwrap();
    assert_eq!(attach.status.code(), Some(1), "{}", stderr_of(&attach));
    assert!(
        stderr_of(&attach).contains("goes once a process closes its device file"),
        "{}",
        stderr_of(&attach)
    );

    let started = std::time::Instant::now();
    let detach = sandbox.loopfuse(["detach", "loop0"]).output().unwrap();
    let waited = started.elapsed();
    let _ = nix::sys::signal::kill(holder, nix::sys::signal::SIGKILL);
    assert_eq!(detach.status.code(), Some(1), "{}", stderr_of(&detach));
    assert!(
        stderr_of(&detach).contains("unmounted lazily"),
        "{}",
        stderr_of(&detach)
    );
    assert!(waited < Duration::from_secs(10), "detach waited {waited:?}");

    let detached = wait_until(Duration::from_secs(10), || sandbox.list().is_empty());
    assert!(detached, "the attachment stayed after the holder exited");
    sandbox.assert_clean();
}
