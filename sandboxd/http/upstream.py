"""The bridge's connections to the daemon: a pool of ``AsyncClient``s, each one request at a time.

A request takes an idle connection or opens one (as this process's uid: the daemon applies
that uid's quota), and gives it back only when the answer came whole; a connection that
failed, timed out or was cancelled mid-request is closed, which makes the daemon kill a
run still in flight.  A request that never went out (the daemon had closed an idle
connection, e.g. across a restart) is sent again once on a new connection; one that went
out is never sent twice.  Every call has a deadline, so a daemon that does not answer
costs at most that long, never a hang.

``Unreachable.sent`` says whether the request may have reached the daemon: a request that
never went out (no socket, refused, no connection in time, closed before it was written)
did nothing and may be sent anywhere else; one that went out and got no answer may have run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..client import AsyncClient, NotSentError, SandboxdError

log = logging.getLogger("sandboxd.http")
IDLE_EXPIRY = 60.0  # far below the daemon's idle_timeout (5 min): it never closes one we are about to use


class Unreachable(Exception):
    """The daemon could not be asked (no socket, refused, gone mid-request, no answer in time)."""

    def __init__(self, message: str, timed_out: bool = False, sent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.timed_out = timed_out
        self.sent = sent  # the request went out: it may have run


class Upstream:
    def __init__(self, socket_path: str, max_idle: int) -> None:
        self.socket_path = socket_path
        self.max_idle = max_idle
        self.idle: list[tuple[float, AsyncClient]] = []

    async def _connect(self) -> AsyncClient:
        client = AsyncClient(self.socket_path)
        try:
            await client.connect()
        except OSError as e:
            log.warning("cannot connect to sandboxd at %s: %s", self.socket_path, e.strerror or e)
            raise Unreachable(f"sandboxd is not reachable ({e.strerror or type(e).__name__})") from None
        return client

    def _take(self) -> AsyncClient | None:
        now = time.monotonic()
        while self.idle:
            since, client = self.idle.pop()
            if now - since < IDLE_EXPIRY and client.reader is not None and not client.reader.at_eof():
                return client
            self._discard(client)
        return None

    def _give_back(self, client: AsyncClient) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append((time.monotonic(), client))
        else:
            self._discard(client)

    def _discard(self, client: AsyncClient) -> None:
        if client.writer is not None:
            client.writer.close()  # the daemon kills a run in flight on this connection

    async def call(self, op: str, deadline: float, **fields: Any) -> dict[str, Any]:
        """One request, answered within ``deadline`` seconds; ``SandboxdError`` for an error answer."""
        client = self._take()
        reused = client is not None
        started = time.monotonic()
        for _attempt in range(2):
            if client is None:
                try:
                    async with asyncio.timeout(deadline):
                        client = await self._connect()
                except TimeoutError:
                    raise Unreachable(f"sandboxd did not accept a connection within {deadline:g} s",
                                      timed_out=True) from None
            try:
                async with asyncio.timeout(max(0.001, deadline - (time.monotonic() - started))):
                    answer = await client.call(op, **fields)
            except SandboxdError:
                self._give_back(client)  # an answer, whole: the connection is fine
                raise
            except NotSentError as e:
                self._discard(client)
                client = None
                if reused:
                    reused = False
                    continue  # it never reached the daemon: once more on a new connection
                raise Unreachable(f"sandboxd closed the connection ({e})") from None
            except TimeoutError:
                self._discard(client)
                raise Unreachable(f"sandboxd did not answer {op} within {deadline:g} s", timed_out=True,
                                  sent=True) from None
            except (OSError, EOFError) as e:
                self._discard(client)
                raise Unreachable(f"sandboxd closed the connection during {op} ({e})", sent=True) from None
            except BaseException:
                self._discard(client)  # cancelled (the server is stopping), or a decoding error
                raise
            self._give_back(client)
            return answer
        raise Unreachable("sandboxd closed the connection")

    async def close(self) -> None:
        for _, client in self.idle:
            await client.close()
        self.idle.clear()
