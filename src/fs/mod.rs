//! The FUSE filesystem of an attachment: a directory holding `disk` and, after a partition
//! scan, `p1`, `p2`, ...; each file behaves like a loop device and its partitions.
//!
//! Handlers translate requests into [`BlockDevice`] calls and map `io::Error` to an errno in
//! one place ([`errno_of`]). This module does not depend on how the image is stored.
#![forbid(unsafe_code)]

mod cache;
mod devices;
mod fallocate;
mod overrun;
mod per_node;
mod permissions;
mod times;

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    IoctlFlags, KernelConfig, LockOwner, Notifier, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, WriteFlags,
};

pub use cache::CacheMode;
pub use devices::{DISK_INODE, DISK_NAME, DeviceEntry, DeviceTable, OpenFile, ROOT_INODE};
use fallocate::fallocate_device;
use overrun::invalidate_names;
use permissions::PermissionTable;
use times::TimeTable;

/// How long the kernel may cache attributes and names. The size of a device file never
/// changes while attached, and its times change only through `setattr`, whose reply gives
/// the kernel the new ones. So only `st_blocks` can be up to this much out of date.
const ATTR_TTL: Duration = Duration::from_secs(1);

/// Largest write request accepted, and the read-ahead window asked of the kernel.
pub const MAX_REQUEST: u32 = 1 << 20;

/// `st_blksize` of the device files: the preferred I/O size, as block devices report it.
const BLOCK_SIZE: u32 = 4096;

/// Ownership and permissions of the files of an attachment.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Called after data was written through `disk` and the writer closed it, so that a new
/// partition table becomes visible the way udev's watch on a block device makes it.
pub type DiskChanged = Box<dyn Fn() + Send + Sync>;

/// Called after a release leaves no file of the attachment open.
pub type LastClosed = Box<dyn Fn() + Send + Sync>;

/// The filesystem served for one attachment.
pub struct DeviceFs {
    devices: Arc<DeviceTable>,
    cache: CacheMode,
    /// Sends cache invalidations to the kernel; set once the session is mounted.
    notifier: Arc<OnceLock<Notifier>>,
    on_disk_changed: Option<DiskChanged>,
    on_last_close: Option<LastClosed>,
    owner: Owner,
    permissions: PermissionTable,
    times: TimeTable,
    read_only: bool,
    /// Logical sector size of the devices, as `losetup -b` sets it.
    sector_size: u32,
    /// Time shown for the directory, and for the disk until `touch` changes it: the image's
    /// modification time at attach.
    mtime: SystemTime,
}

