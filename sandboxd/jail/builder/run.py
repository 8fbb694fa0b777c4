"""The daemon's side of an environment build: the build jail as a process, its progress, its verdict.

    await run.build(spec, python, timeout, network, progress, driver, limits)
                                                  # BuildFailed(message, log, limit) if it did not

The build jail (``buildjail``) runs in a process of its own, started by the launcher as
root, with the spec in a file beside the environment's directory, in a cgroup of its own
(``CgroupDriver.create_build``: jail.build_memory_max, swap off, and jail.build_pids), which
it joins first: a build never takes the daemon's memory, and one that reaches its limit is
killed by the kernel and fails with a message naming the setting (any OOM kill in its
cgroup fails it, even if pip went on).  Whatever is left of it when its process is gone is
killed with the cgroup, which is removed.  A build that reaches
an index over HTTP gets a network namespace of the runs' kind (the same egress policy),
leased here and given back when the process is gone; a wheelhouse or a ``file://`` index
gets none.  Every line the process writes is a JSON progress event; they are the build's
word, shown to whoever asked, and trusted for nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...common import launch, sizes
from ..kernel.cgroups import CgroupDriver, CgroupStats, WorkerCgroup
from ..net.network import Network
from .buildjail import BuildSpec

log = logging.getLogger(__name__)
Progress = Callable[[str, dict[str, Any]], None]
LOG_LINES = 40


class BuildFailed(Exception):
    def __init__(self, message: str, log: list[str] | None = None, limit: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.log = log or []
        self.limit = limit  # the setting of the limit the build reached, if that is why it failed


def needs_network(index_url: str, extra_index_urls: tuple[str, ...] | list[str]) -> bool:
    return any(url.startswith("http") for url in (index_url, *extra_index_urls))


@dataclass(frozen=True)
class BuildLimits:
    """What one build may take, in its own cgroup."""

    memory: int  # bytes, swap off (jail.build_memory_max)
    pids: int  # processes and threads (jail.build_pids)


async def build(spec: BuildSpec, python: str, timeout: float, network: Network | None, progress: Progress,
                driver: CgroupDriver | None = None, limits: BuildLimits | None = None) -> dict[str, Any]:
    """Run the build jail for ``spec`` (its ``netns_fd`` and ``cgroup_procs`` are filled in
    here) until it is done; what it used (``memory_peak``: bytes, None without cgroups)."""
    lease = None
    if needs_network(spec.index_url, spec.extra_index_urls):
        if network is None:
            raise BuildFailed("this environment needs its index, and network for runs is not set up on this "
                              "daemon (no quota allows network): give it find_links instead, or allow network "
                              "to some caller")
        lease = await network.lease()
        spec.netns_fd = lease.fd
    cgroup = None
    try:
        if driver is not None and limits is not None and driver.kind != "none":
            cgroup = driver.create_build(f"build-{os.path.basename(spec.venv)}", limits.memory, limits.pids)
            spec.cgroup_procs = cgroup.procs_files
        else:
            log.warning("no cgroups on this daemon: the build of %s is confined by rlimits only", spec.venv)
        try:
            await _run(spec, python, timeout, progress)
        except BuildFailed as failed:
            if cgroup is not None and limits is not None:
                _at_limit(cgroup.stats(), limits, failed)
            raise
        if cgroup is not None and limits is not None:
            stats = cgroup.stats()
            if stats.oom_kills:  # a process of the build was killed (v1: one; v2: all): the build is not whole
                raise BuildFailed(_memory_message(stats, limits), limit="jail.build_memory_max")
            return {"memory_peak": stats.memory_peak}
        return {"memory_peak": None}
    finally:
        if cgroup is not None:
            await _remove(cgroup)
        if lease is not None and network is not None:
            network.release(lease)


def _memory_message(stats: CgroupStats, limits: BuildLimits) -> str:
    return (f"the build was killed at its memory limit, jail.build_memory_max ({sizes.human_size(limits.memory)}; "
            f"{stats.oom_kills} process{'es' if stats.oom_kills != 1 else ''} killed): raise it if these packages "
            "need more to build")


def _at_limit(stats: CgroupStats, limits: BuildLimits, failed: BuildFailed) -> None:
    """Say in a failed build's message which of its limits it reached, if it reached one."""
    if stats.oom_kills:
        failed.message, failed.limit = _memory_message(stats, limits), "jail.build_memory_max"
    elif stats.pids_max_hits:
        failed.message += (f" (the build reached jail.build_pids, {limits.pids} processes and threads: "
                           f"{stats.pids_max_hits} forks refused)")
        failed.limit = "jail.build_pids"


async def _remove(cgroup: WorkerCgroup) -> None:
    """Kill whatever is left of the build and remove its cgroup, without blocking the loop."""
    for _ in range(1000):
        cgroup.kill()
        if cgroup.remove():
            return
        await asyncio.sleep(0.01)
    log.error("the cgroup of a build is not empty 10 s after it ended: %s (removed at the next start)",
              cgroup.dirs)


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
            raise BuildFailed(f"the build took longer than jail.build_timeout ({timeout:g}s) and was stopped",
                              limit="jail.build_timeout") from None
    finally:
        os.unlink(spec_path)
    failure = next((e for e in lines if e.get("stage") == "error"), None)
    if failure is not None or proc.returncode != 0:
        message = str((failure or {}).get("message") or f"the build jail exited with {proc.returncode}")
        raise BuildFailed(message[:2000], [str(x)[:500] for x in (failure or {}).get("log", [])][-LOG_LINES:])
