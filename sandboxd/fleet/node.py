"""The node as a load balancer sees it: ready or why not, its capacity, the agent's word, and
the front process's own drain.

    capacity(status, draining)    the numbers (pure): workers, running, queued, free, ready
                                  workers per runtime, sessions, draining
    weight(cap)                   free capacity in percent (1..100) for the agent's weight
    agent_line(view)              ``up ready 75%``, ``drain`` or ``down``: one line
    Node.view()                   all of it at once, from one ``status`` (the caller caches it)
    Drain                         the process's drain: begun on SIGTERM, never undone; tracks
                                  requests in flight, waits for them for a grace, then cuts them

The agent's words are HAProxy's (agent-check): ``up`` and ``down`` are the operational
state, ``ready`` and ``drain`` the administrative one, ``N%`` the weight.  After ``drain``
HAProxy keeps the server draining until the agent says ``ready``, so an answer for a ready
node always carries both (``up ready 75%``).  A node that is full still says ``1%``, never
``0%`` (which HAProxy takes as a drain): it is the last choice, not out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sandboxd.fleet")
Status = Callable[[], Awaitable[tuple[dict[str, Any] | None, str]]]  # the daemon's status (cached), or why not
Checks = Callable[[dict[str, Any]], Awaitable[list[str]]]  # the front process's own problems, given the status


def runtime_of(pool_key: str) -> str:
    """``python3+net@default`` -> ``python3``."""
    return pool_key.split("@", 1)[0].split("+", 1)[0]


def capacity(status: dict[str, Any] | None, draining: bool) -> dict[str, Any]:
    """The numbers /capacity shows and the agent weighs, from the daemon's ``status``."""
    st = status or {}
    cap = st.get("capacity") or {}
    workers, running, queued = (int(cap.get(k) or 0) for k in ("capacity", "running", "queued"))
    ready: dict[str, int] = {}
    for key, pool in ((st.get("pool") or {}).get("profiles") or {}).items():
        if isinstance(pool, dict) and isinstance(pool.get("ready"), int):
            ready[runtime_of(str(key))] = ready.get(runtime_of(str(key)), 0) + pool["ready"]
    sessions = st.get("sessions") or {}
    return {"workers": workers, "running": running, "queued": queued, "queue_max": int(cap.get("queue_max") or 0),
            "free": max(0, workers - running - queued), "ready_workers": ready,
            "sessions": {k: int(sessions.get(k) or 0) for k in ("open", "limit", "busy")},
            "draining": draining or bool(st.get("draining"))}


def weight(cap: dict[str, Any]) -> int:
    """Free workers as a percentage of all of them, 1 to 100."""
    workers, free = int(cap["workers"]), int(cap["free"])
    if not workers:
        return 1
    return max(1, min(100, round(100 * free / workers)))


@dataclass(frozen=True)
class View:
    """One look at the node: what /health/ready, /capacity and the agent say."""

    ready: bool
    not_ready: list[str]
    capacity: dict[str, Any]
    reachable: bool  # the daemon answered status
    version: str | None = None

    @property
    def state(self) -> str:
        """``ready``, ``drain`` (draining, here or in the daemon) or ``down``."""
        if self.ready:
            return "ready"
        return "drain" if self.reachable and self.capacity["draining"] else "down"


def agent_line(view: View) -> str:
    """The agent-check answer (with its newline)."""
    if view.state == "ready":
        return f"up ready {weight(view.capacity)}%\n"
    return f"{view.state}\n"


class Drain:
    """The front process's drain: SIGTERM begins it, nothing ends it but the exit.

    Requests go through ``track()``: while draining, ``refusing`` is true and new ones are
    answered 503 by the app; ``settle(grace)`` waits for those in flight to finish, then
    cancels what is left (each such request answers for itself, see ``cut``).
    """

    def __init__(self) -> None:
        self.since: float | None = None
        self.why = ""
        self.in_flight = 0
        self.cut = False  # the grace ran out: requests still in flight were cancelled
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self, why: str) -> None:
        if self.since is None:
            self.since, self.why = time.time(), why
            log.info("draining (%s): %d requests in flight; new ones are answered 503", why, self.in_flight)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        task = asyncio.current_task()
        self.in_flight += 1
        self._idle.clear()
        if task is not None:
            self._tasks.add(task)
        try:
            yield
        finally:
            self.in_flight -= 1
            if task is not None:
                self._tasks.discard(task)
            if not self.in_flight:
                self._idle.set()

    async def settle(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for the requests in flight; cancel the rest.  How many were cut."""
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
            return 0
        except TimeoutError:
            pass
        left = list(self._tasks)
        self.cut = True
        log.warning("drain grace of %g s ran out: cutting %d requests still in flight", grace, len(left))
        for task in left:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):  # each answers for itself as it unwinds
                await self._idle.wait()
        return len(left)


@dataclass
class Node:
    """A front process's view of its node: the daemon's ``status`` plus its own checks and drain."""

    status: Status
    checks: Checks | None = None
    drain: Drain = field(default_factory=Drain)

    async def view(self) -> View:
        st, why = await self.status()
        here = self.drain.draining
        if st is None:
            reasons = [why or "sandboxd does not answer"]
            if here:
                reasons.insert(0, f"draining ({self.drain.why})")
            return View(False, reasons, capacity(None, here), reachable=False)
        reasons = []
        if here:
            reasons.append(f"draining ({self.drain.why})")
        reasons += [str(r) for r in st.get("not_ready") or ()]
        if self.checks is not None:
            reasons += await self.checks(st)
        return View(not reasons, reasons, capacity(st, here), reachable=True, version=st.get("version"))
