//! Attach requests: their options, the device range they give, and their validation
//! against the image and the environment before anything is created.

use std::path::{Path, PathBuf};

use super::AttachError;
use super::environment::{self, EnvironmentError};
use super::lifecycle::Lifecycle;
use super::namespace;
use crate::block::overlay::{self, OverlayError};
use crate::fs::CacheMode;
use crate::image::{self, Access, ImageError};
use crate::registry::Registry;

/// Sector sizes a device may have, as for `losetup -b`.
pub const SECTOR_SIZES: [u32; 4] = [512, 1024, 2048, 4096];

/// A validated attach request.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub image: PathBuf,
    /// Byte offset of the device inside the image.
    pub offset: u64,
    /// Maximum size of the device in bytes; `None` means up to the end of the image.
    pub sizelimit: Option<u64>,
    pub read_only: bool,
    /// Whether to expose the partitions of the device as `p1`, `p2`, ...
    pub partscan: bool,
    /// Logical sector size, one of [`SECTOR_SIZES`].
    pub sector_size: u32,
    /// Whether users other than the attaching one may open the device files.
    pub allow_other: bool,
    /// Kernel caching of the device files' data.
    pub cache: CacheMode,
    /// Overlay file that receives every write, leaving the image unchanged.
    pub overlay: Option<PathBuf>,
    /// Whether to write to a new overlay in the registry, removed at detach.
    pub snapshot: bool,
    /// When the attachment detaches itself, and where its PID is published.
    pub lifecycle: Lifecycle,
}

impl AttachOptions {
    /// Options for attaching the whole of `image` read-write.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        Self {
            image: image.into(),
            offset: 0,
            sizelimit: None,
            read_only: false,
            partscan: false,
            sector_size: 512,
            allow_other: false,
            cache: CacheMode::default(),
            overlay: None,
            snapshot: false,
            lifecycle: Lifecycle::default(),
        }
    }

    /// Returns whether writes go to an overlay instead of the image.
    pub fn uses_overlay(&self) -> bool {
        self.overlay.is_some() || self.snapshot
    }

    /// Access to the image itself: read-only under an overlay, which takes the writes.
    fn image_access(&self) -> Access {
        if self.read_only || self.uses_overlay() {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        }
    }
}

/// Returns `options` made read-only when the image is write-protected, since losetup then
/// sets up a read-only device instead of failing. An overlay takes the writes itself.
pub fn read_only_if_write_protected(options: &AttachOptions) -> AttachOptions {
    let mut options = options.clone();
    if !options.read_only && !options.uses_overlay() && image::is_write_protected(&options.image) {
        log::warn!(
            "{}: write-protected, attaching read-only",
            options.image.display()
        );
        options.read_only = true;
    }
    options
}

/// The device range of an image: `(offset, size)` in bytes.
///
/// The size is rounded down to whole sectors, as the kernel loop driver does. The returned
/// `bool` is true when a partial sector at the end was left out.
pub fn device_range(
    options: &AttachOptions,
    image_len: u64,
) -> Result<(u64, u64, bool), AttachError> {
    let path = options.image.clone();
    if options.offset >= image_len {
        return Err(AttachError::OffsetPastEnd {
            path,
            offset: options.offset,
            len: image_len,
        });
    }

    // A size limit past the end of the image is cut to the image, as the kernel loop
    // driver does, so `--sizelimit` is a maximum.
    let available = image_len - options.offset;
    let size = match options.sizelimit {
        Some(limit) if limit > 0 => limit.min(available),
        _ => available,
    };

    let sector = u64::from(options.sector_size);
    let whole_sectors = size - size % sector;
    if whole_sectors == 0 {
        return Err(AttachError::SmallerThanSector {
            path,
            size,
            sector_size: options.sector_size,
        });
    }

    Ok((options.offset, whole_sectors, whole_sectors != size))
}

/// Checks an attach request against the image and the environment, without changing
/// anything, and returns the device range.
pub fn validate(options: &AttachOptions, registry: &Registry) -> Result<(u64, u64), AttachError> {
    let info = image::probe(&options.image)?;
    // The registry stores paths in JSON, which holds only UTF-8.
    let pidfile = options.lifecycle.pidfile.as_ref();
    for path in [Some(&info.path), options.overlay.as_ref(), pidfile]
        .into_iter()
        .flatten()
    {
        if path.to_str().is_none() {
            return Err(AttachError::NotUtf8 { path: path.clone() });
        }
    }
    let options = &AttachOptions {
        image: info.path.clone(),
        ..options.clone()
    };
    let (offset, size, cut) = device_range(options, info.len)?;
    if let Err(error) = image::check_unlocked(&info.path, options.image_access()) {
        return Err(explain_lock_conflict(error, registry));
    }
    if let Some(overlay_path) = &options.overlay {
        check_overlay(&info.path, overlay_path, options.read_only, registry)?;
    }
    environment::check_mount_possible().map_err(explain_environment)?;
    options.lifecycle.validate()?;

    if cut {
        let available = info.len - offset;
        let (requested, what) = match options.sizelimit {
            Some(limit) if limit > 0 && limit < available => {
                (limit, format!("the size limit {limit} is"))
            }
            _ if offset == 0 => (available, format!("its {available} bytes are")),
            _ => (
                available,
                format!("the {available} bytes after the offset are"),
            ),
        };
        log::warn!(
            "{}: {what} not a whole number of {}-byte sectors; the last {} bytes are left out",
            info.path.display(),
            options.sector_size,
            requested - size
        );
    }

    Ok((offset, size))
}

