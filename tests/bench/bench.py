"""make bench: sandboxd against a spawn-per-request baseline, in one run, on this machine.

Prints a table and writes results (JSON) and a plot (PNG) to --out (default bench-out/).
Every ratio compares numbers measured in this same run.

    sandboxd            a real daemon over its socket (pool of pre-confined workers)
    spawn baseline      the dify-sandbox model, implemented here: per request fork, chroot
                        into the same root, setuid to a run uid, rlimits, no_new_privs, the
                        same syscall profile (as ERRNO, plus what exec needs), then a fresh
                        /usr/bin/python3 -I -S -c CODE
    bwrap               bubblewrap with every namespace and the same root, when installed
    sandboxd-http       the same daemon through the HTTP bridge (kept-alive connections, as an
                        unprivileged test user), against the socket in the same run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bridge import BridgeProcess  # noqa: E402
from harness import ENVS_BASE, DaemonProcess, configured_index, daemon_dir, ensure_test_users  # noqa: E402

from sandboxd.client import Client  # noqa: E402

PRINT1 = "print(1)"
BASELINE_UID = 879900  # outside every test daemon's run uids
NUMPY_CODE = "import numpy as np\nprint(int((np.arange(100000) ** 2).sum() % 97), np.linalg.det(np.eye(3)))"
# jail.warmup for numpy: first calls of its common machinery (not the measured code itself)
NUMPY_WARMUP = ("import numpy as np\na = np.ones((4, 4))\nnp.linalg.inv(a + np.eye(4))\nnp.linalg.det(a)\n"
                "(a * 2).sum()\n")
BENCH_CONFIG: dict[str, Any] = {
    "daemon": {"workers": 16, "queue": 512, "log_level": "warning"},  # over tests/harness.py's BASE_CONFIG
    "pool": {"min": 4, "max": 16},
    "quotas": {"default": {"concurrent": 128, "queued": 512, "runs_per_minute": 0, "cpu_seconds_per_hour": 0,
                           "max_output": "16M", "max_files_size": "16M", "sessions": 16}},
    "limits": {"output": "16M"},
    "network": {"dns": []},  # runs with network never get the host's resolvers (nothing here resolves names)
}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


def summary(lat: list[float], seconds: float) -> dict[str, float]:
    return {"n": len(lat), "p50_ms": pct(lat, 0.50) * 1e3, "p95_ms": pct(lat, 0.95) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3, "runs_per_s": len(lat) / seconds if seconds else 0.0}


# -- sandboxd ------------------------------------------------------------------------------------
def in_threads(client: Any, concurrency: int) -> float:
    """Run ``client`` in ``concurrency`` threads at once; the seconds until all are done."""
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def closed_loop(sock: str, concurrency: int, seconds: float, code: str = PRINT1, **kw: Any) -> dict[str, float]:
    """``concurrency`` clients, each sending the next request when the last answer arrives."""
    lat: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    def client() -> None:
        with Client(sock, timeout=120) as c:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = c.run(code, **kw)
                lat.append(time.perf_counter() - t)
                if r["status"] != "ok":
                    errors.append(r["status"])

    out = summary(lat, in_threads(client, concurrency))
    out["errors"] = len(errors)
    return out


def paced(sock: str, rate: float, count: int, code: str = PRINT1, **kw: Any) -> dict[str, float]:
    """One client at ``rate`` requests per second: the latency of a request that finds a warm pool."""
    lat: list[float] = []
    with Client(sock, timeout=120) as c:
        for _ in range(count):
            t = time.perf_counter()
            c.run(code, **kw)
            d = time.perf_counter() - t
            lat.append(d)
            time.sleep(max(0.0, 1 / rate - d))
    return summary(lat, 0)


def sessions(sock: str, quick: bool) -> dict[str, Any]:
    """session_exec of print(x) (paced, as print(1) is), PSS of idle sessions, first streamed byte."""
    out: dict[str, Any] = {}
    count = 60 if quick else 300
    with Client(sock, timeout=120) as c:
        with c.session() as s:
            s.exec("x = 1")
            lat = []
            for _ in range(count):
                t = time.perf_counter()
                r = s.exec("print(x)")
                lat.append(time.perf_counter() - t)
                assert r["stdout"] == b"1\n", r
                time.sleep(max(0.0, 1 / 50 - lat[-1]))
            out["exec_paced"] = summary(lat, 0)
        opened = [c.session() for _ in range(10)]
        for x in opened:
            x.exec("y = list(range(1000))")
        time.sleep(0.5)
        uids = {x["run_uid"] for x in c.sessions()}
        pss = sum(_pss_kb(pid) for pid in _pids_of_uids(uids)) / 1024
        out["idle_session_pss_mib"] = pss / len(opened)
        for x in opened:
            x.close()
        firsts, walls = [], []
        for _ in range(5 if quick else 15):
            seen: list[float] = []
            t = time.perf_counter()
            c.run("print('started')\nimport time\ntime.sleep(0.3)\nprint('done')", on_output=partial(_arrived, seen))
            walls.append(time.perf_counter() - t)
            firsts.append(seen[0] - t)
        out["first_byte"] = {"p50_ms": pct(firsts, 0.5) * 1e3, "run_p50_ms": pct(walls, 0.5) * 1e3}
    return out


def _arrived(seen: list[float], stream: str, data: bytes) -> None:
    seen.append(time.perf_counter())


def _pids_of_uids(uids: set[int]) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid in uids:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    except OSError:
        return 0


# -- sandboxd-http ----------------------------------------------------------------------------------
class HttpRunner:
    """POST /v1/sandbox/run over one kept-alive connection (http.client: head and body in one write)."""

    def __init__(self, port: int, key: str) -> None:
        import http.client

        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"X-Api-Key": key, "Content-Type": "application/json"}

    def run(self, code: str) -> str:
        body = json.dumps({"language": "python3", "code": code, "preload": "", "enable_network": False})
        self.conn.request("POST", "/v1/sandbox/run", body, self.headers)
        r = self.conn.getresponse()
        data = json.loads(r.read())
        if r.status != 200 or data["data"]["error"]:
            raise RuntimeError(f"HTTP {r.status}: {data}")
        return str(data["data"]["stdout"])

    def close(self) -> None:
        self.conn.close()


def http_paced(port: int, key: str, rate: float, count: int) -> dict[str, float]:
    lat: list[float] = []
    c = HttpRunner(port, key)
    try:
        for _ in range(count):
            t = time.perf_counter()
            c.run(PRINT1)
            d = time.perf_counter() - t
            lat.append(d)
            time.sleep(max(0.0, 1 / rate - d))
    finally:
        c.close()
    return summary(lat, 0)


def http_closed_loop(port: int, key: str, concurrency: int, seconds: float) -> dict[str, float]:
    lat: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    def client() -> None:
        c = HttpRunner(port, key)
        try:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    c.run(PRINT1)
                except RuntimeError as e:
                    errors.append(str(e))
                lat.append(time.perf_counter() - t)
        finally:
            c.close()

    out = summary(lat, in_threads(client, concurrency))
    out["errors"] = len(errors)
    return out


def http_versus_socket(sock: str, args: argparse.Namespace, row: Any) -> dict[str, Any]:
    """print(1) over sandboxd-http and over the socket, interleaved, on the same daemon."""
    out: dict[str, Any] = {}
    # The runs the socket side sends: the daemon's default memory and output (the bridge's own, 1G and
    # 8M, would hold 16 x 16M of answer budget and make runs wait for it at c=16).
    b = BridgeProcess(sock, {"MAX_WORKERS": "16", "MAX_REQUESTS": "512", "WORKER_TIMEOUT": "5",
                             "SANDBOXD_HTTP_MEMORY": "256M", "SANDBOXD_HTTP_MAX_OUTPUT": "1M"}).start()
    try:
        http_closed_loop(b.port, b.key or "", 4, 1.0)  # warm up the bridge's connections
        count = 300 if not args.quick else 100
        sock_paced, http_p = [], []
        for _ in range(3):  # interleaved, so that drift on the machine hits both alike
            sock_paced.append(paced(sock, rate=50, count=count // 3))
            http_p.append(http_paced(b.port, b.key or "", rate=50, count=count // 3))
        for name, runs in (("socket_paced", sock_paced), ("http_paced", http_p)):
            out[name] = {k: sorted(r[k] for r in runs)[1] for k in ("p50_ms", "p99_ms")}  # the median of 3
        out["socket_c16"] = closed_loop(sock, 16, args.seconds)
        out["http_c16"] = http_closed_loop(b.port, b.key or "", 16, args.seconds)
        out["added_p50_ms"] = out["http_paced"]["p50_ms"] - out["socket_paced"]["p50_ms"]
        out["throughput_c16_http_over_socket"] = out["http_c16"]["runs_per_s"] / out["socket_c16"]["runs_per_s"]
    finally:
        b.close()
    row("socket, paced 50/s, c=1: p50 / p99", f"{out['socket_paced']['p50_ms']:.2f} / "
        f"{out['socket_paced']['p99_ms']:.2f} ms")
    row("sandboxd-http, paced 50/s, c=1: p50 / p99", f"{out['http_paced']['p50_ms']:.2f} / "
        f"{out['http_paced']['p99_ms']:.2f} ms  (+{out['added_p50_ms']:.2f} ms at p50; target <= 1)")
    for key, name in (("socket_c16", "socket"), ("http_c16", "sandboxd-http")):
        r = out[key]
        row(f"{name}, closed loop, c=16: p50/p99, runs/s", f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms, "
            f"{r['runs_per_s']:.0f}/s" + (f"  ({r['errors']} errors)" if r["errors"] else ""))
    row("HEADLINE: runs/s c=16, sandboxd-http / socket",
        f"{out['throughput_c16_http_over_socket'] * 100:.0f} %  (target >= 90 %)")
    return out


# -- the spawn-per-request baseline ---------------------------------------------------------------
class SpawnBaseline:
    """Fresh interpreter per request: fork, chroot, setuid, rlimits, no_new_privs, seccomp, execve."""

    def __init__(self, root: str, uid: int) -> None:
        from sandboxd.jail.kernel import libc
        from sandboxd.jail.policy import profiles
        from sandboxd.jail.policy.seccomp import _backend

        sc = _backend()
        f = sc.SyscallFilter(sc.ERRNO(1))
        f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
        exec_needs = ("execve", "arch_prctl", "set_tid_address", "set_robust_list", "rseq", "prlimit64",
                      "access", "readlink", "ioctl", "socket", "connect", "sysinfo")
        for name in dict.fromkeys([*profiles.PYTHON_ALLOW, *profiles.RUNTIME_REQUIRED, *exec_needs]):
            try:
                f.add_rule(sc.ALLOW, name)
            except (RuntimeError, ValueError, OSError):
                pass
        for cmd in profiles.FCNTL_ALLOWED:  # fcntl is argument-checked, as in the jail's profile
            f.add_rule(sc.ALLOW, "fcntl", sc.Arg(1, sc.EQ, cmd))
        f.add_rule(sc.ERRNO(38), "clone3")
        f.add_rule(sc.ALLOW, "clone")
        r, w = os.pipe()
        with os.fdopen(w, "wb") as wf:
            f.export_bpf(wf)
        self.bpf = b""
        while chunk := os.read(r, 65536):
            self.bpf += chunk
        os.close(r)
        self.root, self.uid, self.libc = root, uid, libc

    def run_one(self, code: str) -> float:
        out_r, out_w = os.pipe()
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(out_w, 1)
                os.closerange(3, 1 << 16)
                os.chroot(self.root)
                os.chdir("/tmp")
                os.setgroups([])
                os.setresgid(self.uid, self.uid, self.uid)
                os.setresuid(self.uid, self.uid, self.uid)
                import resource

                resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
                resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
                self.libc.prctl(self.libc.PR_SET_NO_NEW_PRIVS, 1)
                self.libc.seccomp_load(self.bpf, new_listener=False)
                os.execve("/usr/bin/python3", ["python3", "-I", "-S", "-c", code],
                          {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            finally:
                os._exit(127)
        os.close(out_w)
        data = b""
        while chunk := os.read(out_r, 65536):
            data += chunk
        os.close(out_r)
        _, st = os.waitpid(pid, 0)
        d = time.perf_counter() - t
        if st != 0 or not data:
            raise RuntimeError(f"baseline run failed: status {st}")
        return d


def baseline_closed_loop(base: SpawnBaseline, concurrency: int, seconds: float) -> dict[str, float]:
    """The baseline at ``concurrency``: forks from one single-threaded loop (no forking from threads)."""

    async def go() -> list[float]:
        lat: list[float] = []
        stop = time.perf_counter() + seconds
        loop = asyncio.get_running_loop()

        async def client() -> None:
            while time.perf_counter() < stop:
                done: asyncio.Future[bytes] = loop.create_future()
                t = time.perf_counter()
                pid_r, pid_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(pid_r)
                    try:
                        base.run_one(PRINT1)
                        os.write(pid_w, b"ok")
                    finally:
                        os._exit(0)
                os.close(pid_w)

                def readable(fd: int = pid_r, fut: asyncio.Future[bytes] = done) -> None:
                    if not fut.done():
                        fut.set_result(os.read(fd, 8))

                loop.add_reader(pid_r, readable)
                await done
                loop.remove_reader(pid_r)
                os.close(pid_r)
                os.waitpid(pid, 0)
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return lat

    t0 = time.perf_counter()
    lat = asyncio.run(go())
    return summary(lat, time.perf_counter() - t0)


def bwrap_one(root: str, argv: tuple[str, ...] = ("/usr/bin/python3", "-I", "-S", "-c", PRINT1)) -> float:
    t = time.perf_counter()
    subprocess.run(["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", root, "/",
                    "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/tmp", *argv], check=True, capture_output=True)
    return time.perf_counter() - t


NODE_PRINT1 = "console.log(1)"


def runtimes_and_network(d: DaemonProcess, root: str, quick: bool, row: Any) -> dict[str, Any]:
    """Node.js warm runs against bwrap + a fresh node in the same root, the cost of a Node worker;
    what network costs a run and a worker; a 1 MiB download through the policy."""
    sock = d.socket
    out: dict[str, Any] = {}
    n = 40 if quick else 120
    seconds = 2.0 if quick else 5.0
    with Client(sock, timeout=60) as c:
        node_ok = c.run(NODE_PRINT1, language="nodejs").ok
        net_ok = c.run(PRINT1, network=True).ok
    if node_ok:
        # Paced slowly enough that the pool refills between runs: a warm worker's latency.
        out["node_paced"] = paced(sock, 5, n // 2, NODE_PRINT1, language="nodejs")
        row("nodejs console.log(1), warm (paced 5/s): p50 / p99", f"{out['node_paced']['p50_ms']:.2f} / "
            f"{out['node_paced']['p99_ms']:.2f} ms")
        out["node_c4"] = closed_loop(sock, 4, seconds, NODE_PRINT1, language="nodejs")
        cpu_ms = 2000 / max(out["node_c4"]["runs_per_s"], 1e-9)  # two cores busy: CPU per run and its worker
        out["node_cpu_per_run_ms"] = cpu_ms
        row("nodejs closed loop c=4: runs/s (CPU per run + worker)", f"{out['node_c4']['runs_per_s']:.0f}/s "
            f"(<= {cpu_ms:.0f} ms of CPU each: node's start in a new worker)")
        time.sleep(2)
        pss = [(_pss_kb(pid), pid) for pid in _node_pids(d)]
        if pss:
            out["node_idle_pss_mib"] = sum(k for k, _ in pss) / 1024 / len(pss)
            row("PSS per idle Node worker (its node process)", f"{out['node_idle_pss_mib']:.1f} MiB "
                f"({len(pss)} pooled)")
        if shutil.which("bwrap") and os.path.exists(os.path.join(root, "usr/bin/node")):
            argv = ("/usr/bin/node", "-e", NODE_PRINT1)
            bwrap_one(root, argv)
            lat = [bwrap_one(root, argv) for _ in range(20 if quick else 40)]
            out["bwrap_node_c1"] = summary(lat, sum(lat))
            ratio = out["bwrap_node_c1"]["p50_ms"] / out["node_paced"]["p50_ms"]
            row("bwrap + fresh node, c=1: p50", f"{out['bwrap_node_c1']['p50_ms']:.2f} ms "
                f"({ratio:.1f}x sandboxd's warm node; target >= 10x)")
            out["node_ratio_bwrap_over_sandboxd"] = ratio
    if net_ok:
        out["network_paced"] = paced(sock, 50, n, PRINT1, network=True)
        row("print(1) with network (own netns, veth, policy): p50", f"{out['network_paced']['p50_ms']:.2f} ms")
        out["plain_c4"] = closed_loop(sock, 4, seconds)
        out["network_c4"] = closed_loop(sock, 4, seconds, network=True)
        plain, net = out["plain_c4"]["runs_per_s"], out["network_c4"]["runs_per_s"]
        out["network_worker_extra_ms"] = 2000 / max(net, 1e-9) - 2000 / max(plain, 1e-9)
        row("closed loop c=4, plain / network: runs/s", f"{plain:.0f} / {net:.0f}/s (a network worker costs "
            f"~{out['network_worker_extra_ms']:.1f} ms more CPU)")
        out["download"] = download_through_policy(sock, row)
    return out


def _node_pids(d: DaemonProcess) -> list[int]:
    """This daemon's node processes (its Node workers), not those of any other daemon."""
    pids = []
    for pid, _uid in d.run_uid_processes():
        try:
            with open(f"/proc/{pid}/comm", encoding="ascii") as f:
                if f.read().strip() == "node":
                    pids.append(pid)
        except OSError:
            pass
    return pids


