#!/bin/bash
# Runs inside a fleet node (make fleet): what an operator does on one host.
#
#   node.sh install KEY   install /root/sandboxd.deb (its Depends are in the root already: the node
#                         has no way to the archive), give sandboxd-http the fleet's key, its
#                         address on the node's network and its agent-check, start it; wait for
#                         /health/ready; print the seconds from install to ready
#   node.sh upgrade       the rolling-upgrade procedure of docs/fleet.md up to its last step: drain,
#                         wait for the runs in flight, reinstall the .deb, restart the services,
#                         check that the node came back drained; print the seconds each step
#                         took (the driver checks that nothing came meanwhile, then undrains)
#   node.sh ready         wait until this node's /health/ready says 200 (at most 120 s)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
deb=/root/sandboxd.deb

ready() {  # ready [TIMEOUT]: /health/ready 200 on the node's own bridge
    python3 - "${1:-120}" <<'PY'
import http.client, json, sys, time
deadline = time.monotonic() + float(sys.argv[1])
last = ""
while time.monotonic() < deadline:
    try:
        c = http.client.HTTPConnection("127.0.0.1", 8194, timeout=5)
        c.request("GET", "/health/ready")
        r = c.getresponse()
        body = r.read().decode()
        if r.status == 200:
            sys.exit(0)
        last = f"{r.status} {body}"
    except OSError as e:
        last = str(e)
    time.sleep(0.1)
print(f"not ready: {last}", file=sys.stderr)
sys.exit(1)
PY
}

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

case $1 in
install)
    t0=$(now)
    dpkg -i "$deb" >/tmp/apt.log 2>&1 || { tail -20 /tmp/apt.log; exit 1; }
    (umask 077 && printf 'API_KEY=%s\nSANDBOXD_HTTP_LISTEN=0.0.0.0:8194\nSANDBOXD_HTTP_AGENT_LISTEN=0.0.0.0:8196\n' \
        "$2" >/etc/sandboxd/sandboxd-http.env)
    systemctl enable --now --quiet sandboxd-http.service
    ready 180 || { journalctl -u sandboxd -u sandboxd-http --no-pager | tail -20; exit 1; }
    echo "install to ready: $(since "$t0") s"
    ;;
upgrade)
    t0=$(now)
    sandboxctl drain --wait 120s >/dev/null
    echo "drained, runs finished: $(since "$t0") s"
    t1=$(now)
    dpkg -i "$deb" >/tmp/apt.log 2>&1 || { tail -20 /tmp/apt.log; exit 1; }
    systemctl restart sandboxd.service sandboxd-http.service
    echo "reinstalled and restarted: $(since "$t1") s"
    # still drained after the restart (the state directory says so): nothing comes here until undrain
    sandboxctl --json status | python3 -c 'import json, sys
st = json.load(sys.stdin)
assert st["draining"] and not st["ready"], st["not_ready"]'
    echo "back, drained: $(since "$t1") s"
    ;;
ready)
    ready "${2:-120}"
    ;;
*)
    echo "usage: node.sh install KEY | upgrade | ready" >&2
    exit 2
    ;;
esac
