//! `loopfuse doctor` in a working environment and in broken ones: no `/dev/fuse`, a
//! `/dev/fuse` the user cannot open, no `fusermount3`, and user namespaces disabled.
//! Each broken check must print FAIL with its fix, and the exit status must be 0 only
//! when an attachment will work.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::unprivileged::{NOBODY, Unprivileged};
use common::{Sandbox, find_tool, is_root, loopfuse_binary, run, wait_until};

/// Verdict words that start every check line.
const VERDICTS: [&str; 5] = ["ok", "warn", "FAIL", "skip", "info"];

/// The report of a doctor run: its check lines and the final verdict line.
struct Report {
    status: Option<i32>,
    lines: Vec<String>,
}

impl Report {
    fn of(output: &Output) -> Self {
        let stdout = String::from_utf8_lossy(&output.stdout);
        Self {
            status: output.status.code(),
            lines: stdout.lines().map(str::to_string).collect(),
        }
    }

    /// The line about `subject`, which must be there.
    fn line(&self, subject: &str) -> &str {
        self.lines
            .iter()
            .find(|line| {
                line.split_once(' ')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with(&format!("{subject}:")))
            })
            .unwrap_or_else(|| panic!("no line about {subject}:\n{}", self.text()))
    }

    fn verdict(&self) -> &str {
        self.lines.last().map_or("", String::as_str)
    }

    fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// Asserts the line shape: one verdict word per check line, then the verdict line.
    fn assert_well_formed(&self) {
        let (verdict, checks) = self.lines.split_last().expect("doctor printed nothing");
        assert!(verdict.starts_with("verdict: "), "{}", self.text());
        for line in checks {
            let word = line.split_whitespace().next().unwrap_or("");
            assert!(VERDICTS.contains(&word), "bad verdict in: {line}");
        }
    }
}

fn assert_line(report: &Report, subject: &str, verdict: &str, fragments: &[&str]) {
    let line = report.line(subject);
    assert!(
        line.starts_with(&format!("{verdict} ")),
        "expected {verdict}: {line}"
    );
    for fragment in fragments {
        assert!(line.contains(fragment), "'{fragment}' missing from: {line}");
    }
}

#[test]
fn doctor_passes_where_fuse_works() {
    let Some(sandbox) = Sandbox::new("doctor_passes_where_fuse_works", &[]) else {
        return;
    };

    let report = Report::of(&sandbox.run(["doctor"]));

    report.assert_well_formed();
    assert_eq!(report.status, Some(0), "{}", report.text());
    assert_line(
        &report,
        "/dev/fuse",
        "ok",
        &["opened for reading and writing"],
    );
    if is_root() {
        assert_line(&report, "fusermount3", "skip", &["root mounts directly"]);
    } else {
        assert_line(&report, "fusermount3", "ok", &["is setuid root"]);
    }
    assert_line(
        &report,
        "runtime directory",
        "ok",
        &[&sandbox.registry().display().to_string()],
    );
    assert_line(&report, "trial mount", "ok", &["mounted and unmounted"]);
    assert_line(&report, "FUSE protocol", "info", &["7.", "INIT request"]);
    assert!(
        report
            .verdict()
            .contains("'attach' and 'run' can mount here"),
        "{}",
        report.text()
    );
    sandbox.assert_clean();
}

#[test]
fn doctor_names_container_options() {
    let Some(sandbox) = Sandbox::new("doctor_names_container_options", &[]) else {
        return;
    };

    // The variable only marks a pod; nothing connects to the address.
    let output = sandbox
        .loopfuse(["doctor"])
        .env("KUBERNETES_SERVICE_HOST", "192.0.2.1")
        .output()
        .unwrap();

    let report = Report::of(&output);
    // What the container needs is named only while FUSE does not work in it.
    let fragments: &[&str] = if report.line("trial mount").starts_with("ok ") {
        &["Kubernetes (KUBERNETES_SERVICE_HOST)", "FUSE mounts work"]
    } else {
        &[
            "Kubernetes (KUBERNETES_SERVICE_HOST)",
            "/dev/fuse",
            "SYS_ADMIN",
        ]
    };
    assert_line(&report, "container", "info", fragments);
}

