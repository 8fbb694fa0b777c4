"""The operations of the protocol as the clients offer them -- described once.

Each public function here says what one method sends and what it returns: it validates
its arguments, builds the request's fields and names how the answer is unwrapped
(``Request``).  ``sync.Client`` and ``aio.AsyncClient`` are made from these functions
(``sync.method`` / ``aio.method``), so the two faces cannot drift apart; ``Exchange`` is
the part of a call that is the same over both transports (interim frames, the answer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..common import protocol, sizes

T = TypeVar("T")

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


def unwrap(response: Any) -> dict[str, Any]:
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


@dataclass
class Request(Generic[T]):
    """One call: the operation, its fields, and what the answer becomes."""

    op: str
    fields: dict[str, Any]
    result: Callable[[dict[str, Any]], T]
    progress: Callable[[dict[str, Any]], None] | None = None  # interim progress frames go here
    on_output: Output | None = None  # streamed output goes here (and is asked for)

    def frame(self, rid: int) -> dict[str, Any]:
        fields = dict(self.fields)
        if self.progress is not None:
            fields["progress"] = True  # ask for interim frames
        if self.on_output is not None:
            fields["stream"] = True
        return {"op": self.op, "id": rid, **fields}


@dataclass
class Exchange:
    """What a call does with the frames that come back, whichever transport reads them."""

    request: Request[Any]
    answer: dict[str, Any] | None = field(default=None)

    def take(self, frame: Any) -> bool:
        """Deliver an interim frame, or keep the answer; True once the answer is in."""
        if isinstance(frame, dict) and "progress" in frame and "ok" not in frame:
            if self.request.progress is not None:
                self.request.progress(frame["progress"])
            return False
        if isinstance(frame, dict) and "event" in frame and frame.get("ok") is True:
            if self.request.on_output is not None and frame.get("event") == "output":
                self.request.on_output(str(frame.get("stream")), bytes(frame.get("data") or b""))
            return False
        self.answer = unwrap(frame)
        return True


def whole(reply: dict[str, Any]) -> dict[str, Any]:
    return reply


def key(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda reply: reply[name]


def call(op: str, progress: Callable[[dict[str, Any]], None] | None = None, on_output: Output | None = None,
         **fields: Any) -> Request[dict[str, Any]]:
    """Any operation by name; its whole answer (docs/protocol.md).  Interim ``progress``
    frames go to ``progress``, streamed output (with ``on_output``, which asks for it) to
    ``on_output``."""
    return Request(op, fields, whole, progress, on_output)


def hello() -> Request[dict[str, Any]]:
    """The daemon, its protocol version, and who you are to it (uid, admin, quota)."""
    return Request("hello", {}, whole)


def status() -> Request[dict[str, Any]]:
    """Health, root, capacity, pools, your usage."""
    return Request("status", {}, whole)


def run(code: str, *, on_output: Output | None = None, **options: Any) -> Request[Result]:
    """Run ``code``; its ``Result``.  Options (docs/protocol.md, run): language, stdin,
    timeout ("2s", or seconds) or timeout_ms, cpu / cpu_ms, memory ("256M", or MiB) or
    memory_mb, network, files, env, max_output, display, environment."""
    return Request("run", _request("run", RUN_OPTIONS, options, code=code), lambda r: Result(r["result"]),
                   on_output=on_output)


def kill(run_id: str | None = None, session_id: str | None = None) -> Request[dict[str, Any]]:
    """Kill a run in flight, or end a session (its owner's, or anyone's for an admin)."""
    return Request("kill", {"session_id": session_id} if session_id else {"run_id": run_id}, whole)


def jobs() -> Request[list[dict[str, Any]]]:
    """Runs in flight (admin)."""
    return Request("jobs", {}, key("jobs"))


def usage(user: str | int | None = None, all_users: bool = False) -> Request[list[dict[str, Any]]]:
    """Usage against quota: yours, ``user``'s (a uid or a name), or everyone's (admin)."""
    fields: dict[str, Any] = {"all": True} if all_users else {}
    if isinstance(user, int):
        fields["uid"] = user
    elif user is not None:
        fields["user"] = user
    return Request("usage", fields, key("users"))


def root_why(module: str, language: str | None = None, environment: str | None = None) -> Request[dict[str, Any]]:
    """Can ``module`` be imported (or required) in the jail, and if not, why."""
    fields = {k: v for k, v in (("language", language), ("environment", environment)) if v}
    return Request("root_why", {"module": module, **fields}, whole)


def environments() -> Request[list[dict[str, Any]]]:
    """The Python environments: packages, state, size, use."""
    return Request("environments", {}, key("environments"))


def build_environment(name: str, force: bool = True,
                      progress: Callable[[dict[str, Any]], None] | None = None) -> Request[dict[str, Any]]:
    """Build an environment now (admin); ``progress`` gets each stage as it happens."""
    return Request("build_environment", {"name": name, "force": force}, key("environment"), progress)


def reload() -> Request[list[str]]:
    """Re-read the daemon's configuration (admin); what changed."""
    return Request("reload", {}, key("changes"))


