//! Compares `loopfuse::partition::scan` with util-linux on images that `sfdisk`, `sgdisk` and
//! `fdisk` create.
//!
//! The kernel's partition parser is the real reference, but `losetup -P` needs root and a
//! kernel built with MBR and GPT support. So util-linux serves as the oracle: `partx`
//! (libblkid) for numbers, starts and sizes, and `sfdisk --json` (libfdisk) for types and
//! names. Where util-linux and the kernel differ, the test expects the kernel's answer and
//! says why.
//!
//! Without the tools each test prints one line and passes, unless `LOOPFUSE_REQUIRE_FUSE=1`
//! (set in CI), which makes a missing tool a failure.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use loopfuse::block::MemoryDevice;
use loopfuse::partition::{
    GptProblem, PartitionError, PartitionTable, PartitionWarning, Scheme, scan,
};

const TOOLS: [&str; 4] = ["sfdisk", "sgdisk", "fdisk", "partx"];
const MIB: u64 = 1 << 20;

/// Returns whether the partitioning tools can run, or fails under `LOOPFUSE_REQUIRE_FUSE=1`.
fn tools_available(test: &str) -> bool {
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|tool| {
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    if missing.is_empty() {
        return true;
    }

    let message = format!(
        "{test}: {} not found (Debian packages util-linux, fdisk and gdisk)",
        missing.join(", ")
    );
    if std::env::var("LOOPFUSE_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("{message}, and LOOPFUSE_REQUIRE_FUSE=1 makes that a failure");
    }
    println!("{message}, skipped");
    false
}

/// A sparse image file in its own temporary directory, removed on drop.
struct Image {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Image {
    fn new(len: u64) -> Self {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("disk.img");
        fs::File::create(&path)
            .and_then(|file| file.set_len(len))
            .expect("create image");
        Self { _dir: dir, path }
    }

    fn truncate(&self, len: u64) {
        fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .and_then(|file| file.set_len(len))
            .expect("truncate image");
    }

    fn overwrite(&self, offset: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;

        fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .and_then(|file| file.write_all_at(bytes, offset))
            .expect("overwrite image bytes");
    }

    fn scan(&self, sector_size: u32) -> Result<Option<PartitionTable>, PartitionError> {
        let bytes = fs::read(&self.path).expect("read image");
        scan(&MemoryDevice::read_only(bytes), sector_size)
    }

    fn table(&self, sector_size: u32) -> PartitionTable {
        self.scan(sector_size)
            .expect("scan succeeds")
            .expect("image has a partition table")
    }
}

/// Runs `program` with `args`, then the image path, feeding it `stdin`. Fails the test unless
/// the program succeeds, and returns its standard output.
fn run(program: &str, args: &[&str], path: &Path, stdin: &str) -> String {
    let mut child = Command::new(program)
        .args(args)
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("write to stdin");
    let output = child.wait_with_output().expect("wait for tool");
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Returns `(number, start, len)` in bytes for every partition that `partx` lists.
///
/// partx gives START and SECTORS in 512-byte units even with `--sector-size`, and SIZE in
/// bytes, so the two are checked against each other.
fn partx(image: &Image, sector_size: u32) -> Vec<(u32, u64, u64)> {
    let sector_arg = sector_size.to_string();
    let mut args = vec!["--show", "--bytes", "--noheadings"];
    args.extend(["-o", "NR,START,SECTORS,SIZE"]);
    if sector_size != 512 {
        args.extend(["--sector-size", &sector_arg]);
    }
    let output = run("partx", &args, &image.path, "");

    output
        .lines()
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .map(|field| field.parse().expect("numeric partx column"))
                .collect();
            let [number, start, sectors, size] = fields[..] else {
                panic!("unexpected partx line {line:?}");
            };
            assert_eq!(sectors * 512, size, "partx line {line:?}");
            (number as u32, start * 512, size)
        })
        .collect()
}

/// Returns `(type, name)` of every partition, as `sfdisk --json` prints them.
fn sfdisk_types(image: &Image) -> Vec<(String, Option<String>)> {
    let output = run("sfdisk", &["--json"], &image.path, "");
    let json: serde_json::Value = serde_json::from_str(&output).expect("sfdisk JSON");

    json["partitiontable"]["partitions"]
        .as_array()
        .expect("partition list")
        .iter()
        .map(|partition| {
            let kind = partition["type"].as_str().expect("type").to_string();
            let name = partition["name"].as_str().map(str::to_string);
            (kind, name)
        })
        .collect()
}

fn layout(table: &PartitionTable) -> Vec<(u32, u64, u64)> {
    table
        .partitions
        .iter()
        .map(|partition| (partition.number, partition.start, partition.len))
        .collect()
}

/// Writes an MBR with sfdisk from a script in its input format.
fn sfdisk(image: &Image, script: &str) {
    run(
        "sfdisk",
        &["--quiet", "--no-reread", "--no-tell-kernel"],
        &image.path,
        script,
    );
}

/// Runs sgdisk with `args` on `image`.
fn sgdisk(image: &Image, args: &[&str]) {
    run("sgdisk", args, &image.path, "");
}

/// Length of the stub the kernel lists for an extended partition: 1 KiB, or one sector.
fn extended_stub(sector_size: u32) -> u64 {
    u64::from(sector_size).max(1024)
}

#[test]
fn mbr_primaries_match_partx() {
    if !tools_available("mbr_primaries_match_partx") {
        return;
    }
    let image = Image::new(64 * MIB);
    sfdisk(&image, "label: dos\n,8M,83\n,4M,82\n,4M,7\n,,c\n");

    let table = image.table(512);

    assert_eq!(table.scheme, Scheme::Mbr);
    assert_eq!(layout(&table), partx(&image, 512));
    let types: Vec<String> = sfdisk_types(&image)
        .into_iter()
        .map(|(kind, _)| format!("0x{:02x}", u8::from_str_radix(&kind, 16).unwrap()))
        .collect();
    let ours: Vec<&str> = table
        .partitions
        .iter()
        .map(|p| p.type_name.as_str())
        .collect();
    assert_eq!(ours, types);
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
}

#[test]
fn mbr_logicals_match_partx_except_extended_size() {
    if !tools_available("mbr_logicals_match_partx_except_extended_size") {
        return;
    }
    let image = Image::new(64 * MIB);
    sfdisk(
        &image,
        "label: dos\n,8M,83\n,,5\n,4M,83\n,4M,82\n,6M,7\n,,b\n",
    );

    let table = image.table(512);
    let mut expected = partx(&image, 512);

    // partx lists the extended partition (2) with its full size. The kernel exposes only a
    // 1 KiB stub, so that mkfs cannot overwrite the EBRs, and loopfuse follows the kernel.
    let extended = expected
        .iter_mut()
        .find(|(number, _, _)| *number == 2)
        .unwrap();
    extended.2 = extended_stub(512);
    assert_eq!(layout(&table), expected);
    let numbers: Vec<u32> = table.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 5, 6, 7, 8]);
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
}

