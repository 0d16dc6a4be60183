//! loopfuse: a loop device without the kernel loop driver.
//!
//! An image file is mapped into memory and served through FUSE as a directory holding a
//! `disk` file (and `p1`, `p2`, ... for its partitions) that behaves like `/dev/loopN`.
//! Data flows down one path: [`cli`] → [`attach`] → [`fs`] → [`block`] → [`image`].

pub mod attach;
pub mod block;
pub mod cli;
pub mod doctor;
pub mod fs;
pub mod image;
pub mod mount;
pub mod partition;
pub mod registry;

/// Formats an error and its chain of sources on one line: `outer: cause: root cause`.
///
/// A source whose text the outer message already contains is left out, so wrapped errors
/// are not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();

    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
