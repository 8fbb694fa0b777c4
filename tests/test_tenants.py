"""Tenants against each other: one test per finding of the red-team pass (numbers follow it).

In every test the attacker is sbx-bob, a real unprivileged user in the socket group, and the
victim another uid: sbx-alice, an admin (root) or the host itself.  What is measured is the
victim: its requests keep working and answer within a small factor of their idle latency
(measured first, in the same test), the daemon's memory stays bounded, quota figures are
exact, channels decode nothing, logs and terminals get no raw escape sequences.

Bob's and Alice's connections are made by a helper process running as that user
(``/usr/bin/python3``, setuid by subprocess) that hands the connected sockets to the test
over SCM_RIGHTS.  The daemon identifies a caller by SO_PEERCRED, which the kernel records at
connect(): they are that user's connections whoever writes to them afterwards, and the test
can drive dozens of them with exact timing.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pwd
import re
import select
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Protocol

import msgpack
import pytest
from harness import REPO, DaemonProcess, as_user, on_a_terminal, recv_frame, rss_kb, run_uid_processes, wait_until

HEADER = struct.Struct(">I")
MAX_FRAME = 16 << 20  # the daemon's default max_frame
HELPER_PYTHON = "/usr/bin/python3"  # Debian's, with msgpack: it runs as any uid
VICTIM_RUN = {"op": "run", "code": "print('alice')"}
VICTIM_STATUS = {"op": "status"}
CTYPES = "import ctypes, errno, json, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"

# Connects N sockets as the calling user and sends them back over fd 0 (a socketpair).
CONNECT = r"""
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
chan = socket.socket(fileno=0)
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    socks.append(s)
for i in range(0, n, 200):
    socket.send_fds(chan, [b"s"], [s.fileno() for s in socks[i:i + 200]])
"""


# -- the wire, as any client writes it ------------------------------------------------------
def packed(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return body


def framed(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def frame(obj: Any) -> bytes:
    return framed(packed(obj))


def call(s: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    s.sendall(frame(request))
    response = recv_frame(s)
    assert isinstance(response, dict), f"the daemon closed the connection instead of answering {request.get('op')}"
    return response


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        buf += chunk
    return bytes(buf)


def code_of(response: dict[str, Any]) -> str:
    return "ok" if response.get("ok") else str((response.get("error") or {}).get("code"))


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


# -- other users' connections ---------------------------------------------------------------
class Connect(Protocol):
    def __call__(self, user: str, path: str, n: int = 1) -> list[socket.socket]: ...


def connect_as(user: str, path: str, n: int = 1) -> list[socket.socket]:
    """``n`` connections to ``path`` made by a process running as ``user``."""
    parent, child = socket.socketpair()
    socks: list[socket.socket] = []
    with parent:
        try:
            proc = subprocess.Popen([HELPER_PYTHON, "-I", "-c", CONNECT, path, str(n)], stdin=child.fileno(), cwd="/",
                                    stderr=subprocess.PIPE, **as_user(user))
        finally:
            child.close()
        try:
            parent.settimeout(30)
            while len(socks) < n:
                msg, fds, _flags, _addr = socket.recv_fds(parent, 16, 256)
                socks += [socket.socket(fileno=fd) for fd in fds]
                if not msg:
                    break
        finally:
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                err = b"(timed out)"
    if len(socks) != n:
        for s in socks:
            s.close()
        raise RuntimeError(f"connecting as {user}: got {len(socks)} of {n} sockets: {err.decode(errors='replace')}")
    return socks


@pytest.fixture
def connect(test_users: Any) -> Iterator[Connect]:
    """Connections as other users; all of them are closed when the test ends, however it ends."""
    opened: list[socket.socket] = []

    def make(user: str, path: str, n: int = 1) -> list[socket.socket]:
        socks = connect_as(user, path, n)
        for s in socks:
            s.settimeout(60)
        opened.extend(socks)
        return socks

    yield make
    for s in opened:
        s.close()


# -- measuring the victim -------------------------------------------------------------------
def victim_call(connect: Connect, d: DaemonProcess, request: dict[str, Any],
                user: str = "sbx-alice") -> tuple[float, dict[str, Any]]:
    """One request on a new connection of ``user``: (seconds from sending to the answer, answer)."""
    (s,) = connect(user, d.socket)
    try:
        t0 = time.monotonic()
        response = call(s, request)
        return time.monotonic() - t0, response
    finally:
        s.close()


def idle_latency(connect: Connect, d: DaemonProcess) -> float:
    """The victim's round trip (status and a small run) while nobody attacks: the median."""
    victim_call(connect, d, VICTIM_RUN)  # warm-up
    samples = [victim_call(connect, d, req)[0] for req in (VICTIM_STATUS, VICTIM_RUN) * 3]
    return statistics.median(samples)


def bound(idle: float) -> float:
    return 10 * idle + 1.0


def assert_victim_prompt(connect: Connect, d: DaemonProcess, idle: float, during: str,
                         requests: tuple[dict[str, Any], ...] = (VICTIM_STATUS, VICTIM_RUN)) -> None:
    for req in requests:
        seconds, response = victim_call(connect, d, req)
        assert response.get("ok"), f"alice's {req['op']} was refused {during}: {response}"
        if req["op"] == "run":
            result = response["result"]
            assert (result["status"], result["stdout"]) == ("ok", b"alice\n"), result
        assert seconds < bound(idle), f"alice's {req['op']} took {seconds:.2f}s {during} (idle {idle:.3f}s)"


