#!/bin/bash
# Runs inside the booted container (make e2e): install sandboxd with apt, use it the way
# users and admins do, purge it and look for anything left behind.  Then install it again
# for the qemu stage.  Prints one line per check; exits non-zero if any failed.
set -uo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
deb=/root/sandboxd.deb
unit_dir=/lib/systemd/system
failed=0
# A check runs in a command substitution, where a failed expect in the middle of it would not
# end it: every failed expect leaves this mark, and the check fails if it is there afterwards.
expect_failed=/run/sandboxd-e2e-expect-failed

check() {  # check NAME COMMAND...: run a check, time it, show its output if it fails
    local name=$1 start out
    shift
    start=$(date +%s%N)
    rm -f "$expect_failed"
    if out=$("$@" 2>&1) && [ ! -e "$expect_failed" ]; then
        printf 'ok    %-44s %6d ms\n' "$name" $((($(date +%s%N) - start) / 1000000))
        [ -z "${E2E_VERBOSE:-}" ] || printf '%s\n' "$out" | sed 's/^/      /'
    else
        printf 'FAIL  %-44s %6d ms\n' "$name" $((($(date +%s%N) - start) / 1000000))
        printf '%s\n' "$out" | sed 's/^/      /'
        failed=$((failed + 1))
    fi
}

expect() {  # expect WANT GOT WHAT
    [ "$1" = "$2" ] || { echo "$3: expected '$1', got '$2'"; touch "$expect_failed"; return 1; }
}

snapshot() {  # every path outside the package manager's and the system's own state
    find / -xdev \( -path /proc -o -path /sys -o -path /run -o -path /tmp -o -path /var/tmp \
        -o -path /var/log -o -path /var/cache -o -path /var/lib/apt -o -path /var/lib/dpkg \
        -o -path /var/lib/systemd -o -path /root \) -prune -o -print | sort
}

run_uid_processes() {
    local range lo hi
    range=$(sed -n 's/^ *run_uids: *"\{0,1\}\([0-9]*\)-\([0-9]*\).*/\1 \2/p' /etc/sandboxd/sandboxd.yaml 2>/dev/null)
    read -r lo hi <<<"${range:-880000 881023}"  # the slim conffile leaves jail.run_uids at its default
    ps -eo uid= | awk -v lo="$lo" -v hi="$hi" '$1 >= lo && $1 <= hi' | wc -l
}

install_package() {
    apt-get install -y -q "$deb" >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; return 1; }
    dpkg -s sandboxd | grep -q '^Status: install ok installed'
    expect enabled "$(systemctl is-enabled sandboxd.socket)" "socket enabled"
    expect active "$(systemctl is-active sandboxd.socket)" "socket active"
    # the package does not start the daemon: the first connection does
    expect inactive "$(systemctl is-active sandboxd.service)" "service before first use"
}

socket_mode() {
    expect "660 root sandboxd" "$(stat -c '%a %U %G' /run/sandboxd/sandboxd.sock)" "socket mode"
}

verify_units() {
    local out
    out=$(systemd-analyze verify "$unit_dir/sandboxd.socket" "$unit_dir/sandboxd.service" \
        "$unit_dir/sandboxd-http.service" 2>&1)
    [ -z "$out" ] || { echo "$out"; return 1; }
}

security_score() {
    systemd-analyze security --no-pager sandboxd.service | tail -1
}

socket_activation() {
    sandboxctl status
    expect active "$(systemctl is-active sandboxd.service)" "service after the first connection"
}

user_run() {
    local out uid
    out=$(runuser -u alice -- sandboxctl run -c 'import os; print(6 * 7, os.getuid())')
    uid=$(id -u alice)
    read -r answer run_uid <<<"$out"
    expect 42 "$answer" "output"
    [ "$run_uid" != 0 ] && [ "$run_uid" != "$uid" ] || { echo "ran as uid $run_uid"; return 1; }
}

