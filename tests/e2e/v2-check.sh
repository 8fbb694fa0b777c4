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
    out=$(runuser -u alice -- sandboxctl --json run "$@" 2>&1)
    status=$(printf '%s' "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])' 2>/dev/null)
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
sandboxctl status >/dev/null
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
# Under the installed unit (no container filter here), calls that systemd's ProtectKernelLogs,
# ProtectKernelModules and ProtectClock would refuse are refused by the jail, by name
# (syslog 103 and init_module 175 are x86_64 numbers, like this VM).
check "syslog refused by name" blocked_syscall -c 'import ctypes
assert ctypes.CDLL(None).syscall(103, 3, None, 0) != -1'
check "init_module refused by name" blocked_syscall -c 'import ctypes
assert ctypes.CDLL(None).syscall(175, None, 0, b"") != -1'
check "clock_settime refused by name" blocked_syscall -c 'import time
time.clock_settime(time.CLOCK_REALTIME, 0)'
systemctl stop sandboxd.service
fact "stop removes the daemon's cgroups" gone "$([ -d $service ] && find $service -type d || echo gone)"
fact "no processes of run uids left" 0 "$(ps -eo uid= | awk '$1 >= 880000 && $1 < 881024' | wc -l)"
echo "E2E-V2 journal:"
journalctl -u sandboxd --no-pager -o cat | sed 's/^/E2E-V2 | /' | tail -15
echo "E2E-V2 end: $failed failed"
systemctl poweroff
