#!/bin/bash
# make e2e: install and run the Debian package under a booted systemd.
#
#  1. build the .deb (make deb: dpkg-buildpackage + lintian);
#  2. take a cached minimal bookworm root (base.sh; ~75 s the first time);
#  3. boot a copy with systemd-nspawn and run inside.sh there: apt install, socket
#     activation, systemctl start/status/reload/restart/stop, a run as a member of the
#     sandboxd group, refusal for a user outside it, the journal, apt purge;
#  4. boot the same root with its own kernel under qemu (TCG, pure cgroup v2) and run
#     v2-check.sh at boot: memory and fork bombs must end as memory_limit / pids_limit.
#
# Environment: SANDBOXD_E2E_CACHE (default /var/cache/sandboxd-e2e) holds the base root;
# SANDBOXD_E2E_KEEP=1 keeps the work directory for a post-mortem.  Needs root, debootstrap,
# systemd-container, qemu-system-x86 and e2fsprogs (`make e2e` installs them first).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${SANDBOXD_E2E_CACHE:-/var/cache/sandboxd-e2e}
work=$(mktemp -d /var/tmp/sandboxd-e2e.XXXXXX)
root=$work/root
npid=
start_all=$(date +%s)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

# shellcheck source=lib.sh
. "$here/lib.sh"

cleanup() {
    if [ -n "$npid" ] && kill -0 "$npid" 2>/dev/null; then
        kill "$npid" 2>/dev/null || true
        wait "$npid" 2>/dev/null || true
    fi
    if [ -n "${SANDBOXD_E2E_KEEP:-}" ]; then
        echo "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

in_container() {
    inside "$leader" "$@"
}

stage "build the package"
build_deb

stage "base root (cached in $cache)"
base=$("$here/base.sh" "$cache" 2>"$work/base.log") || { tail -30 "$work/base.log"; exit 1; }
cp -a "$base" "$root"
cp "$deb" "$root/root/sandboxd.deb"
install -m 0755 "$here/inside.sh" "$root/root/inside.sh"
install -m 0755 "$here/../../packaging/debian/tests/smoke" "$root/root/autopkgtest-smoke"
install -m 0755 "$here/v2-check.sh" "$root/usr/local/sbin/sandboxd-v2-check"
install -m 0644 "$here/e2e-v2.service" "$root/etc/systemd/system/e2e-v2.service"
echo "   $base -> $root"

stage "boot under systemd-nspawn"
up=0
boot "$root" "sandboxd-e2e-$$" "$work/nspawn.log" || up=$?
npid=$booted_pid  # (stopped by cleanup, up or not)
leader=$booted_leader
[ "$up" = 0 ] || exit 1
state=$(system_state "$leader")
echo "   system: $state"
[ "$state" = running ] || { in_container systemctl --failed --no-pager || true; exit 1; }

stage "inside the container"
rc=0
in_container timeout 600 bash /root/inside.sh || rc=$?
[ "$rc" = 0 ] || { echo "container checks failed"; exit 1; }
in_container systemctl enable --quiet e2e-v2.service
in_container systemctl poweroff
for _ in $(seq 300); do
    kill -0 "$npid" 2>/dev/null || break
    sleep 0.1
done
wait "$npid" || true
npid=

stage "boot the same root under qemu (TCG, its own kernel, pure cgroup v2)"
kernel=$(ls "$root"/boot/vmlinuz-* | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | tail -1)
truncate -s 4G "$work/root.img"
mkfs.ext4 -q -L sandboxd-e2e -d "$root" "$work/root.img"
echo "   image made; booting $(basename "$kernel")"
rc=0
timeout 1200 qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 2 -m 2048 \
    -nographic -no-reboot -nic none \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 root=/dev/vda rw panic=-1 quiet systemd.show_status=0" \
    -drive "file=$work/root.img,format=raw,if=virtio" >"$work/qemu.log" 2>&1 || rc=$?
# The console prefixes each line with the kernel time and the unit's name.
tr -d '\r' <"$work/qemu.log" | sed -n 's/^.*\(E2E-V2 \)/\1/p' >"$work/v2.txt"
cat "$work/v2.txt"
if [ "$rc" != 0 ] || ! grep -q '^E2E-V2 end: 0 failed' "$work/v2.txt"; then
    echo "qemu stage failed (exit $rc); the last of its console:"
    tr -d '\r' <"$work/qemu.log" | tail -40
    exit 1
fi
stage

echo
echo "e2e passed in $(($(date +%s) - start_all)) s"