blocked_syscall_report() {
    # The unit must not add a systemd filter whose EPERM would hide the jail's report.
    local out
    out=$(runuser -u alice -- sandboxctl --json run -c 'import os; os.chroot("/")')
    echo "$out" | grep -q '"status": "blocked_syscall"' || { echo "$out"; return 1; }
    echo "$out" | grep -q '"blocked_syscall": "chroot"' || { echo "$out"; return 1; }
}

blocked_calls_are_named_under_the_unit() {
    # Calls a systemd filter on the unit would refuse first (RestrictAddressFamilies,
    # LockPersonality, RestrictRealtime): each must still come back as blocked_syscall with
    # its name.  syslog, init_module and clock_settime are checked in the qemu stage: here
    # systemd-nspawn's own filter on the container refuses them before the jail sees them.
    local name code out bad=0
    while IFS='|' read -r name code; do
        out=$(runuser -u alice -- sandboxctl --json run -c "$code" </dev/null || true)
        case "$out" in
            *"\"blocked_syscall\": \"$name\""*) ;;
            *) echo "$name: $(echo "$out" | grep -E '"(status|blocked_syscall)"' | tr -d '\n')"; bad=1 ;;
        esac
    done <<'CALLS'
socket|import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
personality|import ctypes; assert ctypes.CDLL(None).personality(8) != -1
sched_setscheduler|import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
CALLS
    return $bad
}

own_device_nodes() {
    # Under the unit's device policy each run still gets its own /dev nodes (CAP_MKNOD kept).
    local out
    out=$(sandboxctl --json status)
    echo "$out" | grep -q '"private_dev": true' || { echo "$out" | grep -A3 self_test; return 1; }
    out=$(runuser -u alice -- sandboxctl run -c 'import os; open("/dev/null", "w").write("x"); print(os.stat("/dev/null").st_dev == os.stat("/dev").st_dev)')
    [ "$out" = "True" ] || { echo "$out"; return 1; }
}

autopkgtest_smoke() {
    # The package's own autopkgtest (debian/tests/smoke), against the installed package.
    sh /root/autopkgtest-smoke
}

node_run() {
    # Debian's nodejs (18, with libnode and its libraries) installed after sandboxd: runtimes.nodejs
    # is "auto", so a reload finds it, rebuilds the root with node's libraries and pools Node workers.
    apt-get install -y -q nodejs >/tmp/apt-node.log 2>&1 || { tail -5 /tmp/apt-node.log; return 1; }
    systemctl reload sandboxd.service
    local out
    for _ in $(seq 150); do
        sandboxctl --json status | python3 -c 'import json, sys
sys.exit(0 if json.load(sys.stdin)["runtimes"]["nodejs"]["available"] else 1)' && break
        sleep 0.2
    done
    out=$(runuser -u alice -- sandboxctl run --language nodejs -c 'console.log(6 * 7, process.version.split(".")[0])')
    case "$out" in "42 v18"*|"42 v"*) ;; *) echo "$out"; return 1 ;; esac
    out=$(runuser -u alice -- sandboxctl --json run --language nodejs -c "require('child_process').execSync('id')" || true)
    echo "$out" | grep -q '"blocked_syscall": "clone"' || { echo "$out" | head -20; return 1; }
}

http_post() {  # http_post KEY JSON: POST /v1/sandbox/run to the packaged sandboxd-http; prints "STATUS BODY"
    python3 - "$1" "$2" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", 8194, timeout=60)
c.request("POST", "/v1/sandbox/run", sys.argv[2], {"X-Api-Key": sys.argv[1], "Content-Type": "application/json"})
r = c.getresponse()
print(r.status, r.read().decode())
PY
}

