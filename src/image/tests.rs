use std::io::Write;

use super::*;

fn image_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(bytes).unwrap();
    file.flush().unwrap();
    file
}

#[test]
fn image_write_then_read_back() {
    let file = image_file(&[0u8; 8192]);
    let image = Image::open(file.path(), Access::ReadWrite).unwrap();

    assert_eq!(image.write_at(4000, b"hello").unwrap(), 5);
    image.flush().unwrap();

    let on_disk = std::fs::read(file.path()).unwrap();
    assert_eq!(&on_disk[4000..4005], b"hello");
    let mut buf = [0u8; 5];
    assert_eq!(image.read_at(4000, &mut buf).unwrap(), 5);
    assert_eq!(&buf, b"hello");
}

#[test]
fn image_write_past_end_is_enospc() {
    let file = image_file(&[0u8; 4096]);
    let image = Image::open(file.path(), Access::ReadWrite).unwrap();

    let error = image.write_at(4096, b"x").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(image.write_at(4094, b"xyz").unwrap(), 2);
    assert_eq!(std::fs::metadata(file.path()).unwrap().len(), 4096);
}

#[test]
fn image_read_past_end_returns_nothing() {
    let file = image_file(&[1u8; 4096]);
    let image = Image::open(file.path(), Access::ReadOnly).unwrap();
    let mut buf = [0u8; 16];

    assert_eq!(image.read_at(4096, &mut buf).unwrap(), 0);
    assert_eq!(image.read_at(4090, &mut buf).unwrap(), 6);
}

#[test]
fn read_only_image_rejects_writes_with_erofs() {
    let file = image_file(&[0u8; 4096]);
    let image = Image::open(file.path(), Access::ReadOnly).unwrap();

    for error in [
        image.write_at(0, b"x").unwrap_err(),
        image.discard(0, 4096).unwrap_err(),
        image.write_zeroes(0, 4096).unwrap_err(),
    ] {
        assert_eq!(error.raw_os_error(), Some(libc::EROFS));
    }
}

#[test]
fn image_second_writer_is_locked_out() {
    let file = image_file(&[0u8; 4096]);
    let _first = Image::open(file.path(), Access::ReadWrite).unwrap();

    let second = Image::open(file.path(), Access::ReadWrite);
    assert!(matches!(second, Err(ImageError::Locked { .. })));
    let reader = Image::open(file.path(), Access::ReadOnly);
    assert!(matches!(
        reader,
        Err(ImageError::Locked {
            holder_writes: true,
            ..
        })
    ));
}

#[test]
fn image_readers_share_the_lock() {
    let file = image_file(&[0u8; 4096]);
    let _first = Image::open(file.path(), Access::ReadOnly).unwrap();

    assert!(Image::open(file.path(), Access::ReadOnly).is_ok());
    assert!(matches!(
        Image::open(file.path(), Access::ReadWrite),
        Err(ImageError::Locked {
            holder_writes: false,
            ..
        })
    ));
}

#[test]
fn probe_rejects_bad_inputs() {
    let directory = tempfile::tempdir().unwrap();
    let empty = image_file(&[]);
    let qcow2 = image_file(b"QFI\xfb\x00\x00\x00\x03\x00\x00\x00\x00");
    let gzip = image_file(b"\x1f\x8b\x08\x00");
    let missing = directory.path().join("missing.img");

    assert!(matches!(probe(&missing), Err(ImageError::NotFound { .. })));
    assert!(matches!(
        probe(directory.path()),
        Err(ImageError::NotAFile {
            kind: "directory",
            ..
        })
    ));
    assert!(matches!(probe(empty.path()), Err(ImageError::Empty { .. })));
    assert!(matches!(
        probe(qcow2.path()),
        Err(ImageError::ForeignDisk { .. })
    ));
    assert!(matches!(
        probe(gzip.path()),
        Err(ImageError::Compressed { .. })
    ));
}