DOWNLOAD = """import time, urllib.request
t = time.perf_counter()
n = len(urllib.request.urlopen("http://{host}/1m", timeout=20).read())
print(n, time.perf_counter() - t)
"""


def download_through_policy(sock: str, row: Any) -> dict[str, float] | None:
    """1 MiB from the test internet's public host (tests/netlab.py: a namespace of its own on this
    machine), from a run through the policy and from the host itself."""
    import http.client

    from netlab import PUBLIC, Lab

    lab = Lab()
    try:
        lab.__enter__()  # it takes down whatever it made if it fails
    except Exception as e:  # noqa: BLE001 - the bench goes on without this row
        print(f"  skipped the download: no test internet ({e})")
        return None
    runs, host = [], []
    try:
        with Client(sock, timeout=60) as c:
            for _ in range(5):
                r = c.run(DOWNLOAD.format(host=PUBLIC), network=True, timeout_ms=30000)
                size, secs = r.text.split()
                assert int(size) == 1 << 20, r
                runs.append(float(secs))
                t = time.perf_counter()
                conn = http.client.HTTPConnection(PUBLIC, 80, timeout=20)  # straight there: no proxy applies
                conn.request("GET", "/1m")
                assert len(conn.getresponse().read()) == 1 << 20
                conn.close()
                host.append(time.perf_counter() - t)
    finally:
        lab.__exit__(None, None, None)
    out = {"run_mib_s": 1 / pct(runs, 0.5), "host_mib_s": 1 / pct(host, 0.5)}
    row("1 MiB download, run (policy) / host: MiB/s", f"{out['run_mib_s']:.0f} / {out['host_mib_s']:.0f}")
    return out


