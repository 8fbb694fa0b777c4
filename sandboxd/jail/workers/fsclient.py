"""The daemon's side of the fork server: start it, ask it for workers.

The server runs on the root's interpreter (``/usr/bin/python3`` by default) with an
empty environment apart from the administrator's preload variables; it reports
``{"event": "reaped", "pid", "wstatus"}`` when a worker's pid 1 is gone (and with it,
everything of the worker).  Workers' pid 1 becomes ``sandboxd-init`` (``locate_init``
finds it: the package's, or one built beside the sources by ``make dev``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...common.launch import HelperClient, HelperError
from ..child.contract import WorkerSpec

ForkServerError = HelperError


INIT_NAME = "sandboxd-init"
INSTALLED_INIT = "/usr/lib/sandboxd/sandboxd-init"  # the Debian package's
BUILT_INIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "child", INIT_NAME)


class InitMissing(Exception):
    pass


def locate_init(configured: str = "") -> str:
    """sandboxd-init: the configured path, the package's, or the one ``make dev`` built."""
    candidates = [configured] if configured else [INSTALLED_INIT, BUILT_INIT]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise InitMissing(f"{INIT_NAME} is missing (looked for {' and '.join(candidates)}): workers need it as their "
                      "pid 1; `make dev` builds it from sandboxd/jail/child/init.c")


@dataclass
class SpawnedWorker:
    """A worker's pid 1 as the fork server made it, and the daemon's ends of its pipes."""

    pid: int
    pidfd: int
    status_r: int  # sandboxd-init's report of R's end, then EOF when it exits
    link: int  # R's messages (SOCK_SEQPACKET), fds with the first
    request_w: int
    stdin_w: int
    stdout_r: int
    stderr_r: int

    def close(self) -> None:
        for name in ("pidfd", "status_r", "link", "request_w", "stdin_w", "stdout_r", "stderr_r"):
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

    async def file_op(self, request: dict[str, Any], fds: Sequence[int]) -> tuple[int, int]:
        """A child doing one operation on a session's files (``child.files``): (pid, pidfd).
        ``fds``: the scratch's top, the result pipe's write end, the content (a memfd), the
        socket that brings a read's fd back, then the session's cgroup.procs files."""
        reply, got = await self.call({"op": "files", "request": request}, fds=fds)
        if not reply.get("ok") or len(got) != 1:
            for fd in got:
                os.close(fd)
            raise ForkServerError(str(reply.get("error") or f"files returned {len(got)} descriptors, expected 1"))
        return int(reply["pid"]), got[0]
