"""The sandboxd sessions of one MCP session: one per language, opened at first use.

    run        the language's session (opened now if it is not), one cell, the record
    files      write: into every open session, kept for a language not open yet (it opens with
               them); read and list: the session of the language that ran last (Python first)
    reset      every session closed; the next call opens fresh ones
    close      the same, when the MCP session ends (stdio closed, HTTP DELETE or idle, shutdown)

Each session has its own connection to the daemon, so a long Python cell does not hold up a
JavaScript one, and a lock, so the calls of one language run one after another (the daemon
refuses a second exec while one runs; here it waits its turn instead).  Session ids never
leave this object: an agent cannot name another MCP session's sandboxd session, as all of
them belong to this server's one uid at the daemon.

A session that ended on its own (its idle timeout or lifetime, its CPU budget) answers
``not_found`` before any code ran: the cell is run in a new session and the reply says the
old state is gone.  A call cancelled by the client drops its connection (the exchange on it
is unfinished) and interrupts the cell over a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .. import sessionfiles
from ..client import AsyncClient, AsyncSession, SandboxdError
from ..common.errors import RequestError
from .facts import Facts
from .results import LANGUAGE_NAMES

log = logging.getLogger("sandboxd.mcp")
BUSY_RETRIES = 20  # a cancelled cell still stopping: wait for it this many times (retry_after_ms each)
CLOSE_TIMEOUT = 10.0
LANGUAGES = ("python3", "nodejs")


class Gone(Exception):
    """The MCP session has ended; nothing more runs for it."""


@dataclass
class Open:
    """An open session, and its connection (None after a cancelled call left the last one unfinished)."""

    info: dict[str, Any]
    client: AsyncClient | None

    @property
    def id(self) -> str:
        return str(self.info["session_id"])

    async def session(self, socket: str) -> AsyncSession:
        if self.client is None:
            client = AsyncClient(socket)
            await client.connect()
            self.client = client
        return AsyncSession(self.client, self.info)

    async def disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.close()


@dataclass(eq=False)  # each one is itself (a set holds them)
class Workspace:
    facts: Facts
    name: str  # for logs: "stdio" or the MCP session id
    sessions: dict[str, Open] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=lambda: {lang: asyncio.Lock() for lang in LANGUAGES})
    pending: dict[str, dict[str, bytes]] = field(default_factory=lambda: {lang: {} for lang in LANGUAGES})
    current: str = "python3"
    closed: bool = False
    _chores: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def socket(self) -> str:
        return self.facts.settings.socket

    # -- sessions -----------------------------------------------------------------------------
    async def _open(self, language: str) -> Open:
        """The language's session, opened (with the files waiting for it) if it is not."""
        if self.closed:
            raise Gone("this MCP session has ended")
        if language in self.sessions:
            return self.sessions[language]
        settings = self.facts.settings
        options: dict[str, Any] = {"language": language}
        if language == "python3":
            options["display"] = True
            if settings.environment:
                options["environment"] = settings.environment
        if self.facts.network:
            options["network"] = True
        if settings.memory:
            options["memory_mb"] = settings.memory >> 20
        if self.pending[language]:
            options["files"] = dict(self.pending[language])
        client = AsyncClient(self.socket)
        await client.connect()
        try:
            session = await client.session(**options)
        except BaseException:
            await client.close()
            raise
        self.pending[language].clear()
        opened = self.sessions[language] = Open(session.info, client)
        log.info("MCP session %s: opened %s session %s", self.name, language, opened.id)
        return opened

    async def _drop(self, language: str) -> None:
        """Forget the language's session (it has ended, or its connection is unusable)."""
        opened = self.sessions.pop(language, None)
        if opened is not None:
            await opened.disconnect()

    def _chore(self, coro: Any) -> None:
        """Work that must happen even though the call that needs it is being cancelled: its own task."""
        task = asyncio.get_running_loop().create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _interrupt(self, session_id: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT), AsyncClient(self.socket) as c:
                await c.call("session_interrupt", session_id=session_id)
        except (OSError, ConnectionError, SandboxdError, TimeoutError) as e:
            log.info("MCP session %s: interrupting %s: %s", self.name, session_id, e)

    # -- runs ---------------------------------------------------------------------------------
    async def run(self, language: str, code: str, timeout_s: float) -> tuple[dict[str, Any], list[str]]:
        """One cell in the language's session: its record, and notes for the agent."""
        notes: list[str] = []
        async with self.locks[language]:
            self.current = language
            for _attempt in range(BUSY_RETRIES):
                opened = await self._open(language)
                try:
                    async with self._using(opened) as session:
                        result = await session.exec(code, timeout_ms=max(1, round(timeout_s * 1000)))
                except SandboxdError as e:
                    if e.code == "not_found":  # it ended on its own; the code did not run
                        await self._drop(language)
                        notes.append(f"the previous {LANGUAGE_NAMES[language]} session had ended "
                                     f"({e.details.get('reason') or 'ended'}): its variables and files are gone; "
                                     "this ran in a new session")
                        continue
                    if e.code == "busy":  # an earlier, cancelled cell is still stopping
                        await asyncio.sleep(min(2.0, (e.details.get("retry_after_ms") or 100) / 1000))
                        continue
                    raise
                except asyncio.CancelledError:
                    self._chore(self._interrupt(opened.id))
                    raise
                record = dict(result.record)
                if record.get("session_ended"):
                    await self._drop(language)
                return record, notes
        raise SandboxdError("busy", f"the {LANGUAGE_NAMES[language]} session stayed busy")

    @contextlib.asynccontextmanager
    async def _using(self, opened: Open) -> AsyncIterator[AsyncSession]:
        """The session on its connection; a call that does not finish (cancelled, or the connection
        broke) leaves the connection unusable: it is dropped, and the next call makes another."""
        session = await opened.session(self.socket)
        try:
            yield session
        except SandboxdError:
            raise
        except BaseException:
            client, opened.client = opened.client, None
            if client is not None:
                self._chore(client.close())
            raise

    # -- files --------------------------------------------------------------------------------
    async def write_file(self, path: str, data: bytes) -> list[str]:
        """Into every open session; kept for the others.  Where it went, in words."""
        try:  # the daemon's own check, so that a file kept for later is refused now as it would be then
            path = "/".join(sessionfiles.parts_of(path, whole_work=False))
        except RequestError as e:
            raise SandboxdError(e.code, e.message, e.details) from None
        went = []
        kept = sum(len(d) for files in self.pending.values() for d in files.values())
        for language in LANGUAGES:
            async with self.locks[language]:
                if language in self.sessions:
                    async with self._using(self.sessions[language]) as session:
                        await session.write_file(path, data)
                    went.append(f"the {LANGUAGE_NAMES[language]} session")
                else:
                    limit = self.facts.max_files_size or (16 << 20)
                    if kept + len(data) > limit:
                        raise SandboxdError("forbidden", f"files waiting for sessions not opened yet would exceed "
                                            f"{limit} bytes: run code in that language first, then write the file")
                    self.pending[language][path] = data
                    kept += len(data)
                    went.append(f"the {LANGUAGE_NAMES[language]} session when it opens")
        return went

    async def read_file(self, path: str) -> tuple[str, bytes]:
        language = self.current
        async with self.locks[language], self._using(await self._open(language)) as session:
            return language, await session.read_file(path)

    async def list_files(self, path: str) -> tuple[str, dict[str, Any]]:
        language = self.current
        async with self.locks[language], self._using(await self._open(language)) as session:
            return language, await session.list_files(path)

    # -- ends ---------------------------------------------------------------------------------
    async def reset(self) -> list[str]:
        """Close every session (over a connection of its own: a call may be running on theirs)."""
        closed = await self._close_all()
        for files in self.pending.values():
            files.clear()
        self.current = "python3"
        return closed

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self._close_all()

    async def _close_all(self) -> list[str]:
        opened, self.sessions = self.sessions, {}
        names = []
        if opened:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT), AsyncClient(self.socket) as c:
                    for language, o in opened.items():
                        try:
                            await c.call("session_close", session_id=o.id)
                        except SandboxdError as e:
                            if e.code != "not_found":
                                raise
                        names.append(f"the {LANGUAGE_NAMES[language]} session")
                        log.info("MCP session %s: closed %s session %s", self.name, language, o.id)
            except (OSError, ConnectionError, SandboxdError, TimeoutError) as e:
                log.warning("MCP session %s: closing its sandboxd sessions: %s (the daemon's idle timeout ends "
                            "them)", self.name, e)
            for o in opened.values():
                await o.disconnect()
        return names