def bwrap_closed_loop(root: str, concurrency: int, seconds: float) -> dict[str, float]:
    """bwrap + a fresh python3 at ``concurrency`` clients, each starting the next as one ends
    (subprocess's fork+exec happens in C, straight into exec: safe from these threads)."""
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < stop:
            lat.append(bwrap_one(root))

    return summary(lat, in_threads(client, concurrency))


# -- memory -----------------------------------------------------------------------------------------
def memory(daemon_pid: int) -> dict[str, float]:
    """RSS and PSS (MiB) of the daemon, its fork server, and every pooled worker (their descendants)."""
    def tree(pid: int) -> list[int]:
        out = [pid]
        try:
            with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
                children = f.read().split()
        except OSError:
            return out
        for child in children:
            out += tree(int(child))
        return out

    def rollup(pid: int) -> tuple[int, int]:
        rss = pss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss = int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss = int(line.split()[1])
        except OSError:
            pass
        return rss, pss

    pids = tree(daemon_pid)
    d_rss, d_pss = rollup(daemon_pid)
    fs_rss = fs_pss = w_rss = w_pss = 0
    children = [p for p in pids if p != daemon_pid]
    fs = children[0] if children else None
    for p in children:
        rss, pss = rollup(p)
        if p == fs:
            fs_rss, fs_pss = rss, pss
        else:
            w_rss, w_pss = w_rss + rss, w_pss + pss
    mib = 1024.0
    return {"daemon_rss": d_rss / mib, "daemon_pss": d_pss / mib, "forkserver_rss": fs_rss / mib,
            "forkserver_pss": fs_pss / mib, "pool_rss": w_rss / mib, "pool_pss": w_pss / mib,
            "pool_processes": len([p for p in children if p != fs]), "total_pss": (d_pss + fs_pss + w_pss) / mib}


