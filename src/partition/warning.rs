//! Problems that [`scan`](super::scan) works around, returned for the caller to log.

use std::fmt;

use super::GptHeaderError;

/// A problem in a partition table that did not stop the scan. `Display` describes what was
/// found and what the scan did about it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PartitionWarning {
    /// The primary GPT is invalid, so the partitions come from the backup at `backup_lba`.
    BackupGptUsed {
        primary: GptHeaderError,
        backup_lba: u64,
    },
    /// The backup GPT named by the primary header is invalid. The primary is used.
    BackupGptInvalid { backup: GptHeaderError },
    /// The backup GPT header is not at the last LBA, as after an image was grown.
    BackupGptNotAtEnd { backup_lba: u64, last_lba: u64 },
    /// Both GPT headers are valid but disagree in these fields (UEFI field names).
    GptHeadersDiffer { fields: Vec<&'static str> },
    /// The GPT header revision is not 1.0. The header is read as 1.0, as the kernel does.
    UnknownGptRevision { revision: u32 },
    /// A GPT entry reaches past the last LBA of the device, so it is left out.
    GptEntryPastEnd {
        number: u32,
        first_lba: u64,
        last_lba: u64,
        device_last_lba: u64,
    },
    /// A GPT entry ends before it starts, so it is left out.
    GptEntryEndsBeforeStart {
        number: u32,
        first_lba: u64,
        last_lba: u64,
    },
    /// Partitions with numbers above [`MAX_PARTITION_NUMBER`](super::MAX_PARTITION_NUMBER)
    /// are left out. `count` is how many for GPT, and `None` for MBR, whose chain of logical
    /// partitions is not followed past the limit.
    PastPartitionLimit { count: Option<u32> },
    /// The chain of logical partitions stops early at the EBR at `lba`.
    EbrChainStopped { lba: u64, reason: EbrStop },
    /// A partition starts at or past the end of the device, so it is left out.
    StartsPastEnd {
        number: u32,
        start: u64,
        device_len: u64,
    },
    /// A partition runs past the end of the device, so it is cut to `len` bytes.
    TruncatedAtEnd {
        number: u32,
        len_in_table: u64,
        len: u64,
    },
}

/// Reason a chain of logical partitions stopped before its last EBR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EbrStop {
    /// The sector that a link points to has no `0x55AA` signature.
    MissingSignature,
    /// The EBR lies past the end of the device.
    PastEnd,
    /// 100 links in a row contained no logical partition. The kernel stops there too.
    TooManyEmptyLinks,
    /// A link points back to an EBR of the chain read before.
    Loop,
}

impl fmt::Display for EbrStop {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            EbrStop::MissingSignature => "it has no 0x55AA signature",
            EbrStop::PastEnd => "it lies past the end of the device",
            EbrStop::TooManyEmptyLinks => "100 EBRs in a row contained no partition",
            EbrStop::Loop => "the chain loops back to it (read once)",
        })
    }
}

impl fmt::Display for PartitionWarning {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionWarning::BackupGptUsed {
                primary,
                backup_lba,
            } => write!(
                formatter,
                "primary {primary}, so the backup GPT at LBA {backup_lba} is used \
                 ('sgdisk -e' rewrites the primary)"
            ),
            PartitionWarning::BackupGptInvalid { backup } => write!(
                formatter,
                "backup {backup}, so only the primary GPT is used ('sgdisk -e' rewrites the backup)"
            ),
            PartitionWarning::BackupGptNotAtEnd {
                backup_lba,
                last_lba,
            } => write!(
                formatter,
                "backup GPT header is at LBA {backup_lba}, not at the last LBA {last_lba}, \
                 as after the image was grown ('sgdisk -e' moves it to the end)"
            ),
            PartitionWarning::GptHeadersDiffer { fields } => write!(
                formatter,
                "primary and backup GPT headers differ in {}; the primary is used",
                fields.join(", ")
            ),
            PartitionWarning::UnknownGptRevision { revision } => write!(
                formatter,
                "GPT header revision is {revision:#010x}, expected 0x00010000; read as 1.0"
            ),
            PartitionWarning::GptEntryPastEnd {
                number,
                first_lba,
                last_lba,
                device_last_lba,
            } => write!(
                formatter,
                "partition {number} (LBA {first_lba} to {last_lba}) reaches past the last LBA \
                 {device_last_lba} of the device, so it is left out"
            ),
            PartitionWarning::GptEntryEndsBeforeStart {
                number,
                first_lba,
                last_lba,
            } => write!(
                formatter,
                "partition {number} ends at LBA {last_lba}, before its start at LBA {first_lba}, \
                 so it is left out"
            ),
            PartitionWarning::PastPartitionLimit { count: None } => write!(
                formatter,
                "partitions after number {} are left out, as the kernel allows no more",
                super::MAX_PARTITION_NUMBER
            ),
            PartitionWarning::PastPartitionLimit { count: Some(count) } => write!(
                formatter,
                "{count} partitions numbered above {} are left out, as the kernel allows no more",
                super::MAX_PARTITION_NUMBER
            ),
            PartitionWarning::EbrChainStopped { lba, reason } => write!(
                formatter,
                "logical partitions end at the EBR at LBA {lba} because {reason}"
            ),
            PartitionWarning::StartsPastEnd {
                number,
                start,
                device_len,
            } => write!(
                formatter,
                "partition {number} starts at {start:#x}, past the device end at {device_len:#x}, \
                 so it is left out"
            ),
            PartitionWarning::TruncatedAtEnd {
                number,
                len_in_table,
                len,
            } => write!(
                formatter,
                "partition {number} runs past the end of the device, so it is cut from \
                 {len_in_table} to {len} bytes"
            ),
        }
    }
}
