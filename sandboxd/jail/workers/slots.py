"""uid/gid slots: each live worker owns one, and a slot is free again only when
nothing of its last run is left (pid 1 reaped, cgroup removed)."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    index: int
    uid: int
    gid: int


class SlotPool:
    def __init__(self, first_uid: int, count: int) -> None:
        if first_uid <= 0 or count <= 0:
            raise ValueError("the run uid range must be above 0 and not empty")
        self.first_uid = first_uid
        self.count = count
        self._free = collections.deque(Slot(i, first_uid + i, first_uid + i) for i in range(count))
        self._waiters: collections.deque[asyncio.Future[Slot]] = collections.deque()

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.count - len(self._free)

    async def acquire(self, timeout: float) -> Slot:
        if self._free and not self._waiters:
            return self._free.popleft()
        waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed over as we gave up: pass it on
            else:
                waiter.cancel()
            raise

    def release(self, slot: Slot) -> None:
        """A slot is free: the longest waiter gets it, else it goes back to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)
