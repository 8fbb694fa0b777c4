"""Protocol fuzzing against the real daemon (hypothesis).

``make test`` runs a short version; ``make fuzz`` runs 25,000 examples per property
(SANDBOXD_FUZZ_EXAMPLES), about 126,000 inputs in all.
Every input gets a well-formed answer with a stable error code (or, for framing the
daemon cannot recover from, a closed connection), the daemon stays up, and its memory
stays bounded.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from harness import DaemonProcess, recv_frame, rss_kb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxd.common import errors, protocol
from sandboxd.common.errors import RequestError
from sandboxd.config import QuotaLimits, parse
from sandboxd.plan import build

EXAMPLES = int(os.environ.get("SANDBOXD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
CODES = set(errors.CODES) | {"bad_config"}
OPS = ["hello", "run", "status", "usage", "kill", "jobs", "root_why", "syscalls", "nonsense", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=64), st.binary(max_size=64))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.one_of(st.text(max_size=8), scalars),
                                                                       inner, max_size=5)), max_leaves=20)
run_fields = st.fixed_dictionaries({}, optional={
    "code": st.one_of(st.sampled_from(["pass", "print(1)", "1/0", "def ("]), values),
    "language": st.one_of(st.just("python3"), values),
    "stdin": st.one_of(st.binary(max_size=256), values),
    "timeout_ms": st.one_of(st.integers(-5, 10**12), values),
    "cpu_ms": st.one_of(st.integers(-5, 10**12), values),
    "memory_mb": st.one_of(st.integers(-5, 10**9), values),
    "max_output": st.one_of(st.integers(-5, 10**12), values),
    "network": st.one_of(st.booleans(), values),
    "files": st.one_of(st.dictionaries(st.text(max_size=20), st.binary(max_size=32), max_size=4), values),
    "env": st.one_of(st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=4), values),
    "run_id": values, "module": st.one_of(st.sampled_from(["json", "nope", "../x"]), values),
    "user": values, "uid": values,
})
requests = st.builds(lambda op, rid, fields, extra: {**extra, **fields, "op": op, "id": rid},
                     st.one_of(st.sampled_from(OPS), values), st.one_of(st.none(), st.integers(0, 10**9),
                                                                        st.text(max_size=20), values),
                     run_fields, st.dictionaries(st.text(max_size=10), values, max_size=3))


class Conn:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None

    def fresh(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(60)
            self.sock.connect(self.path)
        return self.sock

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def answer(self) -> Any:
        resp = recv_frame(self.fresh())
        if resp is None:
            self.drop()
        return resp


def check_envelope(resp: dict[str, Any]) -> None:
    assert isinstance(resp, dict) and "ok" in resp and "id" in resp
    if resp["ok"] is False:
        err = resp["error"]
        assert err["code"] in CODES, err
        assert isinstance(err["message"], str) and err["message"]
        assert err["code"] != "internal", err  # hostile input is never an internal error


@pytest.fixture(scope="module")
def conn(daemon: DaemonProcess) -> Iterator[Conn]:
    c = Conn(daemon.socket)
    yield c
    c.drop()


@FUZZ
@given(requests)
def test_random_requests_get_stable_answers(conn: Conn, request: dict[str, Any]) -> None:
    try:
        frame = protocol.encode(request)
    except (ValueError, OverflowError, TypeError):
        return  # not encodable as msgpack: nothing a client could send
    conn.fresh().sendall(frame)
    resp = conn.answer()
    assert resp is not None, "the daemon closed the connection on a well-framed request"
    while "progress" in resp and "ok" not in resp:
        resp = conn.answer()
    check_envelope(resp)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bodies_are_bad_frames(conn: Conn, body: bytes) -> None:
    conn.fresh().sendall(struct.pack(">I", len(body)) + body)
    resp = conn.answer()
    assert resp is not None
    if resp["ok"] is False:
        assert resp["error"]["code"] in ("bad_frame", "bad_request", "unknown_op", "forbidden"), resp
    else:  # the random bytes happened to be a valid request
        check_envelope(resp)


@FUZZ
@given(st.integers((16 << 20) + 1, 2**32 - 1))
def test_oversized_lengths_are_refused_and_closed(daemon: DaemonProcess, length: int) -> None:
    c = Conn(daemon.socket)
    c.fresh().sendall(struct.pack(">I", length) + b"\x80")
    resp = c.answer()
    assert resp is not None and resp["error"]["code"] == "frame_too_large"
    assert c.answer() is None  # and the connection is closed
    c.drop()


@settings(max_examples=max(20, EXAMPLES // 20), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([{"op": "hello", "id": 1}, {"op": "run", "id": 2, "code": "print(2)"}]),
       st.integers(1, 7))
def test_frames_written_in_tiny_pieces(daemon: DaemonProcess, request: dict[str, Any], piece: int) -> None:
    c = Conn(daemon.socket)
    s = c.fresh()
    frame = protocol.encode(request)
    for i in range(0, len(frame), piece):
        s.sendall(frame[i : i + piece])
    resp = c.answer()
    assert resp["ok"] is True and resp["id"] == request["id"]
    c.drop()


@FUZZ
@given(st.binary(min_size=1, max_size=3))
def test_truncated_headers_then_hangup(daemon: DaemonProcess, partial: bytes) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket)
    s.sendall(partial)
    s.close()
    assert daemon.proc is not None and daemon.proc.poll() is None


LIMITS = QuotaLimits(max_timeout=10.0, max_memory=512 << 20, network=True)
CFG = parse({})


@FUZZ
@given(run_fields)
def test_request_validation_only_raises_request_errors(fields: dict[str, Any]) -> None:
    try:
        build({"op": "run", **fields}, LIMITS, CFG, "r")
    except RequestError as e:
        assert e.code in ("bad_request", "forbidden") and e.details.get("field")


def test_daemon_survived_and_memory_is_bounded(daemon: DaemonProcess) -> None:
    """Runs last in this module: the daemon is alive, answers, and did not balloon."""
    assert daemon.proc is not None and daemon.proc.poll() is None
    with daemon.client() as c:
        assert c.hello()["ok"]
    rss = rss_kb(daemon.proc.pid)
    print(f"daemon alive after fuzzing, RSS {rss / 1024:.1f} MiB")  # make fuzz shows it (-rP)
    assert rss < 120_000
