//! Recognition of image formats that are not raw disks.
//!
//! A loop device exposes a file's bytes as they are, so attaching a qcow2 or a compressed
//! image would show the user container metadata instead of a disk. Such files are recognised
//! by their magic numbers and rejected before anything is mounted.

/// A container or compression format recognised at the start (or, for VHD, the end) of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForeignFormat {
    /// Name shown to the user, spelled as `qemu-img info` prints it.
    pub name: &'static str,
    /// Whether `qemu-img convert -O raw` can turn the file into a raw image.
    pub convertible_by_qemu: bool,
}

impl ForeignFormat {
    const fn disk(name: &'static str) -> Self {
        Self {
            name,
            convertible_by_qemu: true,
        }
    }

    const fn compressed(name: &'static str) -> Self {
        Self {
            name,
            convertible_by_qemu: false,
        }
    }
}

/// Magic numbers found at byte offset 0 of a file.
const MAGIC_AT_START: &[(&[u8], ForeignFormat)] = &[
    // QCOW header: "QFI\xfb" then a big-endian version (1 = qcow, 2 or 3 = qcow2).
    (b"QFI\xfb\x00\x00\x00\x01", ForeignFormat::disk("qcow")),
    (b"QFI\xfb", ForeignFormat::disk("qcow2")),
    (b"QED\x00", ForeignFormat::disk("qed")),
    // VMDK hosted sparse extent ("KDMV"), ESX sparse extent ("COWD") and text descriptor.
    (b"KDMV", ForeignFormat::disk("vmdk")),
    (b"COWD", ForeignFormat::disk("vmdk")),
    (b"# Disk DescriptorFile", ForeignFormat::disk("vmdk")),
    (b"vhdxfile", ForeignFormat::disk("vhdx")),
    // A dynamic VHD starts with a copy of its footer, whose cookie is "conectix".
    (b"conectix", ForeignFormat::disk("vpc")),
    (b"WithoutFreeSpace", ForeignFormat::disk("parallels")),
    (b"WithouFreSpacExt", ForeignFormat::disk("parallels")),
    (b"\x1f\x8b", ForeignFormat::compressed("gzip")),
    (b"\xfd7zXZ\x00", ForeignFormat::compressed("xz")),
    (b"\x28\xb5\x2f\xfd", ForeignFormat::compressed("zstd")),
];

/// VDI images store the signature 0xbeda107f, little-endian, at byte offset 0x40.
const VDI_SIGNATURE_OFFSET: usize = 0x40;
const VDI_SIGNATURE: &[u8] = &[0x7f, 0x10, 0xda, 0xbe];

/// A fixed VHD is raw data followed by a 512-byte footer starting with "conectix".
pub const VHD_FOOTER_LEN: usize = 512;
const VHD_COOKIE: &[u8] = b"conectix";

/// Bytes of the file's start that [`detect_foreign_format`] looks at.
pub const HEAD_LEN: usize = 512;

/// Returns the format of a file that is not a raw disk, judged by its first bytes (`head`,
/// up to [`HEAD_LEN`]) and its last 512 bytes (`tail`, empty when the file is shorter).
pub fn detect_foreign_format(head: &[u8], tail: &[u8]) -> Option<ForeignFormat> {
    for (magic, format) in MAGIC_AT_START {
        if head.starts_with(magic) {
            return Some(*format);
        }
    }

    if head.get(VDI_SIGNATURE_OFFSET..VDI_SIGNATURE_OFFSET + VDI_SIGNATURE.len())
        == Some(VDI_SIGNATURE)
    {
        return Some(ForeignFormat::disk("vdi"));
    }

    if tail.len() == VHD_FOOTER_LEN && tail.starts_with(VHD_COOKIE) {
        return Some(ForeignFormat::disk("vpc"));
    }

    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; HEAD_LEN];
        head[offset..offset + magic.len()].copy_from_slice(magic);
        head
    }

    #[test]
    fn detect_recognises_container_magics() {
        let cases: &[(&[u8], &str)] = &[
            (b"QFI\xfb\x00\x00\x00\x03", "qcow2"),
            (b"QFI\xfb\x00\x00\x00\x01", "qcow"),
            (b"KDMV", "vmdk"),
            (b"# Disk DescriptorFile", "vmdk"),
            (b"vhdxfile", "vhdx"),
            (b"conectix", "vpc"),
            (b"\x1f\x8b\x08", "gzip"),
            (b"\xfd7zXZ\x00", "xz"),
        ];

        for (magic, name) in cases {
            let format = detect_foreign_format(&head_with(0, magic), &[]);
            assert_eq!(format.map(|f| f.name), Some(*name), "magic {magic:?}");
        }
    }

    #[test]
    fn detect_recognises_vdi_signature() {
        let head = head_with(VDI_SIGNATURE_OFFSET, VDI_SIGNATURE);

        assert_eq!(
            detect_foreign_format(&head, &[]).map(|f| f.name),
            Some("vdi")
        );
    }

    #[test]
    fn detect_recognises_fixed_vhd_footer() {
        let mut tail = vec![0u8; VHD_FOOTER_LEN];
        tail[..8].copy_from_slice(b"conectix");

        let format = detect_foreign_format(&[0u8; HEAD_LEN], &tail).unwrap();
        assert_eq!(format.name, "vpc");
        assert!(format.convertible_by_qemu);
    }

    #[test]
    fn detect_accepts_raw_disks() {
        let mut mbr = vec![0u8; HEAD_LEN];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;

        assert_eq!(detect_foreign_format(&mbr, &[0u8; VHD_FOOTER_LEN]), None);
        assert_eq!(detect_foreign_format(&[], &[]), None);
    }
}
