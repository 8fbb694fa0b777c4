"""The worker contract's pure parts: the step runner, fd placement, SetupError, the handoff page."""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sandboxd.jail.child.contract import Handoff, SetupError, Step, remap_fds, run_steps

# --- run_steps ---------------------------------------------------------------------------


def fake_clock(*readings_ns: int) -> Callable[[], int]:
    it: Iterator[int] = iter(readings_ns)
    return lambda: next(it)


def recorder(name: str) -> Step[list[str]]:
    """A step that appends its name to the context."""
    return Step(name, lambda ctx: ctx.append(name))


def test_steps_run_in_order_with_their_context() -> None:
    ctx: list[str] = []
    run_steps([recorder(n) for n in ("fds", "mounts", "seccomp")], ctx,
              clock=fake_clock(0, 1000, 1000, 2000, 2000, 3000))
    assert ctx == ["fds", "mounts", "seccomp"]


def test_timings_are_microseconds_per_step() -> None:
    ctx: list[str] = []
    took = run_steps([recorder("a"), recorder("b"), recorder("c")], ctx,
                     clock=fake_clock(1_000_000, 1_005_999, 2_000_000, 2_000_500, 10_000_000, 13_000_000))
    assert took == {"a": 5, "b": 0, "c": 3000}
    assert list(took) == ["a", "b", "c"]


def test_no_steps_no_timings() -> None:
    assert run_steps([], None, clock=fake_clock()) == {}


def test_the_real_clock_gives_non_negative_integers() -> None:
    took = run_steps([Step("x", lambda _: None)], None)
    assert isinstance(took["x"], int) and took["x"] >= 0


def test_the_first_failing_step_ends_the_list() -> None:
    ran: list[str] = []

    def fail(ctx: list[str]) -> None:
        ctx.append("b")
        raise OSError(errno.EPERM, "Operation not permitted")

    steps = [recorder("a"), Step("b", fail), recorder("c")]
    with pytest.raises(SetupError) as info:
        run_steps(steps, ran, clock=fake_clock(0, 0, 0, 0, 0, 0))
    assert ran == ["a", "b"]
    assert info.value.step == "b"
    assert info.value.errno == errno.EPERM
    assert "Operation not permitted" in info.value.message
    assert isinstance(info.value.__cause__, OSError)


def test_os_error_subclasses_keep_their_errno() -> None:
    def missing(_: object) -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/usr/lib/python3")

    with pytest.raises(SetupError) as info:
        run_steps([Step("root", missing)], None)
    assert (info.value.step, info.value.errno) == ("root", errno.ENOENT)
    assert "/usr/lib/python3" in info.value.message


def test_os_error_without_errno_is_errno_zero() -> None:
    def bare(_: object) -> None:
        raise OSError("no errno here")

    with pytest.raises(SetupError) as info:
        run_steps([Step("bare", bare)], None)
    assert info.value.errno == 0
    assert info.value.message == "no errno here"


def test_other_exceptions_are_errno_zero_with_their_type_name() -> None:
    def bad(_: object) -> None:
        raise ValueError("bad filter")

    with pytest.raises(SetupError) as info:
        run_steps([Step("seccomp", bad)], None)
    assert info.value.step == "seccomp"
    assert info.value.errno == 0
    assert info.value.message == "ValueError: bad filter"
    assert isinstance(info.value.__cause__, ValueError)


def test_a_setup_error_from_a_step_passes_through_unchanged() -> None:
    original = SetupError("inner", 28, "disk full")

    def raise_it(_: object) -> None:
        raise original

    with pytest.raises(SetupError) as info:
        run_steps([Step("outer", raise_it)], None)
    assert info.value is original
    assert (info.value.step, info.value.errno, info.value.message) == ("inner", 28, "disk full")


def test_base_exceptions_are_not_setup_errors() -> None:
    def leave(_: object) -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        run_steps([Step("exit", leave)], None)


# --- remap_fds through its seam -----------------------------------------------------------


class FakeOps:
    """Records the calls remap_fds makes; dup_above hands out fresh numbers from ``next_fd``."""

    def __init__(self, next_fd: int) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.next_fd = next_fd

    def dup_above(self, fd: int, low: int) -> int:
        self.calls.append(("dup_above", fd, low))
        new = max(self.next_fd, low)
        self.next_fd = new + 1
        return new

    def dup2(self, fd: int, fd2: int) -> int:
        self.calls.append(("dup2", fd, fd2))
        return fd2

    def closerange(self, low: int, high: int) -> None:
        self.calls.append(("closerange", low, high))