# -- the run ------------------------------------------------------------------------------------------
def extra_lib_paths(n: int) -> list[str]:
    """``n`` real package directories, as a user would add site-packages trees."""
    top = "/usr/lib/python3/dist-packages"
    dirs = sorted(e.path for e in os.scandir(top) if e.is_dir() and not e.name.endswith((".dist-info", ".egg-info"))
                  and e.name != "__pycache__") if os.path.isdir(top) else []
    return dirs[:n]


def root_builds(work: str) -> dict[str, Any]:
    """Cold build (hard links on the same filesystem, copies across), warm start, and
    both with 20 extra library paths.  Each build goes into a fresh base directory."""
    from sandboxd.config import jail_settings, parse
    from sandboxd.jail.root import contents, rootfs

    out: dict[str, Any] = {}
    extra = extra_lib_paths(20)
    linking = {"hard_links": True}  # without it (the default) the root is copied, never linked
    cases = [("default, hard links", {"root": linking}, work), ("default, copies (the default)", {}, work),
             ("default, copies into tmpfs", {}, "/dev/shm"),
             (f"{len(extra)} extra paths, hard links", {"root": {"extra_paths": extra, **linking}}, work)]
    for name, raw, fs in cases:
        spec = contents.root_spec(jail_settings(parse(raw), work))
        base = tempfile.mkdtemp(prefix="sandboxd-bench-root-", dir=fs)
        try:
            cold, warm = [], []
            for _ in range(3):
                shutil.rmtree(base)
                os.mkdir(base)
                t0 = time.perf_counter()
                info = rootfs.ensure_root(spec, base)
                cold.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                again = rootfs.ensure_root(spec, base)
                warm.append(time.perf_counter() - t0)
                assert again.reused
            out[name] = {"cold_s": min(cold), "warm_s": min(warm), "files": info.files,
                         "libraries": info.libraries, "linked": info.linked, "copied": info.copied}
        finally:
            shutil.rmtree(base, ignore_errors=True)
    return out


