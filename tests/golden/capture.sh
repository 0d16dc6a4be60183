#!/usr/bin/env bash
# Captures the golden outputs of util-linux losetup that tests/losetup.rs compares the
# 'loopfuse losetup' front with. Needs root and kernel loop devices; run it from anywhere.
#
# Two read-only devices share one 64 MiB image, as loopfuse allows: DEVICE0 attached with
# -P, DEVICE1 with an offset, a size limit and 4096-byte sectors. Variable parts are
# normalised: device paths become DEVICE0/DEVICE1, the image path IMAGE, '[dev]:inode'
# becomes '[DEV]:INO', and runs of spaces in tables shrink to one (column widths follow the
# path lengths). tests/losetup.rs applies the same normalisation to loopfuse's output.
set -euo pipefail
golden=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /tmp/loopfuse-golden.XXXXXX)
image=$work/disk.img
device0=""
device1=""
cleanup() {
    [ -n "$device1" ] && losetup -d "$device1"
    [ -n "$device0" ] && losetup -d "$device0"
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s 64M "$image"
printf 'label: gpt\n,20M,L\n,,L\n' | sfdisk --quiet "$image"
device0=$(losetup -f -r -P --show "$image")
device1=$(losetup -f -r -o 1M --sizelimit 2M -b 4096 --show "$image")
devino=$(stat -c '%d]:%i' "$image")

normalise() {
    sed -e "s|$device0|DEVICE0|g" -e "s|$device1|DEVICE1|g" -e "s|$image|IMAGE|g" \
        -e "s|\[0*$devino|[DEV]:INO|g"
}
squeeze() { tr -s ' '; }
# Only the lines for this image, in DEVICE0, DEVICE1 order (losetup lists in /sys order).
ours() { grep -F "$image" | normalise | sort; }

losetup -a | ours >"$golden/a.txt"
losetup -j "$image" | ours >"$golden/j.txt"
losetup -j "$image" -o 1048576 | ours >"$golden/j-offset.txt"
losetup "$device1" | normalise >"$golden/show-one.txt"
losetup -l "$device0" | normalise | squeeze >"$golden/l.txt"
losetup -l -n "$device1" | normalise | squeeze >"$golden/l-n.txt"
losetup -l -O NAME,OFFSET,SIZELIMIT,RO,PARTSCAN,LOG-SEC,BACK-FILE "$device1" |
    normalise | squeeze >"$golden/l-O.txt"
losetup -l --raw "$device1" | normalise >"$golden/l-raw.txt"
losetup -l -J "$device0" | normalise >"$golden/l-J.txt"
losetup -J -O NAME,RO,PARTSCAN,LOG-SEC,BACK-FILE -j "$image" -o 1048576 | normalise \
    >"$golden/J-O-j.txt"
echo "golden files written to $golden"
