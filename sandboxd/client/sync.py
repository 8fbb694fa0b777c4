"""The synchronous client: a blocking socket, one request at a time, methods made from ``ops``."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from ..common import protocol
from . import ops
from .ops import MAX_RESPONSE, Exchange, Request, SandboxdError, default_socket

P = ParamSpec("P")
T = TypeVar("T")


def method(op: Callable[P, Request[T]]) -> Callable[Concatenate[Client, P], T]:
    """``Client.NAME(...)``: the request ``op(...)`` describes, performed."""
    def perform(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.perform(op(*args, **kwargs))
    perform.__name__, perform.__doc__ = op.__name__, op.__doc__
    return perform


def session_method(op: Callable[Concatenate[str, P], Request[T]]) -> Callable[Concatenate[Session, P], T]:
    """``Session.NAME(...)``: the request ``op(session_id, ...)`` describes, on the session's client."""
    def perform(self: Session, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.client.perform(op(self.id, *args, **kwargs))
    perform.__name__, perform.__doc__ = op.__name__, op.__doc__
    return perform


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

    def perform(self, request: Request[T]) -> T:
        """Send one request and read until its answer (interim frames go where it says)."""
        self.send(request.frame(next(self._ids)))
        exchange = Exchange(request)
        while not exchange.take(self.receive()):
            pass
        assert exchange.answer is not None
        return request.result(exchange.answer)

    call = method(ops.call)
    hello = method(ops.hello)
    status = method(ops.status)
    run = method(ops.run)
    kill = method(ops.kill)
    jobs = method(ops.jobs)
    usage = method(ops.usage)
    root_why = method(ops.root_why)
    environments = method(ops.environments)
    build_environment = method(ops.build_environment)
    reload = method(ops.reload)
    drain = method(ops.drain)
    undrain = method(ops.undrain)
    sessions = method(ops.sessions)

    def session(self, **options: Any) -> Session:
        """Open a session (``with c.session() as s: ...`` closes it at the end)."""
        return Session(self, self.perform(ops.session_open(**options)))


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

    exec = session_method(ops.session_exec)
    write_file = session_method(ops.session_write_file)
    read_file = session_method(ops.session_read_file)
    list_files = session_method(ops.session_list_files)

    def interrupt(self) -> bool:
        """KeyboardInterrupt in the running cell (over a connection of its own: this one may be
        waiting for that very cell).  False if nothing was running."""
        with Client(self.client.path, timeout=10) as other:
            return other.perform(ops.session_interrupt(self.id))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.client.perform(ops.session_close(self.id))
            except SandboxdError as e:
                if e.code != "not_found":  # it ended on its own already
                    raise
