"""Roots on the daemon's side: build one in a child process, delete old ones when unused.

The build runs in a process of its own (``rootfs.main``, started by ``launch``) so the daemon's event loop keeps
serving meanwhile; its progress comes back as JSON lines.  Switching the jail to a new
root (a new template in the fork server, a new generation of workers) is the jail's
job; an old root is deleted here once no worker made from it is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from ...common import launch
from ...common.tasks import Tasks
from . import rootfs


class Roots:
    def __init__(self, base: str) -> None:
        self.base = base
        self.tasks = Tasks("roots")

    def ensure(self, spec: rootfs.RootSpec) -> rootfs.RootInfo:
        """At start (nothing to serve yet): reuse or build in this process, drop the rest."""
        info = rootfs.ensure_root(spec, self.base)
        rootfs.remove_stale_roots(self.base, [info.path])
        return info

    async def build(self, spec: rootfs.RootSpec, force: bool = False,
                    progress: rootfs.Progress | None = None) -> rootfs.RootInfo:
        """Build (or reuse) the root in a child process, so this loop keeps serving meanwhile."""
        os.makedirs(self.base, mode=0o755, exist_ok=True)
        spec_file = os.path.join(self.base, f".spec-{os.getpid()}.json")
        with open(spec_file, "w", encoding="utf-8") as f:
            f.write(spec.to_json())
        argv = launch.command(sys.executable, rootfs.__name__, spec_file, self.base)
        if force:
            argv.append("--force")
        last: dict[str, Any] = {}
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, close_fds=True)
            async for line in launch.output_lines(proc):
                try:
                    last = json.loads(line)
                except ValueError:
                    continue
                if progress is not None and last.get("stage") not in ("done", "error"):
                    progress(str(last.get("stage")), last)
        finally:
            os.unlink(spec_file)
        if last.get("stage") != "done":
            raise rootfs.RootError(str(last.get("message", "the root builder failed without a report")))
        return rootfs.RootInfo(**last["root"])  # summary() has the fields' names

    def drop_when_unused(self, path: str, in_use: Callable[[], bool], current: Callable[[], str | None]) -> None:
        """Delete the root at ``path`` once ``in_use`` says no worker needs it (that root only:
        another rebuild may be writing its own next to it)."""
        self.tasks.spawn(self._drop(path, in_use, current))

    async def _drop(self, path: str, in_use: Callable[[], bool], current: Callable[[], str | None]) -> None:
        while in_use():
            await asyncio.sleep(0.5)
        now = current()
        if now is None or os.path.realpath(path) != os.path.realpath(now):
            rootfs.remove_root(self.base, path)
