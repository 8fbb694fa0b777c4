"""make soak: many runs at high concurrency from several uids, bombs included; then
check that every accepted request got exactly one result and that nothing is left.

    soak.py [--runs 10000] [--concurrency 32]

Clients run as root, sbx-alice and sbx-bob (real setuid processes).  Prints the
figures and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from harness import (  # noqa: E402
    DaemonProcess,
    as_user,
    daemon_dir,
    ensure_test_users,
    fd_count,
    host_mounts,
    rss_kb,
    run_uid_processes,
)

from sandboxd.client import Client  # noqa: E402

# (name, weight, request fields, acceptable statuses)
MIX: list[tuple[str, int, dict[str, Any], set[str]]] = [
    ("normal", 60, {"code": "print(sum(range(1000)))"}, {"ok"}),
    # Under load a fork bomb may not reach the process limit before its time is up: both are true.
    ("fork bomb", 5, {"code": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
                      "timeout_ms": 2000}, {"pids_limit", "timeout"}),
    ("memory bomb", 6, {"code": "a = []\nwhile True: a.append(bytearray(1 << 20))", "memory_mb": 48},
     {"memory_limit"}),
    ("output flood", 6, {"code": "while True: print('x' * 1000)", "max_output": 65536}, {"output_limit"}),
    ("disk bomb", 5, {"code": "n = 0\ntry:\n    while True:\n"
                              "        open(f'/tmp/f{n}', 'wb').write(b'x' * (1 << 20)); n += 1\n"
                              "except OSError as e:\n    print(e.errno)"}, {"ok"}),
    ("timeout", 6, {"code": "import time; time.sleep(10)", "timeout_ms": 300}, {"timeout"}),
    ("blocked syscall", 6, {"code": "import os; os.chroot('/')"}, {"blocked_syscall"}),
    ("exception", 6, {"code": "raise ValueError('x')"}, {"exit_nonzero"}),
]
CONFIG: dict[str, Any] = {
    "daemon": {"workers": 16, "queue": 1024, "log_level": "warning", "max_connections_per_uid": 256},
    "pool": {"min": 4, "max": 16},
    "quotas": {"default": {"concurrent": 64, "queued": 1024, "runs_per_minute": 0, "cpu_seconds_per_hour": 0}},
}


def client_process(sock: str, runs: int, threads: int, seed: int) -> dict[str, Any]:
    """Worker side (runs as some uid): ``threads`` clients share ``runs`` requests."""
    rng = random.Random(seed)
    weights = [m[1] for m in MIX]
    plan = rng.choices(range(len(MIX)), weights, k=runs)
    lock = threading.Lock()
    stats: dict[str, Any] = {"sent": 0, "answered": 0, "unexpected": collections.Counter(),
                             "statuses": collections.Counter(), "refused": collections.Counter(), "errors": [],
                             "kinds": {}}

    def worker(mine: list[int]) -> None:
        with Client(sock, timeout=120) as c:
            for i, kind in enumerate(mine):
                name, _, fields, ok = MIX[kind]
                rid = f"{seed}-{i}-{threading.get_ident()}"
                with lock:
                    stats["sent"] += 1
                try:
                    c.send({"op": "run", "id": rid, **fields})
                    resp = c.receive()
                except (ConnectionError, OSError) as e:
                    with lock:
                        stats["errors"].append(repr(e))
                    return
                with lock:
                    stats["answered"] += 1
                    if resp.get("id") != rid:
                        stats["errors"].append(f"answer for {resp.get('id')!r}, expected {rid!r}")
                    if resp.get("ok"):
                        status = resp["result"]["status"]
                        stats["kinds"][resp["result"]["run_id"]] = name
                        stats["statuses"][f"{name}: {status}"] += 1
                        if status not in ok:
                            stats["unexpected"][f"{name}: {status}"] += 1
                    else:
                        stats["refused"][resp["error"]["code"]] += 1

    chunks = [plan[i::threads] for i in range(threads)]
    ts = [threading.Thread(target=worker, args=(ch,)) for ch in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in stats.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--worker", nargs=4, metavar=("SOCK", "RUNS", "THREADS", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sock, runs, threads, seed = args.worker
        print(json.dumps(client_process(sock, int(runs), int(threads), int(seed))))
        return 0

    remove_users = ensure_test_users()
    mounts_before = host_mounts()
    d = DaemonProcess(daemon_dir(), CONFIG).start()
    failures: list[str] = []
    try:
        assert d.proc is not None
        pid = d.proc.pid
        lo, n = d.uid_range
        with Client(d.socket) as c:  # warm up, then take the baseline
            for _ in range(50):
                c.run("pass")
        time.sleep(2)
        rss0, fds0 = rss_kb(pid), fd_count(pid)
        users = ["root", "sbx-alice", "sbx-bob"]
        runs = [args.runs // len(users) + (i < args.runs % len(users)) for i in range(len(users))]
        threads = [max(1, args.concurrency // len(users) + (i < args.concurrency % len(users)))
                   for i in range(len(users))]
        print(f"soak: {sum(runs)} runs at concurrency {sum(threads)} from {', '.join(users)}")
        t0 = time.monotonic()
        procs = []
        for i, user in enumerate(users):
            kw = {} if user == "root" else as_user(user)
            argv = [sys.executable, __file__, "--worker", d.socket, str(runs[i]), str(threads[i]), str(i)]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, cwd="/", **kw))  # type: ignore[call-overload]
        results = [json.loads(p.communicate()[0]) for p in procs]
        elapsed = time.monotonic() - t0
        sent = sum(r["sent"] for r in results)
        answered = sum(r["answered"] for r in results)
        statuses: collections.Counter[str] = collections.Counter()
        unexpected: collections.Counter[str] = collections.Counter()
        refused: collections.Counter[str] = collections.Counter()
        errors: list[str] = []
        for r in results:
            statuses.update(r["statuses"])
            unexpected.update(r["unexpected"])
            refused.update(r["refused"])
            errors += r["errors"]
        print(f"  {sent} sent, {answered} answered ({sum(statuses.values())} results, {sum(refused.values())} "
              f"refused), {elapsed:.0f} s, {answered / elapsed:.0f} runs/s")
        for k, v in sorted(statuses.items()):
            print(f"    {v:6d}  {k}")
        if refused:
            print(f"  refused: {dict(refused)}")
        if sent != answered or errors:
            failures.append(f"{sent - answered} requests without exactly one answer; errors: {errors[:5]}")
        if unexpected:
            failures.append(f"unexpected verdicts: {dict(unexpected)}")

        # Let clean-up finish (a fork bomb's cgroup takes a moment to empty), then compare.
        settle = time.monotonic()
        while True:
            with Client(d.socket) as c:
                st = c.status()
            pooled = sum(p["ready"] + p["starting"] for p in st["pool"]["profiles"].values())
            if st["slots"]["in_use"] == pooled or time.monotonic() - settle > 30:
                break
            time.sleep(0.2)
        print(f"  clean-up settled {time.monotonic() - settle:.1f} s after the last answer")
        time.sleep(1)
        rss1, fds1 = rss_kb(pid), fd_count(pid)
        print(f"  after: daemon RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, fds {fds0} -> {fds1}, "
              f"uid slots in use {st['slots']['in_use']} (pooled workers {pooled}), "
              f"run-uid processes {len(run_uid_processes(lo, n))}, running {st['capacity']['running']}")
        if st["slots"]["in_use"] != pooled:
            failures.append(f"uid slots in use {st['slots']['in_use']} != pooled workers {pooled}")
        if st["capacity"]["running"] or st["capacity"]["queued"]:
            failures.append("runs still counted as running or queued")
        if fds1 > fds0 + 8:
            failures.append(f"daemon fds grew from {fds0} to {fds1}")
        if rss1 > rss0 + 8 * 1024:
            failures.append(f"daemon RSS grew from {rss0} to {rss1} kB")
        if len(run_uid_processes(lo, n)) > 2 * pooled:
            failures.append(f"{len(run_uid_processes(lo, n))} run-uid processes for {pooled} pooled workers")
        kinds = {rid: kind for r in results for rid, kind in r["kinds"].items()}
        problems = [line for line in d.log().splitlines() if " ERROR " in line or "Traceback" in line]
        for line in problems:
            rid = next((w.rstrip(":") for w in line.split() if w.rstrip(":") in kinds), None)
            print(f"  daemon error{f' ({kinds[rid]})' if rid else ''}: {line}")
        if problems:
            failures.append(f"{len(problems)} errors in the daemon's log, first: {problems[:3]}")
    finally:
        d.close()
        remove_users()
    left = len(run_uid_processes(lo, n))
    cgroups = subprocess.run(["find", "/sys/fs/cgroup", "-path", f"*{d.config['jail']['cgroup_parent']}*"],
                             capture_output=True, text=True).stdout.split()
    print(f"  after stop: run-uid processes {left}, cgroups {len(cgroups)}, host mounts {mounts_before} -> "
          f"{host_mounts()}")
    if left or cgroups or host_mounts() != mounts_before:
        failures.append("something of the runs survived the daemon")
    print("soak: " + ("PASS" if not failures else "FAIL\n  " + "\n  ".join(failures)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
