"""Per-uid quotas: which limits apply to a caller, and admission of runs under them.

Resolution: the default, then every group entry that matches one of the caller's
groups (by name or gid; for each limit the most generous of them), then the user's
own entry (by name or uid).  With ``deny_unlisted`` a caller matching neither a user
nor a group entry is refused.

Admission is atomic because the daemon is one event loop: checks and counter updates
happen without an ``await`` between them.  Rate and CPU budget give
``quota_exceeded`` with ``retry_after_ms``; a caller at its concurrency waits in the
queue up to its ``queued`` limit; global capacity full and queue full gives ``busy``.

Capacity is shared fairly.  A caller's fair share is ``capacity * weight / (the weights
of the callers running or waiting, plus one for a caller yet to come)``; the last
``reserved`` free workers go only to callers below theirs, so that no caller (a
Dify bridge, two users filling their quotas with sleeps) can take every worker while
others wait or are about to come.  The queue is served by need, not arrival: the waiter
whose caller has the fewest running runs per weight first, then the oldest.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from .common import errors
from .common.declare import declared
from .common.errors import RequestError
from .config import DaemonSettings, QuotaLimits, QuotaPolicy
from .peer import Identity
from .usage import UsageStore


def effective_limits(policy: QuotaPolicy, who: Identity) -> QuotaLimits | None:
    """The caller's limits, or None when ``deny_unlisted`` refuses them."""
    user = policy.users.get(who.name)
    if user is None:
        user = policy.users.get(str(who.uid))
    groups = [o for g, o in policy.groups.items() if who.in_group(g)]
    if policy.deny_unlisted and user is None and not groups:
        return None
    values = dict(policy.default.__dict__)
    for f in declared(QuotaLimits):
        offered = [o[f.name] for o in groups if f.name in o]
        if offered:
            values[f.name] = most_generous(offered)
    if user is not None:
        values.update(user)
    return QuotaLimits(**values)


def daemon_limits(d: DaemonSettings) -> dict[str, Any]:
    """What the daemon allows every caller, as ``hello`` says it: a client sizes its requests by it
    (sandboxd-http refuses to start with settings these make fail)."""
    return {"max_frame": d.max_frame, "workers": d.workers, "reserved_workers": min(d.reserved_workers, d.workers - 1),
            "queue_timeout_ms": int(d.queue_timeout * 1000), "read_timeout_ms": int(d.read_timeout * 1000),
            "buffer_budget_per_uid": d.buffer_budget_per_uid, "response_budget_per_uid": d.response_budget_per_uid}


def most_generous(values: list[Any]) -> Any:
    """The largest of numbers and flags; of lists (environments), all their entries."""
    if isinstance(values[0], tuple):
        return tuple(dict.fromkeys(v for value in values for v in value))
    return max(values)


def allows_environment(limits: QuotaLimits, name: str) -> bool:
    return "*" in limits.environments or name in limits.environments


def limits_dict(limits: QuotaLimits) -> dict[str, Any]:
    d = dataclasses.asdict(limits)
    for name in ("max_timeout", "max_session_idle", "max_session_lifetime"):  # durations in ms, as requests
        d[f"{name}_ms"] = int(d.pop(name) * 1000)
    return d


@dataclass
class _Waiter:
    uid: int
    limits: QuotaLimits
    future: asyncio.Future[None]


