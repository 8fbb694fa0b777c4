"""Warm pools of single-use, already-confined workers, one pool per filter key.

``acquire`` hands out a ready worker if there is one; otherwise it makes one for
this request (slower, never a failure) and raises the pool's target.  The target
moves between ``minimum`` and ``maximum``: up by one on each miss, down by one after
``DECAY_SECONDS`` without a miss.  Refills run in the background; a worker whose
generation is stale (the root or config changed) is retired instead of handed out.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from .worker import Worker, WorkerFailed

log = logging.getLogger(__name__)
DECAY_SECONDS = 30.0
REFILL_DELAY = 0.002  # seconds after a run ends before its pool is topped up


class Pool:
    def __init__(self, make: Callable[[str, bool], Awaitable[Worker]], retire: Callable[[Worker], None],
                 keys: Iterable[str], minimum: int, maximum: int) -> None:
        self.make = make
        self.retire = retire
        self.minimum = minimum
        self.maximum = maximum
        self.generation = 0
        self.keys = list(keys)
        self.ready: dict[str, collections.deque[Worker]] = {k: collections.deque() for k in self.keys}
        self.starting: dict[str, int] = {k: 0 for k in self.keys}
        self.target: dict[str, int] = {k: minimum for k in self.keys}
        self.last_miss: dict[str, float] = {k: 0.0 for k in self.keys}
        self.hits = 0
        self.misses = 0
        self.failures = 0
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._decay: asyncio.Task[None] | None = None

    def start(self) -> None:
        for key in self.keys:
            self._refill(key)
        self._decay = asyncio.get_running_loop().create_task(self._decay_loop())

    async def acquire(self, key: str) -> Worker:
        """A ready worker.  While the pool has others left its refill waits for ``done``
        (after the run), so making workers stays off the run's critical path."""
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
        self.last_miss[key] = time.monotonic()
        self.target[key] = min(self.maximum, self.target[key] + 1)
        self._refill(key)
        worker = await self.make(key, True)  # a request is waiting for this one: full CPU weight
        try:
            await worker.ready
        except WorkerFailed:
            self.retire(worker)
            raise
        return worker

    def done(self, key: str) -> None:
        """A run on a worker of ``key`` finished: top the pool up, once its response is out
        (a refill starts with synchronous cgroup work that would otherwise go first)."""
        asyncio.get_running_loop().call_later(REFILL_DELAY, self._refill, key)

    def _refill(self, key: str) -> None:
        if self.closed:
            return
        missing = self.target[key] - len(self.ready[key]) - self.starting[key]
        for _ in range(max(0, missing)):
            self.starting[key] += 1
            task = asyncio.get_running_loop().create_task(self._grow(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _grow(self, key: str) -> None:
        generation = self.generation
        worker: Worker | None = None
        try:
            worker = await self.make(key, False)
            await worker.ready
        except asyncio.CancelledError:
            if worker is not None:
                self.retire(worker)
            raise
        except Exception as e:  # noqa: BLE001 - a failed refill is logged; requests still get workers
            self.failures += 1
            if worker is not None:
                self.retire(worker)
            log.error("could not start a %s worker: %s", key, e)
            await asyncio.sleep(min(5.0, 0.1 * self.failures))
            return
        finally:
            self.starting[key] -= 1
        if self.closed or generation != self.generation:
            self.retire(worker)
            return
        self.failures = 0
        self.ready[key].append(worker)

    async def _decay_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(DECAY_SECONDS / 3)
            now = time.monotonic()
            for key in self.keys:
                if self.target[key] > self.minimum and now - self.last_miss[key] > DECAY_SECONDS:
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

    def resize(self, minimum: int, maximum: int) -> None:
        self.minimum, self.maximum = minimum, maximum
        for key in self.keys:
            self.target[key] = max(minimum, min(maximum, self.target[key]))

    async def close(self) -> None:
        self.closed = True
        if self._decay:
            self._decay.cancel()
        for task in list(self._tasks):
            task.cancel()
        for key in self.keys:
            while self.ready[key]:
                self.retire(self.ready[key].popleft())

    def describe(self) -> dict[str, object]:
        return {
            "minimum": self.minimum,
            "maximum": self.maximum,
            "hits": self.hits,
            "misses": self.misses,
            "profiles": {k: {"ready": len(self.ready[k]), "starting": self.starting[k], "target": self.target[k]}
                         for k in self.keys},
        }
