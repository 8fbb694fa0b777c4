"""The daemon's side of the fork server: start it, ask it for workers.

The server runs on the root's interpreter (``/usr/bin/python3`` by default) with an
empty environment apart from the administrator's preload variables; it reports
``{"event": "reaped", "pid", "wstatus"}`` when a worker's pid 1 is gone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...common.launch import HelperClient, HelperError
from ..child.contract import WorkerSpec

ForkServerError = HelperError


@dataclass
class SpawnedWorker:
    pid: int
    pidfd: int
    status_r: int
    request_w: int
    stdin_w: int
    stdout_r: int
    stderr_r: int
    control_w: int

    def close(self) -> None:
        for name in ("pidfd", "status_r", "request_w", "stdin_w", "stdout_r", "stderr_r", "control_w"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass


class ForkServerClient(HelperClient):
    name = "fork server"
    module = "sandboxd.jail.child.forkserver"

    def __init__(self, python: str, env: Mapping[str, str], on_reaped: Callable[[int, int], None]) -> None:
        super().__init__(python, env, self._event)
        self.on_reaped = on_reaped

    def _event(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "reaped":
            self.on_reaped(msg["pid"], msg["wstatus"])

    async def spawn(self, spec: WorkerSpec, fds: Sequence[int]) -> SpawnedWorker:
        """A worker from ``spec``; ``fds`` are its netns (if any) and its cgroup.procs files."""
        reply, got = await self.call({"op": "spawn", "spec": spec.to_wire()}, fds=fds)
        if not reply.get("ok"):
            for fd in got:
                os.close(fd)
            raise ForkServerError(str(reply.get("error")))
        if len(got) != 7:
            for fd in got:
                os.close(fd)
            raise ForkServerError(f"spawn returned {len(got)} descriptors, expected 7")
        return SpawnedWorker(reply["pid"], *got)
