"""The TCP listening socket of sandboxd-http and sandboxd-mcp: bound before the server starts,
so that a port taken is a clear error at start and port 0 can be told to whoever waits."""

from __future__ import annotations

import socket


def listen(host: str, port: int, backlog: int = 2048) -> tuple[socket.socket, str]:
    """A non-blocking socket listening on ``host:port``, and where it listens (``[::1]:8194`` for IPv6)."""
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                backlog=backlog)
    sock.setblocking(False)
    bound, port = sock.getsockname()[:2]
    return sock, f"[{bound}]:{port}" if ":" in bound else f"{bound}:{port}"