class PeakRSS:
    """The daemon's resident memory sampled every 10 ms: ``growth_mib`` is the peak over the start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = self.peak = rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError, IndexError, ValueError):
                self.peak = max(self.peak, rss_kb(self.pid))

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, IndexError, ValueError):
            self.peak = max(self.peak, rss_kb(self.pid))

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 1024


class Crew:
    """Attacker threads: told to stop and joined when the block ends, also when a test fails
    (their sockets are shut down first, which wakes a thread blocked on one).  Their OSErrors
    (a daemon that closes on them) end them quietly; anything else is re-raised."""

    def __init__(self, sockets: list[socket.socket] | None = None) -> None:
        self.stop = threading.Event()
        self.sockets = sockets or []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, fn: Callable[[], None]) -> None:
        def body() -> None:
            try:
                fn()
            except OSError:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the test below
                self.errors.append(e)

        t = threading.Thread(target=body, daemon=True)
        t.start()
        self.threads.append(t)

    def __enter__(self) -> Crew:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop.set()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self.threads:
            t.join(30)
        for s in self.sockets:
            s.close()
        if kind is None and self.errors:
            raise self.errors[0]


def run_as(connect: Connect, d: DaemonProcess, user: str, code: str, **options: Any) -> dict[str, Any]:
    (s,) = connect(user, d.socket)
    try:
        response = call(s, {"op": "run", "code": code, **options})
    finally:
        s.close()
    assert response.get("ok"), response
    result: dict[str, Any] = response["result"]
    return result


def jobs_of(d: DaemonProcess, uid: int) -> list[dict[str, Any]]:
    with d.client() as c:
        return [j for j in c.call("jobs")["jobs"] if j["caller_uid"] == uid]


def connections(d: DaemonProcess) -> int:
    """Open client connections, this one (asking) not counted."""
    with d.client() as c:
        return int(c.status()["connections"]) - 1


# 1 -------------------------------------------------------------------------------------
def test_01_request_bytes_of_one_uid_leave_room_for_the_others(make_daemon: Any, connect: Connect) -> None:
    """Headers announcing max_frame used to reserve it: sixteen of them filled the 256 MiB
    budget and everybody got ``busy``.  Only settings the pre-fix daemon also knows (the
    defaults: max_frame 16 MiB, buffer_budget 256 MiB; buffer_budget_per_uid 64 MiB now)."""
    d: DaemonProcess = make_daemon({"daemon": {"max_connections_per_uid": 64, "read_timeout": "20s"}})
    assert d.proc is not None
    idle = idle_latency(connect, d)
    with PeakRSS(d.proc.pid) as rss:
        # Phase 1: 64 connections each announce a max_frame body; half send 64 KiB of it, then a
        # trickle, the others nothing at all.
        socks = connect("sbx-bob", d.socket, 64)
        with Crew(socks) as crew:
            for i, s in enumerate(socks):
                s.sendall(HEADER.pack(MAX_FRAME) + bytes(64 << 10) * (i % 2))

            def trickle() -> None:
                while not crew.stop.wait(0.1):
                    for s in socks[1::2]:
                        with contextlib.suppress(OSError):
                            s.send(bytes(1024))

            crew.start(trickle)
            time.sleep(0.5)
            for _ in range(3):
                assert_victim_prompt(connect, d, idle, "while bob's 64 connections hold max_frame headers")
        assert wait_until(lambda: connections(d) == 0, 10), "bob's connections were not closed"

        # Phase 2: 32 connections send whole max_frame bodies (a status with a 16 MiB pad) at
        # 1 MiB per 20 ms each, again and again: 512 MiB wanted at once, twice the global budget.
        # (Bob's own frames may stall each other at his 64 MiB: that is his business.)
        overhead = len(packed({"op": "status", "pad": bytes(1 << 16)})) - (1 << 16)
        data = memoryview(framed(packed({"op": "status", "pad": bytes(MAX_FRAME - overhead)})))
        assert len(data) == 4 + MAX_FRAME
        pushed: list[int] = []
        answers: list[str] = []
        socks = connect("sbx-bob", d.socket, 32)
        with Crew(socks) as crew:
            def sender(s: socket.socket) -> None:
                while not crew.stop.is_set():
                    off = 0
                    while off < len(data):
                        n = s.send(data[off:off + (1 << 20)])
                        pushed.append(n)
                        off += n
                        if crew.stop.wait(0.02):
                            return
                    response = recv_frame(s)
                    if response is None:
                        return
                    answers.append(code_of(response))

            for s in socks:
                crew.start(functools.partial(sender, s))
            time.sleep(1.0)
            for _ in range(3):
                assert_victim_prompt(connect, d, idle, "while bob streams 32 bodies of 16 MiB",
                                     requests=(VICTIM_RUN,))
    assert sum(pushed) > 64 << 20, f"bob pushed only {sum(pushed) >> 20} MiB"
    assert set(answers) <= {"bad_request", "busy"}, answers  # what of bob's was answered was refused
    # The uid's bytes are capped at buffer_budget_per_uid (64 MiB); a frame is copied once on the way.
    assert rss.growth_mib < 3 * 64, f"the daemon grew by {rss.growth_mib:.0f} MiB"


# 2 -------------------------------------------------------------------------------------
def huge_key_run(n: int) -> bytes:
    """A run with one unknown field whose name is ``n`` characters (random: nothing to share)."""
    return frame({"op": "run", "code": "pass", os.urandom(n // 2 + 1).hex()[:n]: 1})


def empty_arrays(n: int) -> bytes:
    """A status holding one array of ``n`` empty arrays (one byte each)."""
    return framed(b"\x82" + packed("op") + packed("status") + packed("x") + b"\xdd" + HEADER.pack(n) + b"\x90" * n)


def nested_maps(outer: int, inner: int) -> bytes:
    """A status holding ``outer`` arrays of ``inner`` empty maps: no container longer than 4096."""
    one = b"\xdc" + struct.pack(">H", inner) + b"\x80" * inner
    return framed(b"\x82" + packed("op") + packed("status") + packed("x") + b"\xdc" + struct.pack(">H", outer)
                  + one * outer)


def thousand_files() -> bytes:
    """A run with 1000 valid files of long shared prefixes, then a bad env (refused after the files)."""
    names = [("p" * 60 + "/") * 15 + f"{i:04d}" for i in range(1000)]
    return frame({"op": "run", "code": "pass", "files": {n: b"" for n in names}, "env": {"1x": "y"}})


def test_02_hostile_frames_cost_little_and_count_against_their_sender(make_daemon: Any, connect: Connect) -> None:
    """Unbounded work before the checks: a did-you-mean over a megabytes-long field name,
    millions of empty containers, a quadratic check of 1000 file names.  Each must get a
    prompt error; and refusals count: after runs_per_minute of them, quota_exceeded."""
    limit = 20
    d: DaemonProcess = make_daemon({"quotas": {"default": {"runs_per_minute": limit}}})
    assert d.proc is not None
    idle = idle_latency(connect, d)
    kinds = {"huge_key": huge_key_run(8 << 20), "arrays": empty_arrays(4 << 20), "maps": nested_maps(1000, 1000),
             "files": thousand_files()}
    expected = {"huge_key": "bad_request", "arrays": "bad_frame", "maps": "bad_frame", "files": "bad_request"}
    with PeakRSS(d.proc.pid) as rss:
        (s,) = connect("sbx-bob", d.socket)
        for kind, data in kinds.items():  # one of each, one after another: 4 refusals
            t0 = time.monotonic()
            s.sendall(data)
            response = recv_frame(s)
            seconds = time.monotonic() - t0
            assert code_of(response) == expected[kind], (kind, response)
            assert seconds < bound(idle), f"{kind}: answered in {seconds:.2f}s (alice's idle run {idle:.3f}s)"
        assert response["error"]["field"] == "env"  # the 1000 files passed their checks
        s.close()

        # Pipelined on 4 connections, 8 each: the refusals pass the limit on the way.
        socks = connect("sbx-bob", d.socket, 4)
        answers: dict[int, list[str]] = {}
        took: dict[int, float] = {}
        with Crew() as crew:
            def pipeline(i: int, s: socket.socket) -> None:
                t0 = time.monotonic()
                s.sendall(b"".join(kinds.values()) * 2)
                answers[i] = [code_of(recv_frame(s)) for _ in range(2 * len(kinds))]
                took[i] = time.monotonic() - t0

            for i, s in enumerate(socks):
                crew.start(functools.partial(pipeline, i, s))
            time.sleep(0.2)
            assert_victim_prompt(connect, d, idle, "while bob pipelines hostile frames", requests=(VICTIM_RUN,))
        assert len(answers) == 4, answers
        for i, codes in answers.items():
            assert set(codes) <= {"bad_request", "bad_frame", "quota_exceeded"}, codes
            assert took[i] < bound(idle) + 4, f"8 pipelined refusals (56 MB) took {took[i]:.2f}s"
        assert any("quota_exceeded" in codes for codes in answers.values()), answers

    # Bob is refused everything now, even a valid request; alice is not.
    (s,) = connect("sbx-bob", d.socket)
    for req in ({"op": "no_such_op"}, {"op": "run", "code": "print(1)"}):
        response = call(s, req)
        assert code_of(response) == "quota_exceeded", response
        assert response["error"]["limit"] == "runs_per_minute" and response["error"]["retry_after_ms"] > 0
    assert_victim_prompt(connect, d, idle, "after bob's refusals")
    assert rss.growth_mib < 128, f"the daemon grew by {rss.growth_mib:.0f} MiB"


def test_02_a_user_name_of_megabytes_does_not_abort_the_daemon(make_daemon: Any, connect: Connect) -> None:
    d: DaemonProcess = make_daemon()
    assert d.proc is not None
    idle = idle_latency(connect, d)
    (a,) = connect("sbx-alice", d.socket)  # alice has a run in flight
    a.sendall(frame({"op": "run", "code": "import time\ntime.sleep(1)\nprint('alice')"}))
    (s,) = connect("sbx-bob", d.socket)
    s.sendall(frame({"op": "usage", "user": "u" * (5 << 20)}))
    with contextlib.suppress(OSError):
        recv_frame(s)
    alive = not wait_until(lambda: d.proc is not None and d.proc.poll() is not None, 2)
    log = d.log()[-2000:]
    answer: Any = None
    with contextlib.suppress(OSError):
        answer = recv_frame(a)
    if not alive:  # start it again, so that it removes what the dead one left (cgroups, network)
        d.start()
    assert alive, f"one usage request of bob's killed the daemon (alice's run in flight got {answer}):\n{log}"
    assert answer["result"]["stdout"] == b"alice\n", answer
    assert_victim_prompt(connect, d, idle, "after bob's usage request")


# 3 -------------------------------------------------------------------------------------
def test_03_errors_stay_small_and_unread_answers_stop_the_reading(daemon: DaemonProcess, make_daemon: Any,
                                                                   connect: Connect) -> None:
    """An error used to echo a 16 MB key (twice); and a client that never reads its answers
    could have them pile up.  Part 2 uses daemon.response_budget_per_uid, a setting the
    pre-fix daemon does not know: there, part 1 already fails."""
    big = 15_000_000
    hostile = {
        "unknown field of run": ({"op": "run", "code": "pass", "k" * big: 1}, "bad_request"),
        "unknown field of status": ({"op": "status", "k" * big: 1}, "bad_request"),
        "field name that is bytes": ({"op": "status", b"\xff" * big: 1}, "bad_request"),
        "operation name": ({"op": "o" * big}, "unknown_op"),
        "language": ({"op": "run", "code": "pass", "language": "l" * big}, "bad_request"),
        "module name": ({"op": "root_why", "module": "m" * big + "-"}, "bad_request"),
        "run id": ({"op": "kill", "run_id": "r" * big}, "bad_request"),  # (longer than any name: 256)
    }
    (s,) = connect("sbx-bob", daemon.socket)
    for what, (request, code) in hostile.items():
        s.sendall(frame(request))
        n = HEADER.unpack(recv_exact(s, 4))[0]
        assert 4 + n < 8 << 10, f"{what}: an error frame of {4 + n} bytes"
        response = msgpack.unpackb(recv_exact(s, n), raw=False, strict_map_key=False)
        assert code_of(response) == code, (what, response)

    # Part 2: bob sends big-output runs on connection after connection and never reads.
    budget = 16 << 20
    d: DaemonProcess = make_daemon({"daemon": {"response_budget_per_uid": budget}})
    assert d.proc is not None
    idle = idle_latency(connect, d)
    request = frame({"op": "run", "code": "import sys; sys.stdout.write('x' * (4 << 20))", "max_output": 8 << 20})
    answered = 0
    with PeakRSS(d.proc.pid) as rss:
        for _ in range(20):
            (s,) = connect("sbx-bob", d.socket)
            s.sendall(request * 2)
            readable, _, _ = select.select([s], [], [], 0.2)  # its answer has started coming (and waits)
            answered += bool(readable)
        assert_victim_prompt(connect, d, idle, "while bob's answers pile up")
    assert answered < 20, "the daemon kept reading bob's requests"
    assert rss.growth_mib < 3 * budget / (1 << 20) + 32, (f"the daemon grew by {rss.growth_mib:.0f} MiB with a "
                                                          f"16 MiB response budget ({answered} of 20 answered)")


def test_03_unread_answers_on_connections_opened_in_advance_stay_bounded(make_daemon: Any, connect: Connect) -> None:
    """Requests arriving at once on connections opened in advance all start before any answer
    is unread: what piles up is bounded by the uid's share plus what its quota lets run at
    once (bob: 2 running, 2 queued; the other 20 are refused at once)."""
    budget = 16 << 20
    d: DaemonProcess = make_daemon({"daemon": {"response_budget_per_uid": budget},
                                    "quotas": {"users": {"sbx-bob": {"concurrent": 2, "queued": 2}}}})
    assert d.proc is not None
    idle = idle_latency(connect, d)
    request = frame({"op": "run", "code": "import sys; sys.stdout.write('x' * (4 << 20))", "max_output": 8 << 20})
    with PeakRSS(d.proc.pid) as rss:
        socks = connect("sbx-bob", d.socket, 24)  # opened first, idle ...
        for s in socks:
            s.sendall(request * 2)  # ... then a request on each, never read
        time.sleep(2.0)
        seconds, response = victim_call(connect, d, VICTIM_RUN)
    assert rss.growth_mib < 3 * budget / (1 << 20) + 32, (f"the daemon grew by {rss.growth_mib:.0f} MiB with a "
                                                          "16 MiB response budget")
    assert response["result"]["stdout"] == b"alice\n" and seconds < bound(idle)


def test_03_answers_of_runs_in_flight_count_before_they_are_built(make_daemon: Any, connect: Connect) -> None:
    """Runs whose answers (8 MiB of stdout, 8 of stderr, 8 of out/) are never read, one on each
    of 16 connections: the red team took the daemon from 45 MB to 1.03 GB past a 128 MiB budget
    this way -- the answers counted only once written, so every run the quota let run at once
    built one.  An answer's bytes are now held before its run starts."""
    budget = 32 << 20
    d: DaemonProcess = make_daemon({"daemon": {"response_budget_per_uid": budget}})
    assert d.proc is not None
    idle = idle_latency(connect, d)
    code = ("import os, sys\nsys.stdout.write('o' * (8 << 20))\nsys.stderr.write('e' * (8 << 20))\n"
            "os.makedirs('out', exist_ok=True)\nopen('out/f', 'wb').write(b'f' * (8 << 20))\n")
    request = frame({"op": "run", "code": code, "max_output": 8 << 20})
    with PeakRSS(d.proc.pid) as rss:
        for s in connect("sbx-bob", d.socket, 16):
            s.sendall(request)
        time.sleep(6.0)
        assert_victim_prompt(connect, d, idle, "while bob's answers wait")
    assert rss.growth_mib < 4 * budget / (1 << 20) + 64, (f"the daemon grew by {rss.growth_mib:.0f} MiB with a "
                                                          "32 MiB response budget")


