//! Shared harness of the integration tests: a private registry and scratch directory per
//! test, the real `loopfuse` binary, and cleanup that runs even when a test fails.
//!
//! A test that needs FUSE or an external tool skips with one line when it is missing, and
//! fails instead when `LOOPFUSE_REQUIRE_FUSE=1` (as CI sets it).
#![allow(dead_code)]

pub mod unprivileged;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Returns whether CI demands that every FUSE test really runs.
pub fn fuse_required() -> bool {
    std::env::var("LOOPFUSE_REQUIRE_FUSE").is_ok_and(|value| value == "1")
}

/// Prints one skip line, or fails the test when FUSE tests are required.
pub fn skip(test: &str, reason: &str) {
    if fuse_required() {
        panic!("{test}: cannot run: {reason} (LOOPFUSE_REQUIRE_FUSE=1)");
    }
    eprintln!("SKIP {test}: {reason}");
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether `program` is on `PATH` (or in the sbin directories, which tools live in).
pub fn have_tool(program: &str) -> bool {
    find_tool(program).is_some()
}

pub fn find_tool(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|directory| directory.join(program))
        .find(|candidate| candidate.is_file())
}

fn fuse_usable() -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};

    if access("/dev/fuse", AccessFlags::R_OK | AccessFlags::W_OK).is_err() {
        return Err("/dev/fuse is missing or not readable and writable".to_string());
    }
    if !is_root() && !have_tool("fusermount3") {
        return Err("fusermount3 is not installed".to_string());
    }
    Ok(())
}

/// The binary under test: `LOOPFUSE_BIN` when set (scripts/test.sh copies the binary where
/// an unprivileged user can run it), else the one cargo built.
pub fn loopfuse_binary() -> PathBuf {
    std::env::var_os("LOOPFUSE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_loopfuse")))
}

/// A scratch directory and private registry for one test.
///
/// Dropping it detaches everything attached through it and checks that no mount is left;
/// a leftover mount is detached lazily so that a failed test never leaks one.
pub struct Sandbox {
    pub name: String,
    directory: tempfile::TempDir,
}