/// Adds to an environment error that `loopfuse run` still works, when the setuid helper is
/// the only problem and the kernel settings allow user namespaces.
fn explain_environment(error: EnvironmentError) -> AttachError {
    if error.is_about_fusermount() && namespace::user_namespace_restrictions().is_empty() {
        AttachError::NamespaceOnly { source: error }
    } else {
        AttachError::Environment(error)
    }
}

/// Checks that the overlay at `overlay_path` fits the image and is not in use, and warns when
/// the image file is another one than the overlay was made on (a copy, or a touched file).
fn check_overlay(
    image_path: &Path,
    overlay_path: &Path,
    read_only: bool,
    registry: &Registry,
) -> Result<(), AttachError> {
    match overlay::check_overlay(image_path, overlay_path, read_only) {
        Ok(false) => Ok(()),
        Ok(true) => {
            log::warn!(
                "{}: not the file the overlay {} was made on, but its size and first and last MiB match; continuing as if it were an unchanged copy",
                image_path.display(),
                overlay_path.display()
            );
            Ok(())
        }
        Err(OverlayError::Image(error)) => Err(explain_lock_conflict(error, registry)),
        Err(error) => Err(error.into()),
    }
}

/// Replaces a lock conflict with one naming the attachment that holds the lock, when the
/// registry lists it as the image or the overlay of an attachment.
pub fn explain_lock_conflict(error: ImageError, registry: &Registry) -> AttachError {
    let ImageError::Locked { path, .. } = &error else {
        return error.into();
    };
    let holder = registry.list().ok().and_then(|entries| {
        entries
            .into_iter()
            .find(|entry| entry.is_image(path) || is_overlay_of(entry, path))
    });

    match holder {
        // Unmounted lazily, by `run` or `losetup -d` of a busy device: served until closed.
        Some(entry) if entry.state.autoclear && !super::is_mounted(&entry.mountpoint) => {
            AttachError::DetachingWhenClosed {
                path: path.clone(),
                name: entry.state.name,
            }
        }
        Some(entry) => AttachError::AlreadyAttached {
            path: path.clone(),
            // An image under an overlay is opened read-only, whatever the device allows.
            read_only: entry.state.read_only
                || (entry.is_image(path) && entry.state.overlay.is_some()),
            name: entry.state.name,
        },
        None => error.into(),
    }
}

/// Returns whether `path` is the overlay file of `entry`, also through a link.
fn is_overlay_of(entry: &crate::registry::Entry, path: &std::path::Path) -> bool {
    let Some(overlay) = &entry.state.overlay else {
        return false;
    };
    overlay == path
        || crate::registry::FileId::of(path)
            .is_some_and(|id| crate::registry::FileId::of(overlay) == Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(offset: u64, sizelimit: Option<u64>) -> AttachOptions {
        AttachOptions {
            offset,
            sizelimit,
            ..AttachOptions::new("disk.img")
        }
    }

    #[test]
    fn device_range_covers_rest_of_image() {
        assert_eq!(
            device_range(&options(0, None), 1 << 20).unwrap(),
            (0, 1 << 20, false)
        );
        assert_eq!(
            device_range(&options(4096, None), 1 << 20).unwrap(),
            (4096, (1 << 20) - 4096, false)
        );
    }

    #[test]
    fn device_range_honours_sizelimit() {
        assert_eq!(
            device_range(&options(512, Some(1024)), 4096).unwrap(),
            (512, 1024, false)
        );
    }

    #[test]
    fn device_range_drops_partial_sector() {
        assert_eq!(
            device_range(&options(0, None), 1000).unwrap(),
            (0, 512, true)
        );
    }

    #[test]
    fn device_range_cuts_size_limit_at_image_end() {
        assert_eq!(
            device_range(&options(512, Some(4096)), 4096).unwrap(),
            (512, 3584, false)
        );
        assert_eq!(
            device_range(&options(0, Some(1 << 30)), 64 << 20).unwrap(),
            (0, 64 << 20, false)
        );
    }

    #[test]
    fn device_range_rejects_bad_windows() {
        assert!(matches!(
            device_range(&options(4096, None), 4096),
            Err(AttachError::OffsetPastEnd { .. })
        ));
        assert!(matches!(
            device_range(&options(0, None), 100),
            Err(AttachError::SmallerThanSector { .. })
        ));
    }
}