def _env_ready(d: DaemonProcess, timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    with d.client() as c:
        while True:
            envs = {e["name"]: e for e in c.call("environments")["environments"]}
            if all(e["state"] in ("ready", "failed") for e in envs.values()):
                return envs
            if time.monotonic() > deadline:
                raise TimeoutError(f"environments not ready after {timeout:.0f}s: {envs}")
            time.sleep(0.2)


def environments(quick: bool, row: Any) -> dict[str, Any] | None:
    """numpy + pandas from the host's configured local index, built by the daemon: the cold
    build, a restart that reuses it, and runs importing them with and without preload."""
    index = configured_index()
    if index is None:
        print("  skipped: no local package index is configured for pip on this host")
        return None
    os.makedirs(ENVS_BASE, mode=0o755, exist_ok=True)
    envs_dir = tempfile.mkdtemp(prefix="bench-envs-", dir=ENVS_BASE)
    os.chmod(envs_dir, 0o755)
    req = {"requirements": ["numpy", "pandas"], "index_url": index}
    cfg = {**BENCH_CONFIG, "daemon": {**BENCH_CONFIG["daemon"], "environments_dir": envs_dir},
           "pool": {"min": 2, "max": 4},
           "environments": {"default": {**req, "preload": ["numpy", "pandas"]}, "plain": req}}
    out: dict[str, Any] = {}
    work = daemon_dir()
    try:
        t0 = time.perf_counter()
        d = DaemonProcess(work, cfg).start()
        try:
            envs = _env_ready(d, 900)
            out["cold_both_s"] = time.perf_counter() - t0
            for name, e in envs.items():
                assert e["state"] == "ready", e
                out[name] = {"build_s": e["build_seconds"], "size_mib": (e["size_bytes"] or 0) / 2**20,
                             "packages": len(e["packages"])}
            n = 60 if not quick else 15
            code = "import numpy, pandas\nprint(pandas.DataFrame({'a': numpy.arange(10)}).a.sum())"
            with d.client() as c:
                for env in ("default", "plain"):
                    r = c.run(code, environment=env, timeout_ms=30000)
                    assert (r["status"], r["stdout"]) == ("ok", b"45\n"), r
            out["print1"] = paced(d.socket, 20, n)
            out["import_preload"] = paced(d.socket, 20, n, code)
            out["import_no_preload"] = paced(d.socket, 20, n, code, environment="plain")
        finally:
            d.close()
        t0 = time.perf_counter()
        d = DaemonProcess(work, cfg).start()
        try:
            _env_ready(d, 120)
            out["warm_start_s"] = time.perf_counter() - t0
        finally:
            d.close()
    finally:
        shutil.rmtree(envs_dir, ignore_errors=True)
    e = out["default"]
    row("environment numpy+pandas: cold build (pip, jail, root)",
        f"{e['build_s']:.1f} s ({e['packages']} packages, {e['size_mib']:.0f} MiB)")
    row("daemon start that reuses both builds, to ready", f"{out['warm_start_s']:.2f} s")
    p1 = out["print1"]["p50_ms"]
    for key, label in (("import_preload", "with"), ("import_no_preload", "without")):
        row(f"import numpy, pandas {label} preload: p50", f"{out[key]['p50_ms']:.2f} ms "
            f"({out[key]['p50_ms'] / p1:.2f}x print(1)'s {p1:.2f} ms)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench-out"))
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each closed-loop measurement")
    ap.add_argument("--soak-runs", type=int, default=10000, help="runs between the two memory readings")
    ap.add_argument("--quick", action="store_true", help="shorter everything (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.soak_runs = 2.0, 500
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    remove_users = ensure_test_users()  # sandboxd-http runs as one of them
    try:
        return measure(args, results)
    finally:
        remove_users()  # also when a measurement fails or is interrupted


def measure(args: argparse.Namespace, results: dict[str, Any]) -> int:
    def row(name: str, value: str) -> None:
        print(f"  {name:48s} {value}", flush=True)

    print("sandboxd benchmark (ratios compare numbers from this same run)")
    print("root build (best of 3)")
    results["root"] = root_builds(args.out)
    for name, r in results["root"].items():
        row(f"root, {name}: cold / warm", f"{r['cold_s']:.3f} / {r['warm_s']:.3f} s  ({r['files']} files, "
            f"{r['libraries']} libraries, {r['linked']} linked, {r['copied']} copied)")
    d = DaemonProcess(daemon_dir(), BENCH_CONFIG).start()
    try:
        sock = d.socket
        closed_loop(sock, 4, 2.0)  # warm up: pool targets, page cache
        with d.client() as client:
            st = client.status()
        root = st["root"]["path"]
        results["setup_us"] = st["pool"]["setup_us"]
        results["memory_idle"] = memory(d.proc.pid)  # type: ignore[union-attr]

        print("print(1) through the socket")
        results["paced_c1"] = paced(sock, rate=50, count=300 if not args.quick else 60)
        row("sandboxd, paced 50/s, c=1: p50 / p99", f"{results['paced_c1']['p50_ms']:.2f} / "
            f"{results['paced_c1']['p99_ms']:.2f} ms")
        results["sandboxd"] = {}
        for c in (1, 4, 8, 16, 64):
            s = closed_loop(sock, c, args.seconds)
            results["sandboxd"][c] = s
            row(f"sandboxd, closed loop, c={c}: p50/p95/p99, runs/s",
                f"{s['p50_ms']:.1f} / {s['p95_ms']:.1f} / {s['p99_ms']:.1f} ms, {s['runs_per_s']:.0f}/s"
                + (f"  ({s['errors']} errors)" if s["errors"] else ""))

        print("runtimes and network")
        results["runtimes"] = runtimes_and_network(d, root, args.quick, row)
        if "network_paced" in results["runtimes"]:
            cost = results["runtimes"]["network_paced"]["p50_ms"] / results["paced_c1"]["p50_ms"]
            row("  network cost over a plain run's p50", f"{cost:.2f}x")

        print("sessions")
        results["sessions"] = sessions(sock, args.quick)
        se = results["sessions"]
        exec_ratio = se["exec_paced"]["p50_ms"] / results["paced_c1"]["p50_ms"]
        row("session_exec print(x), paced 50/s: p50 / p99", f"{se['exec_paced']['p50_ms']:.2f} / "
            f"{se['exec_paced']['p99_ms']:.2f} ms  ({exec_ratio:.2f}x a run's p50; target <= 0.4x)")
        row("idle session PSS (10 open)", f"{se['idle_session_pss_mib']:.1f} MiB each")
        row("first streamed byte of a run that prints, then sleeps 0.3 s", f"{se['first_byte']['p50_ms']:.1f} ms "
            f"(the whole run: {se['first_byte']['run_p50_ms']:.0f} ms)")
        results["ratios_sessions"] = {"exec_p50_over_run_p50": exec_ratio}

        print("print(1) through sandboxd-http (HTTP, kept-alive) against the socket, same daemon")
        results["http"] = http_versus_socket(sock, args, row)

        print("spawn-per-request baseline (same root, chroot + setuid + seccomp + fresh python3)")
        base = SpawnBaseline(root, uid=BASELINE_UID)
        base.run_one(PRINT1)
        lat = [base.run_one(PRINT1) for _ in range(60 if not args.quick else 20)]
        results["baseline_c1"] = summary(lat, sum(lat))
        row("baseline, c=1: p50 / p99", f"{results['baseline_c1']['p50_ms']:.2f} / "
            f"{results['baseline_c1']['p99_ms']:.2f} ms")
        for c in (8, 16):
            results[f"baseline_c{c}"] = baseline_closed_loop(base, c, args.seconds)
            row(f"baseline, closed loop, c={c}: p50, runs/s", f"{results[f'baseline_c{c}']['p50_ms']:.1f} ms, "
                f"{results[f'baseline_c{c}']['runs_per_s']:.0f}/s")
        if shutil.which("bwrap"):
            bwrap_one(root)
            lat = [bwrap_one(root) for _ in range(40 if not args.quick else 10)]
            results["bwrap_c1"] = summary(lat, sum(lat))
            row("bwrap (all namespaces), c=1: p50", f"{results['bwrap_c1']['p50_ms']:.2f} ms")
            for c in (8, 16):
                results[f"bwrap_c{c}"] = bwrap_closed_loop(root, c, args.seconds)
                row(f"bwrap, closed loop, c={c}: p50, runs/s", f"{results[f'bwrap_c{c}']['p50_ms']:.1f} ms, "
                    f"{results[f'bwrap_c{c}']['runs_per_s']:.0f}/s")
        ratio = results["baseline_c1"]["p50_ms"] / results["paced_c1"]["p50_ms"]
        results["ratios"] = {"p50_c1_baseline_over_sandboxd": ratio}
        for c in (8, 16):
            tput = results["sandboxd"][c]["runs_per_s"] / results[f"baseline_c{c}"]["runs_per_s"]
            results["ratios"][f"throughput_c{c}_sandboxd_over_baseline"] = tput
            row(f"HEADLINE: runs/s c={c}, sandboxd / baseline", f"{tput:.1f}x (target >= 2.5x)")
        row("HEADLINE: p50 c=1, baseline / sandboxd", f"{ratio:.1f}x lower with sandboxd")
        http = results["http"]
        results["ratios"]["p50_c1_baseline_over_http"] = results["baseline_c1"]["p50_ms"] / http["http_paced"]["p50_ms"]
        results["ratios"]["throughput_c16_http_over_baseline"] = (http["http_c16"]["runs_per_s"]
                                                                  / results["baseline_c16"]["runs_per_s"])
        row("p50 c=1, baseline / sandboxd-http", f"{results['ratios']['p50_c1_baseline_over_http']:.1f}x lower "
            "through HTTP")
        row("runs/s c=16, sandboxd-http / baseline", f"{results['ratios']['throughput_c16_http_over_baseline']:.1f}x")
        if "bwrap_c1" in results:
            bw_ratio = results["bwrap_c1"]["p50_ms"] / results["paced_c1"]["p50_ms"]
            results["ratios"]["p50_c1_bwrap_over_sandboxd"] = bw_ratio
            row("HEADLINE: p50 c=1, bwrap / sandboxd", f"{bw_ratio:.1f}x (target >= 6x)")
            for c in (8, 16):
                bw_tput = results["sandboxd"][c]["runs_per_s"] / results[f"bwrap_c{c}"]["runs_per_s"]
                results["ratios"][f"throughput_c{c}_sandboxd_over_bwrap"] = bw_tput
                row(f"HEADLINE: runs/s c={c}, sandboxd / bwrap", f"{bw_tput:.1f}x (target >= 2x)")

        print("output and code size (c=1)")
        results["output_size"] = {}
        for size in (1 << 10, 100 << 10, 1 << 20, 10 << 20):
            s = paced(sock, 20, 15 if not args.quick else 5, f"import sys; sys.stdout.write('x' * {size})",
                      max_output=16 << 20)
            results["output_size"][size] = s
            row(f"output {size >> 10} KiB: p50", f"{s['p50_ms']:.2f} ms")
        results["code_size"] = {}
        for size in (1 << 10, 10 << 10, 100 << 10, 1 << 20):
            code = f"s = '{'x' * (size - 40)}'\nprint(len(s))"
            s = paced(sock, 20, 15 if not args.quick else 5, code)
            results["code_size"][size] = s
            row(f"code {size >> 10} KiB: p50", f"{s['p50_ms']:.2f} ms")

        print(f"memory over {args.soak_runs} runs")
        idle = results["memory_idle"]
        row("idle: daemon / fork server / pool PSS", f"{idle['daemon_pss']:.1f} / {idle['forkserver_pss']:.1f} / "
            f"{idle['pool_pss']:.1f} MiB ({idle['pool_processes']} pool processes)")
        closed_loop(sock, 1, 1.0)
        before = memory(d.proc.pid)  # type: ignore[union-attr]
        results["memory_before_soak"] = before
        done = 0
        t0 = time.perf_counter()
        while done < args.soak_runs:
            s = closed_loop(sock, 16, 2.0)
            done += int(s["n"])
        results["soak"] = {"runs": done, "seconds": time.perf_counter() - t0}
        time.sleep(3)
        closed_loop(sock, 1, 1.0)
        time.sleep(2)
        after = memory(d.proc.pid)  # type: ignore[union-attr]
        results["memory_after"] = after
        row(f"after {done} runs: daemon / fork server / pool PSS",
            f"{after['daemon_pss']:.1f} / {after['forkserver_pss']:.1f} / {after['pool_pss']:.1f} MiB")
        row(f"daemon RSS growth over those {done} runs", f"{after['daemon_rss'] - before['daemon_rss']:+.1f} MiB "
            f"({before['daemon_rss']:.1f} -> {after['daemon_rss']:.1f}; idle at start {idle['daemon_rss']:.1f})")
    finally:
        d.close()

    print("numpy (Debian's python3-numpy in the root)")
    numpy_dir = "/usr/lib/python3/dist-packages/numpy"
    if os.path.isdir(numpy_dir):
        results["numpy"] = {}
        for name, jail in (("no_preload", {}), ("preload", {"preload": ["numpy"]}),
                           ("preload_warmup", {"preload": ["numpy"], "warmup": NUMPY_WARMUP})):
            cfg = {**BENCH_CONFIG, "jail": jail, "pool": {"min": 2, "max": 4},
                   "root": {"extra_paths": [numpy_dir], "python_path": ["/usr/lib/python3/dist-packages"]}}
            nd = DaemonProcess(daemon_dir(), cfg).start()
            try:
                with nd.client() as client:
                    r = client.run(NUMPY_CODE)
                assert r["status"] == "ok", r
                s = paced(nd.socket, 20, 60 if not args.quick else 15, NUMPY_CODE)
                s["print1_p50_ms"] = paced(nd.socket, 20, 60 if not args.quick else 15)["p50_ms"]  # same daemon
            finally:
                nd.close()
            results["numpy"][name] = s
            row(f"numpy run, {name.replace('_', ' + ').replace('no + ', 'no ')}: p50",
                f"{s['p50_ms']:.2f} ms ({s['p50_ms'] / s['print1_p50_ms']:.2f}x print(1) on that daemon, "
                f"{s['print1_p50_ms']:.2f} ms)")
    else:
        print("  skipped: python3-numpy is not installed")

    print("environments (built by the daemon from the host's local package index)")
    envs = environments(args.quick, row)
    if envs is not None:
        results["environments"] = envs

    print("targets (ratios from this run)")
    results["targets"] = targets(results)
    for name, (value, goal, met) in results["targets"].items():
        row(name, f"{value} (target {goal}): {'met' if met else 'MISSED'}")
    with open(os.path.join(args.out, "bench.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    plot(results, os.path.join(args.out, "bench.png"))
    print(f"\nresults: {args.out}/bench.json, plot: {args.out}/bench.png")
    return 0


def targets(r: dict[str, Any]) -> dict[str, tuple[str, str, bool]]:
    """Every target of the issues that make bench checks: (measured, target, met)."""
    out: dict[str, tuple[str, str, bool]] = {}

    def at_least(name: str, value: float | None, goal: float, unit: str = "x") -> None:
        if value is not None:
            out[name] = (f"{value:.2f}{unit}", f">= {goal:g}{unit}", value >= goal)

    def at_most(name: str, value: float | None, goal: float, unit: str = "x") -> None:
        if value is not None:
            out[name] = (f"{value:.2f}{unit}", f"<= {goal:g}{unit}", value <= goal)

    ratios = r.get("ratios", {})
    at_least("print(1) p50 c=1, bwrap / sandboxd", ratios.get("p50_c1_bwrap_over_sandboxd"), 6)
    for c in (8, 16):
        at_least(f"runs/s c={c}, sandboxd / bwrap", ratios.get(f"throughput_c{c}_sandboxd_over_bwrap"), 2)
        at_least(f"runs/s c={c}, sandboxd / spawn baseline", ratios.get(f"throughput_c{c}_sandboxd_over_baseline"),
                 2.5)
    numpy = r.get("numpy", {})
    best = min((numpy[k]["p50_ms"] / numpy[k]["print1_p50_ms"] for k in ("preload", "preload_warmup") if k in numpy),
               default=None)
    at_most("numpy with preload (best), p50 / print(1) p50", best, 1.3)
    rt = r.get("runtimes", {})
    at_least("node: bwrap + fresh node / warm node, p50", rt.get("node_ratio_bwrap_over_sandboxd"), 10)
    at_most("session_exec p50 / run p50", r.get("ratios_sessions", {}).get("exec_p50_over_run_p50"), 0.4)
    http = r.get("http", {})
    at_most("sandboxd-http added p50", http.get("added_p50_ms"), 1.0, " ms")
    if "throughput_c16_http_over_socket" in http:
        at_least("sandboxd-http runs/s c=16 / socket", 100 * http["throughput_c16_http_over_socket"], 90, " %")
    if "memory_after" in r and "memory_before_soak" in r:
        growth = r["memory_after"]["daemon_rss"] - r["memory_before_soak"]["daemon_rss"]
        at_most(f"daemon RSS growth over {r['soak']['runs']} runs", growth, 1.0, " MiB")
    if "memory_idle" in r:
        at_most("idle daemon RSS", r["memory_idle"]["daemon_rss"], 40, " MB")
    return out


def plot(results: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no plot: matplotlib is not installed)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    conc = sorted(results["sandboxd"], key=int)
    ax = axes[0]
    for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
        ax.plot([int(c) for c in conc], [results["sandboxd"][c][key] for c in conc], marker="o",
                label=f"sandboxd {label}")
    ax.axhline(results["baseline_c1"]["p50_ms"], color="red", linestyle="--", label="spawn baseline p50 (c=1)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("latency of print(1), ms")
    ax.set_title("round trip through the socket")
    ax.legend(fontsize=8)
    ax = axes[1]
    names = ["sandboxd\n(paced)", "spawn\nbaseline"] + (["bwrap"] if "bwrap_c1" in results else [])
    vals = [results["paced_c1"]["p50_ms"], results["baseline_c1"]["p50_ms"]] + (
        [results["bwrap_c1"]["p50_ms"]] if "bwrap_c1" in results else [])
    ax.bar(names, vals, color=["tab:green", "tab:red", "tab:orange"][: len(vals)])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("p50 ms, concurrency 1")
    ax.set_title("print(1): pre-confined worker vs fresh interpreter")
    ax = axes[2]
    sizes = sorted(results["output_size"], key=int)
    ax.plot([int(s) / 1024 for s in sizes], [results["output_size"][s]["p50_ms"] for s in sizes], marker="o",
            label="output size")
    csizes = sorted(results["code_size"], key=int)
    ax.plot([int(s) / 1024 for s in csizes], [results["code_size"][s]["p50_ms"] for s in csizes], marker="s",
            label="code size")
    ax.set_xscale("log")
    ax.set_xlabel("KiB")
    ax.set_ylabel("p50 ms")
    ax.set_title("size of output and of code")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