def test_03_root_why_answers_are_not_larger_than_the_question(daemon: DaemonProcess, connect: Connect) -> None:
    request = frame({"op": "root_why", "module": "m" * 15_000_000})  # a valid dotted name, of no module
    (s,) = connect("sbx-bob", daemon.socket)
    s.sendall(request)
    n = HEADER.unpack(recv_exact(s, 4))[0]
    assert 4 + n < len(request), f"a root_why request of {len(request)} bytes got an answer of {4 + n}"


# 4 -------------------------------------------------------------------------------------
def proc_cpu_seconds(uid: int) -> float:
    """utime + stime of the host processes running as ``uid``."""
    total = 0.0
    for pid, _ in run_uid_processes(uid, 1):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def test_04_cancelled_runs_are_charged_their_cpu(make_daemon: Any, connect: Connect) -> None:
    """A run whose client disconnects used to be recorded with cpu_ms=0: CPU for free."""
    bob = uid_of("sbx-bob")
    d: DaemonProcess = make_daemon({"quotas": {"users": {"sbx-bob": {"cpu_seconds_per_hour": 2}}}})
    socks = connect("sbx-bob", d.socket, 3)
    for s in socks:
        s.sendall(frame({"op": "run", "code": "while True: pass", "timeout_ms": 6000}))
    assert wait_until(lambda: len([j for j in jobs_of(d, bob) if j["run_uid"]]) == 3, 10)
    run_uids = [j["run_uid"] for j in jobs_of(d, bob)]
    # Disconnect once each has burned 0.8 s (about 1.2 s on two CPUs), well before their timeout,
    # and together more than the 2 s of the quota.
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4.5:
        burned = [proc_cpu_seconds(u) for u in run_uids]
        if min(burned) >= 0.8:
            break
        time.sleep(0.02)
    burned = [proc_cpu_seconds(u) for u in run_uids]  # what each had used when its client went away
    for s in socks:
        s.close()
    assert min(burned) > 0.5 and sum(burned) > 2.0, f"the runs had not burned enough CPU yet: {burned}"
    assert wait_until(lambda: not jobs_of(d, bob), 10)
    pattern = re.compile(rf"run (\S+) uid={bob} \(\S+\) status=(\w+) wall=[0-9.]+ms cpu=([0-9.]+)ms")
    assert wait_until(lambda: len(pattern.findall(d.log())) == 3, 5), d.log()[-3000:]
    logged = pattern.findall(d.log())
    assert {status for _, status, _ in logged} == {"cancelled"}, logged
    charged = [float(cpu) for _, _, cpu in logged]

    with d.client() as c:
        usage = c.call("usage", user="sbx-bob")["users"][0]["usage"]
        alice_usage = c.call("usage", user="sbx-alice")["users"][0]["usage"]
    assert min(charged) > 500, f"cancelled runs charged {charged} ms"
    # At least what the runs' records say; their workers' last time slices are charged once
    # the workers are gone.
    assert usage["cpu_ms_last_hour"] >= sum(charged) - 0.5
    assert usage["runs_total"] == 3
    # ... which is what they burned: at least what /proc showed at the disconnect, at most that
    # plus what a run can burn while it is being killed.
    assert sum(burned) * 1000 * 0.9 <= usage["cpu_ms_last_hour"] <= sum(burned) * 1000 + 3 * 500, (burned, usage)
    assert alice_usage["cpu_ms_last_hour"] == 0 and alice_usage["runs_total"] == 0  # nothing of it is alice's

    (s,) = connect("sbx-bob", d.socket)
    response = call(s, {"op": "run", "code": "print(1)"})
    assert code_of(response) == "quota_exceeded", response
    assert response["error"]["limit"] == "cpu_seconds_per_hour"
    assert run_as(connect, d, "sbx-alice", "print('alice')")["stdout"] == b"alice\n"


