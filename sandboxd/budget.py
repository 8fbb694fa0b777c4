"""Bytes the daemon holds for callers, counted globally and per uid.

Two budgets use this: request bytes (frames being received and requests being handled)
and response bytes (answers written but not yet taken by the client).  Bytes are
charged as they arrive or are queued -- never by what a header merely announces -- and
one uid can hold at most its own share, so no caller can take a resource away from the
others: a connection that would go over waits (its reads pause) until bytes come back.
Small amounts (a status request, an error) are exempt from the global limit, so a full
budget never stops the cheap requests of callers that hold nothing.
"""

from __future__ import annotations

import asyncio
import collections

SMALL = 64 << 10  # frames up to this size are never held back by the global budget


class Budget:
    def __init__(self, total: int, per_uid: int) -> None:
        self.total = total
        self.per_uid = per_uid
        self.used = 0
        self.by_uid: collections.Counter[int] = collections.Counter()
        self._waiters: list[asyncio.Future[None]] = []

    def configure(self, total: int, per_uid: int) -> None:
        self.total, self.per_uid = total, per_uid
        self._wake()

    def fits(self, uid: int, n: int, small: bool = False) -> bool:
        if self.by_uid[uid] + n > self.per_uid and self.by_uid[uid] > 0:
            return False  # (a uid holding nothing may always take one piece, however large)
        return small or self.used + n <= self.total or self.used == 0

    def take(self, uid: int, n: int) -> None:
        self.used += n
        self.by_uid[uid] += n

    def give(self, uid: int, n: int) -> None:
        n = min(n, self.by_uid.get(uid, 0))  # never more than the uid holds
        if n <= 0:
            return
        self.used -= n
        self.by_uid[uid] -= n
        if self.by_uid[uid] <= 0:
            del self.by_uid[uid]
        self._wake()

    async def reserve(self, uid: int, n: int, small: bool = False) -> None:
        """Take ``n`` bytes for ``uid``, waiting for others to give some back if need be."""
        while not self.fits(uid, n, small):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.take(uid, n)

    def held(self, uid: int) -> int:
        return self.by_uid.get(uid, 0)

    def crowded(self, uid: int) -> bool:
        """``uid`` holds more than its share, or holds some while the total is over."""
        held = self.by_uid.get(uid, 0)
        return held > self.per_uid or (held > 0 and self.used > self.total)

    async def wait_room(self, uid: int) -> None:
        """Return once ``uid`` is not crowded (a uid holding nothing never waits)."""
        while self.crowded(uid):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def describe(self) -> dict[str, int]:
        return {"used": self.used, "limit": self.total, "per_uid_limit": self.per_uid, "uids": len(self.by_uid)}
