//! The image file: opening and validating it, its lock, the shared mapping, and the
//! operations that reach the file itself: flush, first writes into holes, punch hole, zero
//! range and data/hole lookup.
//!
//! This module does not depend on FUSE, partitions or the command line. It is the only module
//! with `unsafe` code, in [`map`] and [`sigbus`].

mod format;
mod map;
mod reserve;
mod sigbus;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, Flock, FlockArg, fallocate};
use nix::unistd::{Whence, lseek};

use crate::block::{BlockDevice, check_range, clamp_to_device};
pub use format::{ForeignFormat, detect_foreign_format};
use map::SharedMap;
use reserve::ReservationMap;

/// Bytes around a write that a cached folio of the image is expected to fit in: the 2 MiB of
/// a PMD on x86-64, an estimate of the largest page-cache folio.
// NOTE: on a kernel with larger page-cache folios, a store may allocate beyond this span.
const FOLIO_SPAN: u64 = 2 << 20;

/// Errors from opening an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    #[error("{}: image file not found (check the path, or create one with 'truncate -s 1G {}')", path.display(), path.display())]
    NotFound { path: PathBuf },

    #[error("{}: image file not found: its directory {} does not exist (check the path)", path.display(), directory.display())]
    DirectoryNotFound { path: PathBuf, directory: PathBuf },

    #[error("{}: image file not found: it is a symbolic link to {}, which does not exist (check the link)", path.display(), target.display())]
    DanglingLink { path: PathBuf, target: PathBuf },

    #[error("{}: cannot open the image", path.display())]
    Open { path: PathBuf, source: io::Error },

    #[error("{}: cannot open the image: this user may not enter the directory {} (ask its owner for search permission, or move the image)", path.display(), directory.display())]
    ClosedDirectory { path: PathBuf, directory: PathBuf },

    #[error("{}: permission denied for writing; make it writable, for example with 'chmod u+w {}'", path.display(), path.display())]
    NotWritable { path: PathBuf },

    #[error("{}: permission denied for writing, and it belongs to user {uid}; ask its owner for write access, or work on a copy", path.display())]
    NotWritableByOwner { path: PathBuf, uid: u32 },

    #[error("{}: is a {kind}, not an image file (give a regular file or a block device)", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },

    #[error("{}: image is empty (give it a size first, e.g. 'truncate -s 1G {}')", path.display(), path.display())]
    Empty { path: PathBuf },

    #[error("{}: is a {} image, not a raw disk; convert it with 'qemu-img convert -O raw {} {}.raw'", path.display(), format.name, path.display(), path.display())]
    ForeignDisk {
        path: PathBuf,
        format: ForeignFormat,
    },

    #[error("{}: is {} compressed; decompress it first and attach the result", path.display(), format.name)]
    Compressed {
        path: PathBuf,
        format: ForeignFormat,
    },

    #[error("{}: image is in use by another attachment{} (see 'loopfuse list'; it may belong to another user or program)", path.display(), if *holder_writes { " that writes to it" } else { "" })]
    Locked { path: PathBuf, holder_writes: bool },

    #[error("{}: cannot map the image into memory", path.display())]
    Map { path: PathBuf, source: io::Error },
}

/// Access mode of an attached image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

/// Facts about an image file found by [`probe`] without locking or mapping it.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// The path as given, made absolute.
    pub path: PathBuf,
    /// Size in bytes.
    pub len: u64,
    /// Whether the image is a block device rather than a regular file.
    pub is_block_device: bool,
}

/// Checks that `path` is a raw image that can be attached, and returns its size.
///
/// Rejects missing files, directories and other non-files, empty files, and files in a
/// container or compression format (qcow2, VMDK, VDI, VHD/VHDX, gzip, ...).
pub fn probe(path: &Path) -> Result<ImageInfo, ImageError> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut file = open_file(&path, Access::ReadOnly)?;
    let info = inspect(&path, &mut file)?;

    Ok(info)
}

/// Checks that the image at `path` is not locked by an attachment that conflicts with
/// `access`. The lock taken for the check is released at once; [`Image::open`] takes the real
/// one, so this only serves to report a conflict before anything is started.
pub fn check_unlocked(path: &Path, access: Access) -> Result<(), ImageError> {
    let file = open_file(path, Access::ReadOnly)?;
    lock(file, path, access).map(drop)
}