# 5 -------------------------------------------------------------------------------------
RESIDENCY_CALLS = CTYPES + r"""
import mmap
path = "/usr/lib/python3.11/os.py"
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
out = {}

def outcome(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]

def c_outcome(rc):
    return "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]

libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
vec = ctypes.create_string_buffer((size + 4095) // 4096)
out["fadvise_dontneed"] = outcome(lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED))
out["fadvise_noreuse"] = outcome(lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NOREUSE))
out["preadv2_nowait"] = outcome(lambda: os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT))
out["mincore"] = c_outcome(libc.mincore(addr, size, vec))
out["madvise_pageout"] = c_outcome(libc.madvise(addr, size, 21))
out["madvise_cold"] = c_outcome(libc.madvise(addr, size, 20))
# what stays allowed
out["fadvise_willneed"] = outcome(lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED))
out["madvise_willneed"] = c_outcome(libc.madvise(addr, size, 3))
out["read"] = len(open(path, "rb").read()) == size and len(os.pread(fd, 4096, 0)) == min(size, 4096)
print(json.dumps(out))
"""

# Sender: a 1 evicts file i from the page cache, a 0 loads it.  Receiver: probes residency.
SEND_BITS = CTYPES + r"""
import sys
FILES, BITS = PARAMS
done = []
for path, bit in zip(FILES, BITS):
    fd = os.open(path, os.O_RDONLY)
    try:
        if bit:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            while os.read(fd, 1 << 16):
                pass
        done.append("ok")
    except OSError as e:
        done.append(errno.errorcode[e.errno])
    os.close(fd)
print(json.dumps(done))
"""

