//! `fallocate(2)` on a device file, with the semantics of a block device.

use std::io;

use crate::block::BlockDevice;

/// Applies an `fallocate(2)` request to a device, with block-device semantics: the size never
/// changes, and ranges are clamped to the end of the device.
pub fn fallocate_device(
    device: &dyn BlockDevice,
    offset: u64,
    length: u64,
    mode: i32,
) -> io::Result<()> {
    let device_len = device.len();
    let end = offset.saturating_add(length).min(device_len);
    let length = end.saturating_sub(offset);
    let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;

    match mode & !libc::FALLOC_FL_KEEP_SIZE {
        libc::FALLOC_FL_PUNCH_HOLE if keep_size => {
            if length > 0 {
                device.discard(offset, length)
            } else {
                Ok(())
            }
        }
        libc::FALLOC_FL_ZERO_RANGE => {
            if length > 0 {
                device.write_zeroes(offset, length)
            } else {
                Ok(())
            }
        }
        0 if length == 0 && offset >= device_len => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        0 => device.allocate(offset, length),
        _ => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
    }
}
