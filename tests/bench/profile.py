"""make profile: where the CPU of a closed loop of print(1) runs goes, per process kind.

Starts a daemon with the bench's configuration, warms it up, then runs ``--concurrency``
clients in a closed loop for ``--seconds`` while ``perf record -a -g`` samples the whole
machine.  Prints the runs per second, the machine's CPU per run (from /proc/stat, so it
holds without perf too) and, from perf, the share of each process kind among the busy
samples -- the daemon, the fork server, each worker's pid 1 (it forks R, then is
``sandboxd-init``), the runners (R, ``sbx-runner``), before the worker redesign the
supervisors (P, ``sbx-super``), the bench's own clients, kernel threads -- with the top
symbols of each.  Writes ``--out``/profile.txt and perf.data.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from bench import BENCH_CONFIG, closed_loop  # noqa: E402
from harness import DaemonProcess, daemon_dir  # noqa: E402

PID1 = "pid 1 (forks R, execs sandboxd-init)"
KINDS = {"sbx-super": "supervisor P", "sbx-pid1": PID1, "sbx-init": PID1, "sandboxd-init": PID1,
         "sbx-runner": "runner R",
         "sbx-forkserver": "fork server",
         "sbx-netns": "network setup", "sandboxd": "daemon"}


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine so far."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def kind_of(comm: str) -> str:
    if comm == "swapper":
        return "idle"
    if comm in KINDS:
        return KINDS[comm]
    if comm.startswith(("python", "profile.py")):
        return "bench clients"
    if comm.startswith(("kworker", "ksoftirq", "rcu", "migration")):
        return "kernel threads"
    return f"other ({comm})"


def perf_split(data: str) -> tuple[dict[str, float], str]:
    """Share of samples per process kind, and perf's own report of the top symbols per comm.

    Samples are counted by pid, under the pid's last name: a worker's pid 1 and R start as
    copies of the fork server (named like it) and rename themselves; what they did before
    is theirs, not the server's."""
    by_pid = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "pid",
                             "-g", "none", "--percent-limit", "0"], capture_output=True, text=True, check=True)
    shares: dict[str, float] = {}
    for line in by_pid.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\d+):(\S.*?)\s*$", line)
        if m:
            kind = kind_of(m.group(3))
            shares[kind] = shares.get(kind, 0.0) + float(m.group(1))
    symbols = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "comm,dso,sym",
                              "-g", "none", "--percent-limit", "0.7"], capture_output=True, text=True, check=True)
    return shares, symbols.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench-out"))
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--network", action="store_true", help="runs with network (a namespace each)")
    ap.add_argument("--no-perf", action="store_true", help="only runs/s and CPU per run")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    use_perf = not args.no_perf and shutil.which("perf") is not None
    kw: dict[str, Any] = {"network": True} if args.network else {}
    d = DaemonProcess(daemon_dir(), BENCH_CONFIG).start()
    perf: subprocess.Popen[bytes] | None = None
    try:
        closed_loop(d.socket, 4, 2.0, **kw)  # warm up: pool targets, page cache
        data = os.path.join(args.out, "perf.data")
        if use_perf:
            perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "999", "-o", data, "--", "sleep",
                                     str(args.seconds + 0.5)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        b0, t0 = busy_jiffies()
        s = closed_loop(d.socket, args.concurrency, args.seconds, **kw)
        b1, t1 = busy_jiffies()
        if perf is not None:
            perf.wait()
    finally:
        if perf is not None and perf.poll() is None:
            perf.terminate()  # the loop failed: no perf left sampling the machine
            perf.wait()
        d.close()
    tick = os.sysconf("SC_CLK_TCK")
    cpu_ms_per_run = (b1 - b0) / tick * 1e3 / max(1, s["n"])
    busy = (b1 - b0) / max(1, t1 - t0)
    lines = [f"closed loop c={args.concurrency}{' with network' if args.network else ''}: {s['runs_per_s']:.0f} runs/s,"
             f" p50 {s['p50_ms']:.1f} ms, {s['errors']} errors",
             f"machine CPU per run (all processes, bench clients included): {cpu_ms_per_run:.2f} ms "
             f"({busy:.0%} of {os.cpu_count()} CPUs busy)"]
    report = ""
    if perf is not None:
        shares, report = perf_split(data)
        idle = shares.pop("idle", 0.0)
        busy_share = max(1e-9, sum(shares.values()))
        lines.append(f"share of the busy samples ({idle:.1f} % of all were idle), and CPU per run:")
        for kind, share in sorted(shares.items(), key=lambda kv: -kv[1]):
            part = share / busy_share
            lines.append(f"  {kind:36s} {part * 100:5.1f} %  {part * cpu_ms_per_run:5.2f} ms")
    elif not args.no_perf:
        lines.append("perf is not installed: no per-process split (apt-get install linux-perf)")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "profile.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n\n" + report)
    print(f"\nfull report: {args.out}/profile.txt" + (f", samples: {args.out}/perf.data" if perf else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
