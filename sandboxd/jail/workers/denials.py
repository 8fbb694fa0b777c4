"""Refused system calls, answered from the daemon's event loop and counted by name.

Every worker's filter defaults to ``SECCOMP_RET_USER_NOTIF``: a call outside the profile
waits until its listener is answered.  R hands the listener to the daemon before it
waits for its request (``LINK_ARMED``); from then on the daemon -- one long-lived
handler for every worker, instead of a supervisor process per run -- reads each
notification, names the call, counts it and answers ``EPERM`` (in discovery mode: lets
it through, unless it is never allowed).

A run that refuses calls in a loop costs the daemon a wake-up each: answers are paced by
a budget per worker (``BURST`` at once, then ``RATE`` a second).  Past it the listener is
not read for a while; the run's refused calls wait meanwhile, on its own clock.  Only
``POLLIN`` leads to a read: a listener whose run is gone (``POLLHUP``) is dropped, since
reading it then would block.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import time
from typing import Any

from ..policy import seccomp as sc
from ..policy.profiles import NEVER_ALLOW

MAX_DENIED_NAMES = 64
BURST = 2000  # answers a worker gets at once
RATE = 2000.0  # then answers a second
BATCH = 64  # notifications answered per wake-up, at most


class SyscallNames:
    """Native syscall number -> name (from the fork server's libseccomp), and the native ABI."""

    def __init__(self, names: dict[int, str], audit_arch: int) -> None:
        self.names, self.audit_arch = names, audit_arch

    def of(self, note: sc.Notification) -> tuple[str, bool]:
        """(the call's name, whether it is a native call)."""
        if note.arch != self.audit_arch:
            return f"arch {note.arch:#x} syscall {note.nr}", False
        if note.nr >= 0x40000000:
            return f"x32:{self.names.get(note.nr & 0x3FFFFFFF, note.nr)}", False
        return self.names.get(note.nr, f"syscall {note.nr}"), True


class Denials:
    def __init__(self, listener: int, names: SyscallNames, discover: bool) -> None:
        self.listener = listener
        self.names = names
        self.discover = discover
        self.counts: dict[str, list[Any]] = {}  # name -> [count, allowed]
        self.reported: dict[str, int] = {}  # counts already in a cell's report
        self.loop = asyncio.get_running_loop()
        self.poller = select.poll()
        self.poller.register(listener, select.POLLIN)
        self.tokens = float(BURST)
        self.stamp = time.monotonic()
        self.reading = False
        self.resume: asyncio.TimerHandle | None = None
        self._read_on()

    def _read_on(self) -> None:
        if self.listener >= 0 and not self.reading:
            self.loop.add_reader(self.listener, self._readable)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.listener)
            self.reading = False

    def _readable(self) -> None:
        now = time.monotonic()
        self.tokens = min(float(BURST), self.tokens + (now - self.stamp) * RATE)
        self.stamp = now
        for _ in range(BATCH):
            if self.tokens < 1.0:
                self._read_off()  # the run's refused calls wait; it pays in wall time
                self.resume = self.loop.call_later((1.0 - self.tokens) / RATE, self._resume)
                return
            events = self.poller.poll(0)
            if not events:
                return
            if not events[0][1] & select.POLLIN:
                self._read_off()  # POLLHUP: the run is gone, nothing more will come
                return
            self.tokens -= 1.0
            if not self._answer():
                return

    def _resume(self) -> None:
        self.resume = None
        self._read_on()
        self._readable()

    def _answer(self) -> bool:
        try:
            note = sc.receive(self.listener)
        except OSError:
            self._read_off()
            return False
        if note is None:
            return True  # the caller went away meanwhile
        name, native = self.names.of(note)
        allow = self.discover and native and name not in NEVER_ALLOW
        if name not in self.counts and len(self.counts) >= MAX_DENIED_NAMES:
            name = "(other)"  # a run calling thousands of distinct numbers must not bloat the report
        entry = self.counts.setdefault(name, [0, allow])
        entry[0] += 1
        try:
            sc.respond(self.listener, note.id, errno.EPERM, allow=allow)
        except OSError:
            pass
        return True

    def report(self) -> list[list[Any]]:
        """Every refusal so far: [name, count, allowed]."""
        return [[name, c, allowed] for name, (c, allowed) in self.counts.items()]

    def since_last(self) -> list[list[Any]]:
        """The refusals since the last call (a session's cells each get their own)."""
        out = []
        for name, (count, allowed) in self.counts.items():
            new = count - self.reported.get(name, 0)
            if new:
                out.append([name, new, allowed])
            self.reported[name] = count
        return out

    def close(self) -> None:
        self._read_off()
        if self.resume is not None:
            self.resume.cancel()
            self.resume = None
        if self.listener >= 0:
            os.close(self.listener)
            self.listener = -1
