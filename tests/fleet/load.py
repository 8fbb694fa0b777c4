"""make fleet's driver, run inside the fleet's own network namespace (tests/fleet/run.sh):
HAProxy with the shipped configuration rendered for the nodes, Dify-shaped load through it,
and the scenario -- one node killed, one drained and brought back, one upgraded while
drained -- with the checks, then one line:

    fleet: N requests, N answered, lost 0, retried K, died-in-flight F

The load is 600 runs, 16 at a time, from one httpx client configured as Dify's code executor
configures its own (timeouts, pool), which never retries: every request gets exactly one
answer here.  An answer is one of
    200         the run's result (checked: the program's own output)
    502         the run died with its node (only the killed node, only while it was down)
    other       lost: a refusal that reached the client (a 503 HAProxy should have retried),
                a timeout, an error -- there must be none
The scenario steps start at fixed request numbers; the load waits at a later number until
a step is done, so that every step happens under load and the run ends after the last.
``retried`` is HAProxy's count (retries and redispatches); ``died-in-flight`` the 502s.

Only addresses of this namespace's bridge and the nodes' namespaces are used.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

LB = "172.31.228.1"
DIFY_PORT = 8194
TOTAL, CONCURRENCY = 600, 16
NODE_PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Node:
    name: str
    ip: str
    leader: int


@dataclass
class Tally:
    answers: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    died: list[str] = field(default_factory=list)
    by_node: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def log(message: str) -> None:
    print(f"   {message}", flush=True)


# -- HAProxy ----------------------------------------------------------------------------------
def render(text: str, nodes: list[Node], stats_socket: str, with_mcp: bool) -> str:
    """The shipped configuration for these nodes: each backend's server lines replaced by one
    per node (the port of the shipped lines kept), the stats socket and log in the work dir,
    the MCP sections left out when the nodes have no sandboxd-mcp."""
    sections: list[list[str]] = []
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
    out: list[str] = []
    for section in sections:
        head = section[0].split()
        if not with_mcp and head[0] in ("frontend", "backend") and "mcp" in head[1]:
            continue
        servers = [line for line in section if line.split()[:1] == ["server"]]
        body = [line for line in section if line not in servers]
        if servers:
            port = servers[0].split()[2].rsplit(":", 1)[1]
            body += [f"    server {n.name} {n.ip}:{port}" for n in nodes]
        body = [re.sub(r"stats socket \S+", f"stats socket {stats_socket}", line) for line in body]
        body = [line.replace("log /dev/log local0", "log stdout format raw local0") for line in body]
        out += body
    return "\n".join(out) + "\n"


class HAProxy:
    def __init__(self, work: str, config_text: str) -> None:
        self.socket = os.path.join(work, "haproxy.sock")
        self.config = os.path.join(work, "haproxy.cfg")
        self.log = os.path.join(work, "haproxy.log")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(config_text)
        check = subprocess.run(["haproxy", "-c", "-q", "-f", self.config], capture_output=True, text=True)
        if check.returncode:
            raise SystemExit(f"haproxy -c: {check.stdout}{check.stderr}")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", self.config], stdout=out, stderr=subprocess.STDOUT)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.socket)
            s.sendall(line.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    def stats(self, backend: str = "sandboxd_http") -> dict[str, dict[str, str]]:
        text = self.command("show stat").lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == backend}

    def wait(self, what: str, ok: Callable[[dict[str, dict[str, str]]], bool], timeout: float = 120) -> float:
        started = time.monotonic()
        last: dict[str, dict[str, str]] = {}
        while time.monotonic() - started < timeout:
            try:
                last = self.stats()
                if ok(last):
                    return time.monotonic() - started
            except OSError:
                pass
            if self.proc.poll() is not None:
                with open(self.log, encoding="utf-8", errors="replace") as f:
                    raise SystemExit(f"haproxy exited: {f.read()[-2000:]}")
            time.sleep(0.1)
        shown = {k: (v["status"], v["weight"], v.get("check_status"), v.get("agent_status")) for k, v in last.items()}
        raise SystemExit(f"HAProxy: {what} did not happen within {timeout:g} s: {shown}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serving(row: dict[str, str]) -> bool:
    return row["status"] == "UP" and row["weight"] not in ("", "0")


def drained(row: dict[str, str]) -> bool:
    return "DRAIN" in row["status"] or row["status"].startswith("DOWN") or row["weight"] == "0"


# -- the nodes ---------------------------------------------------------------------------------------
def in_node(node: Node, *command: str, timeout: float = 300) -> str:
    p = subprocess.run(["nsenter", "-t", str(node.leader), "-a", "env", "-i", NODE_PATH, "LC_ALL=C.UTF-8", *command],
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise SystemExit(f"{node.name}: {' '.join(command)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p.stdout


# -- Dify-shaped requests ---------------------------------------------------------------------------------
def dify_client(base_url: str, key: str) -> httpx.Client:
    """As Dify's code executor sets up its client; trust_env=False keeps every request here."""
    return httpx.Client(base_url=base_url, headers={"X-Api-Key": key}, trust_env=False,
                        timeout=httpx.Timeout(connect=10.0, read=60.0, write=10.0, pool=None),
                        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0))