def test_remap_fds_exact_calls() -> None:
    ops = FakeOps(next_fd=10)
    remap_fds([7, 3, 9], 3, ops)
    assert ops.calls == [
        ("dup_above", 7, 6), ("dup_above", 3, 6), ("dup_above", 9, 6),
        ("dup2", 10, 3), ("dup2", 11, 4), ("dup2", 12, 5),
        ("closerange", 6, 2**31 - 1),
    ]


def test_remap_fds_temporaries_are_above_the_target_range() -> None:
    ops = FakeOps(next_fd=0)  # the lowest free fd would be in the target range: dup_above must not use it
    remap_fds([4, 5], 4, ops)
    assert ops.calls == [("dup_above", 4, 6), ("dup_above", 5, 6), ("dup2", 6, 4), ("dup2", 7, 5),
                         ("closerange", 6, 2**31 - 1)]


def test_remap_no_fds_closes_from_start() -> None:
    ops = FakeOps(next_fd=10)
    remap_fds([], 3, ops)
    assert ops.calls == [("closerange", 3, 2**31 - 1)]


def _describe(fd: int) -> list[int] | None:
    """(inode, access mode) of an open fd, None if closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return [st.st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, int(stat.S_ISFIFO(st.st_mode))]


def test_remap_fds_for_real_in_a_forked_child() -> None:
    p1, p2, p3 = os.pipe(), os.pipe(), os.pipe()
    report_r, report_w = os.pipe()
    ino = {name: os.fstat(p[0]).st_ino for name, p in (("p1", p1), ("p2", p2), ("p3", p3))}
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(report_r)
            os.dup2(p2[1], 200)  # a source inside the target range, wanted at 201: must not be clobbered
            os.dup2(p1[0], 205)  # a stray fd above the range: must be closed
            remap_fds([p3[0], 200, p1[1]], 200)
            seen = {fd: _describe(fd) for fd in range(200, 211)}
            data = json.dumps(seen).encode()
            while data:
                data = data[os.write(report_w, data):]
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    chunks = []
    while chunk := os.read(report_r, 65536):
        chunks.append(chunk)
    os.close(report_r)
    _, wstatus = os.waitpid(pid, 0)
    for fd in (*p1, *p2, *p3):
        os.close(fd)
    assert os.WIFEXITED(wstatus) and os.WEXITSTATUS(wstatus) == 0
    seen = {int(k): v for k, v in json.loads(b"".join(chunks)).items()}
    assert seen[200] == [ino["p3"], os.O_RDONLY, 1]
    assert seen[201] == [ino["p2"], os.O_WRONLY, 1]
    assert seen[202] == [ino["p1"], os.O_WRONLY, 1]
    assert {fd for fd, d in seen.items() if d is not None} == {200, 201, 202}


# --- SetupError ---------------------------------------------------------------------------


def test_setup_error_fields_and_text() -> None:
    e = SetupError("mounts", 1, "mount /proc: Operation not permitted")
    assert (e.step, e.errno, e.message) == ("mounts", 1, "mount /proc: Operation not permitted")
    assert str(e) == "mounts: mount /proc: Operation not permitted"


def test_setup_error_dict_round_trip() -> None:
    e = SetupError("cgroup", 13, "Permission denied")
    d = e.to_dict()
    assert d == {"step": "cgroup", "errno": 13, "message": "Permission denied"}
    back = SetupError.from_dict(d)
    assert back.to_dict() == d
    assert str(back) == str(e)


def test_setup_error_from_a_partial_dict() -> None:
    assert SetupError.from_dict({}).to_dict() == {"step": "worker", "errno": 0, "message": ""}
    assert SetupError.from_dict({}, default_step="runner").step == "runner"
    assert SetupError.from_dict({"step": "", "errno": 5}, default_step="runner").to_dict() == {
        "step": "runner", "errno": 5, "message": ""}


def test_setup_error_from_a_hostile_dict() -> None:
    e = SetupError.from_dict({"step": 42, "errno": "13", "message": None})
    assert e.to_dict() == {"step": "42", "errno": 0, "message": ""}
    assert SetupError.from_dict({"errno": 2.5}).errno == 0


def test_setup_error_from_os_error() -> None:
    e = SetupError.from_os_error("spawn", OSError(errno.EAGAIN, "Resource temporarily unavailable"))
    assert e.to_dict() == {"step": "spawn", "errno": errno.EAGAIN,
                           "message": "[Errno 11] Resource temporarily unavailable"}
    assert SetupError.from_os_error("spawn", OSError("plain")).errno == 0


def test_setup_error_from_another_exception() -> None:
    e = SetupError.from_os_error("spawn", RuntimeError("boom"))
    assert e.to_dict() == {"step": "spawn", "errno": 0, "message": "RuntimeError: boom"}
    assert SetupError.from_os_error("x", KeyError("k")).message == "KeyError: 'k'"


def test_setup_error_round_trips_through_the_wire() -> None:
    from sandboxd.common import protocol

    e = SetupError.from_os_error("fds", OSError(errno.EBADF, "Bad file descriptor"))
    wire = protocol.encode(e.to_dict())
    back = SetupError.from_dict(protocol.decode_body(wire[protocol.HEADER.size:]))
    assert back.to_dict() == e.to_dict()


# --- Handoff ------------------------------------------------------------------------------


@pytest.fixture
def page() -> Iterator[Handoff]:
    buf = mmap.mmap(-1, mmap.PAGESIZE)
    yield Handoff(buf)
    buf.close()


def test_a_fresh_page_reads_as_setup(page: Handoff) -> None:
    assert page.phase() == Handoff.SETUP
    assert page.read() == {"phase": Handoff.SETUP, "errno": 0, "started_ns": 0, "step": "", "exception": "",
                           "message": ""}
    assert page.exit_status() == 0


def test_the_page_fits_in_one_page() -> None:
    assert Handoff.LAYOUT.size + Handoff.STATUS.size <= mmap.PAGESIZE
    assert Handoff.SETUP < Handoff.WAITING < Handoff.RUNNING < Handoff.DONE


def test_write_and_read(page: Handoff) -> None:
    page.write(Handoff.RUNNING, step="request", err=-4, exc="KeyError", message="héllo", started_ns=2**63 + 5)
    assert page.phase() == Handoff.RUNNING
    assert page.read() == {"phase": Handoff.RUNNING, "errno": -4, "started_ns": 2**63 + 5, "step": "request",
                           "exception": "KeyError", "message": "héllo"}


def test_write_replaces_everything(page: Handoff) -> None:
    page.write(Handoff.RUNNING, step="a-long-step-name", exc="SomeLongExceptionName", message="m" * 200,
               started_ns=9)
    page.write(Handoff.WAITING)
    assert page.read() == {"phase": Handoff.WAITING, "errno": 0, "started_ns": 0, "step": "", "exception": "",
                           "message": ""}


def test_long_fields_are_truncated(page: Handoff) -> None:
    page.write(Handoff.SETUP, step="s" * 100, exc="E" * 100, message="m" * 1000)
    d = page.read()
    assert d["step"] == "s" * 32
    assert d["exception"] == "E" * 64
    assert d["message"] == "m" * 256


def test_a_multibyte_character_cut_in_half_still_reads(page: Handoff) -> None:
    page.write(Handoff.SETUP, message="x" + "é" * 200)  # 401 bytes: the cut falls inside an "é"
    message = page.read()["message"]
    assert message.startswith("x" + "é" * 127)
    assert message.endswith("\ufffd")


def test_setup_failed(page: Handoff) -> None:
    page.setup_failed(SetupError("rlimits", 22, "setrlimit RLIMIT_AS: Invalid argument"))
    d = page.read()
    assert d["phase"] == Handoff.SETUP
    assert SetupError.from_dict(d).to_dict() == {"step": "rlimits", "errno": 22,
                                                 "message": "setrlimit RLIMIT_AS: Invalid argument"}


def test_set_exception_keeps_the_rest(page: Handoff) -> None:
    page.write(Handoff.RUNNING, step="st", err=3, exc="Old", message="msg", started_ns=77)
    page.set_exception("MemoryError")
    assert page.read() == {"phase": Handoff.RUNNING, "errno": 3, "started_ns": 77, "step": "st",
                           "exception": "MemoryError", "message": "msg"}
    page.set_exception("")
    assert page.read()["exception"] == ""


def test_finish_sets_done_and_the_exit_status(page: Handoff) -> None:
    page.write(Handoff.RUNNING, started_ns=42)
    page.set_exception("ValueError")
    page.finish(3)
    assert page.phase() == Handoff.DONE
    assert page.exit_status() == 3
    assert page.read() == {"phase": Handoff.DONE, "errno": 0, "started_ns": 42, "step": "",
                           "exception": "ValueError", "message": ""}


def test_write_after_finish_leaves_the_exit_status(page: Handoff) -> None:
    page.finish(7)
    page.write(Handoff.RUNNING)
    assert page.exit_status() == 7


@pytest.mark.parametrize(("given", "status"), [(0, 0), (1, 1), (255, 255), (256, 0), (257, 1), (-1, 255)])
def test_exit_status_is_one_byte(page: Handoff, given: int, status: int) -> None:
    page.finish(given)
    assert page.exit_status() == status

