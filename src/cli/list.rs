//! Output of `loopfuse list`: a table with named columns, or JSON.

use serde::Serialize;

use super::text::escape_control;
use crate::registry::{DiskRange, Entry, Liveness, MountRecord, Stage};

/// One attachment as `list --json` prints it.
#[derive(Debug, Serialize)]
struct ListedAttachment<'a> {
    name: &'a str,
    device: String,
    image: String,
    offset: u64,
    size: u64,
    sizelimit: u64,
    read_only: bool,
    partscan: bool,
    sector_size: u32,
    /// Overlay file that receives the writes, or null when they go to the image.
    overlay: Option<String>,
    /// Whether the overlay is a snapshot's, removed at detach.
    snapshot: bool,
    /// Whether it detaches after the last close (`--autoclear`, a busy `losetup -d`, or a
    /// lazy unmount).
    autoclear: bool,
    pid: i32,
    state: &'static str,
    cache: &'a str,
    /// "MBR", "GPT", or null when no table was found or partitions are not scanned.
    partition_table: Option<&'a str>,
    /// Directory the whole disk's filesystem is mounted on, as in the table's MOUNTPOINT.
    mountpoint: Option<String>,
    partitions: Vec<ListedPartition>,
    /// Filesystems mounted by 'loopfuse mount' from this attachment.
    mounts: Vec<ListedMount<'a>>,
}

/// One filesystem mounted by 'loopfuse mount', as `list --json` prints it.
#[derive(Debug, Serialize)]
struct ListedMount<'a> {
    #[serde(flatten)]
    record: &'a MountRecord,
    /// Whether its driver has exited, leaving the mount for 'umount' or 'detach' to remove.
    driver_exited: bool,
    /// Whether the partition table changed so that neither the disk nor any partition now
    /// covers exactly its bytes. `partition` and `device` are always those it was mounted from.
    old_table: bool,
}

/// One partition as `list --json` prints it.
#[derive(Debug, Serialize)]
struct ListedPartition {
    number: u32,
    device: String,
    /// Offset inside the disk device, in bytes.
    start: u64,
    size: u64,
    #[serde(rename = "type")]
    type_name: String,
    label: Option<String>,
    /// Directory its filesystem is mounted on, as in the table's MOUNTPOINT.
    mountpoint: Option<String>,
}

fn state_of(entry: &Entry) -> &'static str {
    match (entry.liveness, entry.state.stage) {
        (Liveness::Stale, _) => "stale",
        (Liveness::Live, Stage::Starting) => "starting",
        (Liveness::Live, Stage::Attached) => "attached",
    }
}

fn listed(entry: &Entry) -> ListedAttachment<'_> {
    let mut item = ListedAttachment {
        name: &entry.state.name,
        device: entry.device().display().to_string(),
        image: entry.image_path_now().display().to_string(),
        offset: entry.state.offset,
        size: entry.state.size,
        sizelimit: entry.state.sizelimit,
        read_only: entry.state.read_only,
        partscan: entry.state.partscan,
        sector_size: entry.state.sector_size,
        overlay: entry
            .state
            .overlay
            .as_ref()
            .map(|path| path.display().to_string()),
        snapshot: entry.state.snapshot,
        autoclear: entry.state.autoclear,
        pid: entry.state.pid.pid,
        state: state_of(entry),
        cache: &entry.state.cache,
        partition_table: entry.state.partition_table.as_deref(),
        partitions: entry
            .state
            .partitions
            .iter()
            .map(|partition| ListedPartition {
                number: partition.number,
                device: entry
                    .mountpoint
                    .join(format!("p{}", partition.number))
                    .display()
                    .to_string(),
                start: partition.start,
                size: partition.size,
                type_name: partition.type_name.clone(),
                label: partition.label.clone(),
                mountpoint: None,
            })
            .collect(),
        mountpoint: None,
        mounts: entry
            .state
            .mounts
            .iter()
            .map(|record| ListedMount {
                record,
                driver_exited: record.driver_exited(),
                old_table: false,
            })
            .collect(),
    };
    place_mounts(entry, &mut item);
    item
}

/// Fills in the mountpoint of the disk and of each partition, and marks the mounts that no
/// longer match either: a mount belongs to the device that now covers its bytes.
fn place_mounts(entry: &Entry, item: &mut ListedAttachment) {
    let disk_range = entry.state.range_of(None);
    let directory = |mounted: &ListedMount| mounted.record.directory.display().to_string();
    item.mountpoint = mount_on(&item.mounts, None, disk_range).map(directory);
    for partition in &mut item.partitions {
        let number = Some(partition.number);
        let found = mount_on(&item.mounts, number, entry.state.range_of(number));
        partition.mountpoint = found.map(directory);
    }

    let partitions = &item.partitions;
    let placed: Vec<bool> = item
        .mounts
        .iter()
        .map(|mounted| {
            is_mounted_on(mounted, None, disk_range)
                || partitions.iter().any(|partition| {
                    let number = Some(partition.number);
                    is_mounted_on(mounted, number, entry.state.range_of(number))
                })
        })
        .collect();
    for (mounted, placed) in item.mounts.iter_mut().zip(placed) {
        mounted.old_table = !placed;
    }
}

/// Returns whether `mounted` is the filesystem on `partition` (`None` for the disk), which
/// now covers `range`. A mount keeps the range it was made on, so after a change of the
/// table it may belong to no partition, or to one with another number.
fn is_mounted_on(mounted: &ListedMount, partition: Option<u32>, range: Option<DiskRange>) -> bool {
    match mounted.record.range {
        Some(held) => Some(held) == range,
        None => mounted.record.partition == partition,
    }
}