#[test]
fn probe_error_names_the_path_and_the_fix() {
    let qcow2 = image_file(b"QFI\xfb\x00\x00\x00\x03");

    let message = probe(qcow2.path()).unwrap_err().to_string();
    assert!(
        message.starts_with(&qcow2.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("qcow2"), "{message}");
    assert!(message.contains("qemu-img convert -O raw"), "{message}");
}

#[test]
fn image_discard_punches_a_hole() {
    let file = image_file(&vec![0xaau8; 1 << 20]);
    let image = Image::open(file.path(), Access::ReadWrite).unwrap();
    let before = image.allocated_sectors().unwrap();

    image.discard(256 << 10, 256 << 10).unwrap();

    let mut buf = vec![0xffu8; 256 << 10];
    image.read_at(256 << 10, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert!(image.allocated_sectors().unwrap() < before);
    assert_eq!(image.seek_hole(0).unwrap(), 256 << 10);
    assert_eq!(image.seek_data(256 << 10).unwrap(), 512 << 10);
}

fn sparse_image_file(len: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(len).unwrap();
    file
}

#[test]
fn hole_write_allocates_written_blocks() {
    let file = sparse_image_file(8 << 20);
    let image = Image::open(file.path(), Access::ReadWrite).unwrap();
    // Reading the hole first caches it, on ext4 as large folios.
    let mut whole = vec![0u8; 8 << 20];
    image.read_at(0, &mut whole).unwrap();

    image.write_at(3 << 20, &[0x5a; 4096]).unwrap();
    image.write_at(3 << 20, &[0xa5; 4096]).unwrap();
    image.flush().unwrap();

    let allocated = image.allocated_sectors().unwrap() * 512;
    assert!(
        allocated <= 4096,
        "{allocated} bytes allocated for one 4 KiB write"
    );
    let on_disk = std::fs::read(file.path()).unwrap();
    assert!(
        on_disk[3 << 20..(3 << 20) + 4096]
            .iter()
            .all(|&b| b == 0xa5)
    );
    assert!(on_disk[..3 << 20].iter().all(|&b| b == 0));
}

#[test]
fn write_after_shrink_fails_with_eio() {
    let file = sparse_image_file(4 << 20);
    let image = Image::open(file.path(), Access::ReadWrite).unwrap();
    file.as_file().set_len(1 << 20).unwrap();

    let error = image.write_at(3 << 20, b"lost").unwrap_err();

    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert_eq!(std::fs::metadata(file.path()).unwrap().len(), 1 << 20);
}

#[test]
fn sub_page_writes_land_in_a_hole() {
    let file = sparse_image_file(1 << 20);
    let image = Image::open(file.path(), Access::ReadWrite).unwrap();

    assert_eq!(image.write_at(4000, b"across").unwrap(), 6);
    assert_eq!(image.write_at(4002, b"ROSS").unwrap(), 4);
    image.flush().unwrap();

    let on_disk = std::fs::read(file.path()).unwrap();
    assert_eq!(&on_disk[3998..4008], b"\0\0acROSS\0\0");
}

#[test]
fn write_past_shrunk_end_in_last_page_fails() {
    let file = image_file(&[0x11u8; 16384]);
    let image = Image::open(file.path(), Access::ReadWrite).unwrap();
    image.write_at(8192, &[0x22; 4096]).unwrap();
    file.as_file().set_len(8192 + 100).unwrap();

    let error = image.write_at(8192 + 1000, b"lost").unwrap_err();

    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert_eq!(std::fs::metadata(file.path()).unwrap().len(), 8192 + 100);
}

#[test]
fn zero_range_past_shrunk_end_fails() {
    let file = image_file(&[0x11u8; 16384]);
    let image = Image::open(file.path(), Access::ReadWrite).unwrap();
    file.as_file().set_len(8192 + 100).unwrap();
    let before = image.allocated_sectors().unwrap();

    let error = image.write_zeroes(12288, 4096).unwrap_err();

    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert_eq!(image.allocated_sectors().unwrap(), before);
}

#[test]
fn file_write_past_shrunk_end_fails() {
    let file = image_file(&[0x11u8; 16384]);
    let image = Image::open(file.path(), Access::ReadWrite).unwrap();
    file.as_file().set_len(8192).unwrap();

    let error = image.write_through_file(12288, &[0x22; 4096]).unwrap_err();

    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert_eq!(std::fs::metadata(file.path()).unwrap().len(), 8192);
}
