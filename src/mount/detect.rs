//! Filesystem detection by superblock magic, in the spirit of blkid: each type is recognised
//! by fixed bytes at a fixed offset of the device, and named as blkid names it.
//!
//! This module only looks at bytes; it does not depend on devices, drivers or mounting.

use std::fmt;

/// How many bytes from the start of a device [`detect`] needs to see every magic it checks
/// (the btrfs superblock at 64 KiB is the farthest).
pub const PROBE_LEN: usize = 0x1_0048;

/// A filesystem type that [`detect`] can recognise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext2,
    Ext3,
    Ext4,
    Vfat,
    Exfat,
    Ntfs,
    Squashfs,
    Iso9660,
    Erofs,
    Xfs,
    Btrfs,
    F2fs,
    Swap,
    Luks,
}

impl FsType {
    /// Every type, in the order `-t` help lists them.
    pub const ALL: [FsType; 14] = [
        FsType::Ext2,
        FsType::Ext3,
        FsType::Ext4,
        FsType::Vfat,
        FsType::Exfat,
        FsType::Ntfs,
        FsType::Squashfs,
        FsType::Iso9660,
        FsType::Erofs,
        FsType::Xfs,
        FsType::Btrfs,
        FsType::F2fs,
        FsType::Swap,
        FsType::Luks,
    ];

