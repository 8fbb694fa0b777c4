"""Which connections sandboxd-http holds, and who gives way (THREATS 24, 30).

A red team's 1,100 connections that sent their headers slowly got 26 of 30 authenticated
requests answered 503: every open connection counted against ``max_connections``, finished
head or not.  Here a connection is one of two things:

    pending    its first request head is not complete yet.  Bounded by ``header_timeout``
               (``guard``) and here, apart from max_connections: every ``SWEEP`` seconds an
               address (an IPv4 address, an IPv6 /64) with more than ``max_pending_per_client``
               pending, and the whole beyond ``max_connections`` pending, lose their oldest
               (408) -- never one opened since the sweep before, so a client that sends its
               head at once always has its head read, however fast a flood from its own
               address reconnects.  Beyond twice max_connections pending (fds), the oldest is
               closed at once.
    admitted   a head is in.  It holds one of ``max_connections`` until it closes; the last
               ``reserved_connections`` of them are for requests that carry the API key.  A
               head that finds no room for it closes the oldest idle kept-alive connection
               whose last request had no key, if there is one, and is answered 503 otherwise.

The key is the routes' own check (``keys``); with ``no_auth`` every request counts as having
it.  What was closed or refused is counted (``sandboxd_http_connections_shed_total``) and
logged as a sum at most every ``LOG_EVERY`` seconds: a flood must not become a log flood.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("sandboxd.http")
LOG_EVERY = 10.0
SWEEP = 0.1  # seconds: far more than one turn of the event loop, far less than header_timeout

# Why a connection was closed or a head refused (the metric's label, and the log's words).
REASONS = {
    "slow_head": "did not complete a request head within header_timeout",
    "pending_per_client": "closed as the oldest pending one of a client address over max_pending_per_client",
    "pending_all": "closed as the oldest pending one beyond max_connections pending",
    "idle_without_key": "closed idle (its last request had no key) to make room for a head",
    "full_without_key": "refused 503: no connection left outside reserved_connections for a request without the key",
    "full": "refused 503: max_connections in use",
}


class Held(Protocol):
    """A connection as the gate sees it (guard's protocol)."""

    def shed(self, status: str | None) -> None:
        """Close it, writing a bare ``status`` line first when given."""


def client_key(host: str | None) -> str:
    """The address connections are counted by: IPv4 as is, IPv6 by its /64 (what one host
    usually has), an IPv4-mapped IPv6 address as the IPv4 one."""
    if not host:
        return ""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Gate:
    def __init__(self, max_connections: int, reserved: int, per_client: int,
                 count: Callable[[str], None] | None = None) -> None:
        assert 0 <= reserved < max_connections
        self.max_connections = max_connections
        self.reserved = reserved
        self.per_client = per_client
        self._count = count
        # dicts as ordered sets: the first is the oldest
        self.pending: dict[Held, tuple[str, int]] = {}  # -> (its address, the sweep it was opened after)
        self.pending_by: dict[str, dict[Held, None]] = {}
        self.admitted: dict[Held, bool] = {}  # -> its last head had the key
        self.idle_without_key: dict[Held, None] = {}
        self._over: set[str] = set()  # addresses over per_client
        self.generation = 0  # sweeps so far
        self._tally: dict[str, int] = {}
        self._logged = time.monotonic()

    # -- events of a connection ----------------------------------------------------------------
    def opened(self, conn: Held, address: str | None) -> None:
        key = client_key(address)
        while len(self.pending) >= 2 * self.max_connections:
            self._shed(next(iter(self.pending)), "pending_all", "408 Request Timeout")
        self.pending[conn] = (key, self.generation)
        mine = self.pending_by.setdefault(key, {})
        mine[conn] = None
        if len(mine) > self.per_client:
            self._over.add(key)

    def sweep(self) -> None:
        """Close the oldest pending connections beyond the bounds, of those opened before the
        last sweep (the ones opened since get their turn of the loop first)."""
        for key in list(self._over):
            mine = self.pending_by.get(key, {})
            while len(mine) > self.per_client and self._old(next(iter(mine))):
                self._shed(next(iter(mine)), "pending_per_client", "408 Request Timeout")
            if len(mine) <= self.per_client:
                self._over.discard(key)
        while len(self.pending) > self.max_connections and self._old(next(iter(self.pending))):
            self._shed(next(iter(self.pending)), "pending_all", "408 Request Timeout")
        self.generation += 1

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sweep every SWEEP seconds on ``loop``."""
        def tick() -> None:
            self.sweep()
            loop.call_later(SWEEP, tick)

        loop.call_later(SWEEP, tick)

    def head(self, conn: Held, with_key: bool) -> bool:
        """A request head is complete: may it be served?  False: answer 503 and close."""
        if conn in self.admitted:  # the next request of a kept-alive connection: it has its place
            self.admitted[conn] = with_key
            self.idle_without_key.pop(conn, None)
            return True
        self._forget_pending(conn)
        room = self.max_connections - (0 if with_key else self.reserved)
        while len(self.admitted) >= room and self.idle_without_key:
            self._shed(next(iter(self.idle_without_key)), "idle_without_key", None)
        if len(self.admitted) >= room:
            self.note("full" if with_key else "full_without_key")
            return False
        self.admitted[conn] = with_key
        return True

    def idle(self, conn: Held) -> None:
        """Its answer is out and it is kept alive, waiting for the next request."""
        if self.admitted.get(conn) is False:
            self.idle_without_key[conn] = None

    def busy(self, conn: Held) -> None:
        """Bytes of its next request arrived."""
        self.idle_without_key.pop(conn, None)

    def closed(self, conn: Held) -> None:
        self._forget_pending(conn)
        self.admitted.pop(conn, None)
        self.idle_without_key.pop(conn, None)

    # -- what it did ------------------------------------------------------------------------------
    def note(self, reason: str) -> None:
        """Count a connection closed or a head refused; log the sums now and then."""
        if self._count is not None:
            self._count(reason)
        self._tally[reason] = self._tally.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._tally:
            words = "; ".join(f"{n} {REASONS[r]}" for r, n in sorted(self._tally.items()))
            log.warning("connections in the last %.0f s: %s (now %d pending, %d admitted)", now - self._logged,
                        words, len(self.pending), len(self.admitted))
        self._tally.clear()
        self._logged = now

    def _shed(self, conn: Held, reason: str, status: str | None) -> None:
        self.closed(conn)
        self.note(reason)
        conn.shed(status)

    def _old(self, conn: Held) -> bool:
        return self.pending[conn][1] < self.generation

    def _forget_pending(self, conn: Held) -> None:
        entry = self.pending.pop(conn, None)
        if entry is not None:
            key = entry[0]
            mine = self.pending_by[key]
            del mine[conn]
            if not mine:
                del self.pending_by[key]
