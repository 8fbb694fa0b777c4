"""P after setup: the run's pid 1.  Reap, answer seccomp notifications, collect, report.

The supervisor runs as the run's uid, without capabilities, non-dumpable, under its
own short seccomp filter, and never runs user code.  It waits on three things: the
runner's pidfd (the run is over when it exits), the seccomp listener (a refused
syscall: record its name, answer EPERM, or let it continue in discovery mode) and
SIGCHLD (reap orphans).  When the runner exits it kills whatever else of the run is
left (``kill(-1)`` from pid 1 reaches exactly the namespace), reaps it, reads the
``out/`` folder as the run's uid without following links, and writes one ``exit``
frame.  Exiting as pid 1 tears the namespace down.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import stat
import sys
import time
from typing import Any, NoReturn

from . import libc
from . import seccomp as sc
from .contract import (
    EXIT_SETUP,
    FD_LIFELINE,
    FD_STATUS,
    LINK_DONE,
    LINK_STARTED,
    LINK_WAITING,
    Handoff,
    ServerState,
    WorkerSpec,
    drain,
    write_frame,
)
from .profiles import NEVER_ALLOW

OUT_DIR = "out"
MAX_DEPTH = 8
MAX_DENIED_NAMES = 64
RUN_WRITABLE = ("/work", "/tmp", "/var/tmp", "/dev/shm")


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
        self.started = False  # an exec runtime said LINK_STARTED

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
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        libc.seccomp_load(self.state.supervisor_filter, new_listener=False)

    def wait(self) -> tuple[int, Any]:
        """Answer refused calls and reap until the runner is done: (wait status, rusage or None)."""
        poller = select.poll()
        for fd in (self.pidfd, self.wake_r, FD_LIFELINE):
            poller.register(fd, select.POLLIN)
        if self.listener >= 0:
            poller.register(self.listener, select.POLLIN)
            if self.spec.exec_argv:
                poller.register(self.link, select.POLLIN)
        status: tuple[int, Any] | None = None
        # Without a cgroup the run's CPU time comes from the runner's rusage: wait for the real exit.
        early = bool(self.spec.cgroups)
        while status is None:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == self.listener:
                    if ev & select.POLLIN:
                        _answer(self.listener, self.state, self.spec.discover, self.denied)
                    elif ev & (select.POLLHUP | select.POLLERR):
                        poller.unregister(self.listener)
                elif fd == self.wake_r:
                    drain(self.wake_r)
                    status = _reap(self.runner, block=False) or status
                    if status is None and early and self.handoff.phase() == Handoff.DONE:
                        status = (self.handoff.exit_status() << 8, None)
                elif fd == self.link:
                    status = self._runtime_said(poller, ev, early) or status
                elif fd == FD_LIFELINE:
                    os._exit(EXIT_SETUP)  # the fork server is gone: so is this run
                elif fd == self.pidfd:
                    status = _reap(self.runner, block=True) or status
        return status

    def _runtime_said(self, poller: select.poll, ev: int, early: bool) -> tuple[int, Any] | None:
        """A message of an exec runtime's bootstrap on the link: W (waiting: the worker is
        ready), S (user code starts), D<status> (its code is done: end it now, as a forked
        runner's DONE does).  The link stays open to user code, which can only mislead its
        own verdict with it -- or not say D, and be waited for."""
        try:
            msg = os.read(self.link, 16) if ev & select.POLLIN else b""
        except OSError:
            msg = b""
        if not msg:
            poller.unregister(self.link)
            return None
        if msg == LINK_WAITING and "runtime" not in self.timings:
            self.timings["runtime"] = (time.monotonic_ns() - self.exec_started_ns) // 1000
            write_frame(FD_STATUS, {"t": "ready", "setup_us": self.timings})
        elif msg == LINK_STARTED:
            self.started = True
        elif msg[:1] == LINK_DONE and self.started and early and msg[1:].isdigit():
            return (int(msg[1:]) & 0xFF) << 8, None
        return None

    def answer_queued(self) -> None:
        """Answer the refused calls still queued, so none is left hanging in the report."""
        if self.listener < 0:
            return
        queued = select.poll()
        queued.register(self.listener, select.POLLIN)
        while any(ev & select.POLLIN for _fd, ev in queued.poll(0)):
            if not _answer(self.listener, self.state, self.spec.discover, self.denied):
                break

    def report(self, status: tuple[int, Any], end_ns: int) -> NoReturn:
        """End everything else of the run and write the one exit frame.

        Files in out/ are read once the run is really dead (no torn reads).  Without out/
        the report goes first: killing wakes the runner, whose teardown would otherwise run
        before us; the kill follows within microseconds.
        """
        wstatus, rusage = status
        report = {
            "t": "exit",
            "wstatus": wstatus,
            "utime": rusage.ru_utime if rusage else None,
            "stime": rusage.ru_stime if rusage else None,
            "maxrss_kb": rusage.ru_maxrss if rusage else None,
            "end_ns": end_ns,
            "handoff": self.handoff.read(),
            "started": self.started or (not self.spec.exec_argv and _started(self.link)),
            "denied": [[name, c, allowed] for name, (c, allowed) in self.denied.items()],
            "files": {},
            "files_truncated": False,
        }
        if os.path.lexists(OUT_DIR):
            _kill_rest(wait=True)
            report["files"], report["files_truncated"] = _collect_out(self.spec.out_max_files,
                                                                      self.spec.out_max_bytes)
            write_frame(FD_STATUS, report)
        else:
            write_frame(FD_STATUS, report)
            _kill_rest(wait=False)
        os._exit(0)  # as pid 1: the kernel kills and reaps whatever is left of the namespace


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
    os.set_blocking(link, False)
    try:
        return os.read(link, 1) == LINK_STARTED
    except OSError:
        return False


def _reap(runner: int, block: bool) -> tuple[int, Any] | None:
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


def _collect_out(max_files: int, max_bytes: int) -> tuple[dict[str, bytes], bool]:
    """Regular files under /work/out, read without following links; capped.

    Called once every process of the run is dead, so nothing can swap a directory for a
    link behind our back: plain paths are safe, and only one directory is open at a time.
    Whatever cannot be returned (unreadable, a name that is not UTF-8, too deep, over the
    caps) is skipped and marks the result truncated; the rest still comes back.
    """
    files: dict[str, bytes] = {}
    total = 0
    truncated = False
    try:
        if not stat.S_ISDIR(os.lstat(OUT_DIR).st_mode):
            return files, False
    except OSError:
        return files, False
    stack: list[tuple[str, int]] = [("", 0)]
    while stack:
        rel_dir, depth = stack.pop()
        try:
            with os.scandir(os.path.join(OUT_DIR, rel_dir) if rel_dir else OUT_DIR) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            truncated = True
            continue
        for entry in entries:
            rel = rel_dir + entry.name
            try:
                rel.encode("utf-8")
                st = entry.stat(follow_symlinks=False)
            except (OSError, UnicodeError):
                truncated = True
                continue
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 >= MAX_DEPTH:
                    truncated = True
                else:
                    stack.append((rel + "/", depth + 1))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if len(files) >= max_files or total + st.st_size > max_bytes:
                truncated = True
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    data = os.read(fd, max_bytes - total + 1)
                finally:
                    os.close(fd)
            except OSError:
                truncated = True
                continue
            if total + len(data) > max_bytes:
                truncated = True
                continue
            files[rel] = data
            total += len(data)
    return files, truncated