PROBE_BITS = CTYPES + r"""
import mmap
FILES = PARAMS
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
bits, failures = [], []
for path in FILES:
    fd = os.open(path, os.O_RDONLY)
    guess = None
    try:  # not cached: EAGAIN
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        guess = 0
    except BlockingIOError:
        guess = 1
    except OSError as e:
        failures.append("preadv2 " + errno.errorcode[e.errno])
    size = os.fstat(fd).st_size
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    vec = ctypes.create_string_buffer((size + 4095) // 4096)
    if libc.mincore(addr, size, vec) == 0:
        guess = 0 if vec.raw[0] & 1 else 1
    else:
        failures.append("mincore " + errno.errorcode[ctypes.get_errno()])
    bits.append(guess)
    os.close(fd)
print(json.dumps({"bits": bits, "failures": failures}))
"""


def test_05_no_page_cache_residency_or_eviction_from_runs(daemon: DaemonProcess, connect: Connect) -> None:
    """The root's files are shared by every run: eviction (fadvise DONTNEED, madvise PAGEOUT
    and COLD) and residency probes (preadv2 RWF_NOWAIT, mincore) would carry bits between
    callers.  They are refused (EPERM, named); reading files still works."""
    r = run_as(connect, daemon, "sbx-bob", RESIDENCY_CALLS)
    assert r["status"] == "ok", r["stderr"][-2000:]
    assert json.loads(r["stdout"]) == {
        "fadvise_dontneed": "EPERM", "fadvise_noreuse": "EPERM", "preadv2_nowait": "EPERM", "mincore": "EPERM",
        "madvise_pageout": "EPERM", "madvise_cold": "EPERM",
        "fadvise_willneed": "ok", "madvise_willneed": "ok", "read": True}
    assert {"fadvise64", "preadv2", "mincore", "madvise"} <= set(r["denied_syscalls"]), r["denied_syscalls"]

    # Bob sends 16 bits through 16 of the root's files; alice, another uid, tries to read them.
    lib = "/usr/lib/python3.11"
    files = sorted(os.path.join(lib, n) for n in os.listdir(lib)
                   if n.endswith(".py") and os.path.getsize(os.path.join(lib, n)) >= 32 << 10)[:16]
    assert len(files) == 16
    bits = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0]
    sent = run_as(connect, daemon, "sbx-bob", SEND_BITS.replace("PARAMS", repr((files, bits))))
    assert sent["status"] == "ok", sent["stderr"][-2000:]
    got = run_as(connect, daemon, "sbx-alice", PROBE_BITS.replace("PARAMS", repr(files)))
    assert got["status"] == "ok", got["stderr"][-2000:]
    probe = json.loads(got["stdout"])
    correct = sum(1 for b, g in zip(bits, probe["bits"], strict=True) if g == b)
    assert correct <= 12, f"alice decoded {correct} of bob's 16 bits (chance: 8); {probe}"
    assert probe["failures"] == ["preadv2 EPERM", "mincore EPERM"] * 16 and probe["bits"] == [None] * 16, probe
    assert json.loads(sent["stdout"]) == ["EPERM" if b else "ok" for b in bits]


