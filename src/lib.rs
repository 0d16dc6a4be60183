//! loopfuse: a loop device without the kernel loop driver.
//!
//! An image file is mapped into memory and served through FUSE as a directory holding a
//! `disk` file (and `p1`, `p2`, ... for its partitions) that behaves like `/dev/loopN`.
//! Data flows down one path: [`cli`] → [`attach`] → [`fs`] → [`block`] → [`image`].

pub mod block;
pub mod image;
pub mod partition;
