#!/usr/bin/env bash
# Benchmark loopfuse side by side with the raw image file, the kernel loop device and
# qemu-storage-daemon's FUSE export, in one run. The medians and their ratios to the raw
# file and to the kernel loop device go to stdout, BENCHMARKS.md and benchmarks.png.
#
# Usage: scripts/bench.sh
# Run it as root: dropping caches, losetup and installing missing packages need root.
# Without root it still runs, but skips the kernel loop device with a note in the report.
#
# Environment:
#   LOOPFUSE_BIN   loopfuse binary (default: target/release/loopfuse of this repository,
#                  built with `cargo build --release` when missing; a binary named here
#                  is never built, and the loopfuse columns show "not built" if it is missing)
#   BENCH_DIR      parent of the scratch directory (default: /var/tmp/loopfuse-bench);
#                  it must not be on tmpfs, which would put the images in memory
#   BENCH_OUT      directory that receives BENCHMARKS.md and benchmarks.png
#                  (default: the repository root)
#   BENCH_QUICK=1  development mode: 256 MiB image, 1 run of 3 s per workload, 1 GiB mkfs
#
# A full run took 23 minutes on a 2-core VM (Linux 6.18, ext4 scratch directory).
# Everything the script attaches, mounts or starts is undone by the EXIT trap, which then
# removes the scratch directory.
set -euo pipefail
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER=$REPO_ROOT/scripts/bench/report.py

BUILD_LOOPFUSE=0
if [[ -z ${LOOPFUSE_BIN:-} ]]; then
  LOOPFUSE_BIN=$REPO_ROOT/target/release/loopfuse
  BUILD_LOOPFUSE=1
fi
BENCH_DIR_GIVEN=${BENCH_DIR:+1}
BENCH_DIR=$(realpath -m -- "${BENCH_DIR:-/var/tmp/loopfuse-bench}")
BENCH_OUT=${BENCH_OUT:-$REPO_ROOT}
BENCH_QUICK=${BENCH_QUICK:-0}

if [[ $BENCH_QUICK == 1 ]]; then
  IMAGE_MIB=256
  RUNS=1
  RUNTIME=3
  MKFS_MIB=1024
  LATENCY_REPS=3
else
  IMAGE_MIB=1024
  RUNS=3
  RUNTIME=10
  MKFS_MIB=4096
  LATENCY_REPS=10
fi
RSS_IMAGE_GIB=100
# mkfs.ext4 -d copies this tree into the new filesystem.
MKFS_SOURCE_DIR=/usr/include

TARGETS=(raw loop qsd loopfuse loopfuse-writeback loopfuse-offset loopfuse-p1)
declare -A TARGET_LABEL=(
  [raw]="raw image file"
  [loop]="kernel loop (losetup)"
  [qsd]="qemu-storage-daemon FUSE export"
  [loopfuse]="loopfuse"
  [loopfuse-writeback]="loopfuse --cache writeback"
  [loopfuse-offset]="loopfuse --offset 1MiB"
  [loopfuse-p1]="loopfuse -P, partition p1"
)
FIO_WORKLOADS=(seqread seqwrite randread randread2 randwrite randwrite_cpu0 randread_aio)

SCRATCH=
RESULTS=
FIO_COMMAND=()
HOLD_FD=
NAP_FD=
LOOPFUSE_STATUS=
# Everything below is undone by cleanup(): loop devices from `losetup -f --show`,
# qemu-storage-daemon PIDs (with their mountpoint file) and loopfuse disk paths.
declare -A ACTIVE_LOOP=() ACTIVE_QSD=() ACTIVE_LOOPFUSE=()

# Values set by attach_target() for the target in use.
DEV=
LOOPFUSE_DISK=
QSD_PID=
SKIP_REASON=

log() {
  printf 'bench: %s\n' "$*" >&2
}

die() {
  printf 'bench: error: %s\n' "$*" >&2
  exit 1
}

