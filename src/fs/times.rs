//! Times of the device files. The disk starts at the image's modification time at attach, a
//! partition at the time its device file was made, and `touch` may set the access and
//! modification times, as on a device node. A change of
//! times, mode or owner sets the change time to the current time.

use std::time::SystemTime;

use fuser::TimeOrNow;

use super::per_node::PerNode;

/// Access, modification and change time of one device file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileTimes {
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl FileTimes {
    /// Returns the times of a node made at `time`.
    pub fn all(time: SystemTime) -> Self {
        Self {
            atime: time,
            mtime: time,
            ctime: time,
        }
    }
}

/// The times of every device file.
pub struct TimeTable {
    files: PerNode<FileTimes>,
}

impl TimeTable {
    pub fn new() -> Self {
        Self {
            files: PerNode::new(),
        }
    }

    /// Returns the times of the device node `node`, made at `start`.
    pub fn of(&self, node: u64, start: SystemTime) -> FileTimes {
        self.files.get(node).unwrap_or(FileTimes::all(start))
    }

    /// Applies a `utimensat` to the device node `node`, made at `start`, or records a
    /// change of its mode or owner when both times are `None`.
    pub fn change(
        &self,
        node: u64,
        start: SystemTime,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) {
        let now = SystemTime::now();
        let resolve = |time: TimeOrNow| match time {
            TimeOrNow::SpecificTime(time) => time,
            TimeOrNow::Now => now,
        };
        self.files.update(node, FileTimes::all(start), |times| {
            if let Some(atime) = atime {
                times.atime = resolve(atime);
            }
            if let Some(mtime) = mtime {
                times.mtime = resolve(mtime);
            }
            times.ctime = now;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn touch_changes_one_file() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let table = TimeTable::new();
        let set = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400);

        table.change(3, start, None, Some(TimeOrNow::SpecificTime(set)));

        let times = table.of(3, start);
        assert_eq!(times.mtime, set);
        assert_eq!(times.atime, start);
        assert!(times.ctime > start);
        assert_eq!(table.of(2, start).mtime, start);
    }

    #[test]
    fn mode_change_moves_only_ctime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let table = TimeTable::new();

        table.change(2, start, None, None);

        let times = table.of(2, start);
        assert_eq!(times.atime, start);
        assert_eq!(times.mtime, start);
        assert!(times.ctime > start);
    }
}