#[test]
fn mbr_4096_byte_sectors_match_partx() {
    if !tools_available("mbr_4096_byte_sectors_match_partx") {
        return;
    }
    let image = Image::new(64 * MIB);
    // fdisk commands: new DOS label, primary 1 of 8 MiB, extended 2 over the rest, logical 5
    // of 8 MiB, logical 6 over the rest, write.
    let script = "o\nn\np\n1\n\n+8M\nn\ne\n2\n\n\nn\nl\n\n+8M\nn\nl\n\n\nw\n";
    run("fdisk", &["--sector-size", "4096"], &image.path, script);

    let table = image.table(4096);
    let mut expected = partx(&image, 4096);

    let extended = expected
        .iter_mut()
        .find(|(number, _, _)| *number == 2)
        .unwrap();
    extended.2 = extended_stub(4096);
    assert_eq!(layout(&table), expected);
    assert_eq!(table.partitions.len(), 4);
}

#[test]
fn mbr_partition_past_end_is_cut() {
    if !tools_available("mbr_partition_past_end_is_cut") {
        return;
    }
    let image = Image::new(64 * MIB);
    sfdisk(&image, "label: dos\n,16M,83\n,16M,83\n,,83\n");
    let before = partx(&image, 512);
    image.truncate(24 * MIB);

    let table = image.table(512);

    // partx still lists the sizes from the table. The kernel cuts partition 2 at the end of
    // the device and leaves out partition 3, which starts past it.
    assert_eq!(partx(&image, 512), before);
    let (_, start_2, len_2) = before[1];
    assert_eq!(
        layout(&table),
        vec![before[0], (2, start_2, 24 * MIB - start_2)]
    );
    assert_eq!(
        table.warnings,
        [
            PartitionWarning::TruncatedAtEnd {
                number: 2,
                len_in_table: len_2,
                len: 24 * MIB - start_2
            },
            PartitionWarning::StartsPastEnd {
                number: 3,
                start: before[2].1,
                device_len: 24 * MIB
            },
        ]
    );
}

#[test]
fn gpt_128_entries_match_partx() {
    if !tools_available("gpt_128_entries_match_partx") {
        return;
    }
    let image = Image::new(64 * MIB);
    sgdisk(
        &image,
        &[
            "-n",
            "1:2048:+8M",
            "-t",
            "1:8300",
            "-c",
            "1:root", //
            "-n",
            "2:0:+4M",
            "-t",
            "2:ef00",
            "-c",
            "2:EFI system", //
            "-n",
            "4:0:0",
            "-t",
            "4:8200",
        ],
    );

    let table = image.table(512);

    assert_eq!(table.scheme, Scheme::Gpt);
    assert_eq!(layout(&table), partx(&image, 512));
    let ours: Vec<(String, Option<String>)> = table
        .partitions
        .iter()
        .map(|p| (p.type_name.clone(), p.label.clone()))
        .collect();
    assert_eq!(ours, sfdisk_types(&image));
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
}

