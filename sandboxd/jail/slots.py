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
        self._changed: asyncio.Condition | None = None

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.count - len(self._free)

    def try_acquire(self) -> Slot | None:
        return self._free.popleft() if self._free else None

    async def acquire(self, timeout: float) -> Slot:
        slot = self.try_acquire()
        if slot is not None:
            return slot
        cond = self._condition()
        async with cond:
            await asyncio.wait_for(cond.wait_for(lambda: bool(self._free)), timeout)
            return self._free.popleft()

    def release(self, slot: Slot) -> None:
        self._free.append(slot)
        if self._changed is not None:
            cond = self._changed

            async def notify() -> None:
                async with cond:
                    cond.notify_all()

            asyncio.get_running_loop().create_task(notify())

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed
