//! Output formats of util-linux `losetup` (2.38), reproduced for loopfuse devices: the
//! one-line `-a`/`-j` form and the `--list` table in its aligned, raw and JSON styles.

use std::os::unix::fs::MetadataExt;

use crate::cli::text::escape_control;
use crate::registry::{Entry, FileId};

/// One loop device as `losetup` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopInfo {
    /// Device path: the attachment's `disk` file.
    pub name: String,
    pub back_file: String,
    /// `st_dev` and `st_ino` of the image, when it can be stat'ed.
    pub back_device: Option<u64>,
    pub back_inode: Option<u64>,
    /// `st_dev` of the device file: its FUSE filesystem, since it has no `st_rdev`.
    pub device_number: Option<u64>,
    pub offset: u64,
    pub sizelimit: u64,
    pub autoclear: bool,
    pub partscan: bool,
    pub read_only: bool,
    pub direct_io: bool,
    pub sector_size: u32,
}

impl LoopInfo {
    pub fn of(entry: &Entry) -> Self {
        let state = &entry.state;
        // As the kernel reports it: the file attached, even when its name now leads to
        // another file or to none.
        let attached = state.image_id.or_else(|| FileId::of(&state.image));
        let device = entry.device();
        Self {
            name: device.display().to_string(),
            back_file: entry.image_path_now().display().to_string(),
            back_device: attached.map(|id| id.device),
            back_inode: attached.map(|id| id.inode),
            device_number: std::fs::metadata(&device).ok().map(|m| m.dev()),
            offset: state.offset,
            sizelimit: state.sizelimit,
            autoclear: state.autoclear,
            partscan: state.partscan,
            read_only: state.read_only,
            direct_io: false,
            sector_size: state.sector_size,
        }
    }
}

/// Formats the line `losetup -a` prints: `DEVICE: [DEV]:INODE (FILE), offset N, sizelimit N`.
pub fn info_line(info: &LoopInfo) -> String {
    let mut line = match (info.back_device, info.back_inode) {
        (Some(device), Some(inode)) => {
            format!("{}: [{device:04}]:{inode} ({})", info.name, info.back_file)
        }
        // losetup prints this form when it cannot learn the backing file's numbers.
        _ => format!("{}: []: ({})", info.name, info.back_file),
    };
    if info.offset != 0 {
        line.push_str(&format!(", offset {}", info.offset));
    }
    if info.sizelimit != 0 {
        line.push_str(&format!(", sizelimit {}", info.sizelimit));
    }
    line
}

/// A `--list` column, in the order `--output-all` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Name,
    Autoclear,
    BackFile,
    BackIno,
    BackMajMin,
    MajMin,
    Offset,
    Partscan,
    Ro,
    Sizelimit,
    Dio,
    LogSec,
}

/// Alignment of a column's cells and their type in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    /// Right-aligned number.
    Number,
    /// Right-aligned 0 or 1; `true`/`false` in JSON.
    Flag,
}

impl Column {
    pub const ALL: [Column; 12] = [
        Column::Name,
        Column::Autoclear,
        Column::BackFile,
        Column::BackIno,
        Column::BackMajMin,
        Column::MajMin,
        Column::Offset,
        Column::Partscan,
        Column::Ro,
        Column::Sizelimit,
        Column::Dio,
        Column::LogSec,
    ];

    /// The columns of `losetup --list` without `-O`.
    pub const DEFAULT: [Column; 8] = [
        Column::Name,
        Column::Sizelimit,
        Column::Offset,
        Column::Autoclear,
        Column::Ro,
        Column::BackFile,
        Column::Dio,
        Column::LogSec,
    ];

    pub fn heading(self) -> &'static str {
        self.describe().0
    }

    /// Heading, kind and help text, as `losetup --help` lists them.
    fn describe(self) -> (&'static str, Kind, &'static str) {
        match self {
            Column::Name => ("NAME", Kind::Text, "loop device name"),
            Column::Autoclear => ("AUTOCLEAR", Kind::Flag, "autoclear flag set"),
            Column::BackFile => ("BACK-FILE", Kind::Text, "device backing file"),
            Column::BackIno => ("BACK-INO", Kind::Number, "backing file inode number"),
            Column::BackMajMin => (
                "BACK-MAJ:MIN",
                Kind::Text,
                "backing file major:minor device number",
            ),
            Column::MajMin => ("MAJ:MIN", Kind::Text, "loop device major:minor number"),
            Column::Offset => ("OFFSET", Kind::Number, "offset from the beginning"),
            Column::Partscan => ("PARTSCAN", Kind::Flag, "partscan flag set"),
            Column::Ro => ("RO", Kind::Flag, "read-only device"),
            Column::Sizelimit => ("SIZELIMIT", Kind::Number, "size limit of the file in bytes"),
            Column::Dio => ("DIO", Kind::Flag, "access backing file with direct-io"),
            Column::LogSec => ("LOG-SEC", Kind::Number, "logical sector size in bytes"),
        }
    }

    fn kind(self) -> Kind {
        self.describe().1
    }

    /// Formats the cell of this column for `info`. With `padded`, the major:minor columns
    /// take the aligned-table form, which losetup pads around the colon.
    fn cell(self, info: &LoopInfo, padded: bool) -> String {
        let flag = |value: bool| u8::from(value).to_string();
        let major_minor = |device: Option<u64>, major_width: usize| {
            device.map_or(String::new(), |device| {
                let (major, minor) = (libc::major(device), libc::minor(device));
                if padded {
                    format!("{major:>major_width$}:{minor:<3}")
                } else {
                    format!("{major}:{minor}")
                }
            })
        };
        match self {
            Column::Name => info.name.clone(),
            Column::Autoclear => flag(info.autoclear),
            Column::BackFile => info.back_file.clone(),
            Column::BackIno => info.back_inode.map_or(String::new(), |i| i.to_string()),
            Column::BackMajMin => major_minor(info.back_device, 8),
            Column::MajMin => major_minor(info.device_number, 3),
            Column::Offset => info.offset.to_string(),
            Column::Partscan => flag(info.partscan),
            Column::Ro => flag(info.read_only),
            Column::Sizelimit => info.sizelimit.to_string(),
            Column::Dio => flag(info.direct_io),
            Column::LogSec => info.sector_size.to_string(),
        }
    }
}

/// Help lines for the columns, as the end of `losetup --help` prints them.
pub fn column_help() -> String {
    let lines: Vec<String> = Column::ALL
        .iter()
        .map(|column| format!(" {:>12}  {}", column.heading(), column.describe().2))
        .collect();
    lines.join("\n")
}

/// Parses `-O NAME,OFFSET,...` (names in any case); an unknown name is the error.
pub fn parse_columns(text: &str) -> Result<Vec<Column>, String> {
    text.split(',')
        .map(|name| {
            Column::ALL
                .into_iter()
                .find(|column| column.heading().eq_ignore_ascii_case(name))
                .ok_or_else(|| format!("unknown column: {name}"))
        })
        .collect()
}

/// The style of a `--list` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Table,
    Raw,
    Json,
}

/// Renders `rows` as `losetup --list` does; `headings` is false for `--noheadings`.
pub fn render(rows: &[LoopInfo], columns: &[Column], style: Style, headings: bool) -> String {
    match style {
        Style::Json => render_json(rows, columns),
        // With no rows losetup prints nothing at all, not even the heading line.
        _ if rows.is_empty() => String::new(),
        Style::Raw => render_raw(rows, columns, headings),
        Style::Table => render_table(rows, columns, headings),
    }
}

fn render_table(rows: &[LoopInfo], columns: &[Column], headings: bool) -> String {
    let mut lines: Vec<Vec<String>> = Vec::new();
    if headings {
        lines.push(columns.iter().map(|c| c.heading().to_string()).collect());
    }
    for row in rows {
        lines.push(
            columns
                .iter()
                .map(|c| escape_control(&c.cell(row, true)))
                .collect(),
        );
    }

    // Headings count toward the widths even when they are not printed, as in losetup.
    let mut widths: Vec<usize> = columns.iter().map(|c| c.heading().len()).collect();
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }

    let mut output = String::new();
    for line in lines {
        let mut cells = Vec::with_capacity(columns.len());
        for (index, cell) in line.iter().enumerate() {
            let width = widths[index];
            let is_last = index + 1 == columns.len();
            cells.push(match columns[index].kind() {
                Kind::Number | Kind::Flag => format!("{cell:>width$}"),
                // The last column is not padded when it is aligned left.
                Kind::Text if is_last => cell.clone(),
                Kind::Text => format!("{cell:<width$}"),
            });
        }
        output.push_str(&cells.join(" "));
        output.push('\n');
    }
    output
}

fn render_raw(rows: &[LoopInfo], columns: &[Column], headings: bool) -> String {
    let mut output = String::new();
    if headings {
        let names: Vec<&str> = columns.iter().map(|column| column.heading()).collect();
        output.push_str(&names.join(" "));
        output.push('\n');
    }
    for row in rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|column| escape_raw(&column.cell(row, false)))
            .collect();
        output.push_str(&cells.join(" "));
        output.push('\n');
    }
    output
}

/// Escapes a raw cell as libsmartcols does: bytes that are not printable ASCII, a space or a
/// backslash become `\xHH`, so cells stay separated by single spaces.
fn escape_raw(cell: &str) -> String {
    let mut escaped = String::with_capacity(cell.len());
    for byte in cell.bytes() {
        if byte.is_ascii_graphic() && byte != b'\\' {
            escaped.push(byte as char);
        } else {
            escaped.push_str(&format!("\\x{byte:02x}"));
        }
    }
    escaped
}

/// JSON as libsmartcols prints it: three-space indents, keys in column order, and rows
/// separated by `},{` on one line.
fn render_json(rows: &[LoopInfo], columns: &[Column]) -> String {
    let objects: Vec<String> = rows
        .iter()
        .map(|row| {
            let fields: Vec<String> = columns
                .iter()
                .map(|&column| {
                    let key = column.heading().to_ascii_lowercase();
                    format!("         \"{key}\": {}", json_value(column, row))
                })
                .collect();
            format!("{{\n{}\n      }}", fields.join(",\n"))
        })
        .collect();

    let body = if objects.is_empty() {
        String::new()
    } else {
        format!("      {}", objects.join(","))
    };
    format!("{{\n   \"loopdevices\": [\n{body}\n   ]\n}}\n")
}

fn json_value(column: Column, row: &LoopInfo) -> String {
    let cell = column.cell(row, false);
    match column.kind() {
        _ if cell.is_empty() => "null".to_string(),
        Kind::Number => cell,
        Kind::Flag => (cell == "1").to_string(),
        Kind::Text => serde_json::Value::String(cell).to_string(),
    }
}

#[cfg(test)]
mod tests;
