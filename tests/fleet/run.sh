#!/bin/bash
# make fleet: three sandboxd nodes behind HAProxy, under load, while one dies, one drains and
# one is upgraded (docs/fleet.md).
#
#  1. build the .deb (make deb) and take the cached node root: make e2e's base root with the
#     package's Depends in it (root.sh), so that nodes install the .deb with no way out;
#  2. a private network in namespaces of this run only: NS-lb holds a bridge (172.31.228.1/24),
#     each node NS-nI a veth on it (172.31.228.1I); nothing is added to the host's namespace;
#  3. boot each node with systemd-nspawn (the e2e way, on an overlay of the cached root, in its
#     namespace) and install the .deb there (node.sh): sandboxd-http on 0.0.0.0:8194 with its
#     agent-check on 8196, the daemon socket-activated;
#  4. in NS-lb, load.py renders docs/examples/haproxy.cfg for the three nodes, runs HAProxy,
#     drives the load and the scenario, checks, and prints the `fleet:` line.
#
# Environment: SANDBOXD_E2E_CACHE (default /var/cache/sandboxd-e2e) as for make e2e;
# SANDBOXD_FLEET_KEEP=1 keeps the work directory.  Everything made here is removed on every
# way out (trap).  Needs root, debootstrap, systemd-container and haproxy (make fleet installs them).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${SANDBOXD_E2E_CACHE:-/var/cache/sandboxd-e2e}
work=$(mktemp -d /var/tmp/sandboxd-fleet.XXXXXX)
tag=sbxf$$
net=172.31.228
count=3
key=fleet-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
declare -a npid leader
start_all=$(date +%s)

# shellcheck source=../e2e/lib.sh
. "$here/../e2e/lib.sh"

cleanup() {
    local i
    for i in $(seq "$count"); do
        if [ -n "${npid[$i]:-}" ] && kill -0 "${npid[$i]}" 2>/dev/null; then
            kill "${npid[$i]}" 2>/dev/null || true  # nspawn: SIGTERM powers the container off
        fi
    done
    for i in $(seq "$count"); do
        if [ -n "${npid[$i]:-}" ]; then
            for _ in $(seq 300); do kill -0 "${npid[$i]}" 2>/dev/null || break; sleep 0.1; done
            kill -9 "${npid[$i]}" 2>/dev/null || true
            wait "${npid[$i]}" 2>/dev/null || true
        fi
        mountpoint -q "$work/n$i/root" && umount -l "$work/n$i/root"
        ip netns del "$tag-n$i" 2>/dev/null || true
    done
    ip netns del "$tag-lb" 2>/dev/null || true
    if [ -n "${SANDBOXD_FLEET_KEEP:-}" ]; then
        echo "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

in_node() {  # in_node I COMMAND...
    local i=$1
    shift
    inside "${leader[$i]}" "$@"
}

stage "build the package"
build_deb

stage "node root (cached in $cache)"
froot=$("$here/root.sh" "$cache" "$deb" 2>"$work/root.log") || { tail -30 "$work/root.log"; exit 1; }
echo "   $froot"

stage "private network $net.0/24 in namespaces $tag-*"
ip netns add "$tag-lb"
ip -n "$tag-lb" link set lo up
ip -n "$tag-lb" link add br0 type bridge
ip -n "$tag-lb" addr add "$net.1/24" dev br0
ip -n "$tag-lb" link set br0 up
for i in $(seq "$count"); do
    ip netns add "$tag-n$i"
    ip -n "$tag-n$i" link set lo up
    ip -n "$tag-lb" link add "v$i" type veth peer name eth0 netns "$tag-n$i"
    ip -n "$tag-lb" link set "v$i" master br0 up
    ip -n "$tag-n$i" addr add "$net.1$i/24" dev eth0
    ip -n "$tag-n$i" link set eth0 up
done
echo "   lb $net.1, nodes $(for i in $(seq "$count"); do printf '%s ' "$net.1$i"; done)"

stage "boot $count nodes under systemd-nspawn"
for i in $(seq "$count"); do
    d=$work/n$i
    mkdir -p "$d/upper" "$d/work" "$d/root"
    mount -t overlay overlay -o "lowerdir=$froot,upperdir=$d/upper,workdir=$d/work" "$d/root"
    echo "sandboxd-node$i" >"$d/root/etc/hostname"
    printf '127.0.0.1 localhost sandboxd-node%s\n' "$i" >"$d/root/etc/hosts"
    cp "$deb" "$d/root/root/sandboxd.deb"
    install -m 0755 "$here/node.sh" "$d/root/root/node.sh"
    date +%s.%N >"$d/booted-at"
    up=0
    boot "$d/root" "$tag-n$i" "$d/nspawn.log" --network-namespace-path="/run/netns/$tag-n$i" || up=$?
    npid[$i]=$booted_pid  # (stopped by cleanup, up or not)
    leader[$i]=$booted_leader
    [ "$up" = 0 ] || exit 1
done
for i in $(seq "$count"); do
    d=$work/n$i
    state=$(system_state "${leader[$i]}")
    if [ "$state" != running ]; then
        in_node "$i" systemctl --failed --no-pager || true
        in_node "$i" journalctl -b --no-pager -p warning | tail -20 || true
        echo "node $i: $state"
        exit 1
    fi
    echo "   node$i: $state in $(python3 -c "import time; print(round(time.time() - $(cat "$d/booted-at"), 1))") s"
done

stage "install the .deb on each node (offline), sandboxd-http with its agent"
declare -a ipid
for i in $(seq "$count"); do
    in_node "$i" bash /root/node.sh install "$key" >"$work/n$i/install.log" 2>&1 &
    ipid[$i]=$!
done
failed=0
for i in $(seq "$count"); do
    wait "${ipid[$i]}" || failed=1
done
for i in $(seq "$count"); do
    sed 's/^/   node'"$i"': /' "$work/n$i/install.log" | tail -3
done
[ "$failed" = 0 ] || { echo "an install failed"; exit 1; }

stage "HAProxy and the load (load.py, in $tag-lb)"
nodes=()
for i in $(seq "$count"); do nodes+=("node$i=$net.1$i=${leader[$i]}"); done
rc=0
ip netns exec "$tag-lb" "$repo/.venv/bin/python" "$here/load.py" --work "$work" --key "$key" \
    --config "$repo/docs/examples/haproxy.cfg" "${nodes[@]}" || rc=$?
stage
[ "$rc" = 0 ] || { echo "fleet checks failed"; exit 1; }
echo
echo "fleet passed in $(($(date +%s) - start_all)) s"
