//! Running `loopfuse` as an unprivileged user whose `PATH` lacks `fusermount3`, as in a
//! minimal container image.
//!
//! As root, commands run as `nobody` (uid and gid 65534) through `setpriv`, with a copy of
//! the binary inside the sandbox so that `nobody` can execute it wherever the checkout is.
//! As another user, they run as that user.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{Sandbox, find_tool, is_root, loopfuse_binary, parse_listing};

/// User and group ID of `nobody`, which the tests become when they run as root.
pub const NOBODY: u32 = 65534;

/// An unprivileged user's view of a sandbox: its own runtime directory and a `PATH` holding
/// only the tools a test names, and the `loopfuse` binary.
pub struct Unprivileged<'a> {
    sandbox: &'a Sandbox,
    binary: PathBuf,
    tools: PathBuf,
    runtime: PathBuf,
}

impl<'a> Unprivileged<'a> {
    /// Prepares `sandbox` for an unprivileged user whose `PATH` holds only `tools`.
    pub fn new(sandbox: &'a Sandbox, tools: &[&str]) -> Self {
        let directory = sandbox.path("unprivileged");
        let bin = directory.join("bin");
        let runtime = directory.join("run");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&runtime).unwrap();
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();

        for tool in tools {
            let target = find_tool(tool).unwrap_or_else(|| panic!("{tool} is not installed"));
            std::os::unix::fs::symlink(target, bin.join(tool)).unwrap();
        }
        let binary = bin.join("loopfuse");
        // cp writes the copy in its own process. Written from this one, the copy would be
        // open for writing in any child that another test thread forks meanwhile, and
        // executing it would then fail with ETXTBSY until that child executes.
        super::run_ok("cp", [loopfuse_binary().as_os_str(), binary.as_os_str()]);

        if is_root() {
            for path in [sandbox.path(""), directory.clone(), bin.clone()] {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            }
            fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).unwrap();
            chown_to_nobody(&runtime);
        }

        Self {
            sandbox,
            binary,
            tools: bin,
            runtime,
        }
    }

    /// Creates an image holding `bytes` that the unprivileged user may read and write.
    pub fn image_with(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.sandbox.image_with(name, bytes);
        if is_root() {
            chown_to_nobody(&path);
        }
        path
    }

    /// Creates a directory that the unprivileged user may write to.
    pub fn writable_directory(&self, name: &str) -> PathBuf {
        let path = self.sandbox.path(name);
        fs::create_dir(&path).unwrap();
        if is_root() {
            chown_to_nobody(&path);
        }
        path
    }

    /// Builds a `loopfuse` command run by the unprivileged user with a clean environment.
    pub fn loopfuse<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let home = self.sandbox.path("");
        let environment = [
            ("PATH", self.tools.as_os_str()),
            ("XDG_RUNTIME_DIR", self.runtime.as_os_str()),
            ("HOME", home.as_os_str()),
        ];

        let mut command = if is_root() {
            let mut command = Command::new(find_tool("setpriv").expect("setpriv is installed"));
            command
                .arg(format!("--reuid={NOBODY}"))
                .arg(format!("--regid={NOBODY}"))
                .args(["--clear-groups", "env", "-i"]);
            for (name, value) in environment {
                let mut assignment = std::ffi::OsString::from(format!("{name}="));
                assignment.push(value);
                command.arg(assignment);
            }
            command.arg(&self.binary);
            command
        } else {
            let mut command = Command::new(&self.binary);
            command.env_clear().envs(environment);
            command
        };
        command.args(args).stdin(Stdio::null());
        command
    }

    /// Lists the attachments in the unprivileged user's registry.
    pub fn list(&self) -> Vec<serde_json::Value> {
        parse_listing(&self.loopfuse(["list", "--json"]).output().unwrap())
    }

    /// Returns whether the unprivileged user may create a user namespace, tried with `unshare(1)`
    /// (util-linux), independently of loopfuse.
    pub fn may_create_user_namespace(&self) -> bool {
        let unshare = find_tool("unshare").expect("unshare is installed");
        let mut command = if is_root() {
            let mut command = Command::new(find_tool("setpriv").expect("setpriv is installed"));
            command
                .arg(format!("--reuid={NOBODY}"))
                .arg(format!("--regid={NOBODY}"))
                .arg("--clear-groups")
                .arg(unshare);
            command
        } else {
            Command::new(unshare)
        };
        command
            .args(["--user", "--map-root-user", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl Drop for Unprivileged<'_> {
    fn drop(&mut self) {
        let _ = self.loopfuse(["detach", "--all"]).output();
    }
}

fn chown_to_nobody(path: &std::path::Path) {
    nix::unistd::chown(path, Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
}