/// Returns whether this user may not write to `path` because of its permissions or a
/// read-only filesystem: the two cases in which losetup sets up a read-only device instead.
pub fn is_write_protected(path: &Path) -> bool {
    use nix::unistd::{AccessFlags, access};
    // EACCES also comes from a directory on the path that this user may not search. Such a
    // file cannot be reached at all, so opening it reports the real error.
    let reachable = access(path, AccessFlags::F_OK).is_ok();
    reachable
        && matches!(
            access(path, AccessFlags::W_OK),
            Err(nix::errno::Errno::EACCES | nix::errno::Errno::EROFS)
        )
}

fn lock(file: File, path: &Path, access: Access) -> Result<Flock<File>, ImageError> {
    let lock_kind = match access {
        Access::ReadWrite => FlockArg::LockExclusiveNonblock,
        Access::ReadOnly => FlockArg::LockSharedNonblock,
    };

    Flock::lock(file, lock_kind).map_err(|(_, _)| ImageError::Locked {
        path: path.to_path_buf(),
        // A shared lock only conflicts with an exclusive one, held by a writer.
        holder_writes: access == Access::ReadOnly,
    })
}

fn open_file(path: &Path, access: Access) -> Result<File, ImageError> {
    let metadata = std::fs::metadata(path).map_err(|source| open_error(path, source))?;
    check_file_type(path, &metadata.file_type())?;

    // O_NONBLOCK keeps a FIFO that appears between the check and the open from blocking us.
    let mut options = OpenOptions::new();
    options.read(true).write(access == Access::ReadWrite);
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    options.open(path).map_err(|source| {
        if access == Access::ReadWrite && source.kind() == io::ErrorKind::PermissionDenied {
            let path = path.to_path_buf();
            // Only the owner (or root) can change the mode, so the advice depends on it.
            let uid = metadata.uid();
            if uid == nix::unistd::geteuid().as_raw() {
                ImageError::NotWritable { path }
            } else {
                ImageError::NotWritableByOwner { path, uid }
            }
        } else {
            open_error(path, source)
        }
    })
}

