"""Runs with network: their own namespace, a policed way out, never the host (THREATS 23).

Every address these tests send to is on this machine: loopback, the host's own
addresses, or hosts in the test's own network namespace (``netlab``).  Never a real
resolver, never the uplink.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import ipaddress
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import require
from harness import DaemonProcess, wait_until
from netlab import HOST_SIDE, METADATA, ONE_MIB, PRIVATE, PUBLIC, Lab

from sandboxd.jail.net.firewall import names

NET = {"network": {"dns": [PUBLIC]}}
FETCH = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1] if len(sys.argv) > 1 else URL, timeout=3).read().decode().strip())
except Exception as e:
    print("failed", type(e).__name__, getattr(e, "reason", e))
"""
CONNECT = """
import socket, time
out = []
for family, host, port in TARGETS:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    t = time.monotonic()
    try:
        s.connect((host, port))
        out.append((host, "connected"))
    except OSError as e:
        out.append((host, f"{type(e).__name__} {e.errno} {time.monotonic() - t:.1f}s"))
    s.close()
print(out)
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require(os.geteuid() == 0, "needs root (network namespaces)")
    require(subprocess.run(["which", "dnsmasq"], capture_output=True).returncode == 0, "dnsmasq is missing")
    with Lab() as it:
        yield it


@pytest.fixture
def netd(make_daemon: Any, lab: Lab) -> DaemonProcess:
    d: DaemonProcess = make_daemon(NET)
    return d


def prefix_of(d: DaemonProcess) -> tuple[str, str]:
    return names(d.config["network"]["pool"])


def interfaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if f": {prefix}" in line]


def tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout


class Listener:
    """A TCP listener on a host address; counts who got through."""

    def __init__(self, family: int, host: str) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()
            except OSError:
                continue

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.sock.close()


def uplink_address() -> str:
    """The host's address on its default route (a listener there is the host's own)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((HOST_SIDE, 9))  # no packet is sent for a UDP connect; this only picks the source
        return str(s.getsockname()[0])
    finally:
        s.close()