thread_local! {
    /// Per-thread read buffer, reused so that reads do not allocate.
    static READ_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl DeviceFs {
    /// Creates the filesystem for `devices`. `notifier` is filled in by the caller once the
    /// session exists; until then no invalidation is sent.
    pub fn new(
        devices: Arc<DeviceTable>,
        notifier: Arc<OnceLock<Notifier>>,
        owner: Owner,
        mtime: SystemTime,
    ) -> Self {
        let read_only = devices.disk().read_only();
        Self {
            devices,
            cache: CacheMode::default(),
            notifier,
            on_disk_changed: None,
            on_last_close: None,
            owner,
            permissions: PermissionTable::new(owner, read_only),
            times: TimeTable::new(),
            read_only,
            sector_size: 512,
            mtime,
        }
    }

    /// Sets the logical sector size, to which `fallocate` ranges must be aligned.
    pub fn with_sector_size(mut self, sector_size: u32) -> Self {
        self.sector_size = sector_size;
        self
    }

    /// Sets how the kernel caches the device files' data.
    pub fn with_cache(mut self, cache: CacheMode) -> Self {
        self.cache = cache;
        self
    }

    /// Sets the function called when a writer of `disk` closes it after writing.
    pub fn on_disk_changed(mut self, callback: DiskChanged) -> Self {
        self.on_disk_changed = Some(callback);
        self
    }

    /// Sets the function called when the last open file is released.
    pub fn on_last_close(mut self, callback: LastClosed) -> Self {
        self.on_last_close = Some(callback);
        self
    }

    /// Drops the kernel's cached pages of the other device files that overlap the range
    /// written through `file`. A write through `p1` is then visible through `disk`, and the
    /// other way round, once the writer has called `fsync` or closed the file.
    fn invalidate_other_views(&self, file: &OpenFile) {
        let Some((start, end)) = file.take_written() else {
            return;
        };
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        let written_start = file.entry.disk_offset + start;
        let written_end = file.entry.disk_offset + end;

        for other in self.devices.views() {
            if other.inode == file.entry.inode {
                continue;
            }
            let overlap_start = written_start.max(other.disk_offset);
            let overlap_end = written_end.min(other.disk_offset + other.device.len());
            if overlap_start >= overlap_end {
                continue;
            }
            let offset = (overlap_start - other.disk_offset) as i64;
            let len = (overlap_end - overlap_start) as i64;
            // ENOENT only means the kernel has no cached inode for that file.
            if let Err(error) = notifier.inval_inode(INodeNo(other.inode), offset, len)
                && error.raw_os_error() != Some(libc::ENOENT)
            {
                log::warn!("{}: cannot invalidate cached pages: {error}", other.name);
            }
        }
    }

    fn directory_attr(&self) -> FileAttr {
        let mut attr = self.base_attr(ROOT_INODE);
        attr.kind = FileType::Directory;
        attr.perm = 0o755;
        attr.nlink = 2;
        attr
    }

    fn device_attr(&self, entry: &DeviceEntry) -> FileAttr {
        let mut attr = self.base_attr(entry.inode);
        attr.size = entry.device.len();
        attr.blocks = entry.device.allocated_sectors().unwrap_or(0);
        let permissions = self.permissions.of(entry.node);
        attr.perm = permissions.perm;
        attr.uid = permissions.uid;
        attr.gid = permissions.gid;
        let times = self.times.of(entry.node, self.start_time(entry));
        attr.atime = times.atime;
        attr.mtime = times.mtime;
        attr.ctime = times.ctime;
        attr
    }

    /// Returns the time a device file's times start at: the image's modification time for
    /// the disk, and for a partition the time its device file was made.
    fn start_time(&self, entry: &DeviceEntry) -> SystemTime {
        if entry.node == DISK_INODE {
            self.mtime
        } else {
            entry.created
        }
    }

    fn base_attr(&self, inode: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(inode),
            size: 0,
            blocks: 0,
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.mtime,
            crtime: self.mtime,
            kind: FileType::RegularFile,
            perm: 0,
            nlink: 1,
            uid: self.owner.uid,
            gid: self.owner.gid,
            rdev: 0,
            flags: 0,
            blksize: BLOCK_SIZE,
        }
    }

    fn attr_of(&self, inode: u64) -> Option<FileAttr> {
        if inode == ROOT_INODE {
            return Some(self.directory_attr());
        }
        self.devices
            .find_by_inode(inode)
            .or_else(|| self.devices.find_open_by_inode(inode))
            .map(|entry| self.device_attr(&entry))
    }

    fn opened_file(&self, handle: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        self.devices.handle(u64::from(handle)).ok_or(Errno::EBADF)
    }
}

/// Pending background requests (readahead, asynchronous direct I/O) the kernel may queue.
const MAX_BACKGROUND: u16 = 64;

fn request_capability(config: &mut KernelConfig, capability: InitFlags) {
    if let Err(unsupported) = config.add_capabilities(capability) {
        log::warn!("the kernel does not support {unsupported:?}; continuing without it");
    }
}

/// Maps an I/O error to the errno sent to the kernel.
fn errno_of(error: &io::Error) -> Errno {
    match error.raw_os_error() {
        Some(code) => Errno::from_i32(code),
        None => Errno::EIO,
    }
}

/// Logs a failed request at the level its cause deserves and returns its errno.
fn failed(operation: &str, entry: &DeviceEntry, offset: u64, error: &io::Error) -> Errno {
    let errno = errno_of(error);
    match error.raw_os_error() {
        // Expected results of a device: the caller went past the end, or wrote to a
        // read-only attachment, or the backing filesystem is full.
        Some(libc::ENOSPC | libc::EROFS | libc::ENXIO | libc::EINVAL | libc::EOPNOTSUPP) => {
            log::debug!("{} {operation} at {offset:#x}: {error}", entry.name)
        }
        _ => log::warn!("{}: {operation} at {offset:#x} failed: {error}", entry.name),
    }
    errno
}