    /// The name blkid and `mount -t` use for this type.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext2 => "ext2",
            FsType::Ext3 => "ext3",
            FsType::Ext4 => "ext4",
            FsType::Vfat => "vfat",
            FsType::Exfat => "exfat",
            FsType::Ntfs => "ntfs",
            FsType::Squashfs => "squashfs",
            FsType::Iso9660 => "iso9660",
            FsType::Erofs => "erofs",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
            FsType::F2fs => "f2fs",
            FsType::Swap => "swap",
            FsType::Luks => "crypto_LUKS",
        }
    }

    /// Parses a `-t` argument: a blkid name, or one of the aliases `mount` users type
    /// (`fat`, `msdos`, `ntfs3`, `ntfs-3g`, `iso`, `luks`).
    pub fn from_name(name: &str) -> Option<FsType> {
        let alias = match name.to_ascii_lowercase().as_str() {
            "fat" | "msdos" | "fat12" | "fat16" | "fat32" => Some(FsType::Vfat),
            "ntfs3" | "ntfs-3g" => Some(FsType::Ntfs),
            "iso" | "cd9660" => Some(FsType::Iso9660),
            "luks" | "crypto_luks" => Some(FsType::Luks),
            _ => None,
        };
        alias.or_else(|| {
            FsType::ALL
                .into_iter()
                .find(|fstype| fstype.name().eq_ignore_ascii_case(name))
        })
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Result of probing the first [`PROBE_LEN`] bytes of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    Filesystem(FsType),
    /// A partition table without a filesystem at the start: "GPT" or "MBR", as `list` names them.
    PartitionTable(&'static str),
    /// Only zero bytes: nothing was ever written there.
    Empty,
    /// No known magic. Contains the first 16 bytes for the error message.
    Unknown([u8; 16]),
}

/// ext2/3/4: `s_magic` 0xEF53 (little-endian) at offset 56 of the superblock at 1024.
const EXT_MAGIC_OFFSET: usize = 1024 + 0x38;
/// ext superblock fields `s_feature_compat`, `s_feature_incompat`, `s_feature_ro_compat`.
const EXT_COMPAT_OFFSET: usize = 1024 + 0x5C;
const EXT_INCOMPAT_OFFSET: usize = 1024 + 0x60;
const EXT_RO_COMPAT_OFFSET: usize = 1024 + 0x64;
/// `COMPAT_HAS_JOURNAL`: the journal that makes ext2 into ext3.
const EXT_HAS_JOURNAL: u32 = 0x4;
/// Incompatible features ext3 lacks: extents, 64bit, MMP, flex_bg, ea_inode, dirdata,
/// csum_seed, largedir, inline_data, encrypt (as blkid's ext4 probe counts them).
const EXT4_ONLY_INCOMPAT: u32 =
    0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x1_0000;
/// Read-only-compatible features ext3 lacks: huge_file, gdt_csum, dir_nlink, extra_isize,
/// quota, bigalloc, metadata_csum.
const EXT4_ONLY_RO_COMPAT: u32 = 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200 | 0x400;

/// EROFS: magic 0xE0F5E1E2 (little-endian) at the superblock at 1024.
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// F2FS: magic 0xF2F52010 (little-endian) at the superblock at 1024.
const F2FS_MAGIC: u32 = 0xF2F5_2010;
/// btrfs: "_BHRfS_M" at offset 0x40 of the superblock at 64 KiB.
const BTRFS_MAGIC_OFFSET: usize = 0x1_0040;
/// ISO 9660: standard identifier "CD001" after the type byte of the first volume
/// descriptor, which starts at sector 16 (0x8000) of 2048 bytes.
const ISO_MAGIC_OFFSET: usize = 0x8001;
/// OEM name field of an NTFS or exFAT boot sector.
const OEM_NAME_OFFSET: usize = 3;
/// Boot sector signature 0x55 0xAA at 510, shared by FAT boot sectors and MBRs.
const BOOT_SIGNATURE_OFFSET: usize = 510;
/// File system type strings of FAT12/16 (offset 0x36) and FAT32 (offset 0x52) boot sectors.
const FAT16_TYPE_OFFSET: usize = 0x36;
const FAT32_TYPE_OFFSET: usize = 0x52;
/// Swap signatures sit in the last 10 bytes of the first page, whose size varies by
/// architecture.
const SWAP_PAGE_SIZES: [usize; 4] = [4096, 8192, 16384, 65536];

/// Recognises the filesystem at the start of `bytes`, the first [`PROBE_LEN`] bytes of a
/// device (fewer when the device is smaller).
///
/// Types whose magic sits inside another type's reserved area are checked first: squashfs,
/// LUKS and XFS start at byte 0, where ext leaves a gap and ISO 9660 a system area.
pub fn detect(bytes: &[u8]) -> Detection {
    if let Some(fstype) = detect_filesystem(bytes) {
        return Detection::Filesystem(fstype);
    }
    if bytes_at(bytes, 512, 8) == Some(b"EFI PART") || bytes_at(bytes, 4096, 8) == Some(b"EFI PART")
    {
        return Detection::PartitionTable("GPT");
    }
    if bytes_at(bytes, BOOT_SIGNATURE_OFFSET, 2) == Some(&[0x55, 0xAA]) {
        return Detection::PartitionTable("MBR");
    }
    if bytes.iter().all(|&byte| byte == 0) {
        return Detection::Empty;
    }

    let mut head = [0u8; 16];
    let len = bytes.len().min(head.len());
    head[..len].copy_from_slice(&bytes[..len]);
    Detection::Unknown(head)
}

fn detect_filesystem(bytes: &[u8]) -> Option<FsType> {
    let starts_with = |magic: &[u8]| bytes.starts_with(magic);

    if starts_with(b"hsqs") {
        return Some(FsType::Squashfs);
    }
    if starts_with(b"LUKS\xba\xbe") {
        return Some(FsType::Luks);
    }
    if starts_with(b"XFSB") {
        return Some(FsType::Xfs);
    }
    if bytes_at(bytes, EXT_MAGIC_OFFSET, 2) == Some(&[0x53, 0xEF]) {
        return Some(ext_variant(bytes));
    }
    match le_u32_at(bytes, 1024) {
        Some(EROFS_MAGIC) => return Some(FsType::Erofs),
        Some(F2FS_MAGIC) => return Some(FsType::F2fs),
        _ => {}
    }
    if bytes_at(bytes, BTRFS_MAGIC_OFFSET, 8) == Some(b"_BHRfS_M") {
        return Some(FsType::Btrfs);
    }
    if bytes_at(bytes, ISO_MAGIC_OFFSET, 5) == Some(b"CD001") {
        return Some(FsType::Iso9660);
    }
    match bytes_at(bytes, OEM_NAME_OFFSET, 8) {
        Some(b"NTFS    ") => return Some(FsType::Ntfs),
        Some(b"EXFAT   ") => return Some(FsType::Exfat),
        _ => {}
    }
    if is_fat(bytes) {
        return Some(FsType::Vfat);
    }
    let is_swap = SWAP_PAGE_SIZES.iter().any(|&page| {
        matches!(
            bytes_at(bytes, page - 10, 10),
            Some(b"SWAPSPACE2") | Some(b"SWAP-SPACE")
        )
    });
    is_swap.then_some(FsType::Swap)
}

/// Tells ext4 from ext3 from ext2 by feature flags, as blkid does.
fn ext_variant(bytes: &[u8]) -> FsType {
    let compat = le_u32_at(bytes, EXT_COMPAT_OFFSET).unwrap_or(0);
    let incompat = le_u32_at(bytes, EXT_INCOMPAT_OFFSET).unwrap_or(0);
    let ro_compat = le_u32_at(bytes, EXT_RO_COMPAT_OFFSET).unwrap_or(0);

    if incompat & EXT4_ONLY_INCOMPAT != 0 || ro_compat & EXT4_ONLY_RO_COMPAT != 0 {
        FsType::Ext4
    } else if compat & EXT_HAS_JOURNAL != 0 {
        FsType::Ext3
    } else {
        FsType::Ext2
    }
}

/// A FAT boot sector: the boot signature, a jump instruction, a sane BIOS parameter block
/// and a "FAT" type string. The type string keeps an MBR (which shares the signature) from
/// passing.
fn is_fat(bytes: &[u8]) -> bool {
    if bytes.len() < 512 || bytes[BOOT_SIGNATURE_OFFSET..512] != [0x55, 0xAA] {
        return false;
    }
    let jumps = (bytes[0] == 0xEB && bytes[2] == 0x90) || bytes[0] == 0xE9;
    let bytes_per_sector = u16::from_le_bytes([bytes[0x0B], bytes[0x0C]]);
    let sectors_per_cluster = bytes[0x0D];
    let reserved_sectors = u16::from_le_bytes([bytes[0x0E], bytes[0x0F]]);
    let fat_count = bytes[0x10];
    let sane_bpb = (512..=4096).contains(&bytes_per_sector)
        && bytes_per_sector.is_power_of_two()
        && sectors_per_cluster.is_power_of_two()
        && reserved_sectors > 0
        && (1..=2).contains(&fat_count);
    let type_string = bytes[FAT16_TYPE_OFFSET..FAT16_TYPE_OFFSET + 3] == *b"FAT"
        || bytes[FAT32_TYPE_OFFSET..FAT32_TYPE_OFFSET + 5] == *b"FAT32";

    jumps && sane_bpb && type_string
}

fn bytes_at(bytes: &[u8], offset: usize, len: usize) -> Option<&[u8]> {
    bytes.get(offset..offset.checked_add(len)?)
}

fn le_u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let field = bytes_at(bytes, offset, 4)?;
    Some(u32::from_le_bytes(field.try_into().ok()?))
}

