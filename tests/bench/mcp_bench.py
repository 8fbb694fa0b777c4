"""make bench, the MCP part: what sandboxd-mcp adds to a cell, over each transport.

The same cell (``print(x)`` in a session that has ``x``) three ways on one daemon, paced
(50/s, one at a time) and interleaved in rounds so that drift hits all three alike:

    socket   session_exec over the daemon's socket (sandboxd.client.AsyncSession)
    stdio    a run_python_code tool call to sandboxd-mcp over stdio (the SDK's ClientSession)
    http     the same over Streamable HTTP on 127.0.0.1 (kept-alive, SSE answers)

sandboxd-mcp runs as the unprivileged test user sbx-mcp.  Prints the p50 and p99 of each and
what each transport adds at p50 (the issue's target: at most 1 ms), and the CPU sandboxd-mcp
spends on a call (its /proc stat over the calls: what it costs whatever else the machine
does, which latency on a busy machine does not show); writes --out/mcp.json.
Needs the SDK: .venv-mcp's python runs it (make bench does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench import BENCH_CONFIG, summary  # noqa: E402
from harness import DaemonProcess, daemon_dir, ensure_test_users  # noqa: E402
from mcp_servers import McpHttpProcess, http_session, stdio_session  # noqa: E402

from sandboxd.client import AsyncClient  # noqa: E402

CELL = "print(x)"
RATE = 50.0


async def paced(call: Callable[[], Awaitable[None]], count: int) -> list[float]:
    lat = []
    for _ in range(count):
        t = time.perf_counter()
        await call()
        lat.append(time.perf_counter() - t)
        await asyncio.sleep(max(0.0, 1 / RATE - lat[-1]))
    return lat


def cpu_s(pid: int) -> float:
    """User and system CPU of a process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stdio_server_pid(sock: str) -> int:
    """The sandboxd-mcp that the SDK's stdio_client started (it does not say which)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"sandboxd.mcp" in argv and sock.encode() in argv and b"--http" not in argv:
            return int(pid)
    raise RuntimeError("no sandboxd-mcp process over stdio found")


async def measure(sock: str, endpoint: str, http_pid: int, count: int, rounds: int) -> dict[str, Any]:
    async with AsyncClient(sock) as client, await client.session() as session, \
            stdio_session(sock) as over_stdio, http_session(endpoint) as over_http:
        async def socket_call() -> None:
            r = await session.exec(CELL)
            assert r.stdout == b"1\n", r

        def tool_call(s: Any) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                r = await s.call_tool("run_python_code", {"code": CELL})
                assert not r.is_error and r.content[0].text == "[stdout]\n1", r
            return call

        calls = {"socket": socket_call, "stdio": tool_call(over_stdio), "http": tool_call(over_http)}
        await session.exec("x = 1")
        for s in (over_stdio, over_http):
            await s.call_tool("run_python_code", {"code": "x = 1"})
        for call in calls.values():  # warm: pools, imports, connections
            await paced(call, 10)
        pids = {"stdio": stdio_server_pid(sock), "http": http_pid}
        lat: dict[str, list[float]] = {name: [] for name in calls}
        cpu = dict.fromkeys(calls, 0.0)
        for _ in range(rounds):
            for name, call in calls.items():
                before = cpu_s(pids[name]) if name in pids else 0.0
                lat[name] += await paced(call, count // rounds)
                cpu[name] += cpu_s(pids[name]) - before if name in pids else 0.0
    out: dict[str, Any] = {name: summary(values, 0) for name, values in lat.items()}
    for name in ("stdio", "http"):
        out[f"{name}_added_p50_ms"] = out[name]["p50_ms"] - out["socket"]["p50_ms"]
        out[f"{name}_server_cpu_ms_per_call"] = cpu[name] / len(lat[name]) * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench-out"))
    ap.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    ap.add_argument("--seconds", type=float, help="(make bench's; unused here)")
    ap.add_argument("--soak-runs", type=int, help="(make bench's; unused here)")
    args = ap.parse_args()
    count, rounds = (60, 3) if args.quick else (300, 5)
    os.makedirs(args.out, exist_ok=True)
    remove_users = ensure_test_users()  # sandboxd-mcp runs as one of them
    try:
        d = DaemonProcess(daemon_dir(), BENCH_CONFIG).start()
        try:
            with McpHttpProcess(d.socket, env={"SANDBOXD_MCP_LOG_LEVEL": "warning"}) as server:
                assert server.proc is not None
                results = asyncio.run(measure(d.socket, server.endpoint, server.proc.pid, count, rounds))
        finally:
            d.close()
    finally:
        remove_users()
    print("sandboxd-mcp: a run_python_code call of print(x) against session_exec over the socket, paced 50/s, "
          "same daemon")
    for name, label in (("socket", "session_exec over the socket"), ("stdio", "run_python_code over stdio"),
                        ("http", "run_python_code over Streamable HTTP")):
        r = results[name]
        added = "" if name == "socket" else (f"  (+{results[f'{name}_added_p50_ms']:.2f} ms at p50, target <= 1; "
                                             f"sandboxd-mcp's CPU {results[f'{name}_server_cpu_ms_per_call']:.2f} "
                                             "ms a call)")
        print(f"  {label + ': p50 / p99':48s} {r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms{added}", flush=True)
    with open(os.path.join(args.out, "mcp.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
