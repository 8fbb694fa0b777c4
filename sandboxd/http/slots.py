"""The bridge's ``max_workers``: runs sent to the daemon at once, the rest waiting in order.

An ``asyncio.Semaphore`` that can also let every waiter go at once with an exception:
when the bridge drains, requests still waiting for a slot were never sent to the daemon,
so they are answered 503 (retry elsewhere) at once instead of waiting to run here.
A slot is handed from ``release`` straight to the oldest waiter; a waiter cancelled
(its ``queue_timeout``, its client gone) after being handed one passes it on.
"""

from __future__ import annotations

import asyncio
import collections


class Refused(Exception):
    """The slot will not come: the bridge is draining."""


class Slots:
    def __init__(self, count: int) -> None:
        self.free = count
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release()  # handed a slot, then cancelled before it ran: the next waiter's
            elif fut in self.waiters:
                self.waiters.remove(fut)
            raise

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1

    def refuse_waiters(self) -> int:
        """Every waiter's ``acquire`` raises ``Refused``; how many there were."""
        n = 0
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(Refused())
                n += 1
        return n
