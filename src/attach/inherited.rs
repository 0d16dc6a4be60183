//! Closing the file descriptors a long-lived helper process inherited by accident.
//!
//! A shell, `make` or a CI runner may leave descriptors open without close-on-exec (a
//! jobserver pipe, a runner's log pipe). A daemon that kept such a pipe open would keep its
//! reader waiting for an end of file long after the command that started it has finished.

use std::os::fd::RawFd;

/// Closes every descriptor above standard error except those in `keep`. Must run before
/// this process opens any descriptor of its own.
pub fn close_inherited_descriptors(keep: &[RawFd]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Collected first: the directory listing has a descriptor of its own until it is dropped.
    let open: Vec<RawFd> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for descriptor in open {
        if descriptor > 2 && !keep.contains(&descriptor) {
            // The listing's own descriptor is closed by now, so its close fails with EBADF.
            let _ = nix::unistd::close(descriptor);
        }
    }
}