# Append one tab-separated record to the results file that report.py reads.
record() {
  local fields=() field
  for field in "$@"; do
    field=${field//$'\t'/ }
    fields+=("${field//$'\n'/ | }")
  done
  (IFS=$'\t'; printf '%s\n' "${fields[*]}") >>"$RESULTS"
}

# Record an observation for the report's notes and show it now.
note() {
  log "note: $*"
  record note "$*"
}

# Sleep without forking, so that polling loops measure latency finely.
nap() {
  read -rt "$1" -u "$NAP_FD" _ || true
}

now_us() {
  local now=$EPOCHREALTIME
  printf '%s' "${now/./}"
}

# Print the first 400 characters of file $1 on one line.
file_text() {
  tr '\n' ' ' <"$1" | cut -c1-400
}

# fio separates file names with ':', so a literal colon is written as '\:'.
fio_escape() {
  printf '%s' "${1//:/\\:}"
}

cleanup() {
  local status=$? dev pid
  set +e
  trap - EXIT INT TERM
  if [[ -n $HOLD_FD ]]; then
    exec {HOLD_FD}<&-
    HOLD_FD=
  fi
  for dev in "${!ACTIVE_LOOPFUSE[@]}"; do
    loopfuse_detach "$dev"
  done
  for pid in "${!ACTIVE_QSD[@]}"; do
    stop_qsd "$pid"
  done
  for dev in "${!ACTIVE_LOOP[@]}"; do
    losetup -d "$dev" || log "error: losetup -d $dev failed; detach it by hand"
    unset 'ACTIVE_LOOP[$dev]'
  done
  if [[ -n $SCRATCH && -d $SCRATCH ]]; then
    # rm must never descend into a mount that failed to go away.
    if findmnt -rn -o TARGET | grep -qF -- "$SCRATCH"; then
      log "error: mounts remain under $SCRATCH; not removing it:"
      findmnt -rn -o TARGET | grep -F -- "$SCRATCH" >&2
    else
      rm -rf --one-file-system -- "$SCRATCH"
    fi
  fi
  exit "$status"
}

install_missing_tools() {
  local -A package_of=(
    [fio]=fio [qemu-storage-daemon]=qemu-utils [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs
    [fusermount3]=fuse3 [losetup]=mount [findmnt]=util-linux [sfdisk]=fdisk
    [python3]=python3 [timeout]=coreutils [gnuplot]=gnuplot-nox
  )
  local -A wanted=()
  local tool
  for tool in "${!package_of[@]}"; do
    command -v "$tool" >/dev/null || wanted[${package_of[$tool]}]=1
  done
  ((${#wanted[@]} == 0)) && return 0

  if ((EUID == 0)) && command -v apt-get >/dev/null; then
    log "installing ${!wanted[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${!wanted[@]}" >&2
  fi
  for tool in "${!package_of[@]}"; do
    [[ $tool == gnuplot ]] && continue
    command -v "$tool" >/dev/null ||
      die "$tool is missing. Install the ${package_of[$tool]} package, or run as root so that this script installs it"
  done
}

make_scratch() {
  mkdir -p -- "$BENCH_DIR"
  local fstype
  fstype=$(findmnt -n -o FSTYPE -T "$BENCH_DIR")
  if [[ $fstype == tmpfs || $fstype == ramfs ]]; then
    die "BENCH_DIR=$BENCH_DIR is on $fstype, so images would live in memory; set BENCH_DIR to a disk-backed directory"
  fi
  SCRATCH=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
  RESULTS=$SCRATCH/results.tsv
  : >"$RESULTS"
  mkdir "$SCRATCH/fio" "$SCRATCH/logs"
  mkfifo "$SCRATCH/nap.fifo"
  exec {NAP_FD}<>"$SCRATCH/nap.fifo"
}

drop_caches() {
  sync
  if ((EUID == 0)); then
    echo 3 >/proc/sys/vm/drop_caches
  fi
}

record_metadata() {
  local command=scripts/bench.sh
  [[ -n $BENCH_DIR_GIVEN ]] && command="BENCH_DIR=$BENCH_DIR $command"
  [[ $BUILD_LOOPFUSE == 0 ]] && command="LOOPFUSE_BIN=$LOOPFUSE_BIN $command"
  [[ $BENCH_QUICK == 1 ]] && command="BENCH_QUICK=1 $command"

  record meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
  record meta command "$command"
  record meta quick "$BENCH_QUICK"
  record meta cpus "$(nproc)"
  record meta cpu_model "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
  record meta memory "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  record meta kernel "$(uname -r)"
  record meta scratch_fs "$(findmnt -n -o FSTYPE,SOURCE -T "$SCRATCH" | tr -s ' ')"
  record meta fio "$(fio --version)"
  record meta qsd "$(qemu-storage-daemon --version | head -n1)"
  record meta e2fsprogs "$(mke2fs -V 2>&1 | head -n1)"
  record meta image_mib "$IMAGE_MIB"
  record meta mkfs_mib "$MKFS_MIB"
  record meta rss_image_gib "$RSS_IMAGE_GIB"
  record meta runs "$RUNS"
  record meta runtime "$RUNTIME"
  record meta latency_reps "$LATENCY_REPS"
  record meta root "$([[ $EUID == 0 ]] && echo yes || echo no)"

  local target
  for target in "${TARGETS[@]}"; do
    record target "$target" "${TARGET_LABEL[$target]}" "$(target_setup_text "$target")"
  done
}

# Print how target $1 is set up, for the report. IMAGE is the image file.
target_setup_text() {
  case $1 in
    raw) echo "IMAGE itself" ;;
    loop) echo "losetup -f --show IMAGE (buffered, no direct I/O); detach with losetup -d" ;;
    qsd) echo "qemu-storage-daemon --blockdev driver=file,node-name=file0,filename=IMAGE --blockdev driver=raw,node-name=raw0,file=file0 --export type=fuse,id=exp0,node-name=raw0,mountpoint=MNTFILE,writable=on; stopped with SIGTERM" ;;
    loopfuse) echo "loopfuse attach IMAGE; loopfuse detach DEVICE" ;;
    loopfuse-writeback) echo "loopfuse attach --cache writeback IMAGE; loopfuse detach DEVICE" ;;
    loopfuse-offset) echo "loopfuse attach --offset 1MiB IMAGE, IMAGE 1 MiB larger; loopfuse detach DEVICE" ;;
    loopfuse-p1) echo "loopfuse attach -P IMAGE, then .../loopN/p1 of a GPT whose partition 1 starts at 1 MiB; loopfuse detach DEVICE" ;;
  esac
}

