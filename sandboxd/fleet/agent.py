"""HAProxy's agent-check port: for each connection, one line and close.

HAProxy connects every ``agent-inter``, reads a line and applies it (``node.agent_line``:
``up ready 75%``, ``drain``, ``down``).  Nothing is read from the connection (configure no
``agent-send``).  At most ``MAX_OPEN`` connections are answered at once -- beyond them a
connection is closed unanswered, which HAProxy counts as a failed check -- and each has
``DEADLINE`` seconds to find its answer: a daemon that does not answer ``status`` by then
makes it ``down``.
Bind it where only the balancer reaches: it says how loaded the node is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .node import Node, agent_line

log = logging.getLogger("sandboxd.fleet")
MAX_OPEN = 64
DEADLINE = 2.5  # above the status call's own 2 s: a slow daemon is "down", not a dropped check


class Agent:
    def __init__(self, node: Node, host: str, port: int) -> None:
        self.node, self.host, self.port = node, host, port
        self.open = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        """Listen; the address it got (HOST:PORT)."""
        self.server = await asyncio.start_server(self._answer, self.host, self.port, backlog=256)
        host, port = self.server.sockets[0].getsockname()[:2]
        self.port = port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_OPEN:
            writer.close()
            return
        self.open += 1
        try:
            try:
                async with asyncio.timeout(DEADLINE):
                    line = agent_line(await self.node.view())
            except TimeoutError:
                line = "down\n"
            except Exception:  # the agent answers whatever went wrong
                log.exception("agent-check: the node's state could not be read")
                line = "down\n"
            writer.write(line.encode())
            async with asyncio.timeout(DEADLINE):
                await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
