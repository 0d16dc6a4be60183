//! Identifying a process across PID reuse.

use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::FileId;

/// A process ID together with the process's start time, so that a recycled PID is not
/// mistaken for the process that registered an attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    /// Start time in clock ticks after boot (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
}

impl ProcessId {
    /// Returns the calling process.
    pub fn current() -> Self {
        let pid = std::process::id() as i32;
        Self {
            pid,
            start_time: start_time_of(pid).unwrap_or(0),
        }
    }

    /// Returns the running process `pid`, or `None` when there is none.
    pub fn of(pid: i32) -> Option<Self> {
        start_time_of(pid).map(|start_time| Self { pid, start_time })
    }

    /// Returns whether this process is still running (a zombie counts as gone).
    pub fn is_running(&self) -> bool {
        match read_stat(self.pid) {
            Some((state, start_time)) => start_time == self.start_time && state != 'Z',
            None => false,
        }
    }

    /// Returns whether the process or any of its threads still exists, and so may still hold
    /// open files and their locks. The main thread turns zombie while other threads are still
    /// exiting, and the last thread to exit closes the files they share.
    pub fn holds_resources(&self) -> bool {
        if self.is_running() {
            return true;
        }
        if start_time_of(self.pid) != Some(self.start_time) {
            return false;
        }
        fs::read_dir(format!("/proc/{}/task", self.pid))
            .map(|threads| threads.count() > 1)
            .unwrap_or(false)
    }
}

impl ProcessId {
    /// Returns the path under which this process has a file with the numbers `id` open, as
    /// the kernel names it: the file's current name after a rename, with ` (deleted)`
    /// appended once it was removed. `None` when the process is gone or cannot be read.
    pub fn open_file_path(&self, id: FileId) -> Option<PathBuf> {
        if !self.is_running() {
            return None;
        }
        let descriptors = fs::read_dir(format!("/proc/{}/fd", self.pid)).ok()?;
        descriptors.flatten().find_map(|descriptor| {
            let link = descriptor.path();
            // stat follows the link to the open file itself, even a deleted one.
            (FileId::of(&link) == Some(id)).then(|| fs::read_link(&link).ok())?
        })
    }
}

fn start_time_of(pid: i32) -> Option<u64> {
    read_stat(pid).map(|(_, start_time)| start_time)
}

/// Returns the state letter and start time of `pid` from `/proc/PID/stat`.
fn read_stat(pid: i32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; fields after it are
    // separated by single spaces, starting with the state (field 3).
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(22 - 3)?.parse().ok()?;

    Some((state, start_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_running() {
        let me = ProcessId::current();

        assert!(me.start_time > 0);
        assert!(me.is_running());
        assert_eq!(ProcessId::of(me.pid), Some(me));
    }

    #[test]
    fn recycled_pid_is_not_running() {
        let me = ProcessId::current();
        let impostor = ProcessId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };

        assert!(!impostor.is_running());
    }

    #[test]
    fn exited_child_is_not_running() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId::of(child.id() as i32);
        child.wait().unwrap();

        if let Some(id) = id {
            assert!(!id.is_running());
        }
    }
}
