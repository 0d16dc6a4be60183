//! Partition tables (MBR and GPT) read from a block device.
#![forbid(unsafe_code)]