def host_ipv6_addresses() -> list[str]:
    out = subprocess.run(["ip", "-6", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


# -- what a run with network reaches ------------------------------------------------------
def test_a_run_reaches_a_public_host_by_address_and_by_name(netd: DaemonProcess) -> None:
    r = netd.run(FETCH.replace("URL", repr(f"http://{PUBLIC}/")), network=True)
    assert r["status"] == "ok" and r["stdout"] == f"hello from {PUBLIC}\n".encode(), r
    r = netd.run(FETCH.replace("URL", repr("http://test.example/")), network=True)
    assert r["stdout"] == f"hello from {PUBLIC}\n".encode(), r  # resolved by the test's resolver
    assert r["network"]["bytes_out"] > 0 and r["network"]["packets_in"] > 0
    r = netd.run("print(open('/etc/resolv.conf').read())", network=True)
    assert f"nameserver {PUBLIC}".encode() in r["stdout"]


def test_a_run_reaches_nothing_of_the_host_or_private_networks(netd: DaemonProcess) -> None:
    listeners = [Listener(socket.AF_INET, "127.0.0.1"), Listener(socket.AF_INET, HOST_SIDE),
                 Listener(socket.AF_INET, uplink_address())]
    v6 = [a for a in host_ipv6_addresses() if ipaddress.ip_address(a).is_private]
    listeners += [Listener(socket.AF_INET6, "::1")] + [Listener(socket.AF_INET6, a) for a in v6[:1]]
    try:
        targets = [(socket.AF_INET, "127.0.0.1", listeners[0].port), (socket.AF_INET, HOST_SIDE, listeners[1].port),
                   (socket.AF_INET, listeners[2].sock.getsockname()[0], listeners[2].port),
                   (socket.AF_INET, PRIVATE, 80), (socket.AF_INET, METADATA, 80),
                   (socket.AF_INET6, "::1", listeners[3].port)]
        targets += [(socket.AF_INET6, a, lst.port) for a, lst in zip(v6[:1], listeners[4:], strict=True)]
        code = CONNECT.replace("TARGETS", repr([(int(f), h, p) for f, h, p in targets]))
        r = netd.run(code, network=True, timeout_ms=20000)
        results = dict(eval(r["stdout"]))
        assert not [h for h, v in results.items() if v == "connected"], results
        # Refused at once by the policy (or unreachable), not left to time out.
        assert all(float(v.rsplit(" ", 1)[1][:-1]) < 1.5 for v in results.values()), results
        assert sum(lst.accepted for lst in listeners) == 0
    finally:
        for lst in listeners:
            lst.close()
    # DNS rebinding gains nothing: the name resolves, the private address stays closed.
    r = netd.run(FETCH.replace("URL", repr("http://private.example/")), network=True)
    assert r["stdout"].startswith(b"failed"), r


def test_network_allow_opens_a_private_range(make_daemon: Any, lab: Lab) -> None:
    d: DaemonProcess = make_daemon({"network": {"dns": [PUBLIC], "allow": ["10.99.0.0/24"]}})
    r = d.run(FETCH.replace("URL", repr(f"http://{PRIVATE}/")), network=True)
    assert r["stdout"] == f"hello from {PRIVATE}\n".encode(), r
    r = d.run(FETCH.replace("URL", repr(f"http://{METADATA}/")), network=True)
    assert r["stdout"].startswith(b"failed"), r  # only what was opened


def test_network_deny_closes_more(make_daemon: Any, lab: Lab) -> None:
    d: DaemonProcess = make_daemon({"network": {"dns": [], "deny": ["203.0.113.0/24"]}})
    r = d.run(FETCH.replace("URL", repr(f"http://{PUBLIC}/")), network=True)
    assert r["stdout"].startswith(b"failed"), r


def test_runs_without_network_reach_nothing(netd: DaemonProcess) -> None:
    r = netd.run(FETCH.replace("URL", repr(f"http://{PUBLIC}/")))
    assert r["stdout"].startswith(b"failed"), r
    assert r["denied_syscalls"].get("socket", 0) >= 1
    assert r["network"] is None


def test_the_proxy_of_the_config_is_set_for_network_runs(make_daemon: Any, lab: Lab) -> None:
    d: DaemonProcess = make_daemon({"network": {"dns": [PUBLIC], "proxy": f"http://{PUBLIC}:3128",
                                                "no_proxy": "localhost"}})
    code = "import os; print(os.environ.get('HTTPS_PROXY'), os.environ.get('http_proxy'), os.environ.get('NO_PROXY'))"
    assert d.run(code, network=True)["stdout"] == f"http://{PUBLIC}:3128 http://{PUBLIC}:3128 localhost\n".encode()
    assert d.run(code)["stdout"] == b"None None None\n"


def test_concurrent_network_runs_work_and_cannot_reach_each_other(make_daemon: Any, lab: Lab) -> None:
    netd: DaemonProcess = make_daemon({**NET, "daemon": {"workers": 32, "reserved_workers": 0},
                                       "quotas": {"default": {"concurrent": 32}}})
    pool = ipaddress.ip_network(netd.config["network"]["pool"])
    candidates = [str(pool.network_address + 4 * i + 2) for i in range(pool.num_addresses // 4)]
    code = f"""
import socket, time, urllib.request
server = socket.socket(); server.bind(("0.0.0.0", 8000)); server.listen(64)
ok = urllib.request.urlopen("http://{PUBLIC}/", timeout=5).read() == b"hello from {PUBLIC}\\n"
time.sleep(1)  # every run is listening by now
reached = []
for addr in {candidates!r}:
    s = socket.socket(); s.settimeout(0.5)
    if s.connect_ex((addr, 8000)) == 0:
        reached.append(addr)
    s.close()
print(ok, reached)
"""
    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(lambda _: netd.run(code, network=True, timeout_ms=30000), range(32)))
    own = [r for r in results if r["status"] == "ok"]
    assert len(own) == 32, [r["status"] for r in results]
    # A run may reach its own listener through its own address; never another run's.
    for r in own:
        ok, reached = r["stdout"].decode().split(" ", 1)
        assert ok == "True", r
        assert len(eval(reached)) <= 1, reached


def test_only_interfaces_named_as_runs_are_taken_for_runs(netd: DaemonProcess) -> None:
    """The rules of every sandboxd match run interfaces by name: an interface of the host's own
    (sbx0 here, which the earlier "sbx*" matched) must never be one of them."""
    import json

    from sandboxd.jail.net.netpolicy import RUNS_PREFIX, SEQUENCE

    table, prefix = prefix_of(netd)
    assert prefix.startswith(RUNS_PREFIX) and len(f"{prefix}{SEQUENCE - 1:x}") <= 15  # IFNAMSIZ - 1
    assert netd.run("import socket; socket.socket()", network=True)["status"] == "ok"
    assert interfaces(prefix) and all(i.startswith(RUNS_PREFIX) for i in interfaces(prefix))
    listed = subprocess.run(["nft", "-j", "list", "table", "inet", table], capture_output=True, text=True,
                            check=True).stdout
    matched: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            match = node.get("match")
            if isinstance(match, dict) and match.get("left") in ({"meta": {"key": "iifname"}},
                                                                 {"meta": {"key": "oifname"}}):
                matched.append(match["right"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(listed))
    assert matched and all(isinstance(n, str) and n.startswith(RUNS_PREFIX) for n in matched), matched
    assert not any(fnmatch.fnmatchcase("sbx0", n) for n in matched), matched


# -- nothing left behind ------------------------------------------------------------------
def test_200_network_runs_leave_no_interface_address_or_namespace(netd: DaemonProcess) -> None:
    table, prefix = prefix_of(netd)
    netns_before = len(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else 0
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda _: netd.run("import socket; socket.socket()", network=True), range(200)))
    assert all(r["status"] == "ok" for r in results)
    with netd.client() as c:
        st = c.status()
    pooled = sum(p["ready"] + p["starting"] for key, p in st["pool"]["profiles"].items() if key.endswith("+net"))
    # only the pooled network workers still have interfaces (each one its pair's host end)
    assert wait_until(lambda: len(interfaces(prefix)) <= pooled, 10), (interfaces(prefix), pooled)
    assert table in tables()
    assert (len(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else 0) == netns_before
    assert netd.stop() == 0
    assert wait_until(lambda: not interfaces(prefix), 10), interfaces(prefix)
    assert table not in tables()
    routes = subprocess.run(["ip", "-o", "route"], capture_output=True, text=True).stdout
    assert f"dev {prefix}" not in routes  # (the addresses went with their interfaces)


def test_sigkill_leaves_the_table_only_until_the_next_start(netd: DaemonProcess) -> None:
    table, prefix = prefix_of(netd)
    assert netd.run("print(1)", network=True)["status"] == "ok"
    assert netd.proc is not None
    netd.proc.send_signal(signal.SIGKILL)
    netd.proc.wait()
    # The daemon's processes die with it (PDEATHSIG, lifelines), and their namespaces with them.
    assert wait_until(lambda: not interfaces(prefix), 10), interfaces(prefix)
    assert table in tables()  # left behind...
    netd.start()  # ...until the next start, which replaces it
    assert netd.run(FETCH.replace("URL", repr(f"http://{PUBLIC}/")), network=True)["stdout"] == \
        f"hello from {PUBLIC}\n".encode()
    assert netd.stop() == 0
    assert table not in tables()


def test_forwarding_is_restored_and_other_forwarding_stays_off(netd: DaemonProcess) -> None:
    with open("/proc/sys/net/ipv4/ip_forward", encoding="ascii") as f:
        during = f.read().strip()
    assert during == "1"
    out = subprocess.run(["nft", "list", "table", "inet", prefix_of(netd)[0]], capture_output=True, text=True).stdout
    assert "chain guard" in out  # the host forwarded nothing before: it still forwards nothing else
    netd.stop()
    with open("/proc/sys/net/ipv4/ip_forward", encoding="ascii") as f:
        assert f.read().strip() in ("0", "1")  # 0 unless another sandboxd of this test run still uses it


def test_a_second_daemon_with_the_same_pool_is_refused_network(netd: DaemonProcess, make_daemon: Any) -> None:
    other: DaemonProcess = make_daemon({"network": {"pool": netd.config["network"]["pool"]}}, start=False)
    with pytest.raises(RuntimeError, match="address pool"):
        other.start(timeout=30)


def test_download_counts_what_came_in(netd: DaemonProcess) -> None:
    r = netd.run(FETCH.replace("URL", repr(f"http://{PUBLIC}/1m")).replace(".decode().strip()", ".__len__()"),
                 network=True)
    assert r["stdout"] == f"{ONE_MIB}\n".encode(), r
    assert r["network"]["bytes_in"] >= ONE_MIB


def test_check_config_names_bad_network_settings(tmp_path: Any) -> None:
    from sandboxd.config import ConfigError, parse

    for raw, needle in (({"network": {"pool": "10.1.2.3/16"}}, "network.pool"),
                        ({"network": {"pool": "10.1.2.0/28"}}, "room for"),
                        ({"network": {"allow": ["nonsense"]}}, "network.allow"),
                        ({"network": {"dns": ["10.0.0.2"]}}, "runs may not reach 10.0.0.2 (RFC 1918 private)"),
                        ({"network": {"proxy": "http://127.0.0.1:3128"}}, "network.proxy")):
        with pytest.raises(ConfigError) as e:
            parse(raw)
        assert any(needle in err for err in e.value.errors), (raw, e.value.errors)
    parse({"network": {"dns": ["10.0.0.2"], "allow": ["10.0.0.0/24"]}})  # allowed: fine


def test_runs_get_their_own_loopback_and_unix_sockets(netd: DaemonProcess) -> None:
    loopback = """
import socket, threading
srv = socket.socket(); srv.bind(("127.0.0.1", 8123)); srv.listen(1)
threading.Thread(target=lambda: srv.accept()[0].sendall(b"own loopback"), daemon=True).start()
c = socket.create_connection(("127.0.0.1", 8123)); print(c.recv(64).decode())
"""
    abstract = "import socket\nu = socket.socket(socket.AF_UNIX); u.bind('\\0sbx-test'); u.listen(1); print('bound')\n"
    r = netd.run(loopback + abstract, network=True)
    assert (r["status"], r["stdout"]) == ("ok", b"own loopback\nbound\n"), r
    r = netd.run(abstract)  # Unix sockets for every run: its namespace is its own
    assert (r["status"], r["stdout"]) == ("ok", b"bound\n"), r
    # Two runs bind the same abstract name at once: each has its own namespace.
    hold = abstract + "import time; time.sleep(1)\n"
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda n: netd.run(hold, network=n), (True, False)))
    assert [(r["status"], r["stdout"]) for r in results] == [("ok", b"bound\n")] * 2


def test_status_shows_the_network_and_its_policy(netd: DaemonProcess) -> None:
    with netd.client() as c:
        st = c.status()
    net = st["network"]
    assert net["table"] == prefix_of(netd)[0] and net["pool"] == netd.config["network"]["pool"]
    assert net["dns"] == [PUBLIC] and "10.0.0.0/8" in net["default_deny"]


def conntrack_entries_of(address: str) -> int:
    with open("/proc/net/nf_conntrack", encoding="ascii") as f:
        return sum(1 for line in f if f" src={address} " in line)


def test_a_run_cannot_fill_the_hosts_conntrack_table(make_daemon: Any, lab: Lab) -> None:
    """3,000 UDP flows to the lab's host from one run: the red team's 20,000 left 20,000 entries
    in the table the host's own traffic shares, for minutes after the run.  A run may hold
    network.max_connections_per_run of them; what it leaves is deleted with its address."""
    require(os.path.exists("/proc/net/nf_conntrack"), "no /proc/net/nf_conntrack to count entries with")
    d: DaemonProcess = make_daemon({**NET, "network": {**NET["network"], "max_connections_per_run": 200}})
    code = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("{PUBLIC}", 9))
me = s.getsockname()[0]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(20000, 23000):
    try:
        s.sendto(b"x", ("{PUBLIC}", port))
    except OSError:
        pass  # (a refusal may come back as ICMP on a later send)
print(me, flush=True)
time.sleep(2)
"""
    during: list[tuple[str, int]] = []

    def arrived(stream: str, data: bytes) -> None:
        if stream == "stdout" and not during:
            address = data.decode().split()[0]
            during.append((address, conntrack_entries_of(address)))

    with d.client() as c:
        r = c.run(code, network=True, on_output=arrived)
    assert r["status"] == "ok", r
    address, held = during[0]
    assert held <= 200 + 2, f"one run held {held} conntrack entries"  # was 3,000
    assert wait_until(lambda: conntrack_entries_of(address) == 0, 10), conntrack_entries_of(address)
