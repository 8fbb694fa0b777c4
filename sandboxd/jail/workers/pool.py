"""Warm pools of single-use, already-confined workers, one pool per filter key.

``acquire`` hands out a ready worker if there is one; otherwise it makes one for
this request (slower, never a failure) and raises the pool's target.  The target
moves between each key's ``minimum`` and ``maximum``: up by one on each miss, down by one after
``DECAY_SECONDS`` without a miss.  Refills run in the background; a worker whose
generation is stale (the root or config changed) is retired instead of handed out.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, Protocol, TypeVar

from ...common.tasks import Tasks
from ..child.contract import SetupError

log = logging.getLogger(__name__)
DECAY_SECONDS = 30.0
REFILL_DELAY = 0.002  # seconds after a run ends before its pool is topped up
FAILURES_BEFORE_GIVING_UP = 3  # consecutive worker setup failures before waiting requests get the error


class Pooled(Protocol):
    """What the pool needs of a worker."""

    state: str  # "ready" while it waits for a run
    generation: int
    ready: asyncio.Future[None]  # set once its setup is done


W = TypeVar("W", bound=Pooled)


class Pool(Generic[W]):
    def __init__(self, make: Callable[[str, bool], Awaitable[W]], retire: Callable[[W], None],
                 sizes: Mapping[str, tuple[int, int]], clock: Callable[[], float] = time.monotonic) -> None:
        self.make = make
        self.retire = retire
        self.sizes = dict(sizes)  # key -> (minimum, maximum)
        self.generation = 0
        self.clock = clock
        self.keys = list(sizes)
        self.ready: dict[str, collections.deque[W]] = {k: collections.deque() for k in self.keys}
        self.starting: dict[str, int] = {k: 0 for k in self.keys}
        self.waiters: dict[str, collections.deque[asyncio.Future[W]]] = {
            k: collections.deque() for k in self.keys}
        self.target: dict[str, int] = {k: self.sizes[k][0] for k in self.keys}
        self.last_miss: dict[str, float] = {k: 0.0 for k in self.keys}
        self.hits = 0
        self.misses = 0
        self.failures = 0
        self.closed = False
        self._tasks = Tasks("pool")

    def start(self) -> None:
        for key in self.keys:
            self._refill(key)
        self._tasks.spawn(self._decay_loop())

    async def acquire(self, key: str, timeout: float = 60.0) -> W:
        """A ready worker: a pooled one, else the next one to become ready (first come,
        first served).  While the pool has others left its refill waits for ``done``
        (after the run), so making workers stays off the run's critical path."""
        if self.closed:
            raise SetupError("pool", 0, "the jail is shutting down")
        queue = self.ready[key]
        while queue:
            worker = queue.popleft()
            if worker.state == "ready" and worker.generation == self.generation:
                self.hits += 1
                if not queue:
                    self._refill(key)
                return worker
            self.retire(worker)
        self.misses += 1
        self.last_miss[key] = self.clock()
        self.target[key] = min(self.sizes[key][1], self.target[key] + 1)
        waiter: asyncio.Future[W] = asyncio.get_running_loop().create_future()
        self.waiters[key].append(waiter)
        self._refill(key)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._deliver(key, waiter.result())  # handed over as we gave up: pass it on
            else:
                waiter.cancel()
            raise

    def done(self, key: str) -> None:
        """A run on a worker of ``key`` finished: top the pool up, once its response is out
        (a refill starts with synchronous cgroup work that would otherwise go first)."""
        asyncio.get_running_loop().call_later(REFILL_DELAY, self._refill, key)

    def _refill(self, key: str) -> None:
        if self.closed:
            return
        waiting = sum(1 for w in self.waiters[key] if not w.done())
        missing = self.target[key] + waiting - len(self.ready[key]) - self.starting[key]
        for _ in range(max(0, missing)):
            self.starting[key] += 1
            self._tasks.spawn(self._grow(key, urgent=waiting > 0))

    def _deliver(self, key: str, worker: W) -> None:
        """Hand a ready worker to the oldest waiting request, or keep it."""
        waiters = self.waiters[key]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self.ready[key].append(worker)

    async def _grow(self, key: str, urgent: bool) -> None:
        generation = self.generation
        worker: W | None = None
        try:
            worker = await self.make(key, urgent)  # urgent: requests wait, so full CPU weight
            await worker.ready
        except asyncio.CancelledError:
            self.starting[key] -= 1
            if worker is not None:
                self.retire(worker)
            raise
        except Exception as e:  # noqa: BLE001 - logged; the waiters' requests get the error
            self.starting[key] -= 1
            self.failures += 1
            if worker is not None:
                self.retire(worker)
            log.error("could not start a %s worker: %s", key, e)
            error = e if isinstance(e, SetupError) else SetupError.from_os_error("spawn", e)
            await asyncio.sleep(min(5.0, 0.05 * self.failures))
            self._fail_waiters(key, error)
            return
        self.starting[key] -= 1
        if self.closed or generation != self.generation:
            self.retire(worker)
            self._refill(key)
            return
        self.failures = 0
        self._deliver(key, worker)

    def _fail_waiters(self, key: str, error: SetupError) -> None:
        """Setup keeps failing: tell waiting requests why rather than let them wait."""
        if self.failures < FAILURES_BEFORE_GIVING_UP:
            self._refill(key)
            return
        while self.waiters[key]:
            waiter = self.waiters[key].popleft()
            if not waiter.done():
                waiter.set_exception(error)

    async def _decay_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(DECAY_SECONDS / 3)
            self.decay(self.clock())

    def decay(self, now: float) -> None:
        """Lower the target of every key without a miss for DECAY_SECONDS by one."""
        for key in self.keys:
            if self.target[key] > self.sizes[key][0] and now - self.last_miss[key] > DECAY_SECONDS:
                self.target[key] -= 1
                if len(self.ready[key]) > self.target[key]:
                    self.retire(self.ready[key].pop())

    def renew(self) -> None:
        """Retire every pooled worker (new root or config) and refill with fresh ones."""
        self.generation += 1
        for key in self.keys:
            while self.ready[key]:
                self.retire(self.ready[key].popleft())
            self._refill(key)

    def resize(self, sizes: Mapping[str, tuple[int, int]]) -> None:
        """New sizes; keys that appear with a new configuration (network newly allowed) get a pool."""
        for key, (minimum, maximum) in sizes.items():
            if key not in self.ready:
                self.keys.append(key)
                self.ready[key], self.starting[key], self.waiters[key] = collections.deque(), 0, collections.deque()
                self.target[key], self.last_miss[key] = minimum, 0.0
            self.sizes[key] = (minimum, maximum)
            self.target[key] = max(minimum, min(maximum, self.target[key]))
            self._refill(key)

    async def close(self) -> None:
        self.closed = True
        self._tasks.cancel()
        for key in self.keys:
            while self.ready[key]:
                self.retire(self.ready[key].popleft())
            while self.waiters[key]:
                self.waiters[key].popleft().cancel()

    def describe(self) -> dict[str, object]:
        return {
            "minimum": min((v[0] for v in self.sizes.values()), default=0),
            "maximum": max((v[1] for v in self.sizes.values()), default=0),
            "hits": self.hits,
            "misses": self.misses,
            "profiles": {k: {"ready": len(self.ready[k]), "starting": self.starting[k], "target": self.target[k],
                             "minimum": self.sizes[k][0], "maximum": self.sizes[k][1],
                             "waiting": sum(1 for w in self.waiters[k] if not w.done())} for k in self.keys},
        }