dify_profile() {  # dify_profile KEY: the shipped profile takes what Dify allows, through Dify's Python wrapper
    python3 - "$1" <<'PY'
import base64, http.client, json, sys
def run(user, inputs):
    b64 = base64.b64encode(json.dumps(inputs).encode()).decode()
    code = (f"{user}\nimport json\nfrom base64 import b64decode\n"
            f"output_json = json.dumps(main(**json.loads(b64decode('{b64}').decode('utf-8'))), indent=4)\n"
            "print(f'<<RESULT>>{output_json}<<RESULT>>')\n")
    c = http.client.HTTPConnection("127.0.0.1", 8194, timeout=120)
    c.request("POST", "/v1/sandbox/run", json.dumps({"language": "python3", "code": code, "preload": "",
              "enable_network": True}), {"X-Api-Key": sys.argv[1], "Content-Type": "application/json"})
    r = c.getresponse()
    body = json.loads(r.read())
    assert r.status == 200 and body["data"]["error"] == "", (r.status, str(body)[:500])
    return json.loads(body["data"]["stdout"].split("<<RESULT>>")[1]), len(body["data"]["stdout"])
got, size = run("def main():\n    return {'big': '\u4e2d' * 350000}", {})
assert got == {"big": "\u4e2d" * 350000} and size > 2 << 20, size
assert run("def main(text):\n    return {'n': len(text)}", {"text": "x" * 7000000})[0] == {"n": 7000000}
assert run("def main():\n    return {'n': len(b'x' * 400000000)}", {})[0] == {"n": 400000000}
got, _ = run("import requests, httpx\ndef main():\n    return {'r': requests.__version__, 'h': httpx.__version__}", {})
print(f"2.1 MB output, 7 MB input, 400 MB, requests {got['r']} and httpx {got['h']}: ok")
PY
}

http_bridge() {
    # The container shares the host's network: nothing else may already answer on the bridge's port
    # (it would be sent the key). The service is stopped again on every path out.
    if python3 -c 'import socket; socket.create_connection(("127.0.0.1", 8194), timeout=2)' 2>/dev/null; then
        echo "127.0.0.1:8194 is already served on this host: not sending the key there"; return 1
    fi
    local rc=0
    http_bridge_checks || rc=$?
    systemctl disable --now --quiet sandboxd-http.service 2>/dev/null || true
    return $rc
}

http_bridge_checks() {
    # The packaged sandboxd-http.service, disabled until enabled, as the user sandboxd-http with the
    # key postinst made; Dify's request shape (enable_network true: the shipped quota says no network,
    # so the run goes without it); jinja2 in the default root; the shipped profile for Dify.
    expect disabled "$(systemctl is-enabled sandboxd-http.service)" "sandboxd-http after install"
    expect "600 root" "$(stat -c '%a %U' /etc/sandboxd/sandboxd-http.env)" "the key's file"
    id -nG sandboxd-http | grep -qw sandboxd || { id sandboxd-http; return 1; }
    systemctl enable --now --quiet sandboxd-http.service || { journalctl -u sandboxd-http --no-pager | tail; return 1; }
    local key out uid
    key=$(sed -n 's/^API_KEY=//p' /etc/sandboxd/sandboxd-http.env)
    [ "${#key}" -ge 32 ] || { echo "key: '$key'"; return 1; }
    for _ in $(seq 300); do
        python3 -c 'import http.client as h; c = h.HTTPConnection("127.0.0.1", 8194, timeout=5); c.request("GET", "/health"); assert c.getresponse().status == 200' \
            2>/dev/null && break
        sleep 0.2
    done
    out=$(http_post "$key" '{"language": "python3", "code": "import os, jinja2\nprint(jinja2.Template(\"{{a}}\").render(a=6 * 7), os.getuid() != 0)", "preload": "", "enable_network": true}')
    expect '200 {"code":0,"message":"success","data":{"stdout":"42 True\n","stderr":"","error":"","exit_code":0}}' \
        "$out" "a run through sandboxd-http"
    dify_profile "$key" || return 1
    out=$(http_post wrong '{"language": "python3", "code": "print(1)"}')
    case "$out" in "401 "*) ;; *) echo "wrong key: $out"; return 1 ;; esac
    uid=$(id -u sandboxd-http)
    journalctl -u sandboxd.service --no-pager | grep -qE "run r[0-9a-z-]+ uid=$uid \(sandboxd-http\) status=ok" \
        || { echo "no run of uid $uid in the daemon's journal"; return 1; }
    systemd-analyze security --no-pager sandboxd-http.service | tail -1
}

