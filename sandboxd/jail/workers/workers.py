"""Making workers and cleaning up after them.

A worker takes a uid slot, gets a cgroup with the pool's ceilings, and is spawned by
the fork server from a ``WorkerSpec``.  After its pid 1 has been reaped (the fork
server reports it: the namespace, and everything of the run, is gone) and the run's
result has read the cgroup's counters, its fds are closed (the scratch filesystem and a
network namespace go with them), its cgroup is removed and only then its uid slot
freed: a slot never goes back while anything of its last run may still be alive.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

from ...common.tasks import Tasks
from ..child.contract import WorkerSpec
from ..kernel.cgroups import CgroupDriver, Limits
from ..net.network import Lease, Network
from ..policy.limits import RlimitPolicy
from ..root.rootfs import RootInfo
from ..spec.plans import EnvLayer
from ..spec.settings import JailSettings, environment_of
from .denials import SyscallNames
from .fsclient import ForkServerClient
from .slots import SlotPool
from .worker import Worker

log = logging.getLogger(__name__)
REAP_TIMEOUT = 10.0
AS_MARGIN = 64 << 20  # RLIMIT_AS headroom over the fork server's own address space


@dataclass
class Stack:
    """A root and the fork server whose workers run in it: the base root ("") or an environment's."""

    name: str
    root: RootInfo
    server: ForkServerClient
    info: dict[str, Any]  # what the fork server said when it started (run_path, vsz_kb, preloaded...)
    identity: tuple[object, ...]  # what it was started from (JailSettings.server_identity)
    layer: EnvLayer | None = None
    names: SyscallNames | None = None  # the fork server's table, for naming refused calls

    def worker_preloaded(self, report: dict[str, Any]) -> None:
        """What a worker of this stack preloaded itself, confined: kept for ``status``, its
        errors logged when they are new."""
        raw = report.get("errors")
        errors: dict[str, Any] = raw if isinstance(raw, dict) else {}
        seen = self.info.get("worker_preload") or {}
        self.info["worker_preload"] = {"preloaded": report.get("preloaded") or [], "errors": errors,
                                       "warmed_up": report.get("warmed_up")}
        if errors != seen.get("errors"):
            for name, error in errors.items():
                log.error("preload %s failed in a worker%s: %s", name, f" of environment {self.name}" if self.name
                          else "", error)

    def syscall_names(self) -> SyscallNames:
        if self.names is None:
            raw = self.info.get("syscall_names") or {}
            self.names = SyscallNames({int(k): str(v) for k, v in raw.items()}, int(self.info.get("audit_arch", 0)))
        return self.names


