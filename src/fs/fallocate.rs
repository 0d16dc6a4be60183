//! `fallocate(2)` on a device file, with the rules the kernel applies to block devices, so
//! that a loop device and loopfuse return the same errors and leave the same bytes.

use std::io;

use crate::block::BlockDevice;

/// Applies an `fallocate(2)` request to a device as a block device does:
/// - a range must start inside the device, and may reach past its end only with
///   `FALLOC_FL_KEEP_SIZE`, which cuts it at the end: the size never changes;
/// - offset and length must be multiples of the logical sector size;
/// - only zeroing (`FALLOC_FL_ZERO_RANGE`) and punching holes (`FALLOC_FL_PUNCH_HOLE` with
///   `FALLOC_FL_KEEP_SIZE`) are possible. Plain allocation is not (`EOPNOTSUPP`).
///
/// Every rejected request fails with nothing changed.
pub fn fallocate_device(
    device: &dyn BlockDevice,
    sector_size: u32,
    offset: u64,
    length: u64,
    mode: i32,
) -> io::Result<()> {
    let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
    let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let device_len = device.len();

    if offset >= device_len {
        return Err(invalid());
    }
    let length = match offset.checked_add(length) {
        Some(end) if end <= device_len => length,
        _ if keep_size => device_len - offset,
        _ => return Err(invalid()),
    };
    if !(offset | length).is_multiple_of(u64::from(sector_size)) {
        return Err(invalid());
    }

    const ZERO_RANGE_KEEP_SIZE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    const PUNCH_HOLE_KEEP_SIZE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match mode {
        libc::FALLOC_FL_ZERO_RANGE | ZERO_RANGE_KEEP_SIZE => device.write_zeroes(offset, length),
        PUNCH_HOLE_KEEP_SIZE => device.discard(offset, length),
        _ => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemoryDevice;

    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;

    fn device() -> MemoryDevice {
        MemoryDevice::new(vec![0xaa; 8192])
    }

    fn errno(result: io::Result<()>) -> Option<i32> {
        result.err().and_then(|error| error.raw_os_error())
    }

    #[test]
    fn rejected_requests_change_nothing() {
        let device = device();
        let cases = [
            (4096, 8192, ZERO, libc::EINVAL),
            (8192, 512, PUNCH, libc::EINVAL),
            (100, 512, PUNCH, libc::EINVAL),
            (512, 100, ZERO, libc::EINVAL),
            (0, 4096, 0, libc::EOPNOTSUPP),
            (0, 4096, libc::FALLOC_FL_KEEP_SIZE, libc::EOPNOTSUPP),
        ];
        for (offset, length, mode, expected) in cases {
            let result = fallocate_device(&device, 512, offset, length, mode);
            assert_eq!(errno(result), Some(expected), "{offset} {length} {mode:#x}");
        }
        assert_eq!(device.to_vec(), vec![0xaa; 8192]);
    }

    #[test]
    fn keep_size_cuts_range_at_end() {
        let device = device();
        let zero_keep = ZERO | libc::FALLOC_FL_KEEP_SIZE;

        fallocate_device(&device, 512, 4096, 1 << 20, zero_keep).unwrap();

        let mut expected = vec![0xaa; 4096];
        expected.resize(8192, 0);
        assert_eq!(device.to_vec(), expected);
    }

    #[test]
    fn sector_size_sets_alignment() {
        let device = device();
        let result = fallocate_device(&device, 4096, 512, 512, PUNCH);
        assert_eq!(errno(result), Some(libc::EINVAL));
        fallocate_device(&device, 4096, 4096, 4096, PUNCH).unwrap();
        assert_eq!(&device.to_vec()[4096..], &[0; 4096][..]);
    }
}