outsider_refused() {
    local rc=0 err
    err=$(runuser -u mallory -- sandboxctl run -c 'print(1)' 2>&1) || rc=$?
    expect 126 "$rc" "exit status of a refused connection"
    echo "$err" | grep -q 'Permission denied' || { echo "$err"; return 1; }
}

status_shows_ready() {
    local out
    out=$(systemctl status sandboxd.service --no-pager)
    echo "$out" | grep -q 'Active: active (running)' || { echo "$out"; return 1; }
    echo "$out" | grep -q 'Status: "ready on /run/sandboxd/sandboxd.sock"' || { echo "$out"; return 1; }
}

reload_keeps_pid() {
    local before after
    before=$(systemctl show -p MainPID --value sandboxd.service)
    systemctl reload sandboxd.service
    after=$(systemctl show -p MainPID --value sandboxd.service)
    expect "$before" "$after" "main pid across reload"
    for _ in $(seq 50); do
        journalctl -u sandboxd.service --no-pager | grep -q 'configuration reloaded' && break
        sleep 0.1
    done
    journalctl -u sandboxd.service --no-pager | grep 'configuration reloaded'
    expect 42 "$(runuser -u alice -- sandboxctl run -c 'print(42)')" "run after reload"
}

restart_new_pid() {
    local before after
    before=$(systemctl show -p MainPID --value sandboxd.service)
    systemctl restart sandboxd.service
    after=$(systemctl show -p MainPID --value sandboxd.service)
    [ "$after" != "$before" ] && [ "$after" != 0 ] || { echo "pid $before -> $after"; return 1; }
    expect 42 "$(runuser -u alice -- sandboxctl run -c 'print(42)')" "run after restart"
}

journal_shows_run() {
    journalctl -u sandboxd.service --no-pager | grep -E "run r[0-9a-z-]+ uid=$(id -u alice) \(alice\) status=ok"
}

stop_leaves_nothing() {
    systemctl stop sandboxd.service
    expect inactive "$(systemctl is-active sandboxd.service)" "service after stop"
    expect active "$(systemctl is-active sandboxd.socket)" "socket after stopping the service"
    expect 0 "$(run_uid_processes)" "processes of run uids"
    ! grep -E ' /(var/lib|run)/sandboxd' /proc/self/mountinfo || return 1
    # and the next connection starts it again
    expect 42 "$(runuser -u alice -- sandboxctl run -c 'print(42)')" "run after stop"
}