impl Sandbox {
    /// Creates a sandbox for `test`, or prints a skip line and returns `None` when FUSE or
    /// one of `tools` is missing.
    pub fn new(test: &str, tools: &[&str]) -> Option<Self> {
        if let Err(reason) = fuse_usable() {
            skip(test, &reason);
            return None;
        }
        if let Some(missing) = tools.iter().find(|tool| !have_tool(tool)) {
            skip(test, &format!("{missing} is not installed"));
            return None;
        }

        let directory = tempfile::Builder::new()
            .prefix("loopfuse-test-")
            .tempdir()
            .unwrap();
        fs::set_permissions(directory.path(), fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir(directory.path().join("run")).unwrap();
        fs::set_permissions(
            directory.path().join("run"),
            fs::Permissions::from_mode(0o700),
        )
        .unwrap();

        Some(Self {
            name: test.to_string(),
            directory,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }

    /// The registry directory used by this sandbox's `loopfuse` commands.
    pub fn registry(&self) -> PathBuf {
        self.path("run").join("loopfuse")
    }

    /// Creates a sparse image of `size` bytes.
    pub fn sparse_image(&self, name: &str, size: u64) -> PathBuf {
        let path = self.path(name);
        fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    /// Creates an image holding `bytes`.
    pub fn image_with(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    /// A `loopfuse` command using this sandbox's registry.
    pub fn loopfuse<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(loopfuse_binary());
        command
            .args(args)
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        command
    }

    /// Runs `loopfuse` with `args` and returns its output, whatever its status.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.loopfuse(args).output().unwrap()
    }

    /// Attaches with `args` (the image last) and returns the device path.
    pub fn attach<I, S>(&self, args: I) -> PathBuf
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = self.loopfuse(["attach"]);
        command.args(args);
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "attach failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );

        let device = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
        assert!(
            device.is_file(),
            "attach printed {}, which is not a file",
            device.display()
        );
        device
    }

    /// Detaches `target` and asserts success.
    pub fn detach(&self, target: impl AsRef<OsStr>) {
        let output = self
            .loopfuse(["detach".as_ref(), target.as_ref()])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "detach failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The parsed output of `loopfuse list --json`.
    pub fn list(&self) -> Vec<serde_json::Value> {
        parse_listing(&self.run(["list", "--json"]))
    }

    /// PID of the daemon serving the attachment `name`.
    pub fn daemon_pid(&self, name: &str) -> i32 {
        let entry = self
            .list()
            .into_iter()
            .find(|entry| entry["name"] == name)
            .unwrap();
        entry["pid"].as_i64().unwrap() as i32
    }

    /// FUSE mounts below this sandbox, from `/proc/self/mountinfo`.
    pub fn mounts(&self) -> Vec<String> {
        let root = self.directory.path().to_string_lossy().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|line| {
                // The filesystem type follows the " - " separator: "fuse" or "fuse.SUBTYPE".
                let fstype = line
                    .split(" - ")
                    .nth(1)
                    .and_then(|rest| rest.split(' ').next());
                fstype.is_some_and(|fstype| fstype.starts_with("fuse"))
            })
            .filter_map(|line| line.split(' ').nth(4).map(str::to_string))
            .filter(|mountpoint| mountpoint.starts_with(&root))
            .collect()
    }

    /// Asserts that nothing is mounted or registered.
    pub fn assert_clean(&self) {
        assert_eq!(self.mounts(), Vec::<String>::new(), "mounts left behind");
        assert_eq!(
            self.list(),
            Vec::<serde_json::Value>::new(),
            "registry entries left behind"
        );
        // Lock files stay; device directories, state files and logs must not.
        let leftovers: Vec<String> = fs::read_dir(self.registry())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .filter(|name| !name.ends_with(".lock"))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            leftovers,
            Vec::<String>::new(),
            "registry files left behind"
        );
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // A filesystem driver still holding a device would keep its attachment busy, so
        // the filesystems go first. Nothing here may panic: this can run during a panic.
        let listing = self.loopfuse(["list", "--json"]).output();
        let listed: serde_json::Value = listing
            .ok()
            .and_then(|output| serde_json::from_slice(&output.stdout).ok())
            .unwrap_or_default();
        let attachments = listed["attachments"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for entry in attachments {
            let records = entry["mounts"].as_array().cloned().unwrap_or_default();
            for record in records {
                if let Some(directory) = record["directory"].as_str() {
                    let _ = self.loopfuse(["umount", directory]).output();
                }
            }
        }
        let _ = self.loopfuse(["detach", "--all"]).output();

        let leftovers = self.mounts();
        for mountpoint in leftovers.iter().rev() {
            lazy_unmount(Path::new(mountpoint));
        }
        if !leftovers.is_empty() && !std::thread::panicking() {
            panic!(
                "{}: mounts were left behind and unmounted lazily: {leftovers:?}",
                self.name
            );
        }
    }
}

/// Parses the output of a successful `loopfuse list --json` into its attachments.
pub fn parse_listing(output: &Output) -> Vec<serde_json::Value> {
    assert!(
        output.status.success(),
        "list failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listing: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    listing["attachments"].as_array().unwrap().clone()
}

fn lazy_unmount(mountpoint: &Path) {
    if is_root() {
        let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
    } else {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z", "--"])
            .arg(mountpoint)
            .output();
    }
}

/// Runs `program` with `args`, asserting success, and returns its standard output.
pub fn run_ok<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let tool = find_tool(program).unwrap_or_else(|| PathBuf::from(program));
    let output = Command::new(&tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{program} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `program` with `args` and returns its output, whatever its status.
pub fn run<I, S>(program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let tool = find_tool(program).unwrap_or_else(|| PathBuf::from(program));
    Command::new(&tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so a failing comparison is reproducible.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// SHA-256 of a file, by `sha256sum`.
pub fn sha256(path: &Path) -> String {
    run_ok("sha256sum", [path])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Waits until `condition` holds, for at most `timeout`.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

/// A `fuse2fs` mount of a device file, unmounted on drop.
pub struct Fuse2fs {
    mountpoint: PathBuf,
}

impl Fuse2fs {
    pub fn mount(device: &Path, mountpoint: &Path, mode: &str) -> Self {
        // fakeroot lets an unprivileged user create files owned by the filesystem's root.
        let options = format!("{mode},fakeroot");
        run_ok(
            "fuse2fs",
            [
                device.as_os_str(),
                mountpoint.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
            ],
        );
        Self {
            mountpoint: mountpoint.to_path_buf(),
        }
    }
}

impl Drop for Fuse2fs {
    fn drop(&mut self) {
        let output = run("fusermount3", ["-u".as_ref(), self.mountpoint.as_os_str()]);
        if !output.status.success() {
            let _ = run(
                "fusermount3",
                ["-u".as_ref(), "-z".as_ref(), self.mountpoint.as_os_str()],
            );
        }
    }
}

/// A kernel loop device, detached on drop.
pub struct LoopDevice(pub String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = run("losetup", ["-d", self.0.as_str()]);
    }
}

/// Runs a seeded random read and write workload on `target`: the same offsets and bytes on
/// every run, so two targets that start equal end equal.
pub fn seeded_fio_writes(target: &Path) {
    let filename = format!("--filename={}", target.display());
    run_ok(
        "fio",
        [
            "--name=oracle",
            filename.as_str(),
            "--rw=randrw",
            "--rwmixwrite=70",
            "--bsrange=512-64k",
            "--size=48M",
            "--io_size=24M",
            "--randseed=20261204",
            "--randrepeat=1",
            "--refill_buffers=1",
            "--ioengine=psync",
            "--end_fsync=1",
        ],
    );
}

/// A mount made by a test, lazily unmounted on drop.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Writes a partition table with `sfdisk`, reading `script` from standard input.
pub fn sfdisk(target: &Path, script: &str) {
    let mut child = std::process::Command::new(find_tool("sfdisk").unwrap())
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(target)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "sfdisk failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Mounts an 8 MiB tmpfs at `small` in the sandbox (root only), unmounted when the returned
/// guard drops.
pub fn small_tmpfs(sandbox: &Sandbox) -> (PathBuf, Unmount) {
    let small = sandbox.path("small");
    fs::create_dir(&small).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=8m"),
    )
    .unwrap();
    (small.clone(), Unmount(small))
}

/// Creates the sandbox of `test` with an 8 MiB tmpfs mounted in it. Returns `None`, and the
/// test skips, when not root, since mounting a tmpfs needs root.
pub fn sandbox_with_small_tmpfs(test: &str, tools: &[&str]) -> Option<(Sandbox, PathBuf, Unmount)> {
    if !is_root() {
        eprintln!("SKIP {test}: mounting a small tmpfs needs root");
        return None;
    }
    let sandbox = Sandbox::new(test, tools)?;
    let (small, unmount) = small_tmpfs(&sandbox);
    Some((sandbox, small, unmount))
}

/// Writes 1 MiB chunks of one pattern to `device` with `fdatasync` after each, until a write
/// fails, and asserts that it failed with `ENOSPC` before 16 MiB. Returns the chunk and the
/// indexes of the chunks written.
pub fn write_until_full(device: &Path) -> (Vec<u8>, Vec<u64>) {
    use std::os::unix::fs::FileExt;

    let file = fs::OpenOptions::new().write(true).open(device).unwrap();
    let chunk = pattern(1 << 20, 6);
    let mut written = Vec::new();
    let mut failure = None;
    for index in 0..16u64 {
        match file
            .write_all_at(&chunk, index << 20)
            .and_then(|()| file.sync_data())
        {
            Ok(()) => written.push(index),
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }

    let failure = failure.expect("writing 16 MiB into an 8 MiB tmpfs must fail");
    assert_eq!(failure.raw_os_error(), Some(libc::ENOSPC), "{failure}");
    assert!(!written.is_empty());
    (chunk, written)
}

/// Asserts that each chunk of `written` reads back from `device` as `chunk`.
pub fn assert_chunks_intact(device: &Path, chunk: &[u8], written: &[u64]) {
    use std::os::unix::fs::FileExt;

    let reader = fs::File::open(device).unwrap();
    let mut buf = vec![0u8; chunk.len()];
    for &index in written {
        reader.read_exact_at(&mut buf, index << 20).unwrap();
        assert!(buf == chunk, "chunk {index} differs");
    }
}

/// A filesystem made on a sparse image in the sandbox and mounted through the kernel loop
/// driver (root only). Dropping it unmounts the filesystem, then detaches the loop device.
pub struct KernelMount {
    pub path: PathBuf,
    _unmount: Unmount,
    _loop_device: LoopDevice,
}

impl KernelMount {
    /// Makes a `fstype` filesystem of `size` bytes with `mkfs.FSTYPE OPTIONS` and mounts it
    /// at `name` in the sandbox.
    pub fn new(sandbox: &Sandbox, name: &str, fstype: &str, size: u64, options: &[&str]) -> Self {
        let backing = sandbox.sparse_image(&format!("{name}.img"), size);
        let mut arguments: Vec<&OsStr> = options.iter().map(OsStr::new).collect();
        arguments.push(backing.as_os_str());
        run_ok(&format!("mkfs.{fstype}"), arguments);
        let loop_device = kernel_loop(&backing);
        let path = sandbox.path(name);
        fs::create_dir(&path).unwrap();
        nix::mount::mount(
            Some(loop_device.0.as_str()),
            &path,
            Some(fstype),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        Self {
            path: path.clone(),
            _unmount: Unmount(path),
            _loop_device: loop_device,
        }
    }
}

/// Attaches `image` to a free kernel loop device (root only).
pub fn kernel_loop(image: &Path) -> LoopDevice {
    let name = run_ok(
        "losetup",
        ["-f".as_ref(), "--show".as_ref(), image.as_os_str()],
    );
    LoopDevice(name.trim().to_string())
}
