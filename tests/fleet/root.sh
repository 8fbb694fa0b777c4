#!/bin/bash
# Build (once) and cache the fleet's node root: make e2e's base root (tests/e2e/base.sh) with
# the .deb's Depends already installed from the archive, so that a node on its private
# network (no way to the archive) installs the package offline.  Usage: root.sh CACHE_DIR DEB
# Prints the path of the cached root.  Other Depends build a new one.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=$1
deb=$2
base=$("$here/../e2e/base.sh" "$cache")
# Depends: "a, b (>= 1), c | d" -> "a b c" (the first of alternatives)
depends=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/:any//; s/^ *//; s/ *$//' | grep -v '^$' | sort -u | tr '\n' ' ')
root=$cache/fleet-$(echo "$base $depends" | md5sum | cut -c1-8)
if [ -f "$root/.complete" ]; then
    echo "$root"
    exit 0
fi
rm -rf "$root" "$root.tmp"
cp -a "$base" "$root.tmp"
rm -f "$root.tmp/.complete"
mount -t proc proc "$root.tmp/proc"
trap 'umount "$root.tmp/proc" 2>/dev/null || true' EXIT
# The archive is reached as base.sh reaches it; a host whose route to it is briefly taken (a test
# network of another suite) gets a few more tries.
ok=
for attempt in 1 2 3 4 5; do
    if chroot "$root.tmp" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        $depends >&2; then
        ok=1
        break
    fi
    echo "apt-get install failed (attempt $attempt); updating the lists and trying again" >&2
    chroot "$root.tmp" apt-get update -q >&2 || true
    sleep 5
done
[ -n "$ok" ] || { echo "cannot install the Depends into the fleet root" >&2; exit 1; }
chroot "$root.tmp" apt-get clean >&2
umount "$root.tmp/proc"
trap - EXIT
touch "$root.tmp/.complete"
mv "$root.tmp" "$root"
echo "$root"
