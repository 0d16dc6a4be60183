# Shared by the scripts in scripts/: installing the tools loopfuse is used with.
# shellcheck shell=bash

# Commands the tests and the demo drive, and the Debian package of each.
LOOPFUSE_TOOLS=(
    "fusermount3:fuse3"
    "mkfs.ext4:e2fsprogs"
    "e2fsck:e2fsprogs"
    "fuse2fs:fuse2fs"
    "fio:fio"
    "sfdisk:fdisk"
    "sgdisk:gdisk"
    "mkfs.vfat:dosfstools"
    "fsck.vfat:dosfstools"
    "mcopy:mtools"
    "qemu-img:qemu-utils"
    "partx:util-linux"
    "setpriv:util-linux"
    "unshare:util-linux"
    "nsenter:util-linux"
    "gzip:gzip"
    "debugfs:e2fsprogs"
    "fusefat:fusefat"
    "mount.exfat-fuse:exfat-fuse"
    "mkfs.exfat:exfatprogs"
    "ntfs-3g:ntfs-3g"
    "squashfuse:squashfuse"
    "mksquashfs:squashfs-tools"
    "fuseiso:fuseiso"
    "xorriso:xorriso"
    "mkfs.erofs:erofs-utils"
    "mkfs.xfs:xfsprogs"
)

# Installs the Debian packages of missing tools when running as root; otherwise lists them.
ensure_tools() {
    local missing=() entry tool package
    for entry in "${LOOPFUSE_TOOLS[@]}"; do
        tool=${entry%%:*}
        package=${entry#*:}
        if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1; then
            missing+=("$package")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi

    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [ "$(id -u)" -ne 0 ]; then
        echo "note: missing packages (tests needing them will skip): ${missing[*]}" >&2
        echo "      install them with: sudo apt-get install -y ${missing[*]}" >&2
        return 0
    fi
    echo "==> installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