/// Returns the directory a filesystem on `partition` (`None` for the disk), which covers
/// `range`, is mounted on, marked when its driver has exited, or "-".
fn mountpoint_cell(
    mounts: &[ListedMount],
    partition: Option<u32>,
    range: Option<DiskRange>,
) -> String {
    mount_on(mounts, partition, range).map_or_else(|| "-".to_string(), mount_cell)
}

/// Returns the mount of the filesystem on `partition` (`None` for the disk), which covers
/// `range`, if there is one.
fn mount_on<'a, 'b>(
    mounts: &'b [ListedMount<'a>],
    partition: Option<u32>,
    range: Option<DiskRange>,
) -> Option<&'b ListedMount<'a>> {
    mounts
        .iter()
        .find(|mounted| is_mounted_on(mounted, partition, range))
}

fn mount_cell(mounted: &ListedMount) -> String {
    let directory = mounted.record.directory.display();
    if mounted.driver_exited {
        format!("{directory}[driver-exited]")
    } else {
        directory.to_string()
    }
}

/// Returns a row for each mount whose bytes no partition of the current table covers: the
/// table changed after the mount, and its driver still uses the old partition.
fn outdated_mount_rows(item: &ListedAttachment) -> Vec<Vec<String>> {
    let outdated = item.mounts.iter().filter(|mounted| mounted.old_table);
    outdated
        .map(|mounted| {
            let record = mounted.record;
            let range = record.range.unwrap_or(DiskRange { start: 0, size: 0 });
            let name = match record.partition {
                Some(number) => format!("{}p{number}", item.name),
                None => item.name.to_string(),
            };
            vec![
                name,
                range.size.to_string(),
                (item.offset + range.start).to_string(),
                u8::from(item.read_only).to_string(),
                item.pid.to_string(),
                "partition".to_string(),
                "(old table)".to_string(),
                mount_cell(mounted),
                item.image.clone(),
                item.overlay.clone().unwrap_or_else(|| "-".to_string()),
                record.device.display().to_string(),
            ]
        })
        .collect()
}

/// Renders `entries` as `{"attachments": [...]}` followed by a newline.
pub fn to_json(entries: &[Entry]) -> Result<String, serde_json::Error> {
    #[derive(Serialize)]
    struct Listing<'a> {
        attachments: Vec<ListedAttachment<'a>>,
    }

    let listing = Listing {
        attachments: entries.iter().map(listed).collect(),
    };
    Ok(serde_json::to_string_pretty(&listing)? + "\n")
}

/// Column headings of the table, in order. Partition rows are named `loopNpM`; their OFFSET is
/// the partition's start inside the image, and TYPE is the partition type (the table type,
/// MBR or GPT, on the disk row). MOUNTPOINT is where 'loopfuse mount' mounted the
/// filesystem of that row's device, followed by `[driver-exited]` when its driver is gone
/// ('loopfuse umount' cleans up). OVERLAY is the overlay file, `-` when writes go to the
/// image. DEVICE stays last, so scripts can take the last field.
const COLUMNS: [&str; 11] = [
    "NAME",
    "SIZE",
    "OFFSET",
    "RO",
    "PID",
    "STATE",
    "TYPE",
    "MOUNTPOINT",
    "IMAGE",
    "OVERLAY",
    "DEVICE",
];

/// Renders `entries` as a table with aligned columns; the last column is not padded.
pub fn to_table(entries: &[Entry], headings: bool) -> String {
    // Like `losetup -l`, print nothing at all when nothing is attached.
    if entries.is_empty() {
        return String::new();
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    if headings {
        rows.push(COLUMNS.iter().map(|column| column.to_string()).collect());
    }
    for entry in entries {
        let item = listed(entry);
        let overlay = item.overlay.clone().unwrap_or_else(|| "-".to_string());
        rows.push(vec![
            item.name.to_string(),
            item.size.to_string(),
            item.offset.to_string(),
            u8::from(item.read_only).to_string(),
            item.pid.to_string(),
            item.state.to_string(),
            item.partition_table.unwrap_or("-").to_string(),
            mountpoint_cell(&item.mounts, None, entry.state.range_of(None)),
            item.image.clone(),
            overlay.clone(),
            item.device.clone(),
        ]);
        for partition in &item.partitions {
            rows.push(vec![
                format!("{}p{}", item.name, partition.number),
                partition.size.to_string(),
                (item.offset + partition.start).to_string(),
                u8::from(item.read_only).to_string(),
                item.pid.to_string(),
                "partition".to_string(),
                partition.type_name.clone(),
                mountpoint_cell(
                    &item.mounts,
                    Some(partition.number),
                    entry.state.range_of(Some(partition.number)),
                ),
                item.image.clone(),
                overlay.clone(),
                partition.device.clone(),
            ]);
        }
        rows.extend(outdated_mount_rows(&item));
    }

    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escape_control(cell)).collect())
        .collect();
    let mut widths = [0usize; COLUMNS.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }

    let mut output = String::new();
    for row in rows {
        let last = row.len() - 1;
        for (index, cell) in row.iter().enumerate() {
            if index == last {
                output.push_str(cell);
            } else {
                output.push_str(&format!("{cell:<width$} ", width = widths[index]));
            }
        }
        output.push('\n');
    }
    output
}
