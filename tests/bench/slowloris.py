"""Slow clients without a key against sandboxd-http at its default settings, measured.

A real daemon and a real sandboxd-http (the test user sbx-http, the default settings but the key);
``--flood`` connections from 127.0.0.1 that send a request head a byte at a time and never end it
(a closed one is opened again, as a slowloris tool does); once they are open, ``--requests``
authenticated ``print(1)`` runs, each on a new connection from the same address. Prints how many
were answered 200 and what the others got. Loopback only, bounded: the flood stops after
``--seconds`` or when the requests are done, whichever comes first.

    .venv/bin/python tests/bench/slowloris.py [--flood 1100] [--requests 30]

Run as root (it starts a daemon); not part of the test suite (tests/test_http.py has the scaled
test, test_slow_clients_without_a_key_do_not_lock_out_the_ones_with_it).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import selectors
import shutil
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bridge import KEY, BridgeProcess
from harness import DaemonProcess, daemon_dir, ensure_test_users

HEAD = b"POST /v1/sandbox/run HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4000


class Flood:
    """``n`` slow heads on 127.0.0.1:port, each sent a byte a second, reopened when closed."""

    def __init__(self, port: int, n: int, seconds: float) -> None:
        self.port, self.n, self.deadline = port, n, time.monotonic() + seconds
        self.stop = threading.Event()
        self.opened = self.closed_by_server = 0
        self.sel = selectors.DefaultSelector()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _open(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        self.sel.register(s, selectors.EVENT_READ, 0)  # data: bytes of HEAD sent
        self.opened += 1

    def _loop(self) -> None:
        for _ in range(self.n):
            self._open()
        last_trickle = 0.0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            for key, _ in self.sel.select(0.1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    s.recv(65536)  # an answer (408, 503) or the end: closed either way
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.sel.unregister(s)
                s.close()
                self.closed_by_server += 1
                self._open()
            if time.monotonic() - last_trickle >= 1.0:
                last_trickle = time.monotonic()
                for key in list(self.sel.get_map().values()):
                    sent = key.data
                    if sent < len(HEAD):
                        try:
                            key.fileobj.send(HEAD[sent:sent + 1])  # type: ignore[union-attr]
                            self.sel.modify(key.fileobj, selectors.EVENT_READ, sent + 1)
                        except OSError:
                            pass
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()

    def open_now(self) -> int:
        return len(self.sel.get_map())


def one_request(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = json.dumps({"language": "python3", "code": "print(1)", "preload": "", "enable_network": False})
        conn.request("POST", "/v1/sandbox/run", body, {"X-Api-Key": KEY, "Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return str(r.status)
    except OSError as e:
        return type(e).__name__
    finally:
        conn.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flood", type=int, default=1100)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--seconds", type=float, default=120.0)
    args = p.parse_args()
    remove_users = ensure_test_users()
    d = DaemonProcess(daemon_dir(), {"root": {"hard_links": True}}).start()
    b = BridgeProcess(d.socket).start()
    try:
        flood = Flood(b.port, args.flood, args.seconds)
        flood.thread.start()
        while flood.opened < args.flood and flood.thread.is_alive():
            time.sleep(0.05)
        time.sleep(2.0)  # every head begun and a byte or two in
        statuses = [one_request(b.port) for _ in range(args.requests)]
        held = flood.open_now()
        flood.stop.set()
        flood.thread.join()
        counts = collections.Counter(statuses)
        print(f"authenticated requests answered 200 during a flood of {args.flood} slow heads: "
              f"{counts.get('200', 0)}/{args.requests} (all answers: {dict(counts)}); slow heads open at the end: "
              f"{held}, closed by the bridge: {flood.closed_by_server}")
    finally:
        b.close()
        d.close()
        shutil.rmtree(d.dir, ignore_errors=True)
        remove_users()
    return 0


if __name__ == "__main__":
    sys.exit(main())
