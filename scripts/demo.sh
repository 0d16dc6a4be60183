#!/usr/bin/env bash
# Shows the main job of loopfuse on a sample image it creates: attach, partition-free
# format with mkfs.ext4, check with e2fsck, list, detach, and a final check of the image.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

ensure_tools
export PATH="$PATH:/usr/sbin:/sbin"

# Shows each command before running it, in bold on a terminal.
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
show() { printf '\n%s$ %s%s\n' "$bold" "$*" "$plain"; }
step() { show "$@"; "$@"; }

echo "==> building loopfuse (cargo build --release; a minute or two the first time)"
cargo build --release
export PATH="$PWD/target/release:$PATH"

work=$(mktemp -d "${TMPDIR:-/tmp}/loopfuse-demo.XXXXXX")
device=""
cleanup() {
    if [ -n "$device" ]; then
        loopfuse detach "$device" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
image=$work/sample.img

step truncate -s 256M "$image"
show loopfuse attach "$image"
device=$(loopfuse attach "$image")
echo "$device"
step ls -l "$device"
step mkfs.ext4 -q -L demo "$device"
step e2fsck -fn "$device"
step loopfuse list
step loopfuse detach "$device"
device=""
step e2fsck -fn "$image"
step du -h --apparent-size "$image"
step du -h "$image"
echo
echo "demo finished: the image was formatted through the device file and checks clean."