# Print the options of fio workload $1, one per line.
fio_workload_options() {
  case $1 in
    seqread) printf '%s\n' --ioengine=psync --rw=read --bs=1M ;;
    seqwrite) printf '%s\n' --ioengine=psync --rw=write --bs=1M --end_fsync=1 ;;
    randread) printf '%s\n' --ioengine=psync --rw=randread --bs=4k ;;
    randread2) printf '%s\n' --ioengine=psync --rw=randread --bs=4k --numjobs=2 --group_reporting ;;
    randwrite) printf '%s\n' --ioengine=psync --rw=randwrite --bs=4k ;;
    randwrite_cpu0) printf '%s\n' --ioengine=psync --rw=randwrite --bs=4k --cpus_allowed=0 ;;
    randread_aio) printf '%s\n' --ioengine=libaio --iodepth=16 --direct=1 --rw=randread --bs=4k ;;
    *) die "unknown fio workload $1" ;;
  esac
}

fio_workload_label() {
  case $1 in
    seqread) echo "seq read 1 MiB" ;;
    seqwrite) echo "seq write 1 MiB + fsync" ;;
    randread) echo "rand read 4 KiB, 1 job" ;;
    randread2) echo "rand read 4 KiB, 2 jobs" ;;
    randwrite) echo "rand write 4 KiB, 1 job" ;;
    randwrite_cpu0) echo "rand write 4 KiB, 1 job, fio and server on CPU 0" ;;
    randread_aio) echo "rand read 4 KiB, libaio qd16, O_DIRECT" ;;
  esac
}

# Print the label under the bars of workload $1 in the plot. "|" starts a second line.
fio_workload_plot_label() {
  case $1 in
    seqread) echo 'seq read|1 MiB' ;;
    seqwrite) echo 'seq write|1 MiB + fsync' ;;
    randread) echo 'rand read 4K|1 job' ;;
    randread2) echo 'rand read 4K|2 jobs' ;;
    randwrite) echo 'rand write 4K|1 job' ;;
    randwrite_cpu0) echo 'rand write 4K|on CPU 0' ;;
    randread_aio) echo 'rand read 4K|qd16 O_DIRECT' ;;
  esac
}

# Print the metric that report.py extracts from fio's JSON output for workload $1.
fio_workload_metric() {
  case $1 in
    seqread) echo read_mibps ;;
    seqwrite) echo write_mibps ;;
    randread | randread2 | randread_aio) echo read_iops ;;
    randwrite | randwrite_cpu0) echo write_iops ;;
  esac
}

# Set FIO_COMMAND to the fio command line of workload $1 on file $2, without output options.
# --invalidate=0 keeps fio from dropping the cache that the warm-up read filled
# (by default it calls fadvise(DONTNEED) on files and BLKFLSBUF on block devices).
fio_command() {
  local workload=$1 filename=$2 options
  mapfile -t options < <(fio_workload_options "$workload")
  FIO_COMMAND=(fio --name="$workload" --filename="$(fio_escape "$filename")"
    "${options[@]}" --invalidate=0 --allow_file_create=0 --runtime="$RUNTIME" --time_based)
}

record_workloads() {
  local workload
  for workload in "${FIO_WORKLOADS[@]}"; do
    fio_command "$workload" DEVICE
    record workload "$workload" fio "$(fio_workload_label "$workload")" \
      "$(fio_workload_metric "$workload")" higher \
      "${FIO_COMMAND[*]} --output-format=json --output=RESULT.json" \
      "$(fio_workload_plot_label "$workload")"
  done
  record workload mkfs time "mkfs.ext4 -d $MKFS_SOURCE_DIR, $((MKFS_MIB / 1024)) GiB" s lower \
    "mkfs.ext4 -F -q -d $MKFS_SOURCE_DIR DEVICE" 'mkfs.ext4 -d|(time)'
  record workload fsck time "e2fsck -fn after that mkfs" s lower "e2fsck -fn DEVICE" \
    'e2fsck -fn|(time)'
  record workload attach latency "attach until the device file is readable" ms lower \
    "attach, then a 4 KiB read of DEVICE" attach
  record workload detach latency "detach of an idle device" ms lower \
    "detach, until the command or daemon has exited" detach
  record workload rss_attached memory "daemon RssAnon after attach, ${RSS_IMAGE_GIB} GiB sparse image" \
    MiB lower "RssAnon in /proc/PID/status" rss
  record workload rss_mkfs memory "daemon RssAnon after mkfs.ext4 of that image" MiB lower \
    "mkfs.ext4 -F -q DEVICE, then RssAnon in /proc/PID/status" rss
  record workload rss_mkfs_time memory "mkfs.ext4 of the ${RSS_IMAGE_GIB} GiB sparse image" s lower \
    "mkfs.ext4 -F -q DEVICE" mkfs
  record workload mkfs_allocated space "after the mkfs.ext4 -d runs, $((MKFS_MIB / 1024)) GiB image" \
    MiB lower "stat -c %b IMAGE, times 512 bytes" allocated
  record workload rss_allocated space "after mkfs.ext4 of the ${RSS_IMAGE_GIB} GiB sparse image" \
    MiB lower "stat -c %b IMAGE, times 512 bytes" allocated
}