/// Formats bytes as hex pairs followed by their printable ASCII, like `hexdump -C`:
/// `eb 3c 90 6d ... |.<.mkfs.fat..|`.
pub fn signature(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    let text: String = bytes
        .iter()
        .map(|&byte| {
            if byte.is_ascii_graphic() || byte == b' ' {
                byte as char
            } else {
                '.'
            }
        })
        .collect();
    format!("{} |{text}|", hex.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank() -> Vec<u8> {
        vec![0u8; PROBE_LEN]
    }

    fn with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut bytes = blank();
        bytes[offset..offset + magic.len()].copy_from_slice(magic);
        bytes
    }

    /// A FAT16 boot sector as mkfs.vfat writes it: jump, 512-byte sectors, 4 sectors per
    /// cluster, 4 reserved sectors, 2 FATs, "FAT16" and the signature.
    fn fat16() -> Vec<u8> {
        let mut bytes = with(0, &[0xEB, 0x3C, 0x90]);
        bytes[0x0B..0x0D].copy_from_slice(&512u16.to_le_bytes());
        bytes[0x0D] = 4;
        bytes[0x0E..0x10].copy_from_slice(&4u16.to_le_bytes());
        bytes[0x10] = 2;
        bytes[0x36..0x3E].copy_from_slice(b"FAT16   ");
        bytes[510..512].copy_from_slice(&[0x55, 0xAA]);
        bytes
    }

    fn ext(compat: u32, incompat: u32, ro_compat: u32) -> Vec<u8> {
        let mut bytes = with(EXT_MAGIC_OFFSET, &[0x53, 0xEF]);
        bytes[EXT_COMPAT_OFFSET..EXT_COMPAT_OFFSET + 4].copy_from_slice(&compat.to_le_bytes());
        bytes[EXT_INCOMPAT_OFFSET..EXT_INCOMPAT_OFFSET + 4]
            .copy_from_slice(&incompat.to_le_bytes());
        bytes[EXT_RO_COMPAT_OFFSET..EXT_RO_COMPAT_OFFSET + 4]
            .copy_from_slice(&ro_compat.to_le_bytes());
        bytes
    }

    fn detected(bytes: &[u8]) -> Option<FsType> {
        match detect(bytes) {
            Detection::Filesystem(fstype) => Some(fstype),
            _ => None,
        }
    }

    #[test]
    fn detect_tells_ext_variants_apart() {
        // Feature sets as mke2fs 1.47 writes them for -t ext2, ext3 and ext4.
        assert_eq!(detected(&ext(0x38, 0x2, 0x3)), Some(FsType::Ext2));
        assert_eq!(detected(&ext(0x3C, 0x2, 0x3)), Some(FsType::Ext3));
        assert_eq!(detected(&ext(0x3C, 0x2C2, 0x46B)), Some(FsType::Ext4));
    }

    #[test]
    fn detect_finds_each_magic() {
        let cases = [
            (with(0, b"hsqs"), FsType::Squashfs),
            (with(0, b"LUKS\xba\xbe"), FsType::Luks),
            (with(0, b"XFSB"), FsType::Xfs),
            (with(1024, &EROFS_MAGIC.to_le_bytes()), FsType::Erofs),
            (with(1024, &F2FS_MAGIC.to_le_bytes()), FsType::F2fs),
            (with(BTRFS_MAGIC_OFFSET, b"_BHRfS_M"), FsType::Btrfs),
            (with(ISO_MAGIC_OFFSET, b"CD001"), FsType::Iso9660),
            (with(3, b"NTFS    "), FsType::Ntfs),
            (with(3, b"EXFAT   "), FsType::Exfat),
            (with(4086, b"SWAPSPACE2"), FsType::Swap),
            (fat16(), FsType::Vfat),
        ];
        for (bytes, expected) in cases {
            assert_eq!(detected(&bytes), Some(expected), "{expected}");
        }
    }

    #[test]
    fn detect_prefers_ntfs_over_its_boot_signature() {
        let mut bytes = with(3, b"NTFS    ");
        bytes[510..512].copy_from_slice(&[0x55, 0xAA]);

        assert_eq!(detected(&bytes), Some(FsType::Ntfs));
    }

    #[test]
    fn detect_reports_mbr_without_fat_type_as_table() {
        let mut bytes = fat16();
        bytes[0x36..0x3E].copy_from_slice(b"        ");

        assert_eq!(detect(&bytes), Detection::PartitionTable("MBR"));
    }

    #[test]
    fn detect_reports_gpt_as_table() {
        let mut bytes = with(512, b"EFI PART");
        bytes[510..512].copy_from_slice(&[0x55, 0xAA]);

        assert_eq!(detect(&bytes), Detection::PartitionTable("GPT"));
    }

    #[test]
    fn detect_reports_zeros_as_empty() {
        assert_eq!(detect(&blank()), Detection::Empty);
        assert_eq!(detect(&[]), Detection::Empty);
    }

    #[test]
    fn detect_keeps_first_bytes_of_unknown_data() {
        let bytes = with(0, b"QFI\xfb\0\0\0\x03");

        let Detection::Unknown(head) = detect(&bytes) else {
            panic!("expected unknown");
        };
        assert_eq!(&head[..4], b"QFI\xfb");
        assert!(signature(&head).starts_with("51 46 49 fb 00"));
        assert!(signature(&head).ends_with("|QFI.............|"));
    }

    #[test]
    fn detect_handles_short_devices() {
        assert_eq!(detected(b"hsqs"), Some(FsType::Squashfs));
        assert_eq!(detected(&[0x55; 600]), None);
    }

    #[test]
    fn fstype_names_round_trip() {
        for fstype in FsType::ALL {
            assert_eq!(FsType::from_name(fstype.name()), Some(fstype));
        }
        assert_eq!(FsType::from_name("msdos"), Some(FsType::Vfat));
        assert_eq!(FsType::from_name("EXT4"), Some(FsType::Ext4));
        assert_eq!(FsType::from_name("zfs"), None);
    }
}
