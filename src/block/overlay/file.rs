//! Opening an overlay from file paths: the base image read-only, the overlay file through the
//! same shared mapping (and space reservations) as any image.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use super::error::OverlayError;
use super::format::Layout;
use super::identity::{BaseIdentity, FileIdentity};
use super::{DEFAULT_BLOCK_SIZE, Overlay, read_header};
use crate::image::{Access, Image};

/// Treatment of the overlay file by [`open_overlay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayMode {
    /// Continue the overlay in the file; create it when the file is missing or empty.
    OpenOrCreate,
    /// Start a new overlay, replacing whatever the file contains (a `--snapshot`).
    Replace,
}

/// An overlay opened from its files.
pub struct OpenedOverlay {
    pub overlay: Overlay,
    /// Whether the overlay file was created by this call.
    pub created: bool,
    /// Whether the base file is not the one the overlay was made on (device, inode or
    /// modification time differ) although its size and first and last MiB match.
    pub base_file_differs: bool,
}

/// Opens the image at `base_path` read-only and the overlay at `overlay_path` on top of it.
///
/// With `read_only`, the overlay file is opened read-only and must exist.
pub fn open_overlay(
    base_path: &Path,
    overlay_path: &Path,
    mode: OverlayMode,
    read_only: bool,
) -> Result<OpenedOverlay, OverlayError> {
    // NOTE: the SIGBUS message names the base image even when the overlay file is truncated.
    let base = Arc::new(Image::open(base_path, Access::ReadOnly)?);
    let identity = identity_of(&base)?;

    let state = file_state(overlay_path)?;
    let create = mode == OverlayMode::Replace || state != FileState::Holds;
    if create && read_only {
        return Err(OverlayError::NotFoundReadOnly {
            path: overlay_path.to_path_buf(),
        });
    }

    if create {
        let layout = Layout::new(identity.len, DEFAULT_BLOCK_SIZE);
        create_file(overlay_path, layout.file_len(), state == FileState::Missing)?;
        let created = Image::open(overlay_path, Access::ReadWrite)
            .map_err(OverlayError::from)
            .and_then(|store| {
                Overlay::create(
                    base,
                    Arc::new(store),
                    overlay_path,
                    identity,
                    DEFAULT_BLOCK_SIZE,
                )
            });
        let overlay = created.inspect_err(|_| undo_create(overlay_path, state))?;
        return Ok(OpenedOverlay {
            overlay,
            created: true,
            base_file_differs: false,
        });
    }

    let store = Arc::new(Image::open(overlay_path, access_of(read_only))?);
    let base_path = base.path().to_path_buf();
    let (overlay, base_file_differs) =
        Overlay::open(base, store, overlay_path, &identity, &base_path)?;

    Ok(OpenedOverlay {
        overlay,
        created: false,
        base_file_differs,
    })
}

/// Checks, without changing anything, that the overlay at `overlay_path` (if it contains one)
/// fits the image at `base_path`, that the image is not locked by a writer, and that the
/// overlay is not locked against the access that `read_only` requests.
///
/// Returns whether the base file differs from the one the overlay was made on, as
/// [`OpenedOverlay::base_file_differs`].
pub fn check_overlay(
    base_path: &Path,
    overlay_path: &Path,
    read_only: bool,
) -> Result<bool, OverlayError> {
    super::commit::check_distinct(overlay_path, base_path)?;
    if file_state(overlay_path)? != FileState::Holds {
        return Ok(false);
    }

    let base = Image::open(base_path, Access::ReadOnly)?;
    let identity = identity_of(&base)?;
    let store = Image::open(overlay_path, access_of(read_only))?;
    let header = read_header(&store, overlay_path)?;
    if header.committing {
        return Err(OverlayError::InterruptedCommit {
            path: overlay_path.to_path_buf(),
            base: base.path().to_path_buf(),
        });
    }

    header.base.check(&identity, overlay_path, base.path())
}

fn access_of(read_only: bool) -> Access {
    if read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    }
}

/// Computes the identity of an opened base image.
pub(super) fn identity_of(base: &Image) -> Result<BaseIdentity, OverlayError> {
    let read_error = |source| OverlayError::io(base.path(), "reading the base image", source);
    let metadata = std::fs::metadata(base.path()).map_err(read_error)?;

    BaseIdentity::of(base, FileIdentity::of(&metadata)).map_err(read_error)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileState {
    Missing,
    Empty,
    /// The file has bytes, which should be an overlay.
    Holds,
}

fn file_state(path: &Path) -> Result<FileState, OverlayError> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.len() == 0 => Ok(FileState::Empty),
        Ok(_) => Ok(FileState::Holds),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(FileState::Missing),
        Err(source) => Err(OverlayError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Undoes [`create_file`] after the new overlay could not be written (a full filesystem),
/// so that a retry does not find a file without a header: a file it made is removed, and
/// one that was there is left empty.
fn undo_create(path: &Path, state: FileState) {
    let undone = match state {
        FileState::Missing => std::fs::remove_file(path),
        FileState::Empty | FileState::Holds => OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|file| file.set_len(0)),
    };
    if let Err(error) = undone {
        log::warn!(
            "{}: cannot remove the overlay that was not written: {error}",
            path.display()
        );
    }
}

/// Creates the overlay file (mode 0600, because it contains disk data) as a sparse file of `len` bytes.
/// A file that exists is emptied first unless `new` demands that none exists.
fn create_file(path: &Path, len: u64, new: bool) -> Result<(), OverlayError> {
    let create_error = |source| OverlayError::Create {
        path: path.to_path_buf(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).mode(0o600);
    if new {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }

    let file = options.open(path).map_err(create_error)?;
    file.set_len(len).map_err(create_error)
}