# Write $2 MiB of random data into image $1 starting at MiB $3.
fill_random() {
  dd if=/dev/urandom of="$1" bs=1M seek="$3" count="$2" conv=notrunc status=none
}

# Create a sparse image $1 of $2 MiB with a GPT whose partition 1 covers exactly $3 MiB
# from 1 MiB on. The last MiB contains the backup GPT.
make_partitioned_image() {
  truncate -s "$2M" "$1"
  printf 'label: gpt\nstart=2048, size=%d\n' $(($3 * 2048)) | sfdisk -q "$1" >/dev/null
}

prepare_loopfuse() {
  if [[ ! -x $LOOPFUSE_BIN && $BUILD_LOOPFUSE == 1 ]]; then
    if command -v cargo >/dev/null; then
      log "building loopfuse: cargo build --release"
      if ! (cd "$REPO_ROOT" && cargo build --release) >"$SCRATCH/logs/cargo.log" 2>&1; then
        note "cargo build --release failed: $(tail -n 5 "$SCRATCH/logs/cargo.log" | tr '\n' ' ')"
      fi
    else
      note "cargo is missing, so loopfuse was not built"
    fi
  fi
  if [[ ! -x $LOOPFUSE_BIN ]]; then
    LOOPFUSE_STATUS="not built"
    note "loopfuse binary $LOOPFUSE_BIN not found; its columns say \"not built\""
    return
  fi
  record meta loopfuse "$LOOPFUSE_BIN ($("$LOOPFUSE_BIN" --version 2>/dev/null | head -n1 || true))"

  # One attach and detach before any measurement, so that a broken binary shows one
  # clear reason instead of a failure per workload.
  local probe=$SCRATCH/probe.img
  truncate -s 16M "$probe"
  if loopfuse_attach "$probe"; then
    if [[ ! -s $DEV ]]; then
      note "loopfuse attach printed $DEV, which does not exist or has size 0"
      LOOPFUSE_STATUS="attach failed"
    fi
    loopfuse_detach "$DEV"
  else
    LOOPFUSE_STATUS="attach failed"
  fi
  rm -f -- "$probe"
}

