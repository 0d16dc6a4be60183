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
    /// faster, but a write past the end or into a full backing filesystem is reported late:
    /// the daemon sees it only when the kernel writes the page back. A write past the end
    /// then fails `fsync`, `close` and every later write of the files open for writing,
    /// until they are closed; until then the kernel reports a size grown by that write.
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