impl Filesystem for DeviceFs {
    fn init(&mut self, _request: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_REQUEST) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_REQUEST) {
            let _ = config.set_max_readahead(nearest);
        }
        // Lets the kernel keep several direct I/O requests of one caller in flight at once.
        request_capability(config, InitFlags::FUSE_ASYNC_DIO);
        match self.cache {
            CacheMode::Writeback => request_capability(config, InitFlags::FUSE_WRITEBACK_CACHE),
            // Without it, a shared mapping of a direct I/O file fails with ENODEV, where a
            // block device allows one.
            CacheMode::None => request_capability(config, InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP),
            CacheMode::Writethrough => {}
        }
        // Room for readahead and asynchronous direct I/O requests in flight (kernel default 12).
        let _ = config.set_max_background(MAX_BACKGROUND);
        log::debug!("kernel FUSE protocol {:?}", config.kernel_abi());
        Ok(())
    }

    fn lookup(&self, _request: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let entry = match (u64::from(parent), name.to_str()) {
            (ROOT_INODE, Some(name)) => self.devices.find_by_name(name),
            _ => None,
        };

        match entry {
            Some(entry) => reply.entry(&ATTR_TTL, &self.device_attr(&entry), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(
        &self,
        _request: &Request,
        inode: INodeNo,
        handle: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        // An open file keeps the device it opened, even after a rescan replaced its entry.
        let file = handle.and_then(|handle| self.devices.handle(u64::from(handle)));
        // Loaded first, so the common case does not write to the flag's cache line.
        if let Some(file) = &file
            && file.overrun_pending.load(Ordering::Relaxed)
            && file.overrun_pending.swap(false, Ordering::Relaxed)
        {
            // The kernel sends GETATTR before a cached write once its attributes are stale,
            // and this error fails that write (see `reject_write_past_end`).
            reply.error(Errno::ENOSPC);
            return;
        }
        let attr = match file {
            Some(file) => Some(self.device_attr(&file.entry)),
            None => self.attr_of(u64::from(inode)),
        };

        match attr {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _request: &Request,
        inode: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        handle: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // A block device's size cannot be truncated: O_TRUNC and truncate(2) succeed and
        // leave the device as it is, times included.
        let (atime, mtime) = match size {
            Some(_) => (None, None),
            None => (atime, mtime),
        };
        let changes_inode = mode.is_some() || uid.is_some() || gid.is_some();
        if changes_inode || atime.is_some() || mtime.is_some() {
            let inode = u64::from(inode);
            let entry = self
                .devices
                .find_by_inode(inode)
                .or_else(|| self.devices.find_open_by_inode(inode));
            let Some(entry) = entry else {
                reply.error(Errno::EPERM);
                return;
            };
            log::debug!(
                "setattr {} mode {mode:?} uid {uid:?} gid {gid:?} atime {atime:?} mtime {mtime:?}",
                entry.name
            );
            self.permissions.change(entry.node, mode, uid, gid);
            self.times
                .change(entry.node, self.start_time(&entry), atime, mtime);
        }
        self.getattr(_request, inode, handle, reply);
    }

    fn open(&self, _request: &Request, inode: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(entry) = self.devices.find_by_inode(u64::from(inode)) else {
            // A rescan or a write past the end may have replaced the inode. ESTALE makes the
            // kernel look the name up again and open the current file, or fail with ENOENT.
            reply.error(if u64::from(inode) == ROOT_INODE {
                Errno::EISDIR
            } else {
                Errno::ESTALE
            });
            return;
        };
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }

        log::debug!("open {} flags {:#x}", entry.name, flags.0);
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let handle = self.devices.open(entry, writable);
        let open_flags = match self.cache {
            // Every change to the data goes through this filesystem, so the kernel may keep
            // its cached pages of the file from one open to the next.
            CacheMode::Writethrough | CacheMode::Writeback => FopenFlags::FOPEN_KEEP_CACHE,
            CacheMode::None => {
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
            }
        };
        reply.opened(FileHandle(handle), open_flags);
    }

    fn read(
        &self,
        _request: &Request,
        _inode: INodeNo,
        handle: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file = match self.opened_file(handle) {
            Ok(file) => file,
            Err(errno) => return reply.error(errno),
        };
        let entry = &file.entry;

        READ_BUFFER.with_borrow_mut(|buffer| {
            if buffer.len() < size as usize {
                buffer.resize(size as usize, 0);
            }
            match entry.device.read_at(offset, &mut buffer[..size as usize]) {
                Ok(count) => reply.data(&buffer[..count]),
                Err(error) => reply.error(failed("read", entry, offset, &error)),
            }
        });
    }

    fn write(
        &self,
        _request: &Request,
        _inode: INodeNo,
        handle: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let file = match self.opened_file(handle) {
            Ok(file) => file,
            Err(errno) => return reply.error(errno),
        };
        // A write-back of cached pages, as opposed to a write() or O_DIRECT write that the
        // caller still waits for and that fails on its own.
        let cached = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let end = offset.saturating_add(data.len() as u64);
        if cached && end > file.entry.device.len() {
            return reply.error(self.reject_write_past_end(&file, offset, data));
        }

        match file.entry.device.write_at(offset, data) {
            Ok(count) => {
                file.record_write(offset, count as u64);
                reply.written(count as u32)
            }
            Err(error) => {
                if cached {
                    self.forget_failed_write_back(&file.entry, offset, data.len() as u64);
                }
                reply.error(failed("write", &file.entry, offset, &error))
            }
        }
    }

    /// Runs on every `close()` of a file, before `close` returns to the caller.
    fn flush(
        &self,
        _request: &Request,
        _inode: INodeNo,
        handle: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let file = match self.opened_file(handle) {
            Ok(file) => file,
            Err(errno) => return reply.error(errno),
        };

        self.invalidate_other_views(&file);
        if file.entry.overrun.load(Ordering::Relaxed) {
            // A lookup that raced with the write past the end may have cached the grown inode
            // under a name again, so the names are dropped once more before close returns.
            invalidate_names(self.notifier.get(), &file.entry);
        }
        if file.take_changed()
            && file.entry.name == DISK_NAME
            && let Some(on_disk_changed) = &self.on_disk_changed
        {
            on_disk_changed();
        }
        reply.ok();
    }

    fn release(
        &self,
        _request: &Request,
        _inode: INodeNo,
        handle: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(file) = self.devices.release(u64::from(handle)) {
            self.invalidate_other_views(&file);
        }
        reply.ok();

        if self.devices.open_count() == 0
            && let Some(on_last_close) = &self.on_last_close
        {
            on_last_close();
        }
    }

    fn fsync(
        &self,
        _request: &Request,
        _inode: INodeNo,
        handle: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let file = match self.opened_file(handle) {
            Ok(file) => file,
            Err(errno) => return reply.error(errno),
        };

        self.invalidate_other_views(&file);
        match file.entry.device.flush() {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(failed("fsync", &file.entry, 0, &error)),
        }
    }

    fn readdir(
        &self,
        _request: &Request,
        inode: INodeNo,
        _handle: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if u64::from(inode) != ROOT_INODE {
            reply.error(Errno::ENOTDIR);
            return;
        }

        let mut listing = vec![
            (ROOT_INODE, FileType::Directory, ".".to_string()),
            (ROOT_INODE, FileType::Directory, "..".to_string()),
        ];
        for entry in self.devices.entries() {
            listing.push((entry.inode, FileType::RegularFile, entry.name));
        }

        for (index, (inode, kind, name)) in listing.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(inode), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn ioctl(
        &self,
        _request: &Request,
        _inode: INodeNo,
        _handle: FileHandle,
        _flags: IoctlFlags,
        command: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // Block ioctls (BLKGETSIZE64, BLKSSZGET, BLKRRPART) need a block device. ENOTTY is
        // what a regular file returns, so tools fall back to stat and fallocate.
        log::debug!("ioctl {command:#x} is not supported on a device file");
        reply.error(Errno::ENOTTY);
    }

    fn getxattr(
        &self,
        _request: &Request,
        _inode: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // After ENOSYS the kernel treats extended attributes as unsupported: it sends no more
        // requests (security.selinux, security.capability) and returns EOPNOTSUPP itself.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _request: &Request, _inode: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _request: &Request, _inode: INodeNo, reply: ReplyStatfs) {
        let blocks = self.devices.disk().len() / u64::from(BLOCK_SIZE);
        let files = self.devices.entries().len() as u64;
        reply.statfs(blocks, 0, 0, files, 0, BLOCK_SIZE, 255, BLOCK_SIZE);
    }

    fn fallocate(
        &self,
        _request: &Request,
        _inode: INodeNo,
        handle: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let file = match self.opened_file(handle) {
            Ok(file) => file,
            Err(errno) => return reply.error(errno),
        };

        let device = file.entry.device.as_ref();
        match fallocate_device(device, self.sector_size, offset, length, mode) {
            Ok(()) => {
                file.record_write(offset, length);
                reply.ok()
            }
            Err(error) => reply.error(failed("fallocate", &file.entry, offset, &error)),
        }
    }

    fn lseek(
        &self,
        _request: &Request,
        _inode: INodeNo,
        handle: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let file = match self.opened_file(handle) {
            Ok(file) => file,
            Err(errno) => return reply.error(errno),
        };
        let entry = &file.entry;
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };

        let found = match whence {
            libc::SEEK_DATA => entry.device.seek_data(offset),
            libc::SEEK_HOLE => entry.device.seek_hole(offset),
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Ok(found) => reply.offset(found as i64),
            Err(error) => reply.error(failed("lseek", entry, offset, &error)),
        }
    }
}