purge_leaves_nothing() {
    userdel -r alice 2>/dev/null
    userdel -r mallory 2>/dev/null
    apt-get purge -y -q sandboxd >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; return 1; }
    systemctl daemon-reload
    local left=0
    for g in sandboxd sandboxd-admin sandboxd-http; do
        ! getent group "$g" || { echo "group $g is left"; left=1; }
    done
    ! getent passwd sandboxd-http || { echo "user sandboxd-http is left"; left=1; }
    for p in /etc/sandboxd /var/lib/sandboxd /run/sandboxd "$unit_dir/sandboxd.service" \
        "$unit_dir/sandboxd.socket" /usr/sbin/sandboxd /usr/bin/sandboxctl "$unit_dir/sandboxd-http.service" \
        /usr/sbin/sandboxd-http /etc/sandboxd/sandboxd-http.env; do
        [ ! -e "$p" ] || { echo "$p is left"; left=1; }
    done
    if systemctl list-units --all --no-legend | grep sandboxd; then left=1; fi
    if pgrep -f sandboxd; then left=1; fi
    expect 0 "$(run_uid_processes)" "processes of run uids" || left=1
    # Anything new since before the install that no installed package owns: the
    # dependencies' files are theirs (and stay, as apt leaves them), the rest must be gone.
    snapshot >/tmp/after.txt
    sort -u /var/lib/dpkg/info/*.list >/tmp/owned.txt
    comm -13 /tmp/before.txt /tmp/after.txt | comm -23 - /tmp/owned.txt \
        | grep -vE '^/etc/(passwd|group|shadow|gshadow|subuid|subgid)-$' \
        | grep -vE '^/usr/lib/python3(\.[0-9]+)?/(dist-packages/)?.*__pycache__' \
        | while read -r p; do  # update-alternatives' links belong to the packages that stay (nodejs's js,
            # python3-babel's pybabel, which python3-jinja2 brings along)
            case "$p" in /etc/alternatives/*) continue ;; esac
            case "$(readlink "$p")" in /etc/alternatives/*) continue ;; esac
            echo "$p"
        done >/tmp/new.txt || true
    grep -E '/usr/lib/python3/dist-packages/sandboxd' /tmp/after.txt >>/tmp/new.txt || true
    if [ -s /tmp/new.txt ]; then echo "left behind:"; cat /tmp/new.txt; left=1; fi
    return $left
}

journal_fields() {
    # The journal's own fields (python3-systemd's native protocol): journalctl filters on them.
    local out
    runuser -u alice -- sandboxctl run -c 'import os; os.chroot("/")' >/dev/null 2>&1
    sleep 1
    out=$(journalctl -u sandboxd STATUS=blocked_syscall SYSCALL=chroot CALLER=alice -o json --no-pager | tail -1)
    echo "$out" | grep -q '"RUN_ID"' || { echo "no journal entry with STATUS=blocked_syscall SYSCALL=chroot: $out"; return 1; }
    runuser -u alice -- sandboxctl jobs >/dev/null 2>&1
    sleep 1
    out=$(journalctl -u sandboxd REFUSAL=forbidden OP=jobs -o json --no-pager | tail -1)
    [ -n "$out" ] || { echo "the refused jobs of alice is not in the journal"; return 1; }
}

reinstall_for_qemu() {
    install_package
    useradd --create-home --groups sandboxd alice
}

snapshot >/tmp/before.txt
useradd --create-home mallory
check "apt install ./sandboxd.deb (Depends from the archive)" install_package
useradd --create-home --groups sandboxd alice
check "socket /run/sandboxd/sandboxd.sock 0660 root:sandboxd" socket_mode
check "systemd-analyze verify: clean" verify_units
E2E_VERBOSE=1 check "systemd-analyze security" security_score
check "first connection starts the service" socket_activation
check "run as alice (group sandboxd)" user_run
check "blocked syscall is reported by name" blocked_syscall_report
check "blocked calls are named under the unit's own filters" blocked_calls_are_named_under_the_unit
check "each run has its own device nodes" own_device_nodes
check "the package's autopkgtest (debian/tests/smoke)" autopkgtest_smoke
check "a Node.js run under the unit (Debian's nodejs)" node_run
E2E_VERBOSE=1 check "a Dify request through sandboxd-http.service" http_bridge
check "mallory (not in the group) is refused" outsider_refused
check "systemctl status: running, ready" status_shows_ready
check "systemctl reload: same pid, reloaded" reload_keeps_pid
check "systemctl restart: new pid, runs" restart_new_pid
check "journalctl -u sandboxd shows the runs" journal_shows_run
check "journal fields: STATUS=, SYSCALL=, REFUSAL=" journal_fields
check "systemctl stop: nothing left; socket restarts" stop_leaves_nothing
check "apt purge leaves nothing behind" purge_leaves_nothing
check "install again for the qemu stage" reinstall_for_qemu
echo "$failed failed"
[ "$failed" = 0 ]