def dify_body(n: int) -> dict[str, Any]:
    """A Dify code node: the user's main(), its inputs as base64 JSON, the result between markers."""
    inputs = base64.b64encode(json.dumps({"n": n}).encode()).decode()
    code = ("import time\n\ndef main(n: int) -> dict:\n    time.sleep(0.05 * (n % 4))\n"
            "    return {'square': n * n}\n\n"
            "import json\nfrom base64 import b64decode\n"
            f"inputs_obj = json.loads(b64decode('{inputs}').decode('utf-8'))\n"
            "output_obj = main(**inputs_obj)\n"
            "print(f'<<RESULT>>{json.dumps(output_obj)}<<RESULT>>')\n")
    return {"language": "python3", "code": code, "preload": "", "enable_network": True}


def expected(n: int) -> str:
    return f"<<RESULT>>{json.dumps({'square': n * n})}<<RESULT>>\n"


class Dispenser:
    """Request numbers for the load's threads.  ``steps``: (start at, done before, name, action);
    a step starts (in a thread) when number ``start`` is handed out, and no number from
    ``before`` on is handed out until it is done."""

    def __init__(self, total: int, steps: list[tuple[int, int, str, Callable[[], None]]]) -> None:
        self.total, self.steps = total, steps
        self.next = 0
        self.cond = threading.Condition()
        self.done: set[str] = set()
        self.failed: list[str] = []
        self.threads: list[threading.Thread] = []

    def take(self) -> int | None:
        with self.cond:
            while True:
                if self.failed or self.next >= self.total:
                    return None
                n = self.next
                if all(name in self.done for _s, before, name, _a in self.steps if before <= n):
                    break
                self.cond.wait(1.0)
            self.next += 1
            for start, _b, name, action in self.steps:
                if start == n:
                    t = threading.Thread(target=self._step, args=(name, action), daemon=True)
                    self.threads.append(t)
                    t.start()
            return n

    def _step(self, name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except BaseException as e:  # noqa: BLE001 - a failed step ends the load and the run
            with self.cond:
                self.failed.append(f"{name}: {e}")
        with self.cond:
            self.done.add(name)
            self.cond.notify_all()


def load(client: httpx.Client, dispenser: Dispenser, tally: Tally, killed: dict[str, Any]) -> None:
    while (n := dispenser.take()) is not None:
        sent = time.monotonic()
        try:
            r = client.post("/v1/sandbox/run", json=dify_body(n))
        except httpx.HTTPError as e:
            with tally.lock:
                tally.lost.append(f"#{n}: {type(e).__name__}: {e}")
            continue
        node = r.headers.get("x-sandboxd-node", "?")
        with tally.lock:
            tally.answers[str(r.status_code)] += 1
            tally.by_node[node] += 1
            if r.status_code == 200:
                data = r.json().get("data") or {}
                if data.get("error") or data.get("stdout") != expected(n):
                    tally.lost.append(f"#{n} on {node}: wrong answer {r.text[:300]}")
            elif r.status_code == 502 and node == killed.get("name") and killed.get("at", 1e18) - 1 <= \
                    time.monotonic() and sent <= killed.get("back", 1e18):
                tally.died.append(f"#{n}: {r.text[:80]}")
            else:
                tally.lost.append(f"#{n} on {node}: {r.status_code} {r.text[:300]}")


# -- numbers --------------------------------------------------------------------------------------------------
def added_latency(key: str, nodes: list[Node], rounds: int = 30) -> tuple[float, float]:
    """Median time of the same small run straight to a node and through HAProxy, alternated."""
    direct: list[float] = []
    proxied: list[float] = []
    body = {"language": "python3", "code": "print(1)", "preload": "", "enable_network": False}
    clients = {n.name: dify_client(f"http://{n.ip}:{DIFY_PORT}", key) for n in nodes}
    with dify_client(f"http://{LB}:{DIFY_PORT}", key) as via:
        for i in range(rounds * len(nodes)):
            c = clients[nodes[i % len(nodes)].name]
            for client, into in ((c, direct), (via, proxied)) if i % 2 else ((via, proxied), (c, direct)):
                t = time.perf_counter()
                r = client.post("/v1/sandbox/run", json=body)
                into.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
    for c in clients.values():
        c.close()
    return statistics.median(direct) * 1000, statistics.median(proxied) * 1000


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("nodes", nargs="+", help="NAME=IP=LEADER_PID")
    args = p.parse_args()
    nodes = [Node(name, ip, int(pid)) for name, ip, pid in (n.split("=") for n in args.nodes)]
    with open(args.config, encoding="utf-8") as f:
        haproxy = HAProxy(args.work, render(f.read(), nodes, os.path.join(args.work, "haproxy.sock"), with_mcp=False))
    try:
        return scenario(haproxy, nodes, args.key)
    finally:
        haproxy.stop()


def scenario(haproxy: HAProxy, nodes: list[Node], key: str) -> int:
    names = [n.name for n in nodes]
    took = haproxy.wait("every node UP and ready", lambda st: all(serving(st[n]) for n in names))
    log(f"HAProxy: {len(nodes)} nodes up and weighted by their agents after {took:.1f} s")
    for how in ("", "quickack"):
        if how:
            # the HAProxy host's route to its clients (here: this namespace's own address) acknowledges at once
            subprocess.run(["ip", "route", "replace", "local", LB, "dev", "br0", "table", "local", "proto", "kernel",
                            "scope", "host", "src", LB, "quickack", "1"], check=True)
        direct, proxied = added_latency(key, nodes)
        log(f"a small run{' (route quickack 1)' if how else ''}: {direct:.1f} ms straight to a node, {proxied:.1f} ms "
            f"through HAProxy (+{proxied - direct:.1f} ms, medians of {30 * len(nodes)} each)")
    victim, drainee, upgraded = nodes
    killed: dict[str, Any] = {}
    quiet: dict[str, int] = {}
    numbers: dict[str, float] = {}

    def stot(name: str) -> int:
        return int(haproxy.stats()[name]["stot"])

    def kill() -> None:
        killed["name"] = victim.name
        killed["at"] = time.monotonic()
        pids = [in_node(victim, "systemctl", "show", "-p", "MainPID", "--value", unit).strip()
                for unit in ("sandboxd.service", "sandboxd-http.service")]
        in_node(victim, "kill", "-KILL", *pids)
        in_node(victim, "bash", "/root/node.sh", "ready", "180")
        numbers["kill_to_ready"] = time.monotonic() - killed["at"]
        haproxy.wait(f"{victim.name} UP again", lambda st: serving(st[victim.name]))
        killed["back"] = time.monotonic()
        numbers["kill_to_serving"] = killed["back"] - killed["at"]

    def drain() -> None:
        in_node(drainee, "sandboxctl", "drain", "--wait", "120s")
        haproxy.wait(f"{drainee.name} drained", lambda st: drained(st[drainee.name]))
        quiet[drainee.name] = stot(drainee.name)

    def undrain() -> None:
        quiet[drainee.name] -= stot(drainee.name)  # 0: nothing new came while drained
        in_node(drainee, "sandboxctl", "undrain")
        haproxy.wait(f"{drainee.name} serving again", lambda st: serving(st[drainee.name]))

    def upgrade() -> None:
        t = time.monotonic()
        in_node(upgraded, "sandboxctl", "drain", "--wait", "120s")
        haproxy.wait(f"{upgraded.name} drained", lambda st: drained(st[upgraded.name]))
        before = stot(upgraded.name)
        for line in in_node(upgraded, "bash", "/root/node.sh", "upgrade").splitlines():
            log(f"{upgraded.name} upgrade: {line}")
        quiet[upgraded.name] = stot(upgraded.name) - before
        in_node(upgraded, "sandboxctl", "undrain")
        haproxy.wait(f"{upgraded.name} serving after its upgrade", lambda st: serving(st[upgraded.name]))
        numbers["upgrade"] = time.monotonic() - t

    steps = [(100, 250, "kill", kill), (250, 330, "drain", drain), (330, 400, "undrain", undrain),
             (400, 560, "upgrade", upgrade)]
    dispenser = Dispenser(TOTAL, steps)
    tally = Tally()
    before = haproxy.stats()["BACKEND"]
    started = time.monotonic()
    with dify_client(f"http://{LB}:{DIFY_PORT}", key) as client:
        threads = [threading.Thread(target=load, args=(client, dispenser, tally, killed)) for _ in range(CONCURRENCY)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for t in dispenser.threads:
        t.join(600)
    seconds = time.monotonic() - started
    after = haproxy.stats()["BACKEND"]
    retried = sum(int(after[k] or 0) - int(before[k] or 0) for k in ("wretr", "wredis"))
    answered = sum(tally.answers.values())
    log(f"{answered} answered in {seconds:.0f} s: {dict(tally.answers)}; by node {dict(tally.by_node)}")
    log(f"{victim.name} killed (SIGKILL of sandboxd and sandboxd-http): ready again after "
        f"{numbers.get('kill_to_ready', 0):.1f} s, serving through HAProxy after "
        f"{numbers.get('kill_to_serving', 0):.1f} s")
    log(f"{upgraded.name} upgraded (drain, reinstall, restart, undrain) in {numbers.get('upgrade', 0):.1f} s")
    log(f"requests HAProxy sent to drained nodes: {quiet}")
    servers = haproxy.stats()
    log("per node (HAProxy): " + "; ".join(
        f"{n}: {servers[n]['stot']} sent, {int(servers[n]['wretr'] or 0)} retried, "
        f"{int(servers[n]['wredis'] or 0)} redispatched, {servers[n]['econ'] or 0} connect errors, "
        f"{servers[n]['hrsp_5xx'] or 0} 5xx" for n in names))
    kinds = Counter(d.split(": ", 1)[1].split(":")[0][:60] for d in tally.died)
    log(f"died in flight: {dict(kinds)}")
    problems = list(dispenser.failed)
    problems += [f"lost {x}" for x in tally.lost[:20]]
    problems += [f"{name} got {n} requests while drained" for name, n in quiet.items() if n]
    if set(quiet) != {drainee.name, upgraded.name}:
        problems.append(f"the drain windows were not both measured: {quiet}")
    if dispenser.next < TOTAL:
        problems.append(f"only {dispenser.next} of {TOTAL} requests were sent")
    print(f"fleet: {dispenser.next} requests, {answered} answered, lost {len(tally.lost)}, retried {retried}, "
          f"died-in-flight {len(tally.died)}", flush=True)
    for problem in problems:
        print(f"FAIL  {problem}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