# 6 -------------------------------------------------------------------------------------
HOLD_READ_LOCKS = r"""
import fcntl, os, struct, time
f = open("/etc/hosts")
fcntl.lockf(f, fcntl.LOCK_SH)  # F_SETLKW F_RDLCK, the whole file
g = open("/etc/hosts")
fcntl.fcntl(g, 37, struct.pack("hhqqi", fcntl.F_RDLCK, 0, 0, 0, 0))  # F_OFD_SETLK, the whole file
st = os.stat("/etc/hosts")
print(st.st_dev, st.st_ino, flush=True)
time.sleep(2.5)
"""


def read_locks_on(inode: int, d: DaemonProcess) -> tuple[list[str], list[str]]:
    """Read locks on ``inode`` in /proc/locks: (POSIX ones of this daemon's runs, OFD ones)."""
    runs = {str(pid) for pid, _ in d.run_uid_processes()}
    with open("/proc/locks", encoding="ascii") as f:
        lines = [line.split() for line in f if " READ " in line]
    mine = [fields for fields in lines if fields[-3].split(":")[-1] == str(inode)]
    return ([" ".join(f) for f in mine if "POSIX" in f and f[-4] in runs],
            [" ".join(f) for f in mine if "OFDLCK" in f])


def test_06_a_runs_lock_on_a_root_file_never_meets_the_hosts(daemon: DaemonProcess, connect: Connect) -> None:
    """Root files used to be hard links of the host's: a run's read lock on /etc/hosts blocked
    a host process's exclusive lock.  Now they are copies."""
    with daemon.client() as c:
        root = c.status()["root"]["path"]
    in_root = os.stat(os.path.join(root, "etc/hosts"))
    host = os.stat("/etc/hosts")
    holder: dict[str, Any] = {}
    t = threading.Thread(target=lambda: holder.update(run_as(connect, daemon, "sbx-bob", HOLD_READ_LOCKS,
                                                             timeout_ms=10000)), daemon=True)
    t.start()
    try:
        assert wait_until(lambda: all(read_locks_on(in_root.st_ino, daemon)), 10), "the run's locks never appeared"
        with open("/etc/hosts", "r+") as f:  # the host's own exclusive locks: taken, released at once
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(f, fcntl.LOCK_UN)
            fcntl.fcntl(f, 37, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))  # F_OFD_SETLK
            fcntl.fcntl(f, 37, struct.pack("hhqqi", fcntl.F_UNLCK, 0, 0, 0, 0))
        assert all(read_locks_on(in_root.st_ino, daemon)), "the run no longer held its locks when the host took its own"
    finally:
        t.join(15)
    assert holder.get("status") == "ok", holder
    dev, ino = map(int, holder["stdout"].split())
    assert ino == in_root.st_ino  # the run locked the root's file ...
    assert (dev, ino) != (host.st_dev, host.st_ino)  # ... which is not the host's


# 7 -------------------------------------------------------------------------------------
# Every integer reachable from the run's frames and the objects the collector knows (and the
# numbers written in their strings): those in the run-uid range but its own, and those that
# could be host pids.  The bounds travel XOR-ed so that the walker's own constants are none of them.
WALK_INTEGERS = r"""
import gc, os, re, sys
K, MLO, MHI, MPID = PARAMS
me = os.getuid()
digits = re.compile(rb"(?<![0-9])[0-9]{3,7}(?![0-9])")
uids, numbers, seen, todo = set(), set(), set(), []

def note(n):
    if MLO ^ K <= n < MHI ^ K and n != me:
        uids.add(n)
    if 300 <= n < MPID ^ K:
        numbers.add(n)

frame = sys._getframe()
while frame is not None:
    todo += [frame.f_locals, frame.f_globals, frame.f_code]
    frame = frame.f_back
todo += gc.get_objects() + [sys.modules, vars(sys), sys.orig_argv, sys.path]
skip = {id(uids), id(numbers), id(seen), id(todo)}
steps = 0
while todo and steps < 3_000_000:
    obj = todo.pop()
    steps += 1
    if type(obj) is int:
        note(obj)
        continue
    if id(obj) in seen or id(obj) in skip:
        continue
    seen.add(id(obj))
    if isinstance(obj, (str, bytes, bytearray)):
        data = obj.encode("utf-8", "replace") if isinstance(obj, str) else bytes(obj)
        for m in digits.findall(data):
            note(int(m))
        continue
    if isinstance(obj, (float, bool, type(None))):
        continue
    todo.extend(gc.get_referents(obj))
print(json.dumps({"me": me, "steps": steps, "uids": sorted(uids), "numbers": sorted(numbers)}))
"""


