#!/bin/bash
# Build (once) and cache a minimal bookworm root that boots with systemd, both under
# systemd-nspawn and, with its own kernel, under qemu.  Usage: base.sh CACHE_DIR
# Prints the path of the cached root.  A changed package list builds a new one.
set -euo pipefail

cache=$1
mirror=${SANDBOXD_E2E_MIRROR:-http://deb.debian.org/debian}
# Only what booting, installing and the checks need: sandboxd's own Depends come from the
# archive when the package is installed, as they would on a user's machine.
packages=systemd,systemd-sysv,dbus,apt,ca-certificates,python3,procps,man-db,linux-image-amd64,udev,iproute2,nftables
base=$cache/base-$(echo "$packages" | md5sum | cut -c1-8)
if [ -f "$base/.complete" ]; then
    echo "$base"
    exit 0
fi
mkdir -p "$cache"
rm -rf "$base" "$base.tmp"
debootstrap --variant=minbase --include="$packages" bookworm "$base.tmp" "$mirror" >&2
echo sandboxd-e2e > "$base.tmp/etc/hostname"
printf '127.0.0.1 localhost sandboxd-e2e\n' > "$base.tmp/etc/hosts"
# Root logs in on the serial console under qemu without a password.
chroot "$base.tmp" passwd -d root >&2
# Keep the archive lists so that installing in the container does not need a fresh update.
chroot "$base.tmp" apt-get update -q >&2
touch "$base.tmp/.complete"
mv "$base.tmp" "$base"
echo "$base"
