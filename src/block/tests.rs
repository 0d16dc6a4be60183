use std::sync::Arc;

use super::*;

fn window_over(bytes: Vec<u8>, start: u64, len: u64) -> (Arc<MemoryDevice>, Window) {
    let inner = Arc::new(MemoryDevice::new(bytes));
    let window = Window::new(inner.clone(), start, len).expect("window fits");
    (inner, window)
}

#[test]
fn window_write_lands_at_offset() {
    let (inner, window) = window_over(vec![0; 64], 16, 32);

    assert_eq!(window.write_at(4, b"abcd").unwrap(), 4);

    let bytes = inner.to_vec();
    assert_eq!(&bytes[20..24], b"abcd");
    assert!(bytes[..20].iter().all(|&b| b == 0));
    assert!(bytes[24..].iter().all(|&b| b == 0));
}

#[test]
fn window_write_crossing_end_is_shortened() {
    let (inner, window) = window_over(vec![0; 64], 16, 32);

    assert_eq!(window.write_at(30, b"wxyz").unwrap(), 2);

    let bytes = inner.to_vec();
    assert_eq!(&bytes[46..48], b"wx");
    assert_eq!(bytes[48], 0);
}

#[test]
fn window_write_past_end_is_enospc() {
    let (_inner, window) = window_over(vec![0; 64], 16, 32);

    let error = window.write_at(32, b"a").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
}

#[test]
fn window_read_past_end_returns_nothing() {
    let (_inner, window) = window_over((0..64).collect(), 16, 32);
    let mut buf = [0u8; 8];

    assert_eq!(window.read_at(32, &mut buf).unwrap(), 0);
    assert_eq!(window.read_at(28, &mut buf).unwrap(), 4);
    assert_eq!(&buf[..4], &[44, 45, 46, 47]);
}

#[test]
fn window_discard_outside_range_is_rejected() {
    let (inner, window) = window_over(vec![7; 64], 16, 32);

    let error = window.discard(24, 16).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
    assert!(inner.to_vec().iter().all(|&b| b == 7));

    window.discard(24, 8).unwrap();
    let bytes = inner.to_vec();
    assert!(bytes[40..48].iter().all(|&b| b == 0));
    assert_eq!(bytes[39], 7);
    assert_eq!(bytes[48], 7);
}

#[test]
fn window_larger_than_device_is_rejected() {
    let inner = Arc::new(MemoryDevice::new(vec![0; 64]));

    assert!(Window::new(inner.clone(), 16, 49).is_err());
    assert!(Window::new(inner, u64::MAX, 2).is_err());
}

#[test]
fn read_only_device_rejects_writes_with_erofs() {
    let device = MemoryDevice::read_only(vec![0; 8]);

    let error = device.write_at(0, b"x").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn window_counts_only_its_allocation() {
    use crate::image::{Access, Image};

    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(4 << 20).unwrap();
    let image = Arc::new(Image::open(file.path(), Access::ReadWrite).unwrap());
    image.write_at(1 << 20, &[1; 64 << 10]).unwrap();
    image.write_at(3 << 20, &[2; 128 << 10]).unwrap();

    let first = Window::new(image.clone(), 0, 2 << 20).unwrap();
    let second = Window::new(image.clone(), 2 << 20, 2 << 20).unwrap();
    let empty = Window::new(image, 1 << 21, 1 << 20).unwrap();

    assert_eq!(first.allocated_sectors().unwrap(), (64 << 10) / 512);
    assert_eq!(second.allocated_sectors().unwrap(), (128 << 10) / 512);
    assert_eq!(empty.allocated_sectors().unwrap(), 0);
}