def test_07_a_run_finds_no_other_live_runs_uids_or_pids(daemon: DaemonProcess, connect: Connect) -> None:
    """Alice has four runs in flight; bob's run walks everything it can reach for their run
    uids and host pids.  (test_threats.py::test_17 covers the daemon's own secrets.)"""
    alice = uid_of("sbx-alice")
    lo, n = daemon.uid_range
    key = 0x5A5A5A5A
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
        pid_max = int(f.read())
    walker = "import json\n" + WALK_INTEGERS.replace("PARAMS", repr((key, lo ^ key, (lo + n) ^ key, pid_max ^ key)))
    alone = run_as(connect, daemon, "sbx-bob", walker, timeout_ms=30000, memory_mb=512, max_output=8 << 20)
    assert alone["status"] == "ok", alone["stderr"][-2000:]
    background = set(json.loads(alone["stdout"])["numbers"])

    socks = connect("sbx-alice", daemon.socket, 4)
    for s in socks:
        s.sendall(frame({"op": "run", "code": "import time\ntime.sleep(30)", "timeout_ms": 30000}))
    try:
        assert wait_until(lambda: len([j for j in jobs_of(daemon, alice) if j["worker_pid"]]) == 4, 10)
        jobs = jobs_of(daemon, alice)
        time.sleep(0.5)  # the pool refills while they run: the walker's worker is forked with them alive
        their_pids = {j["worker_pid"] for j in jobs}
        their_pids |= {pid for j in jobs for pid, _ in run_uid_processes(j["run_uid"], 1)}
        walk = run_as(connect, daemon, "sbx-bob", walker, timeout_ms=30000, memory_mb=512, max_output=8 << 20)
        with daemon.client() as c:
            for j in jobs:
                c.call("kill", run_id=j["run_id"])
        results = [recv_frame(s)["result"] for s in socks]
    finally:
        for s in socks:
            s.close()
    assert walk["status"] == "ok", walk["stderr"][-2000:]
    found = json.loads(walk["stdout"])
    assert found["steps"] > 1000 and found["me"] == walk["run_uid"]  # it did walk, as itself
    their_uids = {r["run_uid"] for r in results} | {j["run_uid"] for j in jobs}
    assert len(their_uids) == 4 and walk["run_uid"] not in their_uids
    assert not their_uids & set(found["uids"]), f"the walker found the run uids {their_uids & set(found['uids'])}"
    leaked = their_pids & (set(found["numbers"]) - background)
    assert not leaked, f"the walker found the host pids {leaked} of alice's runs"


# 8 -------------------------------------------------------------------------------------
FORGED = "x\n ERROR sandboxd: self-test failed \x1b]0;pwned\x07"


def test_08_request_ids_cannot_forge_log_lines(make_daemon: Any, connect: Connect) -> None:
    """A request id with a newline and escape sequences, logged when its client goes away
    mid-run: the admin reading the log must see neither a forged line nor a raw escape."""
    bob = uid_of("sbx-bob")
    d: DaemonProcess = make_daemon()
    socks = connect("sbx-bob", d.socket, 2)
    for s, rid in zip(socks, (FORGED, FORGED.encode() + b"\x1b[2J\r"), strict=True):
        s.sendall(frame({"op": "run", "id": rid, "code": "import time\ntime.sleep(30)", "timeout_ms": 30000}))
    assert wait_until(lambda: len(jobs_of(d, bob)) == 2, 10)
    for s in socks:
        s.close()
    assert wait_until(lambda: d.log().count("went away") >= 2, 10), d.log()[-3000:]
    assert wait_until(lambda: not jobs_of(d, bob), 10)
    with open(d.log_path, "rb") as f:
        log = f.read()
    assert b"\x1b" not in log and b"\x07" not in log and b"\r" not in log
    lines = log.split(b"\n")
    assert not [line for line in lines if line.lstrip().startswith(b"ERROR sandboxd: self-test failed")]
    went_away = [line for line in lines if b"went away" in line]
    assert len(went_away) == 2 and all(b"self-test failed" in line for line in went_away), went_away


# 9 -------------------------------------------------------------------------------------
HOSTILE_OUTPUT = r'import sys; print("\x1b]52;c;cHduZWQ=\x07\x1b[2J"); sys.stderr.write("\x1b]0;pwned\x07\n")'


def ctl_command(d: DaemonProcess, *args: str) -> tuple[list[str], dict[str, str]]:
    """sandboxctl of this tree (PYTHONPATH: the package next to these tests, as the daemon's)."""
    return ([os.path.join(REPO, ".venv", "bin", "sandboxctl"), "--socket", d.socket, *args],
            dict(os.environ, PYTHONPATH=REPO))


def test_09_run_output_reaches_an_admin_terminal_escaped(daemon: DaemonProcess) -> None:
    """A run's output with OSC 52 (write the clipboard), a title and a screen clear, shown by
    ``sandboxctl run`` on the admin's terminal."""
    rc, out = on_a_terminal(*ctl_command(daemon, "run", "-c", HOSTILE_OUTPUT))
    assert rc == 0, out
    assert b"\x1b" not in out and b"\x07" not in out, out
    assert b"\\x1b]52;c;cHduZWQ=\\x07\\x1b[2J" in out and b"\\x1b]0;pwned\\x07" in out, out  # visible, escaped
    assert b"sandboxd: ok" in out

    rc, out = on_a_terminal(*ctl_command(daemon, "run", "--raw", "-c", HOSTILE_OUTPUT))
    assert rc == 0 and b"\x1b]52;c;cHduZWQ=\x07\x1b[2J" in out and b"\x1b]0;pwned\x07" in out, out

    cmd, env = ctl_command(daemon, "run", "-c", HOSTILE_OUTPUT)
    p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd="/")
    assert p.returncode == 0 and p.stdout == b"\x1b]52;c;cHduZWQ=\x07\x1b[2J\n", p  # piped: byte-exact
    assert p.stderr.startswith(b"\x1b]0;pwned\x07\n"), p.stderr