class Workers:
    def __init__(self, settings: JailSettings, driver: CgroupDriver, stacks: dict[str, Stack]) -> None:
        self.settings = settings
        self.driver = driver
        first, count = settings.jail.run_uids
        self.slots = SlotPool(first, count)
        self.stacks = stacks  # the jail's: workers are made by the fork server of their key's stack
        self.network: Network | None = None  # when some quota allows runs network
        self.generation = 0  # of the root and configuration; pooled workers of older ones are retired
        self.live: dict[int, Worker] = {}  # host pid of pid 1 -> worker
        self.tasks = Tasks("workers")
        self.setup_samples: collections.deque[dict[str, int]] = collections.deque(maxlen=200)

    def rlimit_policy(self, stack: Stack, exec_runtime: bool = False) -> RlimitPolicy:
        as_base = int(stack.info.get("vsz_kb", 0)) * 1024 + AS_MARGIN
        # V8 reserves address space far beyond what it uses (a WebAssembly memory reserves
        # its whole range with guard regions): with a cgroup counting what is used, an exec
        # runtime gets no RLIMIT_AS at all.
        cgroup = self.driver.kind != "none"
        return RlimitPolicy(as_base, self.settings.jail.address_space_slack, cgroup,
                            unlimited_as=exec_runtime and cgroup)

    async def make(self, key: str, urgent: bool = False, discover: bool = False, memory: int | None = None) -> Worker:
        """Start a worker; ``urgent`` ones (a request waits) get full CPU weight from the start.

        ``memory``: a worker made for one run of an exec runtime, whose heap limit is set at its
        start (pooled ones are made for limits.memory)."""
        s = self.settings
        stack = self.stacks[environment_of(key)]
        slot = await self.slots.acquire(timeout=30.0)
        try:
            cgroup = self.driver.create(f"w{slot.index}", Limits(s.limits.memory, s.limits.pids + 1, s.jail.cpus,
                                                                 active=urgent), slot.index)
        except BaseException:
            self.slots.release(slot)
            raise
        exec_argv = s.exec_argv(s.language_of(key), memory or s.limits.memory)
        policy = self.rlimit_policy(stack, exec_runtime=bool(exec_argv))
        filter_key = key.split("@", 1)[0]
        lease: Lease | None = None
        try:
            cgroup_fds = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in cgroup.procs_files]
            if filter_key.endswith("+net"):
                if self.network is None:
                    raise OSError(0, "network for runs is not set up (no quota allows it)")
                lease = await self.network.lease()
        except BaseException:
            cgroup.remove()
            self.slots.release(slot)
            raise
        spec = WorkerSpec(
            uid=slot.uid,
            gid=slot.gid,
            cgroups=len(cgroup_fds),
            filter_key=filter_key,
            network=filter_key.endswith("+net"),
            scratch_bytes=s.jail.scratch_size,
            scratch_inodes=s.jail.scratch_inodes,
            rlimits=policy.for_limits(memory=s.max_memory, cpu_ms=s.max_cpu_ms, file_size=s.limits.file_size,
                                      nofile=s.limits.nofile, pids=s.limits.pids),
            hostname=s.jail.hostname,
            exec_argv=exec_argv,
        )
        server = stack.server
        try:
            spawned = await server.spawn(spec, [lease.fd, *cgroup_fds] if lease else cgroup_fds)
        except BaseException:
            if lease is not None and self.network is not None:
                self.network.release(lease)
            cgroup.remove()
            self.slots.release(slot)
            raise
        finally:
            for fd in cgroup_fds:
                os.close(fd)
        worker = Worker(spawned, spec, slot, cgroup, self.generation, s.jail.cpus, policy, stack.syscall_names(),
                        self.network, lease, discover=discover)
        worker.forkserver = server
        worker.ready.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self._ready(stack, worker))
        self.live[worker.pid] = worker
        self.tasks.spawn(self._cleanup(worker))
        return worker

    def _ready(self, stack: Stack, worker: Worker) -> None:
        self.setup_samples.append(worker.setup_us)
        if worker.preload_report:
            stack.worker_preloaded(worker.preload_report)

    def on_reaped(self, pid: int, wstatus: int) -> None:
        worker = self.live.get(pid)
        if worker is not None:
            worker.on_reaped(wstatus)

    def retire(self, worker: Worker) -> None:
        worker.kill("retired")

    def made_by(self, server: ForkServerClient) -> bool:
        return any(w.forkserver is server for w in self.live.values())

    def older_than(self, generation: int) -> bool:
        return any(w.generation < generation for w in self.live.values())

    async def _cleanup(self, worker: Worker) -> None:
        await worker.over
        try:
            await asyncio.wait_for(asyncio.shield(worker.gone), REAP_TIMEOUT)
        except TimeoutError:
            log.warning("worker %d: not reaped %.0fs after its run was over; killing it", worker.pid, REAP_TIMEOUT)
            worker.kill("killed")
        await worker.idle.wait()  # the run's result has read the cgroup's counters
        self.finish(worker)

    def finish(self, worker: Worker, closing: bool = False) -> None:
        if self.live.pop(worker.pid, None) is None:
            return
        worker.settle()  # its last CPU, read before its cgroup goes
        worker.close_fds()  # with a lease, the run's network namespace and interfaces go now
        if worker.cgroup.remove(timeout=2.0 if closing else 0.0):
            self.slots.release(worker.slot)
            return
        if closing:
            log.error("worker %d: cgroup not removed at shutdown", worker.pid)
            return
        # Something of the run is still dying.  The uid slot comes back only with an empty,
        # removed cgroup; keep trying (without blocking the loop) rather than lose the slot.
        self.tasks.spawn(self._release_when_removed(worker))

    async def _release_when_removed(self, worker: Worker) -> None:
        started = time.monotonic()
        delay = 0.01  # the last task is reaped; the kernel may take a moment to notice
        warned = False
        while not worker.cgroup.remove():
            waited = time.monotonic() - started
            if waited > 30 and not warned:
                log.error("worker %d: its cgroup is not empty %.0fs after the run; uid slot %d waits for it",
                          worker.pid, waited, worker.slot.uid)
                warned = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        self.slots.release(worker.slot)

    async def close(self) -> None:
        """Every worker is killed by now (or its fork server is gone): wait for the cleanups."""
        if len(self.tasks):
            # Reaps are reported by the fork server: without it, waiting would only take time.
            alive = any(stack.server.alive for stack in self.stacks.values())
            await self.tasks.wait(REAP_TIMEOUT if alive else 0.5)

    async def finish_all(self) -> None:
        """After the fork server has stopped (it kills and reaps whatever is left)."""
        self.tasks.cancel()
        for worker in list(self.live.values()):
            await worker.idle.wait()
            self.finish(worker, closing=True)
        self.tasks.cancel()

    def setup_costs(self) -> dict[str, float]:
        """Median microseconds of each setup step over the last workers made."""
        steps: dict[str, list[int]] = {}
        for sample in self.setup_samples:
            for name, us in sample.items():
                steps.setdefault(name, []).append(us)
        return {name: float(statistics.median(v)) for name, v in steps.items()}