def drain() -> Request[dict[str, Any]]:
    """Take no new runs or sessions (admin); what is in flight goes on.  The drain state and counts."""
    return Request("drain", {}, whole)


def undrain() -> Request[dict[str, Any]]:
    """Take new work again (admin)."""
    return Request("undrain", {}, whole)


def sessions() -> Request[list[dict[str, Any]]]:
    """Your open sessions (admins: everyone's)."""
    return Request("sessions", {}, key("sessions"))


def session_open(**options: Any) -> Request[dict[str, Any]]:
    """A session's description, once it is open (options: docs/protocol.md, session_open)."""
    return Request("session_open", _request("session", SESSION_OPTIONS, options), key("session"))


def session_exec(session_id: str, /, code: str, *, on_output: Output | None = None,
                 **options: Any) -> Request[Result]:
    """Run a cell; its ``Result`` (status "ok", "exception", ...; ``value``, ``exception``).
    Options: stdin, timeout / timeout_ms, files, max_output, display."""
    request = _request("exec", EXEC_OPTIONS, options, session_id=session_id, code=code)
    return Request("session_exec", request, lambda r: Result(r["result"]), on_output=on_output)


def session_interrupt(session_id: str) -> Request[bool]:
    """KeyboardInterrupt in the running cell; False if nothing was running."""
    return Request("session_interrupt", {"session_id": session_id}, lambda r: bool(r["interrupted"]))


def session_close(session_id: str) -> Request[dict[str, Any]]:
    """End the session; what it was, and why it ended."""
    return Request("session_close", {"session_id": session_id}, whole)


def session_write_file(session_id: str, /, path: str, data: bytes | str, *, mode: int | None = None,
                       parents: bool = True) -> Request[dict[str, Any]]:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` under the session's /work (relative:
    "data/x.csv"), replacing what is there, creating missing directories unless ``parents``
    is false; ``mode`` the permission bits (0o644).  ``{"path", "size", "mode"}``."""
    if not isinstance(data, (bytes, bytearray, memoryview, str)):
        raise TypeError(f"data: expected bytes or str, got {type(data).__name__}")
    content = data if isinstance(data, str) else bytes(data)
    fields: dict[str, Any] = {"session_id": session_id, "path": path, "content": content}
    if mode is not None:
        fields["mode"] = mode
    if not parents:
        fields["parents"] = False
    return Request("session_write_file", fields, lambda r: {k: r[k] for k in ("path", "size", "mode")})


def session_read_file(session_id: str, /, path: str) -> Request[bytes]:
    """The bytes of the regular file ``path`` under the session's /work."""
    return Request("session_read_file", {"session_id": session_id, "path": path}, lambda r: bytes(r["content"]))


def session_list_files(session_id: str, /, path: str = ".", *, recursive: bool = False) -> Request[dict[str, Any]]:
    """What the directory ``path`` under the session's /work holds ("." is /work itself):
    ``{"path", "entries": [{"path", "type", "size", "mode", "mtime"}], "truncated"}``, entry
    paths relative to /work, type one of file, dir, symlink, fifo, socket, other; with
    ``recursive``, the directories below too."""
    fields: dict[str, Any] = {"session_id": session_id, "path": path}
    if recursive:
        fields["recursive"] = True
    return Request("session_list_files", fields, lambda r: {k: r[k] for k in ("path", "entries", "truncated")})