fn open_error(path: &Path, source: io::Error) -> ImageError {
    let missing_directory = outermost_missing_directory(path);
    let dangling_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if source.kind() == io::ErrorKind::NotFound && dangling_link {
        ImageError::DanglingLink {
            path: path.to_path_buf(),
            target: missing_link_target(path),
        }
    } else if let (io::ErrorKind::NotFound, Some(directory)) = (source.kind(), missing_directory) {
        ImageError::DirectoryNotFound {
            path: path.to_path_buf(),
            directory: directory.to_path_buf(),
        }
    } else if source.kind() == io::ErrorKind::NotFound {
        ImageError::NotFound {
            path: path.to_path_buf(),
        }
    } else if let Some(directory) = closed_directory(path, &source) {
        ImageError::ClosedDirectory {
            path: path.to_path_buf(),
            directory,
        }
    } else {
        ImageError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Returns the first directory on the way to `path` that does not exist, if its own
/// directory is missing: for `/data/a/b/disk.img` without `/data/a`, that is `/data/a`.
fn outermost_missing_directory(path: &Path) -> Option<PathBuf> {
    let mut missing = None;
    for directory in path.ancestors().skip(1) {
        if directory.as_os_str().is_empty() || directory.exists() {
            break;
        }
        missing = Some(directory.to_path_buf());
    }
    missing
}

/// Returns the first directory on the way to `path` that this user may not search, when
/// that is why opening it failed with EACCES.
fn closed_directory(path: &Path, source: &io::Error) -> Option<PathBuf> {
    use nix::unistd::{AccessFlags, access};
    if source.kind() != io::ErrorKind::PermissionDenied {
        return None;
    }
    let directories: Vec<&Path> = path.ancestors().skip(1).collect();
    directories
        .into_iter()
        .rev()
        .filter(|directory| !directory.as_os_str().is_empty())
        .find(|directory| access(*directory, AccessFlags::X_OK).is_err())
        .map(Path::to_path_buf)
}

/// Follows a chain of symbolic links from `path` and returns the target that is missing. A
/// relative target is shown as the link gives it when it is the first one, and joined to
/// its link's directory further down the chain.
fn missing_link_target(path: &Path) -> PathBuf {
    // As many links as the kernel follows (MAXSYMLINKS).
    const MAX_LINKS: usize = 40;
    let mut target = std::fs::read_link(path).unwrap_or_default();
    let mut link = path.parent().unwrap_or(Path::new("")).join(&target);
    for _ in 1..MAX_LINKS {
        let Ok(next) = std::fs::read_link(&link) else {
            break;
        };
        link = link.parent().unwrap_or(Path::new("")).join(next);
        target = link.clone();
    }
    target
}

fn check_file_type(path: &Path, file_type: &std::fs::FileType) -> Result<(), ImageError> {
    let kind = if file_type.is_file() || file_type.is_block_device() {
        return Ok(());
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else {
        "special file"
    };

    Err(ImageError::NotAFile {
        path: path.to_path_buf(),
        kind,
    })
}

/// Reads the size and the format magic of an open image file.
fn inspect(path: &Path, file: &mut File) -> Result<ImageInfo, ImageError> {
    let open_error = |source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    };
    let metadata = file.metadata().map_err(open_error)?;
    check_file_type(path, &metadata.file_type())?;

    let is_block_device = metadata.file_type().is_block_device();
    let len = if is_block_device {
        file.seek(SeekFrom::End(0)).map_err(open_error)?
    } else {
        metadata.len()
    };
    if len == 0 {
        return Err(ImageError::Empty {
            path: path.to_path_buf(),
        });
    }

    let (head, tail) = read_head_and_tail(file, len).map_err(open_error)?;
    if let Some(format) = detect_foreign_format(&head, &tail) {
        let path = path.to_path_buf();
        return Err(if format.convertible_by_qemu {
            ImageError::ForeignDisk { path, format }
        } else {
            ImageError::Compressed { path, format }
        });
    }

    Ok(ImageInfo {
        path: path.to_path_buf(),
        len,
        is_block_device,
    })
}

/// `f_type` of ramfs, which the `libc` crate does not define.
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// The path of the writes to an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WritePath {
    /// Through the mapping: a block device, which has no holes.
    Map,
    /// Through the mapping where every block around the write is allocated, else through
    /// `pwrite`: a filesystem that overwrites allocated blocks in place (ext2/3/4, tmpfs).
    MapWhereAllocated,
    /// Always through `pwrite`: a filesystem that may copy a block on write (btrfs, XFS
    /// with shared extents) or one not known to overwrite in place. A store through the
    /// mapping there would allocate a new copy of each whole large folio it dirties.
    File,
}

/// The read and write paths that the image file's filesystem calls for.
struct Storage {
    writes: WritePath,
    /// True on tmpfs and ramfs, where mapping a hole allocates memory for it: reads then use
    /// `pread`, which returns zeros for holes and allocates nothing.
    reads_through_file: bool,
}

impl Storage {
    fn of(file: &File, is_block_device: bool) -> Self {
        use nix::sys::statfs::{FsType, fstatfs};

        if is_block_device {
            return Self {
                writes: WritePath::Map,
                reads_through_file: false,
            };
        }
        let kind = fstatfs(file).map(|stat| stat.filesystem_type()).ok();
        let is = |magic: libc::c_long| kind == Some(FsType(magic as _));
        let in_memory = is(libc::TMPFS_MAGIC) || is(RAMFS_MAGIC);
        let in_place = in_memory || is(libc::EXT4_SUPER_MAGIC);
        Self {
            writes: if in_place {
                WritePath::MapWhereAllocated
            } else {
                WritePath::File
            },
            reads_through_file: in_memory,
        }
    }
}

fn read_head_and_tail(file: &mut File, len: u64) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut head = Vec::with_capacity(format::HEAD_LEN);
    file.seek(SeekFrom::Start(0))?;
    file.by_ref()
        .take(format::HEAD_LEN as u64)
        .read_to_end(&mut head)?;

    let mut tail = Vec::new();
    let footer_len = format::VHD_FOOTER_LEN as u64;
    if len >= footer_len * 2 {
        file.seek(SeekFrom::Start(len - footer_len))?;
        file.by_ref().take(footer_len).read_to_end(&mut tail)?;
    }

    Ok((head, tail))
}

/// An attached image: the open, locked file and its shared mapping.
///
/// The file is locked with `flock` for as long as this value lives: exclusively for
/// read-write access, shared for read-only access, so two writers never share an image.
pub struct Image {
    path: PathBuf,
    file: Flock<File>,
    map: SharedMap,
    read_only: bool,
    /// Pages known to have their blocks allocated since attach.
    reservations: ReservationMap,
    storage: Storage,
}

