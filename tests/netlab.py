"""A test "internet" on this machine: a network namespace of the test's own, reached from
the host through a veth pair, with servers in it.  Nothing a test sends leaves the host.

    host  tlab<N>h  203.0.113.1/24 ----- tlab<N>n  203.0.113.2/24    "public" test host
                                                    10.99.0.2        a private host (routed via .2)
                                                    169.254.169.254  a metadata endpoint
    in the namespace: an HTTP server on port 80 of each address (GET / says which address it
    is; /1m is 1 MiB), dnsmasq on 203.0.113.2:53 answering test.example -> 203.0.113.2,
    private.example -> 10.99.0.2 (DNS rebinding) and nothing else (no upstream).

The interface names do not start with ``sbx`` (the prefix of every sandboxd's run
interfaces).  ``Lab`` tears everything down on exit, also when the test failed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time

PUBLIC = "203.0.113.2"
HOST_SIDE = "203.0.113.1"
PRIVATE = "10.99.0.2"
METADATA = "169.254.169.254"
ONE_MIB = 1 << 20
LAB_LOCK = "/tmp/sandboxd-test-netlab.lock"

SERVER = r"""
import http.server, socketserver, sys, threading
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host = self.server.server_address[0]
        body = b"x" * (1 << 20) if self.path == "/1m" else f"hello from {host}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
servers = [Server((addr, 80), Handler) for addr in sys.argv[1:]]
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


class Lab:
    def __init__(self) -> None:
        n = os.getpid() % 100000
        self.ns = f"tlab{n}"
        self.host_if, self.ns_if = f"tlab{n}h", f"tlab{n}n"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dir = tempfile.mkdtemp(prefix="sandboxd-netlab-")
        self._lock = -1

    def __enter__(self) -> Lab:
        # The lab's addresses are fixed: one lab on the host at a time, whichever test run
        # (another checkout's, a helper's) wants one; the lock goes with this process.
        self._lock = os.open(LAB_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _in(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def _up(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{HOST_SIDE}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        for argv in (("ip", "link", "set", "lo", "up"), ("ip", "link", "set", self.ns_if, "up"),
                     ("ip", "addr", "add", f"{PUBLIC}/24", "dev", self.ns_if),
                     ("ip", "addr", "add", f"{PRIVATE}/32", "dev", "lo"),
                     ("ip", "addr", "add", f"{METADATA}/32", "dev", "lo"),
                     ("ip", "route", "add", "default", "via", HOST_SIDE)):
            sh(*self._in(*argv))
        for dest in (f"{PRIVATE}/32", f"{METADATA}/32"):
            sh("ip", "route", "add", dest, "via", PUBLIC)
        server = os.path.join(self.dir, "server.py")
        with open(server, "w", encoding="utf-8") as f:
            f.write(SERVER)
        web = subprocess.Popen(self._in("/usr/bin/python3", "-I", server, PUBLIC, PRIVATE, METADATA),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(web)
        assert web.stdout is not None and web.stdout.readline().strip() == b"ready"
        dns = subprocess.Popen(self._in("dnsmasq", "--no-daemon", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                        "--bind-interfaces", f"--listen-address={PUBLIC}", "--port=53",
                                        "--user=root", "--pid-file=", f"--address=/test.example/{PUBLIC}",
                                        f"--address=/private.example/{PRIVATE}", "--address=/#/"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(dns)
        deadline = time.monotonic() + 10
        while f"{PUBLIC}:53" not in sh(*self._in("ss", "-lnu"), check=False).stdout:
            if time.monotonic() > deadline or dns.poll() is not None:
                raise RuntimeError("dnsmasq did not start in the test namespace")
            time.sleep(0.05)

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for dest in (f"{PRIVATE}/32", f"{METADATA}/32"):
            sh("ip", "route", "del", dest, check=False)
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.ns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


if __name__ == "__main__":  # by hand: python3 tests/netlab.py, then curl 203.0.113.2
    with Lab() as lab:
        print("lab up:", lab.ns, file=sys.stderr)
        input("enter to tear down ")
