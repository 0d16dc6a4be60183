//! Whether a path is a mount point, read from `/proc/self/mountinfo`.

use std::path::Path;

/// Returns whether `path` is currently a mount point, according to `/proc/self/mountinfo`.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = escape_mount_path(&path.to_string_lossy());

    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

/// Escapes a path as `/proc/self/mountinfo` writes it (space, tab, newline, backslash).
fn escape_mount_path(path: &str) -> String {
    let mut escaped = String::with_capacity(path.len());
    for character in path.chars() {
        match character {
            ' ' => escaped.push_str("\\040"),
            '\t' => escaped.push_str("\\011"),
            '\n' => escaped.push_str("\\012"),
            '\\' => escaped.push_str("\\134"),
            other => escaped.push(other),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_escaped_like_mountinfo() {
        assert_eq!(escape_mount_path("/run/a b\\c"), "/run/a\\040b\\134c");
    }
}
