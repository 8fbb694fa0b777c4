"""P after setup: the run's pid 1.  Reap, answer seccomp notifications, collect, report.

The supervisor runs as the run's uid, without capabilities, non-dumpable, under its
own short seccomp filter, and never runs user code.  It waits on: the runner's pidfd
(the run is over when it exits), the seccomp listener (a refused syscall: record its
name, answer EPERM, or let it continue in discovery mode), SIGCHLD (reap orphans), the
link to the runner (it says when it is waiting, when user code starts, when an exec
runtime's code is done, and when a session's cell is done -- untrusted: it can only
mislead its own run's report), and the daemon's control pipe (interrupt the running
cell).  After each cell of a session it reports the cell, with the out/ files new since
the last one and the figures.  When the runner exits it kills whatever else of the run
is left (``kill(-1)`` from pid 1 reaches exactly the namespace), reaps it, reads the
``out/`` folder (``collect``) and writes one ``exit`` frame.  Exiting as pid 1 tears the
namespace down.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import sys
import time
from typing import Any, NoReturn

from ...common import protocol
from ..kernel import libc
from ..policy import seccomp as sc
from ..policy.profiles import NEVER_ALLOW
from . import collect
from .contract import (
    CONTROL_INTERRUPT,
    EXIT_SETUP,
    FD_CONTROL,
    FD_LIFELINE,
    FD_STATUS,
    LINK_CELL,
    LINK_DONE,
    LINK_SESSION,
    LINK_STARTED,
    LINK_WAITING,
    MAX_LINK_MESSAGE,
    Handoff,
    ServerState,
    WorkerSpec,
    drain,
    write_frame,
)

MAX_DENIED_NAMES = 64
RUN_WRITABLE = ("/work", "/tmp", "/var/tmp", "/dev/shm")
Status = tuple[int, Any]  # (wait status, rusage or None)


def supervise(spec: WorkerSpec, state: ServerState, runner: int, handoff: Handoff, listener: int,
              timings: dict[str, int], link: int) -> NoReturn:
    sup = Supervisor(spec, state, runner, handoff, listener, link)
    sup.arm(timings)
    status = sup.wait()
    end_ns = time.monotonic_ns()
    sup.answer_queued()
    sup.report(status, end_ns)


class Supervisor:
    """P after its setup: one runner to watch, its seccomp listener, the status pipe."""

    def __init__(self, spec: WorkerSpec, state: ServerState, runner: int, handoff: Handoff, listener: int,
                 link: int) -> None:
        self.spec, self.state, self.runner, self.handoff = spec, state, runner, handoff
        self.listener, self.link = listener, link
        self.denied: dict[str, list[Any]] = {}  # name -> [count, allowed]
        self.denied_reported: dict[str, int] = {}  # counts already in a cell's report
        self.started = False  # the runner said LINK_STARTED: user code runs from now on
        self.cells = 0
        self.out_seen: collect.Seen = {}
        self.figures_seen: set[str] = set()
        # Without a cgroup the run's CPU time comes from the runner's rusage: wait for the real exit.
        self.early = bool(spec.cgroups)

    def arm(self, timings: dict[str, int]) -> None:
        """Signals, the ready frame (if R got through its setup), then P's own filter."""
        # As the namespace's pid 1, P gets only the signals it has handlers for: none that could
        # end it (SIGINT's KeyboardInterrupt would turn the run's verdict into a sandbox error).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Nothing P might still import may come from places the run can write.
        sys.path[:] = [p for p in sys.path if p and not p.startswith(RUN_WRITABLE)]
        self.pidfd = os.pidfd_open(self.runner)
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, _ignore)
        signal.signal(signal.SIGUSR1, _ignore)  # the runner: "my code is done" (see runtime)
        self.timings = timings
        # An exec runtime is ready once its bootstrap waits for the request (it says so on the
        # link); a forked runner is ready as soon as its filter is loaded.
        self.exec_started_ns = time.monotonic_ns() if self.spec.exec_argv else 0
        if self.listener >= 0 and not self.spec.exec_argv:
            write_frame(FD_STATUS, {"t": "ready", "setup_us": timings})
        os.set_blocking(self.link, False)
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        libc.seccomp_load(self.state.supervisor_filter, new_listener=False)

    def wait(self) -> Status:
        """Answer refused calls, relay cells and reap until the runner is done."""
        self.poller = select.poll()
        for fd in (self.pidfd, self.wake_r, FD_LIFELINE, FD_CONTROL):
            self.poller.register(fd, select.POLLIN)
        if self.listener >= 0:
            self.poller.register(self.listener, select.POLLIN)
            self.poller.register(self.link, select.POLLIN)
        status: Status | None = None
        while status is None:
            try:
                events = self.poller.poll()
            except InterruptedError:
                continue
            for fd, ev in events:
                status = self._event(fd, ev) or status
        return status

    def _event(self, fd: int, ev: int) -> Status | None:
        if fd == self.listener:
            if ev & select.POLLIN:
                _answer(self.listener, self.state, self.spec.discover, self.denied)
            elif ev & (select.POLLHUP | select.POLLERR):
                self.poller.unregister(self.listener)
        elif fd == self.wake_r:
            drain(self.wake_r)
            status = _reap(self.runner, block=False)
            if status is None and self.early and self.handoff.phase() == Handoff.DONE:
                status = (self.handoff.exit_status() << 8, None)
            return status
        elif fd == self.link:
            return self._runner_said(ev)
        elif fd == FD_CONTROL:
            self._daemon_said(ev)
        elif fd == FD_LIFELINE:
            os._exit(EXIT_SETUP)  # the fork server is gone: so is this run
        elif fd == self.pidfd:
            return _reap(self.runner, block=True)
        return None

    def _runner_said(self, ev: int) -> Status | None:
        """W (an exec runtime waits: the worker is ready), S (user code starts), D<status> (an
        exec runtime's code is done: end it now, as a forked runner's DONE does), O (a session
        is open), C<report> (a session's cell is done)."""
        try:
            msg = os.read(self.link, MAX_LINK_MESSAGE) if ev & select.POLLIN else b""
        except BlockingIOError:
            return None
        except OSError:
            msg = b""
        if not msg:
            self.poller.unregister(self.link)
            return None
        kind = msg[:1]
        if kind == LINK_WAITING and self.spec.exec_argv and "runtime" not in self.timings:
            self.timings["runtime"] = (time.monotonic_ns() - self.exec_started_ns) // 1000
            write_frame(FD_STATUS, {"t": "ready", "setup_us": self.timings})
        elif kind == LINK_STARTED:
            self.started = True
        elif kind == LINK_DONE and self.started and self.early and msg[1:].isdigit():
            return (int(msg[1:]) & 0xFF) << 8, None
        elif kind == LINK_CELL and self.started:
            self._cell(msg[1:])
        elif kind == LINK_SESSION and self.started:
            write_frame(FD_STATUS, {"t": "session"})
        return None

    def _daemon_said(self, ev: int) -> None:
        try:
            command = os.read(FD_CONTROL, 64) if ev & select.POLLIN else b""
        except OSError:
            command = b""
        if not command:
            self.poller.unregister(FD_CONTROL)
        elif CONTROL_INTERRUPT in command:
            try:
                os.kill(self.runner, signal.SIGINT)  # a KeyboardInterrupt in the running cell
            except OSError:
                pass

    def _cell(self, raw: bytes) -> None:
        """A cell of a session is done: report it, its refusals and what it left."""
        try:
            if self.spec.exec_argv:  # an exec runtime's bootstrap speaks JSON
                said = json.loads(raw)
            else:
                said = protocol.decode_body(raw, MAX_LINK_MESSAGE, max_items=16, max_containers=4)
        except (protocol.ProtocolError, ValueError, RecursionError):
            said = {}
        said = said if isinstance(said, dict) else {}
        self.cells += 1
        files, truncated = collect.out_files(self.spec.out_max_files, self.spec.out_max_bytes, self.out_seen)
        denied = []
        for name, (count, allowed) in self.denied.items():
            new = count - self.denied_reported.get(name, 0)
            if new:
                denied.append([name, new, allowed])
            self.denied_reported[name] = count
        exit_code = said.get("exit_code")
        write_frame(FD_STATUS, {
            "t": "cell", "seq": self.cells, "exception": _text(said.get("exception"), 128),
            "message": _text(said.get("message"), 4096), "traceback": _text(said.get("traceback"), 1 << 15),
            "value": _text(said.get("value"), 1 << 15), "exit_code": exit_code if isinstance(exit_code, int) else None,
            "interrupted": said.get("interrupted") is True,
            "denied": denied, "files": files, "files_truncated": truncated,
            "display": collect.display(self.spec.out_max_bytes, self.figures_seen),
        })

    def answer_queued(self) -> None:
        """Answer the refused calls still queued, so none is left hanging in the report."""
        if self.listener < 0:
            return
        queued = select.poll()
        queued.register(self.listener, select.POLLIN)
        while any(ev & select.POLLIN for _fd, ev in queued.poll(0)):
            if not _answer(self.listener, self.state, self.spec.discover, self.denied):
                break

    def report(self, status: Status, end_ns: int) -> NoReturn:
        """End everything else of the run and write the one exit frame.

        Files in out/ are read once the run is really dead (no torn reads).  With nothing to
        collect (an empty out/, no figures) the report goes first: killing wakes the runner,
        whose teardown would otherwise run before us; the kill follows within microseconds.
        """
        wstatus, rusage = status
        if not self.started and not self.spec.exec_argv:
            self.started = _started(self.link)  # R said it and closed the link before poll saw it
        report = {
            "t": "exit",
            "wstatus": wstatus,
            "utime": rusage.ru_utime if rusage else None,
            "stime": rusage.ru_stime if rusage else None,
            "maxrss_kb": rusage.ru_maxrss if rusage else None,
            "end_ns": end_ns,
            "handoff": self.handoff.read(),
            "started": self.started,
            "denied": [[name, c, allowed] for name, (c, allowed) in self.denied.items()],
            "files": {},
            "files_truncated": False,
            "display": [],
        }
        if self.cells or collect.anything_to_collect():
            _kill_rest(wait=True)
            files, truncated = collect.out_files(self.spec.out_max_files, self.spec.out_max_bytes,
                                                 self.out_seen if self.cells else None)
            report.update(files=files, files_truncated=truncated,
                          display=collect.display(self.spec.out_max_bytes, self.figures_seen if self.cells else None))
            write_frame(FD_STATUS, report)
        else:
            write_frame(FD_STATUS, report)
            _kill_rest(wait=False)
        os._exit(0)  # as pid 1: the kernel kills and reaps whatever is left of the namespace


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _ignore(signum: int, frame: Any) -> None:
    """A handler that does nothing: the signal only wakes the poll (set_wakeup_fd)."""


