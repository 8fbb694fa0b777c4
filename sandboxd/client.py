"""Clients for the sandboxd socket: synchronous and asyncio.

    from sandboxd.client import Client
    with Client() as c:
        result = c.run("print(1)", timeout="2s", memory="256M")
        print(result.status, result.ok, result.text)     # ok True '1\n'  (result["stdout"] works too)
        with c.session() as s:          # a worker that keeps its state between execs
            s.exec("x = 41")
            print(s.exec("x + 1")["value"])   # '42'

``on_output=callback`` on ``run`` and ``exec`` streams the output: the callback gets
``(stream, data)`` as it arrives ("stdout"/"stderr", bytes); the result still holds all
of it.

Failures raise ``SandboxdError`` carrying the protocol's stable ``code``.  The socket
is ``$SANDBOXD_SOCKET`` or ``/run/sandboxd/sandboxd.sock`` unless given.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .common import protocol, sizes

DEFAULT_SOCKET = "/run/sandboxd/sandboxd.sock"
MAX_RESPONSE = protocol.DEFAULT_MAX_FRAME * 4  # a result holds up to twice max_output plus out/ files
RUN_OPTIONS = ("language", "stdin", "timeout_ms", "cpu_ms", "memory_mb", "network", "files", "env", "max_output",
               "display", "environment")
SESSION_OPTIONS = ("language", "memory_mb", "cpu_ms", "idle_timeout_ms", "max_lifetime_ms", "network", "files", "env",
                   "display", "environment")
EXEC_OPTIONS = ("stdin", "timeout_ms", "files", "max_output", "display")
Output = Callable[[str, bytes], None]  # (stream, data) of streamed output


def default_socket() -> str:
    return os.environ.get("SANDBOXD_SOCKET") or DEFAULT_SOCKET


class SandboxdError(Exception):
    """The daemon answered with an error (``code`` is one of the protocol's codes)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class NotSentError(ConnectionError):
    """The connection was closed before the request went out: it did not reach the daemon."""


def _unwrap(response: Any) -> dict[str, Any]:
    if not isinstance(response, dict):
        raise SandboxdError("bad_frame", "the daemon sent something other than a map")
    if not response.get("ok"):
        err = response.get("error") or {}
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
        raise SandboxdError(str(err.get("code", "internal")), str(err.get("message", "")), details)
    return response


# Options as a person writes them (the config's units), and the protocol field each becomes.
FRIENDLY = {"timeout": ("timeout_ms", "duration"), "cpu": ("cpu_ms", "duration"),
            "idle_timeout": ("idle_timeout_ms", "duration"), "lifetime": ("max_lifetime_ms", "duration"),
            "memory": ("memory_mb", "mib")}


def _friendly(name: str, value: Any) -> tuple[str, int]:
    """``timeout=2.5`` / ``"2500ms"`` -> ("timeout_ms", 2500); ``memory="1G"`` / ``512`` (MiB) -> memory_mb."""
    field, kind = FRIENDLY[name]
    if kind == "duration":
        return field, max(1, round(sizes.duration(value) * 1000))
    if isinstance(value, int) and not isinstance(value, bool):
        return field, value
    return field, sizes.byte_size(value) >> 20


def _request(what: str, allowed: tuple[str, ...], options: dict[str, Any], **fields: Any) -> dict[str, Any]:
    given = {}
    for name, value in options.items():
        if value is None:
            continue
        if name in FRIENDLY and FRIENDLY[name][0] in allowed:
            name, value = _friendly(name, value)
        given[name] = value
    unknown = set(given) - set(allowed)
    if unknown:
        raise TypeError(f"unknown {what} option(s): {', '.join(sorted(unknown))}")
    return {**fields, **given}


def _kill_fields(run_id: str | None, session_id: str | None) -> dict[str, Any]:
    return {"session_id": session_id} if session_id else {"run_id": run_id}


def _usage_fields(user: str | int | None, all_users: bool) -> dict[str, Any]:
    """``usage``'s fields: everyone, a uid (an int) or a user name, or nothing (yourself)."""
    fields: dict[str, Any] = {"all": True} if all_users else {}
    if isinstance(user, int):
        fields["uid"] = user
    elif user is not None:
        fields["user"] = user
    return fields


def _why_fields(language: str | None, environment: str | None) -> dict[str, Any]:
    return {k: v for k, v in (("language", language), ("environment", environment)) if v}


class Result(Mapping[str, Any]):
    """A run's (or exec's) result.  The common fields are attributes; the whole record
    (docs/protocol.md) reads as a mapping: ``result["status"]``, ``result.get("files")``."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)

    def __repr__(self) -> str:
        return f"Result(status={self.status!r}, exit_code={self.exit_code!r}, run_id={self.run_id!r})"

    @property
    def status(self) -> str:
        """ok, exit_nonzero, signaled, timeout, cpu_limit, memory_limit, output_limit, pids_limit,
        blocked_syscall, sandbox_error (sessions: exception, interrupted too)."""
        return str(self.record.get("status"))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def stdout(self) -> bytes:
        return bytes(self.record.get("stdout") or b"")

    @property
    def stderr(self) -> bytes:
        return bytes(self.record.get("stderr") or b"")

    @property
    def text(self) -> str:
        """stdout as text (UTF-8, undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    @property
    def exit_code(self) -> int | None:
        return self.record.get("exit_code")

    @property
    def signal(self) -> int | None:
        return self.record.get("signal")

    @property
    def run_id(self) -> str | None:
        return self.record.get("run_id")

    @property
    def wall_ms(self) -> float:
        return float(self.record.get("wall_ms") or 0.0)

    @property
    def cpu_ms(self) -> float:
        return float(self.record.get("cpu_ms") or 0.0)

    @property
    def memory_peak_kb(self) -> int:
        return int(self.record.get("memory_peak_kb") or 0)

    @property
    def blocked_syscall(self) -> str | None:
        return self.record.get("blocked_syscall")

    @property
    def files(self) -> dict[str, bytes]:
        """What the run left under out/: path -> bytes."""
        return dict(self.record.get("files") or {})

    @property
    def value(self) -> str | None:
        """A session cell's last expression, as repr() shows it."""
        return self.record.get("value")

    @property
    def exception(self) -> dict[str, Any] | None:
        return self.record.get("exception")


def _run_request(code: str, options: dict[str, Any]) -> dict[str, Any]:
    return _request("run", RUN_OPTIONS, options, code=code)


def _is_event(frame: Any) -> bool:
    return isinstance(frame, dict) and "event" in frame and frame.get("ok") is True


def _deliver(frame: dict[str, Any], on_output: Output | None) -> None:
    if on_output is not None and frame.get("event") == "output":
        on_output(str(frame.get("stream")), bytes(frame.get("data") or b""))


class Client:
    def __init__(self, path: str | None = None, timeout: float | None = None) -> None:
        self.path = path or default_socket()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(self.path)
        self._ids = itertools.count(1)
        self.decoder = protocol.FrameDecoder(MAX_RESPONSE)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, request: dict[str, Any]) -> None:
        self.sock.sendall(protocol.encode(request))

    def receive(self) -> Any:
        try:
            return protocol.read_frame(self.sock.recv, self.decoder)
        except EOFError:
            raise ConnectionError("the daemon closed the connection") from None

    def call(self, op: str, progress: Callable[[dict[str, Any]], None] | None = None,
             on_output: Output | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and return its answer; interim ``progress`` frames go to ``progress``,
        streamed output (with ``on_output``, which asks for it) to ``on_output``."""
        rid = next(self._ids)
        if progress is not None:
            fields["progress"] = True  # ask for interim frames
        if on_output is not None:
            fields["stream"] = True
        self.send({"op": op, "id": rid, **fields})
        while True:
            frame = self.receive()
            if isinstance(frame, dict) and "progress" in frame and "ok" not in frame:
                if progress is not None:
                    progress(frame["progress"])
                continue
            if _is_event(frame):
                _deliver(frame, on_output)
                continue
            return _unwrap(frame)

    def hello(self) -> dict[str, Any]:
        return self.call("hello")

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def run(self, code: str, *, on_output: Output | None = None, **options: Any) -> Result:
        """Run ``code``; its ``Result``.  Options (docs/protocol.md, run): language, stdin,
        timeout ("2s", or seconds) or timeout_ms, cpu / cpu_ms, memory ("256M", or MiB) or
        memory_mb, network, files, env, max_output, display, environment."""
        return Result(self.call("run", on_output=on_output, **_run_request(code, options))["result"])

    def kill(self, run_id: str | None = None, session_id: str | None = None) -> dict[str, Any]:
        """Kill a run in flight, or end a session (its owner's, or anyone's for an admin)."""
        return self.call("kill", **_kill_fields(run_id, session_id))

    def jobs(self) -> list[dict[str, Any]]:
        """Runs in flight (admin)."""
        found: list[dict[str, Any]] = self.call("jobs")["jobs"]
        return found

    def usage(self, user: str | int | None = None, all_users: bool = False) -> list[dict[str, Any]]:
        """Usage against quota: yours, ``user``'s, or everyone's (admin)."""
        fields = _usage_fields(user, all_users)
        found: list[dict[str, Any]] = self.call("usage", **fields)["users"]
        return found

    def root_why(self, module: str, language: str | None = None, environment: str | None = None) -> dict[str, Any]:
        """Can ``module`` be imported (or required) in the jail, and if not, why."""
        fields = _why_fields(language, environment)
        return self.call("root_why", module=module, **fields)

    def environments(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("environments")["environments"]
        return found

    def build_environment(self, name: str, force: bool = True,
                          progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Build an environment now (admin); ``progress`` gets each stage as it happens."""
        built: dict[str, Any] = self.call("build_environment", progress=progress, name=name, force=force)["environment"]
        return built

    def reload(self) -> list[str]:
        """Re-read the daemon's configuration (admin); what changed."""
        changes: list[str] = self.call("reload")["changes"]
        return changes

    def session(self, **options: Any) -> Session:
        """Open a session (``with c.session() as s: ...`` closes it at the end)."""
        info = self.call("session_open", **_request("session", SESSION_OPTIONS, options))["session"]
        return Session(self, info)

    def sessions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("sessions")["sessions"]
        return found


class Session:
    """A session of a ``Client``: its execs go over that client's connection, one at a time."""

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        self.client = client
        self.info = info
        self.id: str = info["session_id"]
        self.closed = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec(self, code: str, *, on_output: Output | None = None, **options: Any) -> Result:
        """Run a cell; its ``Result`` (status "ok", "exception", ...; ``value``, ``exception``).
        Options: stdin, timeout / timeout_ms, files, max_output, display."""
        request = _request("exec", EXEC_OPTIONS, options, session_id=self.id, code=code)
        return Result(self.client.call("session_exec", on_output=on_output, **request)["result"])

    def interrupt(self) -> bool:
        """KeyboardInterrupt in the running cell (over a connection of its own: this one may be
        waiting for that very cell).  False if nothing was running."""
        with Client(self.client.path, timeout=10) as other:
            return bool(other.call("session_interrupt", session_id=self.id)["interrupted"])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.client.call("session_close", session_id=self.id)
            except SandboxdError as e:
                if e.code != "not_found":  # it ended on its own already
                    raise


class AsyncClient:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_socket()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.decoder = protocol.FrameDecoder(MAX_RESPONSE)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(self.path, limit=1 << 20)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass

    async def call(self, op: str, progress: Callable[[dict[str, Any]], None] | None = None,
                   on_output: Output | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and return its answer; interim ``progress`` frames go to ``progress``,
        streamed output (with ``on_output``, which asks for it) to ``on_output``.

        ``NotSentError`` means the request never went out whole (the daemon had closed
        the connection): sending it again on a new connection cannot run it twice.
        """
        assert self.reader is not None and self.writer is not None
        if progress is not None:
            fields["progress"] = True
        if on_output is not None:
            fields["stream"] = True
        async with self._lock:  # one request at a time on this connection
            if self.reader.at_eof():
                raise NotSentError("the daemon had closed the connection")
            try:
                self.writer.write(protocol.encode({"op": op, "id": next(self._ids), **fields}))
                await self.writer.drain()
            except OSError as e:
                raise NotSentError(f"the daemon had closed the connection ({e})") from e
            while True:
                frame = await self._frame()
                if _is_event(frame):
                    _deliver(frame, on_output)
                    continue
                if isinstance(frame, dict) and "progress" in frame and "ok" not in frame:
                    if progress is not None:
                        progress(frame["progress"])
                    continue
                return _unwrap(frame)

    async def _frame(self) -> Any:
        assert self.reader is not None
        while (frame := self.decoder.next_frame()) is None:
            chunk = await self.reader.read(min(max(self.decoder.wanted(), 1), 1 << 20))
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self.decoder.feed(chunk)
        return frame

    async def run(self, code: str, *, on_output: Output | None = None, **options: Any) -> Result:
        """As ``Client.run``."""
        return Result((await self.call("run", on_output=on_output, **_run_request(code, options)))["result"])

    async def kill(self, run_id: str | None = None, session_id: str | None = None) -> dict[str, Any]:
        return await self.call("kill", **_kill_fields(run_id, session_id))

    async def jobs(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (await self.call("jobs"))["jobs"]
        return found

    async def usage(self, user: str | int | None = None, all_users: bool = False) -> list[dict[str, Any]]:
        fields = _usage_fields(user, all_users)
        found: list[dict[str, Any]] = (await self.call("usage", **fields))["users"]
        return found

    async def root_why(self, module: str, language: str | None = None,
                       environment: str | None = None) -> dict[str, Any]:
        fields = _why_fields(language, environment)
        return await self.call("root_why", module=module, **fields)

    async def environments(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (await self.call("environments"))["environments"]
        return found

    async def sessions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (await self.call("sessions"))["sessions"]
        return found

    async def hello(self) -> dict[str, Any]:
        return await self.call("hello")

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def session(self, **options: Any) -> AsyncSession:
        """Open a session (``async with await c.session() as s: ...`` closes it at the end)."""
        info = (await self.call("session_open", **_request("session", SESSION_OPTIONS, options)))["session"]
        return AsyncSession(self, info)


class AsyncSession:
    """A session of an ``AsyncClient``."""

    def __init__(self, client: AsyncClient, info: dict[str, Any]) -> None:
        self.client = client
        self.info = info
        self.id: str = info["session_id"]
        self.closed = False

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def exec(self, code: str, *, on_output: Output | None = None, **options: Any) -> Result:
        request = _request("exec", EXEC_OPTIONS, options, session_id=self.id, code=code)
        return Result((await self.client.call("session_exec", on_output=on_output, **request))["result"])

    async def interrupt(self) -> bool:
        """KeyboardInterrupt in the running cell, over a connection of its own."""
        async with AsyncClient(self.client.path) as other:
            return bool((await other.call("session_interrupt", session_id=self.id))["interrupted"])

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                await self.client.call("session_close", session_id=self.id)
            except SandboxdError as e:
                if e.code != "not_found":
                    raise