# 10 ------------------------------------------------------------------------------------
def test_10_kill_tells_nobody_about_other_callers_runs(daemon: DaemonProcess, connect: Connect) -> None:
    """``kill`` of another uid's run id answered ``forbidden``, of an unused one ``not_found``:
    an oracle for who runs what.  Both are ``not_found`` now, and the run goes on."""
    alice = uid_of("sbx-alice")
    short, long_ = connect("sbx-alice", daemon.socket, 2)
    short.sendall(frame({"op": "run", "code": "import time\ntime.sleep(2)\nprint('done')", "timeout_ms": 20000}))
    long_.sendall(frame({"op": "run", "code": "import time\ntime.sleep(30)", "timeout_ms": 30000}))
    assert wait_until(lambda: len(jobs_of(daemon, alice)) == 2, 10)
    ids = sorted((j["run_id"] for j in jobs_of(daemon, alice)), key=lambda r: int(r.rsplit("-", 1)[1]))
    prefix, seq = ids[-1].rsplit("-", 1)
    unused = f"{prefix}-{int(seq) + 100000}"

    (b,) = connect("sbx-bob", daemon.socket)
    answers = {run_id: call(b, {"op": "kill", "run_id": run_id}) for run_id in [*ids, unused]}
    for run_id, response in answers.items():
        assert code_of(response) == "not_found", (run_id, response)
        shape = {k: (v.replace(run_id, "ID") if isinstance(v, str) else v) for k, v in response["error"].items()}
        unused_shape = {k: (v.replace(unused, "ID") if isinstance(v, str) else v)
                        for k, v in answers[unused]["error"].items()}
        assert shape == unused_shape, (response, answers[unused])  # word for word the same

    result = recv_frame(short)["result"]  # untouched by bob
    assert (result["status"], result["stdout"]) == ("ok", b"done\n"), result
    assert [j["run_id"] for j in jobs_of(daemon, alice)] == [j for j in ids if j != result["run_id"]]
    with daemon.client() as c:  # an admin still can
        remaining = jobs_of(daemon, alice)[0]["run_id"]
        assert c.call("kill", run_id=remaining)["killed"] == remaining
    result = recv_frame(long_)["result"]
    assert (result["status"], result["signal_name"]) == ("signaled", "SIGKILL"), result


# 11 ------------------------------------------------------------------------------------
def test_11_connections_reset_mid_run_and_mid_answer_log_no_tracebacks(make_daemon: Any, connect: Connect) -> None:
    """A connection reset while its run was in flight, or while its answer was being written,
    used to log "Task exception was never retrieved" with a traceback."""
    d: DaemonProcess = make_daemon()
    assert d.proc is not None
    idle = idle_latency(connect, d)
    linger0 = struct.pack("ii", 1, 0)

    def mid_run(s: socket.socket) -> None:
        # An answer left unread in our queue makes the close a reset (ECONNRESET for the daemon's read).
        s.sendall(frame({"op": "status"}) + frame({"op": "run", "code": "import time\ntime.sleep(2)",
                                                     "timeout_ms": 5000}))
        time.sleep(0.5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        s.close()

    def mid_answer(s: socket.socket) -> None:
        s.sendall(frame({"op": "run", "code": "import sys; sys.stdout.write('x' * (4 << 20))",
                         "max_output": 8 << 20}))
        s.recv(1000)  # its answer is coming: take a little of it, leave the rest
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        s.close()

    for _ in range(2):
        socks = connect("sbx-bob", d.socket, 24)
        with Crew() as crew:
            for i, s in enumerate(socks):
                crew.start(functools.partial(mid_run if i % 2 else mid_answer, s))
        assert wait_until(lambda: connections(d) == 0 and not jobs_of(d, uid_of("sbx-bob")), 15)
    assert_victim_prompt(connect, d, idle, "after bob's resets")
    time.sleep(0.5)
    log = d.log()
    assert "went away" in log  # the resets did come mid-run
    assert "Task exception was never retrieved" not in log and "Traceback" not in log, log[-5000:]


# 9 -------------------------------------------------------------------------------------
def test_09_two_tenants_filling_their_quotas_leave_workers_for_a_third(make_daemon: Any, connect: Connect) -> None:
    """Under the shipped quota (4 at once, 16 queued) and 8 workers, bob and sbx-http fill their
    quotas with long sleeps; alice's print(1) is answered at once, not after a sleep ends.
    (Before: bob's 4 and sbx-http's 4 held all 8 workers; alice waited 20 s, or 30 and busy.)"""
    shipped = {"concurrent": 4, "queued": 16}
    d: DaemonProcess = make_daemon({"quotas": {"default": shipped}, "pool": {"min": 2, "max": 8}})
    sleep = frame({"op": "run", "code": "import time\ntime.sleep(20)", "timeout_ms": 25000})
    for user in ("sbx-bob", "sbx-http"):
        for s in connect(user, d.socket, shipped["concurrent"] + shipped["queued"]):
            s.sendall(sleep)
    assert wait_until(lambda: len(jobs_of(d, uid_of("sbx-bob"))) + len(jobs_of(d, uid_of("sbx-http"))) >= 7, 20)
    with d.client() as c:
        st = c.status()
    assert st["capacity"]["queued"] >= shipped["queued"], st["capacity"]  # and they are waiting for more
    walls = []
    for _ in range(5):
        t0 = time.monotonic()
        result = run_as(connect, d, "sbx-alice", "print(1)")
        walls.append(time.monotonic() - t0)
        assert (result["status"], result["stdout"]) == ("ok", b"1\n"), result
    assert statistics.median(walls) < 1.0, walls
