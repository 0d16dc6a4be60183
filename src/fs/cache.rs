//! Cache modes of the device files: how much the kernel keeps in its page cache.

/// Kernel caching of the device files' data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Reads are cached by the kernel; every write reaches the image before `write`
    /// returns. Writes past the end fail with `ENOSPC` and a full backing filesystem fails
    /// the write itself, exactly as with a block device.
    #[default]
    Writethrough,
    /// Writes are also cached and reach the image in large batches, on `fsync`, `close`
    /// or when the kernel writes back dirty pages. Small random writes are several times
    /// faster, but a write past the end or into a full backing filesystem is reported late,
    /// because the daemon receives it only when the kernel writes the page back. `fsync` or
    /// `close` then fails, and after a write past the end so does the next write of every
    /// file open for writing. Files opened later show the device's size again.
    Writeback,
    /// Nothing is cached: every read and write is a request to the daemon (`direct_io`).
    /// Uses no page cache for the device files, at the cost of speed.
    None,
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            CacheMode::Writethrough => "writethrough",
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
        })
    }
}