impl Image {
    /// Opens, checks, locks and maps the image at `path`.
    pub fn open(path: &Path, access: Access) -> Result<Self, ImageError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let mut file = open_file(&path, access)?;
        let info = inspect(&path, &mut file)?;

        let file = lock(file, &path, access)?;

        let read_only = access == Access::ReadOnly;
        let map = SharedMap::new(&file, info.len, read_only).map_err(|source| ImageError::Map {
            path: path.clone(),
            source,
        })?;
        sigbus::install(&path);
        log::debug!(
            "{}: mapped {} bytes, read_only={read_only}",
            path.display(),
            info.len
        );

        Ok(Self {
            reservations: ReservationMap::new(info.len),
            storage: Storage::of(&file, info.is_block_device),
            path,
            file,
            map,
            read_only,
        })
    }

    /// Absolute path of the image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of memory used to track reserved pages, for diagnostics.
    pub fn reservation_memory(&self) -> usize {
        self.reservations.memory_bytes()
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }

    /// Returns whether a write to `offset..offset + len` may store through the mapping:
    /// whether every block of the folios it can land in is allocated.
    ///
    /// A store through the mapping dirties the whole page-cache folio, and ext4 caches a hole
    /// that was read as one large folio. Storing into it allocates the whole folio, and on a
    /// full filesystem the store faults instead of failing. Pages are marked once written
    /// through the file, and a span that was data before attach is found with a `SEEK_HOLE`.
    fn can_store_through_map(&self, offset: u64, len: u64) -> io::Result<bool> {
        match self.storage.writes {
            WritePath::Map => return Ok(true),
            WritePath::File => return Ok(false),
            WritePath::MapWhereAllocated => {}
        }
        let start = offset - offset % FOLIO_SPAN;
        let end = (offset + len).next_multiple_of(FOLIO_SPAN).min(self.len());
        let (first, last) = ReservationMap::page_span(start, end - start);
        if self.reservations.all_reserved(first, last) {
            return Ok(true);
        }
        match self.seek(start, Whence::SeekHole) {
            Ok(hole) if hole >= end => {
                self.reservations.mark(first, last);
                Ok(true)
            }
            Ok(_) => Ok(false),
            // The file ends before `start`: another program truncated it.
            Err(error) if error.raw_os_error() == Some(libc::ENXIO) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Writes `data` at `offset` with `pwrite`, which allocates only the blocks written or
    /// fails with `ENOSPC`, and marks the pages it filled as allocated.
    ///
    /// Unlike an `fallocate` and a store through the mapping, it takes no page fault that
    /// reads the hole ahead into large zeroed folios. That cut `mkfs.ext4 -d /usr/include` on a 4
    /// GiB sparse image from 2.1 s to 1.8 s (Linux 6.18, ext4, 2 cores). On a full filesystem it
    /// returns what it wrote before `ENOSPC`, so the writer gets a short write, then the error.
    fn write_reserving(&self, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.check_not_shrunk(offset + data.len() as u64)?;
        let mut written = 0;
        while written < data.len() {
            let at = offset + written as u64;
            match std::os::unix::fs::FileExt::write_at(&*self.file, &data[written..], at) {
                Ok(0) if written == 0 => return Err(io::ErrorKind::WriteZero.into()),
                Ok(0) => break,
                Ok(count) => written += count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) if written == 0 => return Err(error),
                Err(_) => break,
            }
        }
        let (first, end) = ReservationMap::whole_pages(offset, written as u64);
        self.reservations.mark(first, end);
        Ok(written)
    }

    /// Marks the pages wholly inside `offset..offset + len` as allocated, after `fallocate`
    /// allocated that range. A partial page may hold blocks outside it, on a filesystem
    /// with blocks smaller than a page.
    fn mark_allocated(&self, offset: u64, len: u64) {
        let (first, end) = ReservationMap::whole_pages(offset, len);
        self.reservations.mark(first, end);
    }

    /// Fails with `EIO` when the image file no longer reaches `end`, instead of letting a
    /// `pwrite` grow a file that another program truncated.
    fn check_not_shrunk(&self, end: u64) -> io::Result<()> {
        if self.file.metadata()?.len() >= end {
            return Ok(());
        }
        Err(self.truncated(end))
    }

    /// Logs that the image file ends before `end` and returns the `EIO` for the request.
    fn truncated(&self, end: u64) -> io::Error {
        log::error!(
            "{}: image ends before {end:#x}: was it truncated? Detach it and check the file",
            self.path.display()
        );
        io::Error::from_raw_os_error(libc::EIO)
    }

    /// Writes all of `data` at `offset` through the file descriptor instead of the mapping.
    ///
    /// A store through the mapping dirties the whole page-cache folio it lands in, and when
    /// the image's folios are large (ext4 caches a hole that was read as one large folio)
    /// writeback then allocates the whole folio. A `pwrite` marks only the written blocks,
    /// so copying scattered pages into a sparse image allocates only what was written.
    pub fn write_through_file(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, data.len() as u64, self.len())?;
        let mut written = 0;
        while written < data.len() {
            // After a short write, the next call fails with the error that cut it short.
            written += self.write_reserving(offset + written as u64, &data[written..])?;
        }
        Ok(())
    }

    /// Reads through the file descriptor the pages that the mapping cannot map.
    ///
    /// Mapping a hole of a tmpfs image allocates a page, which fails once the tmpfs is full,
    /// while `pread` returns zeros for it. A short read means that the file was truncated.
    fn read_through_file(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match std::os::unix::fs::FileExt::read_exact_at(&*self.file, buf, offset) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.truncated(offset + buf.len() as u64))
            }
            Err(error) => Err(error),
        }
    }

    fn fallocate(&self, flags: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        fallocate(self.file.as_fd(), flags, offset as i64, len as i64)?;
        Ok(())
    }

    fn seek(&self, offset: u64, whence: Whence) -> io::Result<u64> {
        let found = lseek(self.file.as_fd(), offset as i64, whence)?;
        Ok(found as u64)
    }
}