# Attach image $last with loopfuse (earlier arguments are attach options) and set DEV
# to the printed device path. Stdout goes to a file, not a pipe, so a daemon that kept
# its inherited stdout open could not make this wait.
loopfuse_attach() {
  local out=$SCRATCH/logs/loopfuse-attach.out err=$SCRATCH/logs/loopfuse-attach.err lines
  DEV=
  if ! timeout -k 5 60 "$LOOPFUSE_BIN" attach "$@" >"$out" 2>"$err"; then
    note "\`loopfuse attach $*\` failed: $(file_text "$err")"
    SKIP_REASON="attach failed"
    return 1
  fi
  mapfile -t lines <"$out"
  if ((${#lines[@]} == 0)); then
    note "\`loopfuse attach $*\` exited 0 but printed no device path; stderr: $(file_text "$err")"
    SKIP_REASON="attach failed"
    return 1
  fi
  DEV=${lines[-1]}
  ACTIVE_LOOPFUSE[$DEV]=1
}

# Detach loopfuse device $1. When `loopfuse detach` fails, unmount its FUSE mount instead.
loopfuse_detach() {
  local dev=$1 err=$SCRATCH/logs/loopfuse-detach.err mount_dir fstype
  if timeout -k 5 60 "$LOOPFUSE_BIN" detach "$dev" >/dev/null 2>"$err"; then
    unset 'ACTIVE_LOOPFUSE[$dev]'
    if [[ -e $dev ]]; then
      note "after \`loopfuse detach $dev\` returned, $dev still exists"
    fi
    return 0
  fi
  note "\`loopfuse detach $dev\` failed: $(file_text "$err")"
  mount_dir=${dev%/*}
  fstype=$(findmnt -rn -o FSTYPE -M "$mount_dir" || true)
  if [[ $fstype == fuse* ]]; then
    note "unmounting $mount_dir with fusermount3 -u instead"
    fusermount3 -u "$mount_dir" || umount "$mount_dir" ||
      log "error: could not unmount $mount_dir; unmount it by hand"
  fi
  unset 'ACTIVE_LOOPFUSE[$dev]'
  return 1
}

# Start qemu-storage-daemon exporting image $1 over the regular file $2 and wait until
# the export is mounted there. Sets QSD_PID and DEV.
start_qsd() {
  local image=$1 mountpoint=$2 deadline
  : >"$mountpoint"
  # qemu option values escape a literal comma as ',,'.
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=file0,filename=${image//,/,,}" \
    --blockdev driver=raw,node-name=raw0,file=file0 \
    --export "type=fuse,id=exp0,node-name=raw0,mountpoint=${mountpoint//,/,,},writable=on" \
    >"$SCRATCH/logs/qsd.log" 2>&1 &
  QSD_PID=$!
  ACTIVE_QSD[$QSD_PID]=$mountpoint
  DEV=$mountpoint
  deadline=$(($(now_us) + 30000000))
  # The mountpoint file is empty until the export is mounted over it.
  until [[ -s $mountpoint ]]; do
    if ! kill -0 "$QSD_PID" 2>/dev/null || (($(now_us) > deadline)); then
      note "qemu-storage-daemon did not mount $mountpoint: $(file_text "$SCRATCH/logs/qsd.log")"
      stop_qsd "$QSD_PID"
      SKIP_REASON="export failed"
      return 1
    fi
    nap 0.001
  done
}

# Return 0 while process $1 exists and has not exited (a zombie has exited).
process_running() {
  local state=Z
  read -r _ _ state _ 2>/dev/null <"/proc/$1/stat" || return 1
  [[ $state != Z ]]
}

# Stop the qemu-storage-daemon with PID $1 (started by this script) and make sure its
# mount is gone.
stop_qsd() {
  local pid=$1 mountpoint=${ACTIVE_QSD[$1]} i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 30000; i++)); do
    process_running "$pid" || break
    nap 0.001
  done
  # The executable check guards against a PID reused after bash reaped the daemon.
  if process_running "$pid" &&
    [[ $(readlink "/proc/$pid/exe") == "$(realpath "$(command -v qemu-storage-daemon)")" ]]; then
    note "qemu-storage-daemon (PID $pid) ignored SIGTERM for 30 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  if findmnt -rn -M "$mountpoint" >/dev/null; then
    note "$mountpoint was still mounted after qemu-storage-daemon exited; unmounting it"
    fusermount3 -u "$mountpoint" || umount "$mountpoint" ||
      log "error: could not unmount $mountpoint; unmount it by hand"
  fi
  unset 'ACTIVE_QSD[$pid]'
}

# Print why target $1 cannot run at all, or nothing when it can.
target_unavailable_reason() {
  case $1 in
    loop)
      if ((EUID != 0)); then
        echo "needs root"
      elif [[ ! -e /dev/loop-control ]]; then
        echo "no /dev/loop-control"
      fi
      ;;
    qsd)
      [[ -e /dev/fuse ]] || echo "no /dev/fuse"
      ;;
    loopfuse*)
      [[ -n $LOOPFUSE_STATUS ]] && echo "$LOOPFUSE_STATUS"
      ;;
  esac
  return 0
}

# Attach target $1 over image $2 and set DEV to the path to benchmark. On failure,
# return 1 with SKIP_REASON set.
attach_target() {
  local target=$1 image=$2 out i
  DEV=
  LOOPFUSE_DISK=
  SKIP_REASON=
  case $target in
    raw)
      DEV=$image
      ;;
    loop)
      out=$SCRATCH/logs/losetup.out
      if ! losetup -f --show "$image" >"$out" 2>"$SCRATCH/logs/losetup.err"; then
        note "losetup -f --show $image failed: $(file_text "$SCRATCH/logs/losetup.err")"
        SKIP_REASON="losetup failed"
        return 1
      fi
      IFS= read -r DEV <"$out"
      ACTIVE_LOOP[$DEV]=1
      ;;
    qsd)
      start_qsd "$image" "$SCRATCH/qsd.mnt" || return 1
      ;;
    loopfuse)
      loopfuse_attach "$image" || return 1
      LOOPFUSE_DISK=$DEV
      ;;
    loopfuse-writeback)
      loopfuse_attach --cache writeback "$image" || return 1
      LOOPFUSE_DISK=$DEV
      ;;
    loopfuse-offset)
      loopfuse_attach --offset 1MiB "$image" || return 1
      LOOPFUSE_DISK=$DEV
      ;;
    loopfuse-p1)
      loopfuse_attach -P "$image" || return 1
      LOOPFUSE_DISK=$DEV
      DEV=${LOOPFUSE_DISK%/*}/p1
      for ((i = 0; i < 100; i++)); do
        [[ -e $DEV ]] && break
        nap 0.02
      done
      if [[ ! -e $DEV ]]; then
        note "partition target skipped: $DEV did not appear after \`loopfuse attach -P $image\` (entries: $(find "${LOOPFUSE_DISK%/*}" -mindepth 1 -maxdepth 1 -printf '%f ' 2>&1))"
        loopfuse_detach "$LOOPFUSE_DISK" || true
        SKIP_REASON="no p1"
        return 1
      fi
      ;;
  esac
  return 0
}

detach_target() {
  case $1 in
    raw) ;;
    loop)
      losetup -d "$DEV" || note "losetup -d $DEV failed"
      unset 'ACTIVE_LOOP[$DEV]'
      ;;
    qsd)
      stop_qsd "$QSD_PID"
      ;;
    loopfuse*)
      loopfuse_detach "$LOOPFUSE_DISK" || true
      ;;
  esac
}

# Record the reason $3 for every result key from $4 on of target $1 in phase $2.
record_skip() {
  local target=$1 phase=$2 reason=$3 key
  shift 3
  log "$phase: ${TARGET_LABEL[$target]}: skipped ($reason)"
  for key in "$@"; do
    record fail "$target" "$key" "$reason"
  done
}

# Run one fio workload on DEV and record its value. Return 1 when fio fails.
run_fio() {
  local target=$1 workload=$2 run=$3 json err value reason
  json=$SCRATCH/fio/$target.$workload.$run.json
  err=$SCRATCH/fio/$target.$workload.$run.err
  fio_command "$workload" "$DEV"
  # Writeback left over from the previous workload must not run during this one.
  sync
  if timeout -k 10 $((RUNTIME * 6 + 120)) "${FIO_COMMAND[@]}" \
    --output-format=json --output="$json" >/dev/null 2>"$err" &&
    value=$(python3 "$HELPER" fio-value "$json" "$(fio_workload_metric "$workload")" 2>>"$err"); then
    record value "$target" "$workload" "$run" "$value"
    log "fio: ${TARGET_LABEL[$target]}: $(fio_workload_label "$workload"), run $run: $value $(fio_workload_metric "$workload")"
    return 0
  fi

  if [[ $workload == randread_aio ]] && grep -qi 'invalid argument' "$err" "$json" 2>/dev/null; then
    reason="rejects O_DIRECT"
  else
    reason="fio failed"
  fi
  note "${TARGET_LABEL[$target]}: $(fio_workload_label "$workload"): $reason: ${FIO_COMMAND[*]}: $(grep -hiE 'err|fio:' "$err" "$json" 2>/dev/null | head -n 3 | tr '\n' ' ')"
  record fail "$target" "$workload" "$reason"
  return 1
}

run_fio_phase() {
  local target image reason workload run start_us
  local disk=$SCRATCH/disk.img offset=$SCRATCH/offset.img part=$SCRATCH/part.img

  log "writing ${IMAGE_MIB} MiB of random data into each fio image"
  truncate -s "${IMAGE_MIB}M" "$disk"
  fill_random "$disk" "$IMAGE_MIB" 0
  truncate -s "$((IMAGE_MIB + 1))M" "$offset"
  fill_random "$offset" "$((IMAGE_MIB + 1))" 0
  make_partitioned_image "$part" "$((IMAGE_MIB + 2))" "$IMAGE_MIB"
  fill_random "$part" "$IMAGE_MIB" 1
  sync

  for target in "${TARGETS[@]}"; do
    reason=$(target_unavailable_reason "$target")
    if [[ -n $reason ]]; then
      record_skip "$target" fio "$reason" "${FIO_WORKLOADS[@]}"
      continue
    fi
    case $target in
      loopfuse-offset) image=$offset ;;
      loopfuse-p1) image=$part ;;
      *) image=$disk ;;
    esac
    if ! attach_target "$target" "$image"; then
      record_skip "$target" fio "$SKIP_REASON" "${FIO_WORKLOADS[@]}"
      continue
    fi

    log "fio: ${TARGET_LABEL[$target]}: $DEV"
    drop_caches
    # The held descriptor keeps the device's page cache alive between fio runs, as a
    # kernel loop device drops its cache when its last user closes it.
    exec {HOLD_FD}<"$DEV"
    start_us=$(now_us)
    if ! timeout -k 10 600 dd if="$DEV" of=/dev/null bs=1M status=none 2>"$SCRATCH/logs/warmup.err"; then
      note "${TARGET_LABEL[$target]}: warm-up read of $DEV failed: $(file_text "$SCRATCH/logs/warmup.err")"
    fi
    log "fio: ${TARGET_LABEL[$target]}: warm-up read took $((($(now_us) - start_us) / 1000)) ms"

    for workload in "${FIO_WORKLOADS[@]}"; do
      if [[ $workload == randwrite_cpu0 ]]; then
        pin_server "$target" "$image" 0
      fi
      for ((run = 1; run <= RUNS; run++)); do
        run_fio "$target" "$workload" "$run" || break
      done
      if [[ $workload == randwrite_cpu0 ]]; then
        pin_server "$target" "$image" "0-$(($(nproc) - 1))"
      fi
    done

    exec {HOLD_FD}<&-
    HOLD_FD=
    detach_target "$target"
  done
  rm -f -- "$disk" "$offset" "$part"
}

# Time `mkfs.ext4 -d` and `e2fsck -fn` on DEV, RUNS times.
run_mkfs_runs() {
  local target=$1 run start_us elapsed_us status
  for ((run = 1; run <= RUNS; run++)); do
    start_us=$(now_us)
    if ! timeout -k 10 900 mkfs.ext4 -F -q -d "$MKFS_SOURCE_DIR" "$DEV" >"$SCRATCH/logs/mkfs.log" 2>&1; then
      note "${TARGET_LABEL[$target]}: mkfs.ext4 -F -q -d $MKFS_SOURCE_DIR $DEV failed: $(file_text "$SCRATCH/logs/mkfs.log")"
      record fail "$target" mkfs "mkfs failed"
      record fail "$target" fsck "mkfs failed"
      return
    fi
    elapsed_us=$(($(now_us) - start_us))
    record value "$target" mkfs "$run" "$(printf '%d.%06d' $((elapsed_us / 1000000)) $((elapsed_us % 1000000)))"

    start_us=$(now_us)
    status=0
    timeout -k 10 900 e2fsck -fn "$DEV" >"$SCRATCH/logs/fsck.log" 2>&1 || status=$?
    elapsed_us=$(($(now_us) - start_us))
    if ((status != 0)); then
      note "${TARGET_LABEL[$target]}: e2fsck -fn $DEV exited with $status: $(file_text "$SCRATCH/logs/fsck.log")"
      record fail "$target" fsck "e2fsck exit $status"
      return
    fi
    record value "$target" fsck "$run" "$(printf '%d.%06d' $((elapsed_us / 1000000)) $((elapsed_us % 1000000)))"
    log "mkfs: ${TARGET_LABEL[$target]}, run $run done"
  done
}

run_mkfs_phase() {
  local target image reason
  local plain=$SCRATCH/mkfs.img offset=$SCRATCH/mkfs-offset.img part=$SCRATCH/mkfs-part.img

  for target in "${TARGETS[@]}"; do
    reason=$(target_unavailable_reason "$target")
    if [[ -n $reason ]]; then
      record_skip "$target" mkfs "$reason" mkfs fsck mkfs_allocated
      continue
    fi
    # A fresh sparse image per target, so that no target starts from another's blocks.
    rm -f -- "$plain" "$offset" "$part"
    case $target in
      loopfuse-offset)
        image=$offset
        truncate -s "$((MKFS_MIB + 1))M" "$image"
        ;;
      loopfuse-p1)
        image=$part
        make_partitioned_image "$image" "$((MKFS_MIB + 2))" "$MKFS_MIB"
        ;;
      *)
        image=$plain
        truncate -s "${MKFS_MIB}M" "$image"
        ;;
    esac
    if ! attach_target "$target" "$image"; then
      record_skip "$target" mkfs "$SKIP_REASON" mkfs fsck mkfs_allocated
      continue
    fi
    log "mkfs: ${TARGET_LABEL[$target]}: $DEV"
    drop_caches
    # Read the source tree once, so that every run copies it from the page cache.
    find "$MKFS_SOURCE_DIR" -type f -exec cat {} + >/dev/null 2>&1 || true
    run_mkfs_runs "$target"
    detach_target "$target"
    record value "$target" mkfs_allocated 1 "$(allocated_mib "$image")"
  done
  rm -f -- "$plain" "$offset" "$part"
}

# Wait until the first 4 KiB of DEV can be read, or return 1 after 30 s. A regular file
# must also show a non-zero size, because a FUSE mountpoint file is empty until mounted
# (a block device node always shows size 0).
wait_until_usable() {
  local deadline
  deadline=$(($(now_us) + 30000000))
  until [[ -b $DEV || -s $DEV ]] && dd if="$DEV" of=/dev/null bs=4096 count=1 status=none 2>/dev/null; do
    (($(now_us) > deadline)) && return 1
    nap 0.001
  done
}

# Measure the attach and detach latency of target $1 over image $2.
run_latency_target() {
  local target=$1 image=$2 rep start_us attach_us detach_us
  for ((rep = 1; rep <= LATENCY_REPS; rep++)); do
    start_us=${EPOCHREALTIME/./}
    if ! attach_target "$target" "$image"; then
      record fail "$target" attach "$SKIP_REASON"
      record fail "$target" detach "$SKIP_REASON"
      return
    fi
    if ! wait_until_usable; then
      note "${TARGET_LABEL[$target]}: $DEV was not readable 30 s after attach"
      record fail "$target" attach "not usable"
      detach_target "$target"
      return
    fi
    attach_us=$((${EPOCHREALTIME/./} - start_us))

    start_us=${EPOCHREALTIME/./}
    detach_target "$target"
    detach_us=$((${EPOCHREALTIME/./} - start_us))

    record value "$target" attach "$rep" "$(printf '%d.%03d' $((attach_us / 1000)) $((attach_us % 1000)))"
    record value "$target" detach "$rep" "$(printf '%d.%03d' $((detach_us / 1000)) $((detach_us % 1000)))"
  done
  log "latency: ${TARGET_LABEL[$target]}: $LATENCY_REPS attach/detach cycles done"
}

run_latency_phase() {
  local target reason image=$SCRATCH/latency.img
  truncate -s 1G "$image"
  for target in loopfuse qsd loop; do
    reason=$(target_unavailable_reason "$target")
    if [[ -n $reason ]]; then
      record_skip "$target" latency "$reason" attach detach
      continue
    fi
    run_latency_target "$target" "$image"
  done
  rm -f -- "$image"
}

# Print the RssAnon of PID $1 in MiB.
rss_anon_mib() {
  awk '/^RssAnon:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"
}

# Print the blocks allocated to file $1, in MiB.
allocated_mib() {
  local blocks
  blocks=$(stat -c %b -- "$1")
  printf '%d' $((blocks * 512 / 1048576))
}

# Move every thread of the server behind target $1 (over image $2) to CPUs $3: the
# loopfuse daemon or qemu-storage-daemon. The raw file and the kernel loop device have no
# server thread in the write path, so only fio is placed for them.
pin_server() {
  local target=$1 image=$2 cpus=$3 pid=
  case $target in
    qsd) pid=$QSD_PID ;;
    loopfuse*) pid=$(loopfuse_daemon_pid "$image") || pid= ;;
  esac
  if [[ -z $pid ]]; then
    return 0
  fi
  taskset -a -p -c "$cpus" "$pid" >/dev/null 2>&1 ||
    note "${TARGET_LABEL[$target]}: taskset -a -p -c $cpus $pid failed"
}

# Print the PID of the loopfuse daemon serving image $1, from `loopfuse list --json`,
# else from the loopfuse process that has the image open.
loopfuse_daemon_pid() {
  local image=$1 list=$SCRATCH/logs/loopfuse-list.json option
  for option in --json -J; do
    if timeout 30 "$LOOPFUSE_BIN" list "$option" >"$list" 2>/dev/null; then
      break
    fi
    : >"$list"
  done
  python3 "$HELPER" find-pid --list-json "$list" --device "$LOOPFUSE_DISK" \
    --image "$image" --exe "$LOOPFUSE_BIN"
}

# Run `mkfs.ext4 -F -q DEV` and stop it when image $1 has more than $2 MiB allocated,
# so that a daemon that fills holes cannot fill the scratch filesystem. Return 2 when
# stopped, else mkfs's exit status.
run_mkfs_with_space_limit() {
  local image=$1 limit_mib=$2 pid status=0
  timeout -k 10 900 mkfs.ext4 -F -q "$DEV" >"$SCRATCH/logs/mkfs.log" 2>&1 &
  pid=$!
  while process_running "$pid"; do
    if (($(allocated_mib "$image") > limit_mib)); then
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" || true
      return 2
    fi
    nap 0.05
  done
  wait "$pid" || status=$?
  return "$status"
}

run_rss_phase() {
  local target=loopfuse reason pid image=$SCRATCH/rss.img start_us elapsed_us status
  local keys=(rss_attached rss_mkfs rss_mkfs_time rss_allocated)
  # Twice what mkfs.ext4 allocates in a sparse image file of this size (518 MiB for
  # 100 GiB with e2fsprogs 1.47), plus 1 GiB.
  local limit_mib=$((RSS_IMAGE_GIB * 1024 / 100 + 1024))

  # qemu-storage-daemon is not measured here: with its default discard=ignore, mkfs.ext4
  # through its FUSE export allocates every block of the image.
  reason=$(target_unavailable_reason "$target")
  if [[ -n $reason ]]; then
    record_skip "$target" memory "$reason" "${keys[@]}"
    return
  fi
  truncate -s "${RSS_IMAGE_GIB}G" "$image"
  if ! attach_target "$target" "$image"; then
    record_skip "$target" memory "$SKIP_REASON" "${keys[@]}"
    rm -f -- "$image"
    return
  fi
  if ! pid=$(loopfuse_daemon_pid "$image"); then
    note "could not find the loopfuse daemon's PID with \`loopfuse list --json\` or in /proc"
    record_skip "$target" memory "no PID" "${keys[@]}"
    detach_target "$target"
    rm -f -- "$image"
    return
  fi
  log "memory: ${TARGET_LABEL[$target]}: daemon PID $pid, $DEV"
  record value "$target" rss_attached 1 "$(rss_anon_mib "$pid")"

  start_us=$(now_us)
  status=0
  run_mkfs_with_space_limit "$image" "$limit_mib" || status=$?
  elapsed_us=$(($(now_us) - start_us))
  if ((status == 0)); then
    record value "$target" rss_mkfs_time 1 "$(printf '%d.%06d' $((elapsed_us / 1000000)) $((elapsed_us % 1000000)))"
    record value "$target" rss_mkfs 1 "$(rss_anon_mib "$pid")"
  elif ((status == 2)); then
    note "${TARGET_LABEL[$target]}: mkfs.ext4 -F -q $DEV was stopped because the ${RSS_IMAGE_GIB} GiB sparse image had more than $limit_mib MiB allocated"
    record fail "$target" rss_mkfs "stopped: too much allocated"
    record fail "$target" rss_mkfs_time "stopped: too much allocated"
  else
    note "${TARGET_LABEL[$target]}: mkfs.ext4 -F -q $DEV (${RSS_IMAGE_GIB} GiB) exited with $status: $(file_text "$SCRATCH/logs/mkfs.log")"
    record fail "$target" rss_mkfs "mkfs failed"
    record fail "$target" rss_mkfs_time "mkfs failed"
  fi
  detach_target "$target"
  record value "$target" rss_allocated 1 "$(allocated_mib "$image")"
  rm -f -- "$image"
}

# Fail early when the scratch filesystem cannot hold the images, since
# qemu-storage-daemon fills the whole mkfs image (see run_rss_phase).
check_free_space() {
  local needed_mib free_mib
  needed_mib=$((3 * (IMAGE_MIB + 2) + 2 * MKFS_MIB + RSS_IMAGE_GIB * 1024 / 100 + 1024 + 2048))
  free_mib=$(df --output=avail -BM -- "$SCRATCH" | tail -n1 | tr -dc 0-9)
  if ((free_mib < needed_mib)); then
    die "$SCRATCH has $free_mib MiB free but the run needs about $needed_mib MiB; free space or set BENCH_DIR"
  fi
}

main() {
  install_missing_tools
  make_scratch
  check_free_space
  if ((EUID != 0)); then
    note "not running as root: caches are not dropped and the kernel loop device is skipped"
  fi
  record_metadata
  record_workloads
  prepare_loopfuse

  run_fio_phase
  run_mkfs_phase
  run_latency_phase
  run_rss_phase

  mkdir -p -- "$BENCH_OUT"
  python3 "$HELPER" report --results "$RESULTS" --markdown "$BENCH_OUT/BENCHMARKS.md" \
    --plot "$BENCH_OUT/benchmarks.png" --plot-dir "$SCRATCH"
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
main "$@"