#[test]
fn gpt_resized_entry_tables_match_partx() {
    if !tools_available("gpt_resized_entry_tables_match_partx") {
        return;
    }
    for entries in [16, 200] {
        let image = Image::new(64 * MIB);
        let resize = format!("--resize-table={entries}");
        let last = format!("{entries}:0:+2M");
        sgdisk(&image, &[&resize, "-n", "1:0:+1M", "-n", &last]);

        let table = image.table(512);

        assert_eq!(layout(&table), partx(&image, 512), "{entries} entries");
        assert_eq!(table.partitions.last().unwrap().number, entries);
        assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    }
}

#[test]
fn gpt_partition_256_is_left_out() {
    if !tools_available("gpt_partition_256_is_left_out") {
        return;
    }
    let image = Image::new(64 * MIB);
    sgdisk(
        &image,
        &["--resize-table=300", "-n", "1:0:+1M", "-n", "256:0:+1M"],
    );

    let table = image.table(512);
    let listed = partx(&image, 512);

    // libblkid lists partition 256, but the kernel has minors for partitions 1 to 255 only.
    let numbers: Vec<u32> = listed.iter().map(|partition| partition.0).collect();
    assert_eq!(numbers, [1, 256]);
    assert_eq!(layout(&table), listed[..1]);
    assert_eq!(
        table.warnings,
        [PartitionWarning::PastPartitionLimit { count: Some(1) }]
    );
}

#[test]
fn gpt_damaged_primary_uses_backup_like_partx() {
    if !tools_available("gpt_damaged_primary_uses_backup_like_partx") {
        return;
    }
    let image = Image::new(64 * MIB);
    sgdisk(&image, &["-n", "1:0:+8M", "-n", "2:0:+8M", "-n", "3:0:0"]);
    let before = partx(&image, 512);
    // Change a byte of the primary header's first usable LBA without fixing its CRC.
    image.overwrite(512 + 40, &[0x99]);

    let table = image.table(512);

    // libblkid falls back to the backup at the last LBA. The kernel does so only when booted
    // with the `gpt` option, but loopfuse always does, with a warning.
    assert_eq!(partx(&image, 512), before);
    assert_eq!(layout(&table), before);
    let [
        PartitionWarning::BackupGptUsed {
            primary,
            backup_lba,
        },
    ] = &table.warnings[..]
    else {
        panic!("unexpected warnings {:?}", table.warnings);
    };
    assert_eq!(*backup_lba, 64 * MIB / 512 - 1);
    assert!(
        matches!(primary.problem, GptProblem::HeaderCrc { .. }),
        "{primary}"
    );
}

#[test]
fn gpt_4096_byte_sectors_match_partx() {
    if !tools_available("gpt_4096_byte_sectors_match_partx") {
        return;
    }
    let image = Image::new(64 * MIB);
    // fdisk commands: new GPT label, partition 1 of 8 MiB, partition 2 over the rest, write.
    run(
        "fdisk",
        &["--sector-size", "4096"],
        &image.path,
        "g\nn\n\n\n+8M\nn\n\n\n\nw\n",
    );

    let table = image.table(4096);

    assert_eq!(table.sector_size, 4096);
    assert_eq!(layout(&table), partx(&image, 4096));
    assert_eq!(table.partitions.len(), 2);
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
}

#[test]
fn gpt_truncated_image_is_rejected_like_partx() {
    if !tools_available("gpt_truncated_image_is_rejected_like_partx") {
        return;
    }
    let image = Image::new(64 * MIB);
    sgdisk(&image, &["-n", "1:0:+16M", "-n", "2:0:0"]);
    image.truncate(40 * MIB);

    let error = image.scan(512).unwrap_err();

    // The primary header's last usable LBA now lies past the end and the backup is gone.
    // The kernel and libblkid both reject such a header, so neither lists partitions. partx
    // reports only the protective MBR (PTTYPE="PMBR") and no partitions.
    assert_eq!(partx(&image, 512), []);
    let PartitionError::NoValidGpt { primary, backup } = error else {
        panic!("expected NoValidGpt, got {error:?}");
    };
    assert!(
        matches!(primary.problem, GptProblem::UsableRange { .. }),
        "{primary}"
    );
    assert!(
        matches!(backup.problem, GptProblem::Signature { .. }),
        "{backup}"
    );
}