class Admission:
    """Counts running and queued runs, globally and per uid."""

    def __init__(self, capacity: int, queue_max: int, queue_timeout: float, usage: UsageStore,
                 reserved: int = 0) -> None:
        self.capacity = capacity
        self.queue_max = queue_max
        self.queue_timeout = queue_timeout
        self.reserved = min(reserved, capacity - 1)
        self.usage = usage
        self.weights: dict[int, float] = {}  # of the callers running or waiting
        self.running = 0
        self.running_by_uid: collections.Counter[int] = collections.Counter()
        self.queued_by_uid: collections.Counter[int] = collections.Counter()
        self.queue: collections.deque[_Waiter] = collections.deque()

    def configure(self, capacity: int, queue_max: int, queue_timeout: float, reserved: int = 0) -> None:
        self.capacity, self.queue_max, self.queue_timeout = capacity, queue_max, queue_timeout
        self.reserved = min(reserved, capacity - 1)
        self._wake()

    def check_refusals(self, uid: int, limits: QuotaLimits) -> None:
        """A flood of refused requests is rate-limited like runs: ``runs_per_minute`` of them."""
        now = time.time()
        if limits.runs_per_minute:
            count = self.usage.refusals_last_minute(uid, now)
            if count >= limits.runs_per_minute:
                frees = self.usage.refusals_free_at(uid, limits.runs_per_minute, now)
                raise RequestError(errors.QUOTA_EXCEEDED,
                                   f"{count} refused requests in the last minute; the limit is "
                                   f"{limits.runs_per_minute}", limit="runs_per_minute",
                                   retry_after_ms=max(1, int((frees - now) * 1000)))

    def check_budget(self, uid: int, limits: QuotaLimits) -> None:
        now = time.time()
        if limits.runs_per_minute:
            count = self.usage.runs_last_minute(uid, now)
            if count >= limits.runs_per_minute:
                frees = self.usage.runs_free_at(uid, limits.runs_per_minute, now)
                raise RequestError(errors.QUOTA_EXCEEDED,
                                   f"{count} runs in the last minute; the limit is {limits.runs_per_minute}",
                                   limit="runs_per_minute", retry_after_ms=max(1, int((frees - now) * 1000)))
        if limits.cpu_seconds_per_hour:
            budget = limits.cpu_seconds_per_hour * 1000
            used = self.usage.cpu_last_hour(uid, now)
            if used >= budget:
                frees = self.usage.cpu_frees_at(uid, budget, now)
                raise RequestError(errors.QUOTA_EXCEEDED,
                                   f"{used / 1000:.1f} CPU seconds used in the last hour; the limit is "
                                   f"{limits.cpu_seconds_per_hour:g}", limit="cpu_seconds_per_hour",
                                   retry_after_ms=max(1, int((frees - now) * 1000)))

    def share(self, uid: int, weight: float) -> float:
        """``uid``'s fair share of the workers now (see the module's docstring)."""
        others = sum(w for u, w in self.weights.items() if u != uid)
        return self.capacity * weight / (others + weight + 1.0)

    def _can_start(self, uid: int, limits: QuotaLimits) -> bool:
        held = self.running_by_uid[uid]
        if self.running >= self.capacity or held >= limits.concurrent:
            return False
        return self.capacity - self.running > self.reserved or held < self.share(uid, limits.weight)

    async def admit(self, uid: int, limits: QuotaLimits) -> None:
        """Return when the run may start; raise ``RequestError`` when it may not."""
        self.check_budget(uid, limits)
        self.weights[uid] = limits.weight
        if self._can_start(uid, limits) and not self.queued_by_uid[uid]:
            self._start(uid)  # nobody of this caller is waiting ahead: start now
            return
        if self.queued_by_uid[uid] >= limits.queued:
            self._forget(uid)
            raise RequestError(errors.QUOTA_EXCEEDED,
                               f"{self.running_by_uid[uid]} runs running and {self.queued_by_uid[uid]} queued; "
                               f"the limits are {limits.concurrent} and {limits.queued}",
                               limit="queued", retry_after_ms=100)
        if len(self.queue) >= self.queue_max:
            self._forget(uid)
            raise RequestError(errors.BUSY, f"all {self.capacity} workers are busy and the queue is full",
                               capacity=self.capacity, queued=len(self.queue))
        waiter = _Waiter(uid, limits, asyncio.get_running_loop().create_future())
        self.queue.append(waiter)
        self.queued_by_uid[uid] += 1
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout)
        except (TimeoutError, asyncio.CancelledError) as e:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(uid)  # started just as we gave up: hand the slot back
            else:
                waiter.future.cancel()
                self._dequeue(waiter)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise RequestError(errors.BUSY, f"waited {self.queue_timeout:g}s in the queue without a free worker",
                               capacity=self.capacity) from None
        try:
            self.check_budget(uid, limits)  # runs that ran meanwhile may have used it up
        except RequestError:
            self.release(uid)
            raise

    def _dequeue(self, waiter: _Waiter) -> None:
        try:
            self.queue.remove(waiter)
            self.queued_by_uid[waiter.uid] -= 1
            if self.queued_by_uid[waiter.uid] <= 0:
                del self.queued_by_uid[waiter.uid]
        except ValueError:
            pass
        self._forget(waiter.uid)

    def _forget(self, uid: int) -> None:
        """A caller neither running nor waiting no longer counts in the shares."""
        if not self.running_by_uid.get(uid) and not self.queued_by_uid.get(uid):
            self.weights.pop(uid, None)

    def _start(self, uid: int) -> None:
        self.running += 1
        self.running_by_uid[uid] += 1

    def release(self, uid: int) -> None:
        self.running -= 1
        self.running_by_uid[uid] -= 1
        if self.running_by_uid[uid] <= 0:
            del self.running_by_uid[uid]
        self._forget(uid)
        self._wake()

    def _wake(self) -> None:
        """Start waiters while workers are free: the neediest caller's oldest first."""
        for waiter in [w for w in self.queue if w.future.done()]:
            self._dequeue(waiter)
        while self.running < self.capacity and self.queue:
            best: _Waiter | None = None
            best_need = 0.0
            for waiter in self.queue:  # oldest first: ties go to the one that waited longest
                if not self._can_start(waiter.uid, waiter.limits):
                    continue
                need = self.running_by_uid[waiter.uid] / waiter.limits.weight
                if best is None or need < best_need:
                    best, best_need = waiter, need
            if best is None:
                return
            self._dequeue(best)
            self._start(best.uid)
            self.weights[best.uid] = best.limits.weight
            best.future.set_result(None)

    def describe(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "running": self.running, "queued": len(self.queue),
                "queue_max": self.queue_max, "reserved": self.reserved}
