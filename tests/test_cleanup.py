"""Nothing is left behind: after 200 runs including bombs, and after shutdown."""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any

from harness import CGROUP_PARENT, DaemonProcess, host_mounts

BOMBS: list[tuple[str, dict[str, Any]]] = [
    ("print('ok')", {}),
    ("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", {"timeout_ms": 800}),
    ("a = []\nwhile True: a.append(bytearray(1 << 20))", {"memory_mb": 48}),
    ("while True: print('x' * 1000)", {"max_output": 1 << 16}),
    ("import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(100)\ntime.sleep(100)", {"timeout_ms": 300}),
    ("import os\nfor i in range(100): open(f'/tmp/f{i}', 'w').write('x' * 1000)", {}),
    ("import os; os.chroot('/')", {}),
    ("while True: pass", {"timeout_ms": 300}),
]


def cgroup_dirs() -> list[str]:
    found = []
    for ctrl in ("memory", "pids", "cpu", "cpuacct", "unified"):
        base = f"/sys/fs/cgroup/{ctrl}"
        if not os.path.isdir(base):
            continue
        for top, dirs, _ in os.walk(base):
            found += [os.path.join(top, d) for d in dirs if CGROUP_PARENT + "-clean" in os.path.join(top, d)]
            dirs[:] = [d for d in dirs if not d.startswith("w")]
    return found


def test_200_runs_leave_nothing_behind(make_daemon: Any) -> None:
    mounts_before = host_mounts()
    tmp_before = set(os.listdir("/tmp"))
    d: DaemonProcess = make_daemon({"jail": {"cgroup_parent": CGROUP_PARENT + "-clean"},
                                    "pool": {"min": 2, "max": 4}, "daemon": {"workers": 8}})
    statuses: dict[str, int] = {}

    def one(i: int) -> str:
        code, opts = BOMBS[i % len(BOMBS)]
        with d.client() as c:
            return str(c.run(code, **opts)["status"])

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        for status in ex.map(one, range(200)):
            statuses[status] = statuses.get(status, 0) + 1
    assert sum(statuses.values()) == 200
    assert set(statuses) == {"ok", "pids_limit", "memory_limit", "output_limit", "timeout", "blocked_syscall"}, \
        statuses

    # While the daemon lives: only pooled workers remain, each with its own cgroup.
    time.sleep(1.0)
    with d.client() as c:
        st = c.status()
    live = st["slots"]["in_use"]
    pooled = sum(p["ready"] + p["starting"] for p in st["pool"]["profiles"].values())
    assert live == pooled, st["slots"]
    assert st["capacity"]["running"] == 0 and st["capacity"]["queued"] == 0
    assert len(d.run_uid_processes()) <= 2 * live  # sandboxd-init and a runner per pooled worker
    assert len([p for p in cgroup_dirs() if os.path.basename(p).startswith("w")]) <= 4 * live
    assert host_mounts() == mounts_before  # every scratch mount lived in a worker's own namespace

    assert d.stop() == 0
    # After shutdown: no run processes, no cgroups, no mounts, no temporary directories.
    assert d.run_uid_processes() == []
    assert cgroup_dirs() == []
    assert host_mounts() == mounts_before
    state = set(os.listdir(d.state_dir)) - {"usage.sqlite-shm", "usage.sqlite-wal"}
    assert state == {"roots", "usage.sqlite"}, state
    roots = os.listdir(os.path.join(d.state_dir, "roots"))
    assert len([r for r in roots if r.startswith("root-") and not r.endswith(".json")]) == 1
    assert not [r for r in roots if ".partial" in r]
    harness = ("pytest", "sandboxd-test-", "sbx-helper-", "sandboxd-http-test-")  # the tests' own work directories
    assert {p for p in set(os.listdir("/tmp")) - tmp_before if not p.startswith(harness)} == set()
