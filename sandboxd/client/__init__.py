"""Clients for the sandboxd socket: synchronous and asyncio, both made from one description
of the operations (``ops``).

    from sandboxd.client import Client
    with Client() as c:
        result = c.run("print(1)", timeout="2s", memory="256M")
        print(result.status, result.ok, result.text)     # ok True '1\\n'  (result["stdout"] works too)
        with c.session() as s:          # a worker that keeps its state between execs
            s.exec("x = 41")
            print(s.exec("x + 1")["value"])   # '42'
            s.write_file("data/in.bin", b"\x00\x01")   # under the session's /work
            s.read_file("data/in.bin")                   # b'\x00\x01'
            s.list_files("data")["entries"]              # [{"path": "data/in.bin", "type": "file", ...}]

``on_output=callback`` on ``run`` and ``exec`` streams the output: the callback gets
``(stream, data)`` as it arrives ("stdout"/"stderr", bytes); the result still holds all
of it.  ``AsyncClient`` / ``AsyncSession`` are the same operations for asyncio.

Failures raise ``SandboxdError`` carrying the protocol's stable ``code``.  The socket
is ``$SANDBOXD_SOCKET`` or ``/run/sandboxd/sandboxd.sock`` unless given.
"""

from .aio import AsyncClient, AsyncSession
from .ops import DEFAULT_SOCKET, NotSentError, Output, Result, SandboxdError, default_socket
from .sync import Client, Session

__all__ = ["DEFAULT_SOCKET", "AsyncClient", "AsyncSession", "Client", "NotSentError", "Output", "Result",
           "SandboxdError", "Session", "default_socket"]
