//! Expected outputs are util-linux 2.38.1 losetup's, captured byte for byte on a 64 MiB
//! image `/tmp/mountcmd-cap/disk.img` (st_dev 65024, inode 10059994).

use super::*;

const IMAGE: &str = "/tmp/mountcmd-cap/disk.img";

fn plain() -> LoopInfo {
    LoopInfo {
        name: "/dev/loop0".to_string(),
        back_file: IMAGE.to_string(),
        back_device: Some(65024),
        back_inode: Some(10059994),
        device_number: Some(libc::makedev(7, 0)),
        offset: 0,
        sizelimit: 0,
        autoclear: false,
        partscan: true,
        read_only: false,
        direct_io: false,
        sector_size: 512,
    }
}

fn windowed() -> LoopInfo {
    LoopInfo {
        name: "/dev/loop1".to_string(),
        offset: 1048576,
        sizelimit: 2097152,
        partscan: false,
        read_only: true,
        sector_size: 4096,
        device_number: Some(libc::makedev(7, 1)),
        ..plain()
    }
}

#[test]
fn info_line_matches_losetup_a() {
    assert_eq!(
        info_line(&plain()),
        "/dev/loop0: [65024]:10059994 (/tmp/mountcmd-cap/disk.img)"
    );
    assert_eq!(
        info_line(&windowed()),
        "/dev/loop1: [65024]:10059994 (/tmp/mountcmd-cap/disk.img), offset 1048576, sizelimit 2097152"
    );
}

#[test]
fn info_line_pads_small_device_numbers() {
    let info = LoopInfo {
        back_device: Some(42),
        ..plain()
    };
    assert!(info_line(&info).starts_with("/dev/loop0: [0042]:"));
}

#[test]
fn table_matches_losetup_list() {
    let expected = "\
NAME       SIZELIMIT  OFFSET AUTOCLEAR RO BACK-FILE                  DIO LOG-SEC
/dev/loop1   2097152 1048576         0  1 /tmp/mountcmd-cap/disk.img   0    4096
/dev/loop0         0       0         0  0 /tmp/mountcmd-cap/disk.img   0     512
";
    let rows = [windowed(), plain()];

    assert_eq!(
        render(&rows, &Column::DEFAULT, Style::Table, true),
        expected
    );
}

#[test]
fn table_without_headings_matches_losetup_list_n() {
    let expected =
        "/dev/loop0         0      0         0  0 /tmp/mountcmd-cap/disk.img   0     512\n";

    assert_eq!(
        render(&[plain()], &Column::DEFAULT, Style::Table, false),
        expected
    );
}

#[test]
fn table_leaves_last_text_column_unpadded() {
    let columns = parse_columns("BACK-FILE,NAME").unwrap();
    let expected = "BACK-FILE                  NAME\n/tmp/mountcmd-cap/disk.img /dev/loop1\n";

    assert_eq!(
        render(&[windowed()], &columns, Style::Table, true),
        expected
    );

    let columns = parse_columns("NAME,OFFSET,SIZELIMIT,BACK-FILE").unwrap();
    let expected = "\
NAME       OFFSET SIZELIMIT BACK-FILE
/dev/loop0      0         0 /tmp/mountcmd-cap/disk.img
";
    assert_eq!(render(&[plain()], &columns, Style::Table, true), expected);
}

#[test]
fn raw_matches_losetup_list_raw() {
    let expected = "\
NAME SIZELIMIT OFFSET AUTOCLEAR RO BACK-FILE DIO LOG-SEC
/dev/loop1 2097152 1048576 0 1 /tmp/mountcmd-cap/disk.img 0 4096
/dev/loop0 0 0 0 0 /tmp/mountcmd-cap/disk.img 0 512
";
    let rows = [windowed(), plain()];

    assert_eq!(render(&rows, &Column::DEFAULT, Style::Raw, true), expected);
}

#[test]
fn raw_escapes_spaces() {
    let info = LoopInfo {
        back_file: "/tmp/a b.img".to_string(),
        ..plain()
    };
    let columns = [Column::BackFile];

    assert_eq!(
        render(&[info], &columns, Style::Raw, false),
        "/tmp/a\\x20b.img\n"
    );
}

#[test]
fn json_matches_losetup_list_json() {
    let expected = r#"{
   "loopdevices": [
      {
         "name": "/dev/loop1",
         "sizelimit": 2097152,
         "offset": 1048576,
         "autoclear": false,
         "ro": true,
         "back-file": "/tmp/mountcmd-cap/disk.img",
         "dio": false,
         "log-sec": 4096
      },{
         "name": "/dev/loop0",
         "sizelimit": 0,
         "offset": 0,
         "autoclear": false,
         "ro": false,
         "back-file": "/tmp/mountcmd-cap/disk.img",
         "dio": false,
         "log-sec": 512
      }
   ]
}
"#;
    let rows = [windowed(), plain()];

    assert_eq!(render(&rows, &Column::DEFAULT, Style::Json, true), expected);
}

#[test]
fn json_of_no_devices_matches_losetup() {
    let expected = "{\n   \"loopdevices\": [\n\n   ]\n}\n";

    assert_eq!(render(&[], &Column::DEFAULT, Style::Json, true), expected);
    assert_eq!(render(&[], &Column::DEFAULT, Style::Table, true), "");
}

#[test]
fn json_types_follow_columns() {
    let columns = parse_columns("name,back-ino,partscan,MAJ:MIN").unwrap();
    let output = render(&[plain()], &columns, Style::Json, true);

    assert!(output.contains("\"back-ino\": 10059994,"), "{output}");
    assert!(output.contains("\"partscan\": true,"), "{output}");
    assert!(output.contains("\"maj:min\": \"7:0\""), "{output}");
}

#[test]
fn major_minor_is_padded_in_tables() {
    let columns = parse_columns("NAME,BACK-MAJ:MIN,MAJ:MIN").unwrap();
    let output = render(&[plain()], &columns, Style::Table, false);

    assert_eq!(output, "/dev/loop0      254:0     7:0  \n");
}

#[test]
fn unknown_column_is_named() {
    assert_eq!(
        parse_columns("NAME,BOGUS").unwrap_err(),
        "unknown column: BOGUS"
    );
}