impl BlockDevice for Image {
    fn len(&self) -> u64 {
        self.map.len()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let count = clamp_to_device(offset, buf.len(), self.len());
        if self.storage.reads_through_file {
            self.read_through_file(offset, &mut buf[..count])?;
            return Ok(count);
        }
        // NOTE: a read of the part of the last page that a truncation cut off returns the
        // zeros the kernel left there, not EIO. Only whole lost pages fail.
        match self.map.copy_out(offset, &mut buf[..count]) {
            Ok(()) => Ok(count),
            Err(error) if error.raw_os_error() == Some(libc::EFAULT) => {
                self.read_through_file(offset, &mut buf[..count])?;
                Ok(count)
            }
            Err(error) => Err(error),
        }
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.check_writable()?;
        let count = clamp_to_device(offset, data.len(), self.len());
        if count == 0 {
            return match data.is_empty() {
                true => Ok(0),
                false => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            };
        }

        let data = &data[..count];
        if !self.can_store_through_map(offset, count as u64)? {
            return self.write_reserving(offset, data);
        }
        // A store past a new end inside the last page would succeed and be lost.
        self.check_not_shrunk(offset + count as u64)?;
        match self.map.copy_in(offset, data) {
            Ok(()) => Ok(count),
            // The filesystem could not allocate a page it did not hold: `pwrite` reports
            // why, ENOSPC on a full filesystem.
            Err(error) if error.raw_os_error() == Some(libc::EFAULT) => {
                self.write_reserving(offset, data)
            }
            Err(error) => Err(error),
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }

        self.map.flush()?;
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.len())?;

        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        self.fallocate(flags, offset, len)?;
        let (first, end) = ReservationMap::page_span(offset, len);
        self.reservations.clear(first, end);

        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.len())?;
        // Zeroing a range allocates it, also past the end of a file that was truncated.
        self.check_not_shrunk(offset + len)?;

        let flags = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(flags, offset, len) {
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // tmpfs and some others lack ZERO_RANGE: punch the range, then allocate it.
                self.discard(offset, len)?;
                self.allocate(offset, len)
            }
            Err(error) => Err(error),
            Ok(()) => {
                self.mark_allocated(offset, len);
                Ok(())
            }
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.len())?;
        self.check_not_shrunk(offset + len)?;

        self.fallocate(FallocateFlags::FALLOC_FL_KEEP_SIZE, offset, len)?;
        self.mark_allocated(offset, len);

        Ok(())
    }

    fn seek_data(&self, offset: u64) -> io::Result<u64> {
        if offset >= self.len() {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        self.seek(offset, Whence::SeekData)
            .map(|found| found.min(self.len()))
    }

    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        if offset >= self.len() {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        self.seek(offset, Whence::SeekHole)
            .map(|found| found.min(self.len()))
    }

    fn allocated_sectors(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks())
    }
}

#[cfg(test)]
mod tests;