def _answer(listener: int, state: ServerState, discover: bool, denied: dict[str, list[Any]]) -> bool:
    try:
        note = sc.receive(listener)
    except OSError:
        return False
    if note is None:
        return True
    if note.arch != state.audit_arch:
        name, native = f"arch {note.arch:#x} syscall {note.nr}", False
    elif note.nr >= 0x40000000:
        name, native = f"x32:{state.syscall_names.get(note.nr & 0x3FFFFFFF, note.nr)}", False
    else:
        name, native = state.syscall_names.get(note.nr, f"syscall {note.nr}"), True
    allow = discover and native and name not in NEVER_ALLOW
    if name not in denied and len(denied) >= MAX_DENIED_NAMES:
        name = "(other)"  # a run calling thousands of distinct numbers must not bloat the report
    entry = denied.setdefault(name, [0, allow])
    entry[0] += 1
    sc.respond(listener, note.id, errno.EPERM, allow=allow)
    return True


def _started(link: int) -> bool:
    """Did the runner get through its setup (and so on to user code)?"""
    try:
        return os.read(link, 1) == LINK_STARTED
    except OSError:
        return False


def _reap(runner: int, block: bool) -> Status | None:
    """Reap zombies; return (wstatus, rusage) once the runner itself has been reaped."""
    result = None
    while True:
        try:
            pid, wstatus, rusage = os.wait3(0 if block else os.WNOHANG)
        except ChildProcessError:
            return result
        if pid == 0:
            return result
        if pid == runner:
            return wstatus, rusage


def _kill_rest(wait: bool) -> None:
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        return
    while wait:
        try:
            os.wait3(0)
        except ChildProcessError:
            return
