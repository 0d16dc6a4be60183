use std::io;

use super::*;
use crate::block::BlockDevice;

#[test]
fn scan_rejects_invalid_sector_size() {
    for sector_size in [0, 256, 511, 1000, 131_072] {
        let error = scan(&MemoryDevice::new(vec![0; 1 << 20]), sector_size).unwrap_err();

        let PartitionError::InvalidSectorSize { sector_size: found } = error else {
            panic!("expected InvalidSectorSize, got {error:?}");
        };
        assert_eq!(found, sector_size);
    }
}

#[test]
fn scan_accepts_every_power_of_two_sector_size() {
    for shift in 9..=16 {
        let result = scan(&MemoryDevice::new(vec![0; 1 << 17]), 1 << shift);

        assert!(matches!(result, Ok(None)), "{result:?}");
    }
}

#[test]
fn scan_of_zeroed_device_finds_no_table() {
    for sector_size in SECTOR_SIZES {
        assert!(scan_image(vec![0; 1 << 20], sector_size).unwrap().is_none());
    }
}

#[test]
fn scan_of_tiny_device_finds_nothing() {
    for len in [0, 1, 511] {
        assert!(scan_image(vec![0; len], 512).unwrap().is_none());
    }
    // A valid MBR sector on a device shorter than one 4096-byte sector.
    let mut image = standard_mbr(512);
    image.truncate(4095);
    assert!(scan_image(image, 4096).unwrap().is_none());
}

/// A device whose reads at or after `fail_from` fail with EIO.
struct FailingDevice {
    bytes: Vec<u8>,
    fail_from: u64,
}

impl BlockDevice for FailingDevice {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset + buf.len() as u64 > self.fail_from {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let start = offset as usize;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        Ok(buf.len())
    }

    fn write_at(&self, _offset: u64, _data: &[u8]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn seek_data(&self, offset: u64) -> io::Result<u64> {
        Ok(offset)
    }

    fn seek_hole(&self, _offset: u64) -> io::Result<u64> {
        Ok(self.len())
    }

    fn allocated_sectors(&self) -> io::Result<u64> {
        Ok(self.len().div_ceil(512))
    }
}

#[test]
fn scan_reports_read_error_with_offset() {
    // The GPT entry array at LBA 2 cannot be read.
    let device = FailingDevice {
        bytes: standard_gpt(512),
        fail_from: 2 * 512,
    };

    let error = scan(&device, 512).unwrap_err();

    let PartitionError::Read {
        offset,
        len,
        source,
    } = &error
    else {
        panic!("expected Read, got {error:?}");
    };
    assert_eq!((*offset, *len), (1024, 128 * 128));
    assert_eq!(source.raw_os_error(), Some(libc::EIO));
    assert_eq!(error.to_string(), "read of 16384 bytes at 0x400 failed");
}

#[test]
fn scan_reports_read_error_in_logical_chain() {
    let device = FailingDevice {
        bytes: standard_mbr(512),
        fail_from: 768 * 512,
    };

    let error = scan(&device, 512).unwrap_err();

    assert!(
        matches!(error, PartitionError::Read { offset, .. } if offset == 768 * 512),
        "{error:?}"
    );
}

#[test]
fn scan_partitions_are_sorted_and_inside_device() {
    for sector_size in SECTOR_SIZES {
        for image in [standard_mbr(sector_size), standard_gpt(sector_size)] {
            let len = image.len() as u64;
            let table = table_of(image, sector_size);

            assert!(
                table
                    .partitions
                    .windows(2)
                    .all(|pair| pair[0].number < pair[1].number)
            );
            assert!(table.partitions.iter().all(|p| p.len > 0 && p.end() <= len));
        }
    }
}

#[test]
fn scan_warning_messages_read_as_sentences() {
    let mut image = standard_gpt(512);
    image[512 + 16] ^= 0xFF;
    let table = table_of(image, 512);

    let message = table.warnings[0].to_string();

    assert!(
        message.starts_with("primary GPT header at LBA 1 (0x200): header CRC 0x"),
        "{message}"
    );
    assert!(
        message
            .ends_with("so the backup GPT at LBA 2047 is used ('sgdisk -e' rewrites the primary)"),
        "{message}"
    );
}
