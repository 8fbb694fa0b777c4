#!/bin/bash
# Runs at boot under qemu (pure cgroup v2, the root's own kernel), from e2e-v2.service:
# sandboxd, started by its socket under systemd with Delegate=yes, must enforce memory and
# process limits with cgroup v2.  Results go to the serial console; then power off.
set -uo pipefail
export LC_ALL=C.UTF-8
failed=0

check() {  # check NAME WANT_STATUS SANDBOXCTL_RUN_ARGS...
    local name=$1 want=$2 out status start
    shift 2
    start=$(date +%s%N)
    out=$(runuser -u alice -- timeout 120 sandboxctl --json run "$@" 2>&1)
    status=$(printf '%s' "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["result"]["status"])' 2>/dev/null)
    if [ "$status" = "$want" ]; then
        printf 'E2E-V2 ok    %-36s %-14s %6d ms\n' "$name" "$status" $((($(date +%s%N) - start) / 1000000))
    else
        printf 'E2E-V2 FAIL  %-36s wanted %s, got:\n%s\n' "$name" "$want" "$out"
        failed=$((failed + 1))
    fi
}

fact() {  # fact NAME WANT GOT
    if [ "$2" = "$3" ]; then
        printf 'E2E-V2 ok    %-36s %s\n' "$1" "$3"
    else
        printf 'E2E-V2 FAIL  %-36s wanted %s, got %s\n' "$1" "$2" "$3"
        failed=$((failed + 1))
    fi
}

echo "E2E-V2 begin: kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s"
fact "/sys/fs/cgroup is cgroup2 only" cgroup2fs "$(stat -fc %T /sys/fs/cgroup)"
start=$(date +%s%N)
if ! timeout 120 sandboxctl status >/dev/null; then
    echo "E2E-V2 FAIL  the daemon did not answer its first connection; its journal:"
    journalctl -u sandboxd --no-pager -o cat | sed 's/^/E2E-V2 | /' | tail -40
    echo "E2E-V2 end: 1 failed"
    systemctl poweroff
    exit 1
fi
echo "E2E-V2 first connection to ready: $((($(date +%s%N) - start) / 1000000)) ms"
fact "daemon cgroup driver" cgroup2 \
    "$(sandboxctl --json status | python3 -c 'import json, sys; print(json.load(sys.stdin)["cgroup"]["kind"])')"
service=/sys/fs/cgroup/system.slice/sandboxd.service
fact "daemon moved itself into a leaf" "$(systemctl show -p MainPID --value sandboxd)" \
    "$(cat $service/daemon/cgroup.procs | head -1)"
fact "controllers delegated to runs" yes \
    "$(grep -q memory $service/cgroup.subtree_control && grep -q pids $service/cgroup.subtree_control && echo yes)"
check "a normal run" ok -c 'print(sum(range(10)))'
check "memory bomb, 64 MiB" memory_limit --memory 64 -c 'a = []
while True: a.append(bytearray(1 << 20))'
check "fork bomb" pids_limit --timeout 20 -c 'import os
while True:
    os.fork()'
check "a normal run afterwards" ok -c 'print(1)'
# An environment build runs in a cgroup of its own (v2: build-NAME.N under the daemon's parent,
# memory.oom.group): one that reaches jail.build_memory_max is killed and fails naming it, and
# its cgroup goes with it.  16M is less than pip needs to start, so no package is needed.
cp /etc/sandboxd/sandboxd.yaml /root/sandboxd.yaml.before-builds
mkdir -p /srv/sbx-wheels && chmod 0755 /srv/sbx-wheels
cat >>/etc/sandboxd/sandboxd.yaml <<'YAML'
jail: {build_memory_max: 16M}
environments: {tiny: {requirements: [sbxnothing], find_links: [/srv/sbx-wheels]}}
YAML
systemctl restart sandboxd.service
built=$(timeout 600 sandboxctl env build tiny 2>&1)
fact "a build at its memory limit fails naming it" yes \
    "$(printf '%s' "$built" | grep -q 'killed at its memory limit, jail.build_memory_max' && echo yes || echo "no: $built")"
fact "no build cgroup left" 0 "$(find $service -name 'build-*' -type d | wc -l)"
cp /root/sandboxd.yaml.before-builds /etc/sandboxd/sandboxd.yaml
systemctl restart sandboxd.service
check "a normal run after the builds" ok -c 'print(1)'
# Under the installed unit (no container filter here), calls that systemd's ProtectKernelLogs,
# ProtectKernelModules and ProtectClock would refuse are refused by the jail, by name
# (syslog 103 and init_module 175 are x86_64 numbers, like this VM).
check "syslog refused by name" blocked_syscall -c 'import ctypes
assert ctypes.CDLL(None).syscall(103, 3, None, 0) != -1'
check "init_module refused by name" blocked_syscall -c 'import ctypes
assert ctypes.CDLL(None).syscall(175, None, 0, b"") != -1'
check "clock_settime refused by name" blocked_syscall -c 'import time
time.clock_settime(time.CLOCK_REALTIME, 0)'
# The shipped profile for Dify, where cgroup v2 enforces it: a 400 MB allocation through the packaged
# sandboxd-http runs; 1.5 GB is its memory limit (1G) by name.
systemctl start sandboxd-http.service
dify_alloc() {  # dify_alloc BYTES: data.error of a run allocating that much, through sandboxd-http
    python3 - "$1" "$(sed -n 's/^API_KEY=//p' /etc/sandboxd/sandboxd-http.env)" <<'PY'
import http.client, json, sys, time
for _ in range(300):
    try:
        c = http.client.HTTPConnection("127.0.0.1", 8194, timeout=120)
        c.request("GET", "/health")
        if c.getresponse().status == 200:
            break
    except OSError:
        pass
    time.sleep(0.2)
c = http.client.HTTPConnection("127.0.0.1", 8194, timeout=120)
c.request("POST", "/v1/sandbox/run", json.dumps({"language": "python3", "enable_network": True,
          "code": f"print(len(b'x' * {sys.argv[1]}))"}), {"X-Api-Key": sys.argv[2]})
data = json.loads(c.getresponse().read())["data"]
print(":".join(data["error"].split(":")[:2]) if data["error"] else "ok " + data["stdout"].strip())  # the headline
PY
}
fact "400 MB through sandboxd-http" "ok 400000000" "$(dify_alloc 400000000)"
fact "1.5 GB through sandboxd-http" "error: memory limit exceeded" \
    "$(dify_alloc 1500000000)"
systemctl stop sandboxd-http.service
# Runs with network under the packaged unit: their own namespace, the public test host
# reached through the daemon's table, the host itself and private addresses refused.  The
# "internet" is a namespace of this VM's own (-nic none: nothing can leave anyway).
ip netns add inet
ip link add labh type veth peer name labn
ip link set labn netns inet
ip addr add 203.0.113.1/24 dev labh && ip link set labh up
ip netns exec inet sh -c 'ip link set lo up; ip link set labn up; ip addr add 203.0.113.2/24 dev labn;
    ip addr add 10.99.0.2/32 dev lo; ip route add default via 203.0.113.1'
ip route add 10.99.0.2/32 via 203.0.113.2
mkdir -p /tmp/www && echo "hello from the lab" > /tmp/www/index.html
ip netns exec inet python3 -m http.server --bind 203.0.113.2 80 --directory /tmp/www >/dev/null 2>&1 &
ip netns exec inet python3 -m http.server --bind 10.99.0.2 80 --directory /tmp/www >/dev/null 2>&1 &
sleep 1
cat >>/etc/sandboxd/sandboxd.yaml <<'YAML'
network: {dns: []}
quotas: {users: {alice: {network: true}}}
YAML
systemctl restart sandboxd.service
fetch='import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode().strip())
except Exception as e:
    print("refused", type(e).__name__)'
fact "a network run reaches the public test host" "hello from the lab" \
    "$(runuser -u alice -- timeout 60 sandboxctl run --network -c "import sys; sys.argv[1:] = ['http://203.0.113.2/']
$fetch")"
fact "a network run does not reach a private host" "refused URLError" \
    "$(runuser -u alice -- timeout 60 sandboxctl run --network -c "import sys; sys.argv[1:] = ['http://10.99.0.2/']
$fetch")"
fact "a network run does not reach the host itself" "refused URLError" \
    "$(runuser -u alice -- timeout 60 sandboxctl run --network -c "import sys; sys.argv[1:] = ['http://203.0.113.1:9/']
$fetch")"
fact "forwarding on while the daemon serves" 1 "$(cat /proc/sys/net/ipv4/ip_forward)"
systemctl stop sandboxd.service
fact "stop turns forwarding off again" 0 "$(cat /proc/sys/net/ipv4/ip_forward)"
fact "stop removes the daemon's table" none "$(nft list tables | grep -q sandboxd && echo left || echo none)"
fact "no run interface left" 0 "$(ip -o link | grep -c ': sbx')"
kill %1 %2 2>/dev/null
ip netns del inet; ip link del labh 2>/dev/null
fact "stop removes the daemon's cgroups" gone "$([ -d $service ] && find $service -type d || echo gone)"
fact "no processes of run uids left" 0 "$(ps -eo uid= | awk '$1 >= 880000 && $1 < 881024' | wc -l)"
echo "E2E-V2 journal:"
journalctl -u sandboxd --no-pager -o cat | sed 's/^/E2E-V2 | /' | tail -15
echo "E2E-V2 end: $failed failed"
systemctl poweroff
