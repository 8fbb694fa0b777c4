"""The daemon's side of an environment build: the build jail as a process, its progress, its verdict.

    await run.build(spec, python, timeout, network, progress)   # BuildFailed(message, log) if it did not

The build jail (``buildjail``) runs in a process of its own, started by the launcher as
root, with the spec in a file beside the environment's directory.  A build that reaches
an index over HTTP gets a network namespace of the runs' kind (the same egress policy),
leased here and given back when the process is gone; a wheelhouse or a ``file://`` index
gets none.  Every line the process writes is a JSON progress event; they are the build's
word, shown to whoever asked, and trusted for nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

from ...common import launch
from ..net.network import Network
from .buildjail import BuildSpec

Progress = Callable[[str, dict[str, Any]], None]
LOG_LINES = 40


class BuildFailed(Exception):
    def __init__(self, message: str, log: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log = log or []


def needs_network(index_url: str, extra_index_urls: tuple[str, ...] | list[str]) -> bool:
    return any(url.startswith("http") for url in (index_url, *extra_index_urls))


async def build(spec: BuildSpec, python: str, timeout: float, network: Network | None, progress: Progress) -> None:
    """Run the build jail for ``spec`` (its ``netns_fd`` is filled in here) until it is done."""
    lease = None
    if needs_network(spec.index_url, spec.extra_index_urls):
        if network is None:
            raise BuildFailed("this environment needs its index, and network for runs is not set up on this "
                              "daemon (no quota allows network): give it find_links instead, or allow network "
                              "to some caller")
        lease = await network.lease()
        spec.netns_fd = lease.fd
    try:
        await _run(spec, python, timeout, progress)
    finally:
        if lease is not None and network is not None:
            network.release(lease)


async def _run(spec: BuildSpec, python: str, timeout: float, progress: Progress) -> None:
    spec_path = spec.venv + ".json"
    with open(spec_path, "w", encoding="utf-8") as f:
        f.write(spec.to_json())
    lines: list[dict[str, Any]] = []
    try:
        proc = subprocess.Popen(launch.command(python, "sandboxd.jail.builder.buildjail", spec_path),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/",
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, close_fds=True,
                                pass_fds=(spec.netns_fd,) if spec.netns_fd >= 0 else ())
        try:
            async with asyncio.timeout(timeout):
                async for line in launch.output_lines(proc):  # the jail dies with it (PDEATHSIG)
                    try:
                        event = json.loads(line)
                    except ValueError:
                        event = {"stage": "output", "detail": line[:300]}
                    if not isinstance(event, dict):
                        continue
                    lines.append(event)
                    stage = str(event.get("stage", ""))[:32]
                    if stage not in ("exit", "error", "done"):
                        progress(stage, {k: str(v)[:300] for k, v in event.items() if k != "stage"})
        except TimeoutError:
            raise BuildFailed(f"the build took longer than jail.build_timeout ({timeout:g}s) and was stopped") from None
    finally:
        os.unlink(spec_path)
    failure = next((e for e in lines if e.get("stage") == "error"), None)
    if failure is not None or proc.returncode != 0:
        message = str((failure or {}).get("message") or f"the build jail exited with {proc.returncode}")
        raise BuildFailed(message[:2000], [str(x)[:500] for x in (failure or {}).get("log", [])][-LOG_LINES:])