#[test]
fn doctor_explains_unusable_fuse_device() {
    let test = "doctor_explains_unusable_fuse_device";
    if !is_root() {
        eprintln!("SKIP {test}: replacing /dev in a private mount namespace needs root");
        return;
    }
    let Some(sandbox) = Sandbox::new(test, &["unshare", "setpriv", "mknod"]) else {
        return;
    };
    let binary = loopfuse_binary();
    let runtime = sandbox.path("nobody-run");
    fs::create_dir(&runtime).unwrap();
    nix::unistd::chown(&runtime, Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
    fs::set_permissions(sandbox.path(""), fs::Permissions::from_mode(0o755)).unwrap();
    // /dev/null stays, because the doctor starts its namespace probe with it.
    let empty_dev = "mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3";

    // No /dev/fuse at all, as in a container started without '--device /dev/fuse'.
    let script = format!(
        "{empty_dev} && XDG_RUNTIME_DIR={} exec {} doctor",
        sandbox.path("run").display(),
        binary.display()
    );
    let report = Report::of(&run("unshare", ["-m", "sh", "-c", &script]));
    report.assert_well_formed();
    assert_eq!(report.status, Some(1), "{}", report.text());
    let fix_found = ["--device /dev/fuse", "modprobe fuse", "device plugin"]
        .iter()
        .any(|fix| report.line("/dev/fuse").contains(fix));
    assert_line(&report, "/dev/fuse", "FAIL", &["not found; "]);
    assert!(fix_found, "no fix in: {}", report.line("/dev/fuse"));
    assert_line(&report, "trial mount", "skip", &["/dev/fuse is unusable"]);
    assert!(report.verdict().contains("no attachment will work"));

    // A /dev/fuse that the user cannot open, as on a system without udev rules.
    let script = format!(
        "{empty_dev} && mknod -m 600 /dev/fuse c 10 229 && XDG_RUNTIME_DIR={} \
         exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups {} doctor",
        runtime.display(),
        binary.display()
    );
    let report = Report::of(&run("unshare", ["-m", "sh", "-c", &script]));
    report.assert_well_formed();
    assert_eq!(report.status, Some(1), "{}", report.text());
    assert_line(
        &report,
        "/dev/fuse",
        "FAIL",
        &[
            "permission denied for uid 65534 (mode 600)",
            "chmod 0666 /dev/fuse",
        ],
    );
    // The device is there, so a container's options are not the fix.
    let container = report.line("container");
    assert!(!container.contains("--device"), "{container}");
    assert!(report.verdict().contains("no attachment will work"));
    sandbox.assert_clean();
}

#[test]
fn doctor_explains_missing_fusermount() {
    let test = "doctor_explains_missing_fusermount";
    let Some(sandbox) = Sandbox::new(test, &["setpriv", "unshare"]) else {
        return;
    };
    let user = Unprivileged::new(&sandbox, &[]);

    let report = Report::of(&user.loopfuse(["doctor"]).output().unwrap());

    report.assert_well_formed();
    assert_line(&report, "fusermount3", "FAIL", &["not found in PATH"]);
    assert_line(&report, "trial mount", "skip", &["fusermount3 is unusable"]);
    // A container's FUSE options would not help here, so a detected one is only named.
    let container = report.line("container");
    assert!(!container.contains("SYS_ADMIN"), "{container}");
    if user.may_create_user_namespace() {
        assert_eq!(report.status, Some(0), "{}", report.text());
        assert_line(
            &report,
            "user namespaces",
            "ok",
            &["a trial unshare succeeded"],
        );
        assert_line(
            &report,
            "FUSE mount in a user namespace",
            "ok",
            &["'run' can attach"],
        );
        assert!(
            report.verdict().contains("only 'loopfuse run' will work"),
            "{}",
            report.text()
        );
    } else {
        assert_eq!(report.status, Some(1), "{}", report.text());
        assert_line(
            &report,
            "user namespaces",
            "FAIL",
            &["a trial unshare failed"],
        );
        assert!(report.verdict().contains("no attachment will work"));
    }
}

#[test]
fn doctor_explains_disabled_user_namespaces() {
    let test = "doctor_explains_disabled_user_namespaces";
    if !is_root() {
        eprintln!("SKIP {test}: disabling user namespaces in a private user namespace needs root");
        return;
    }
    let Some(sandbox) = Sandbox::new(test, &["unshare", "nsenter", "setpriv", "sleep"]) else {
        return;
    };
    let user = Unprivileged::new(&sandbox, &[]);
    let image = user.image_with("disk.img", &[0; 1 << 20]);

    let namespace = LimitedUserNamespace::new();
    let inside = |command: std::process::Command| namespace.run(command);

    let report = Report::of(&inside(user.loopfuse(["doctor"])));
    report.assert_well_formed();
    assert_eq!(report.status, Some(1), "{}", report.text());
    assert_line(&report, "fusermount3", "FAIL", &["not found in PATH"]);
    assert_line(
        &report,
        "user namespaces",
        "FAIL",
        &[
            "a trial unshare failed",
            "user.max_user_namespaces=0",
            "sysctl -w user.max_user_namespaces=",
        ],
    );
    assert!(report.verdict().contains("no attachment will work"));

    let mut run_command = user.loopfuse(["run".as_ref(), image.as_os_str()]);
    run_command.args(["--", "true"]);
    let output = inside(run_command);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not found in PATH"), "{stderr}");
    assert!(
        stderr.contains("mounting in a private user namespace instead failed too"),
        "{stderr}"
    );
    assert!(stderr.contains("loopfuse doctor"), "{stderr}");
    assert_eq!(user.list(), Vec::<serde_json::Value>::new());
}

/// A private user namespace, mapping IDs 0 to 65535 to themselves, in which no further user
/// namespace may be created. The limit `user.max_user_namespaces` is per user namespace, so
/// setting it to 0 there disables user namespaces for its processes and nowhere else.
///
/// `unshare --user sleep` keeps the namespace alive, root writes its ID maps from outside
/// (`unshare --map-users` would need `newuidmap`), and `nsenter` joins it with the
/// capabilities of its root.
struct LimitedUserNamespace {
    holder: Child,
}

impl LimitedUserNamespace {
    fn new() -> Self {
        let holder = Command::new(find_tool("unshare").unwrap())
            .args(["--user", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let namespace = Self { holder };

        let own = fs::read_link("/proc/self/ns/user").unwrap();
        let holder_namespace = format!("/proc/{}/ns/user", namespace.holder.id());
        let entered = wait_until(Duration::from_secs(5), || {
            fs::read_link(&holder_namespace).is_ok_and(|link| link != own)
        });
        assert!(entered, "unshare --user did not create a user namespace");
        for map in ["uid_map", "gid_map"] {
            let path = format!("/proc/{}/{map}", namespace.holder.id());
            fs::write(&path, "0 0 65536\n").unwrap();
        }
        namespace
    }

    /// Runs `command` inside the namespace after setting the limit to 0.
    fn run(&self, command: Command) -> Output {
        let target = self.holder.id().to_string();
        Command::new(find_tool("nsenter").unwrap())
            .args(["--user", "--target", &target, "--", "sh", "-c"])
            .arg(r#"echo 0 > /proc/sys/user/max_user_namespaces && exec "$@""#)
            .arg("sh")
            .arg(command.get_program())
            .args(command.get_args())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for LimitedUserNamespace {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A runtime directory on a full filesystem fails the check, as attach would fail there:
/// creating an empty file still works on a full filesystem, so the probe writes data.
#[test]
fn doctor_reports_full_runtime_directory() {
    let test = "doctor_reports_full_runtime_directory";
    if !is_root() {
        eprintln!("SKIP {test}: mounting a small tmpfs needs root");
        return;
    }
    let Some(sandbox) = Sandbox::new(test, &[]) else {
        return;
    };
    let (small, _tmpfs) = common::small_tmpfs(&sandbox);
    fs::create_dir(small.join("loopfuse")).unwrap();
    fs::set_permissions(small.join("loopfuse"), fs::Permissions::from_mode(0o700)).unwrap();
    // Fills the filesystem. The write that finds it full fails, as intended.
    let _ = fs::write(small.join("filler"), vec![1u8; 16 << 20]);

    let mut doctor = sandbox.loopfuse(["doctor"]);
    let report = Report::of(&doctor.env("XDG_RUNTIME_DIR", &small).output().unwrap());

    assert_line(
        &report,
        "runtime directory",
        "FAIL",
        &["No space left", "free some space"],
    );
    assert_eq!(report.status, Some(1), "{}", report.text());
}
