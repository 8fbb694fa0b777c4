"""The jail as one object: root, cgroups, fork server, uid slots and warm pools.

    jail = Jail(settings)
    await jail.start()                # build/reuse the root, start the fork server, warm the pools
    result = await jail.run(plan)     # one confined run, one truthful Result
    await jail.close()

``run`` never raises for anything the run does; a worker that cannot be set up gives a
``sandbox_error`` result naming the failed step (``verdict.decide`` writes it, as every
verdict).  Making and cleaning up workers is ``workers``, building roots ``roots``; this
module switches between roots and configurations without dropping runs in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ..tasks import Tasks
from . import cgroup_detect, mounts, rootfs, template
from .cgroups import CgroupDriver
from .contract import SetupError
from .fsclient import ForkServerClient, ForkServerError
from .network import Network
from .pool import Pool
from .roots import Roots
from .seccomp import unfiltered
from .session import Session, SessionFailed
from .settings import JailSettings
from .spec import RunPlan, SessionPlan
from .stream import EventSink
from .verdict import Result, setup_failed
from .worker import Worker
from .workers import Workers

log = logging.getLogger(__name__)
# Settings a running jail cannot change: they take effect at the next start.
FIXED_JAIL = ("run_uids", "cgroup", "cgroup_parent")


class Jail:
    def __init__(self, settings: JailSettings) -> None:
        self.settings = settings
        self.root: rootfs.RootInfo | None = None
        self.driver: CgroupDriver | None = None
        self.workers: Workers | None = None
        self.pool: Pool[Worker] | None = None
        self.roots = Roots(settings.root_dir or f"{settings.state_dir}/roots")
        self.network: Network | None = None
        self.tasks = Tasks("jail")
        self._switching = asyncio.Lock()  # root rebuilds and reconfigurations, one at a time

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.root = self.roots.ensure(s.root_spec())
        log.info("root %s: %s (%d files, %d libraries, %.3fs)", "reused" if self.root.reused else "built",
                 self.root.path, self.root.files, self.root.libraries, self.root.seconds)
        for warning in self.root.warnings:
            log.warning("root: %s", warning)
        self.driver = cgroup_detect.detect(s.jail.cgroup_parent, s.jail.cgroup)
        if self.driver.kind != "none" and s.jail.cgroup_favordynmods:
            log.info("cgroup: %s", cgroup_detect.favor_dynamic_modifications())
        stale = self.driver.cleanup_stale()
        if stale:
            log.warning("removed %d worker cgroups left by an earlier daemon", len(stale))
        for lang, prof in s.profiles.items():
            for name in unfiltered(prof):
                log.warning("profiles.%s.allow lists %s: it is allowed without its usual argument checks", lang, name)
        self.workers = Workers(s, self.driver)
        if s.network_enabled:
            self.network = Network(s.network, s.root.python)
            await self.network.start()
            self.workers.network = self.network
        self.workers.server, self.workers.server_info = await self._start_server(s, self.root)
        self.pool = Pool(self.workers.make, self.workers.retire, s.pool_sizes())
        self.pool.start()

    async def _start_server(self, s: JailSettings, root: rootfs.RootInfo) -> tuple[ForkServerClient, dict[str, Any]]:
        assert self.workers is not None
        server = ForkServerClient(s.root.python, s.forkserver_env(), self.workers.on_reaped)
        template_fd = await template.build(root.path, s.root.python)
        root_fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            info = await server.start({**_init_message(s), "root_id": mounts.root_id(root.path)},
                                      [root_fd, template_fd])
        except BaseException:
            await server.stop()
            raise
        finally:
            os.close(root_fd)
            os.close(template_fd)
        for name, error in info.get("preload_errors", {}).items():
            log.error("preload %s failed: %s", name, error)
        if info.get("tasks", 1) != 1:
            await server.stop()
            raise ForkServerError(
                f"the fork server has {info['tasks']} threads after preloading; a preload module "
                "started threads (set e.g. OPENBLAS_NUM_THREADS=1 in jail.preload_env)")
        return server, info

    async def close(self, grace: float = 0.0) -> None:
        if self.pool:
            await self.pool.close()
        w = self.workers
        if w is not None:
            deadline = time.monotonic() + grace
            while self.running() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for worker in list(w.live.values()):
                if worker.state in ("running", "session"):
                    worker.kill("killed")
            await w.close()
            if w.server:
                await w.server.stop()  # it kills and reaps whatever is left
            await w.finish_all()
        if self.network is not None:
            await self.network.close()
        self.tasks.cancel()
        if self.driver is not None:
            self.driver.close()

    def running(self) -> int:
        return sum(1 for w in self.workers.live.values() if w.state == "running") if self.workers else 0

    # -- runs -----------------------------------------------------------------------------
    async def run(self, plan: RunPlan, bind: Callable[[Worker], None] | None = None,
                  events: EventSink | None = None) -> Result:
        """Carry out ``plan``; ``bind`` learns the worker first (so the run can be killed);
        with ``events`` its output is streamed as it comes."""
        try:
            worker, key, one_off = await self._worker(plan.language, plan.network, plan.memory_bytes, plan.discover)
        except SetupError as e:
            return setup_failed(e)
        if bind is not None:
            bind(worker)
        try:
            return await worker.execute(plan, events)
        finally:
            if not one_off and self.pool is not None:
                self.pool.done(key)

    async def open_session(self, plan: SessionPlan) -> Session:
        """A worker made a session for ``plan``; SessionFailed (with the verdict) if it cannot be."""
        try:
            worker, key, one_off = await self._worker(plan.language, plan.network, plan.memory_bytes)
        except SetupError as e:
            raise SessionFailed(setup_failed(e)) from None
        if not one_off and self.pool is not None:
            self.pool.done(key)  # the pool tops itself up now: this worker is not coming back
        rlimits = worker.rlimits.for_limits(memory=plan.memory_bytes, cpu_ms=plan.cpu_ms or plan.max_lifetime_ms,
                                            file_size=plan.file_size_bytes, nofile=plan.nofile, pids=plan.pids)
        log.debug("session %s on worker %d (%s)", plan.session_id, worker.pid, key)
        return await Session.open(worker, plan, rlimits)

    async def _worker(self, language: str, network: bool, memory: int, discover: bool = False,
                      ) -> tuple[Worker, str, bool]:
        """A ready worker for a run or session: (worker, its pool key, made for it alone)."""
        s = self.settings
        assert self.pool is not None and self.workers is not None
        if language not in s.runtimes:
            raise ValueError(f"unknown language {language!r}")
        key = s.filter_key(language, network)
        if key not in self.pool.keys:
            raise SetupError("network", 0, "network for runs is not set up on this daemon")
        one_off = discover or (s.runtimes[language].start == "exec" and memory != s.limits.memory)
        try:
            if one_off:  # discovery, or a runtime whose heap limit is set at its start
                worker = await self.workers.make(key, urgent=True, discover=discover, memory=memory)
                await worker.ready
            else:
                worker = await self.pool.acquire(key)
        except (TimeoutError, ForkServerError, OSError) as e:
            raise SetupError.from_os_error("spawn", e) from e
        return worker, key, one_off

    # -- roots and configuration ------------------------------------------------------------
    async def rebuild_root(self, force: bool = False, progress: rootfs.Progress | None = None) -> rootfs.RootInfo:
        async with self._switching:  # one rebuild at a time; a second waits and then reuses or rebuilds
            info = await self.roots.build(self.settings.root_spec(), force=force, progress=progress)
            if self.root is None or info.path != self.root.path:
                await self._template(info)
                self._switch(info)
            else:
                self.root = info
            return info

    async def reconfigure(self, new: JailSettings) -> list[str]:
        """Apply new settings without dropping runs in flight; return what changed.

        Pool sizes and CPU shares apply at once.  A different root swaps the template;
        different profiles, preloads or interpreter start a new fork server (the old one
        keeps its running workers until they end).  Either way pooled workers are
        replaced.  The uid range and cgroup placement need a restart.
        """
        async with self._switching:
            return await self._reconfigure(new)

    async def _reconfigure(self, new: JailSettings) -> list[str]:
        old = self.settings
        assert self.pool is not None and self.workers is not None and self.root is not None
        changes: list[str] = []
        fixed = [k for k in FIXED_JAIL if getattr(old.jail, k) != getattr(new.jail, k)]
        if fixed or old.state_dir != new.state_dir or old.root_dir != new.root_dir:
            changes.append(f"jail {', '.join(fixed) or 'state directory'}: applied at the next restart")
            new = dataclasses.replace(new, state_dir=old.state_dir, root_dir=old.root_dir,
                                      jail=dataclasses.replace(new.jail, **{k: getattr(old.jail, k) for k in fixed}))
        if new == old:
            return changes
        if self.network is not None:
            changes += self.network.reconfigure(new.network)
        elif new.network_enabled:
            self.network = Network(new.network, new.root.python)
            await self.network.start()
            self.workers.network = self.network
            changes.append("network for runs started")
        root_changed = old.root_spec().digest() != new.root_spec().digest()
        info = await self.roots.build(new.root_spec()) if root_changed else self.root
        if old.server_identity() != new.server_identity():
            server, server_info = await self._start_server(new, info)
            previous = self.workers.server
            self.workers.server, self.workers.server_info = server, server_info
            if previous is not None:
                self.tasks.spawn(self._retire_server(previous))
            changes.append("fork server restarted (profiles, preload or interpreter changed)")
        elif root_changed:
            await self._template(info)
        if root_changed:
            changes.append(f"root rebuilt ({info.build_id})")
        self.settings = self.workers.settings = new
        self.pool.resize(new.pool_sizes())
        self._switch(info if root_changed else None)
        return changes

    async def _template(self, info: rootfs.RootInfo) -> None:
        """The fork server's template mount namespace, made from ``info``'s root."""
        assert self.workers is not None and self.workers.server is not None
        template_fd = await template.build(info.path, self.settings.root.python)
        try:
            reply, _ = await self.workers.server.call({"op": "template", "root_id": mounts.root_id(info.path)},
                                                      fds=[template_fd])
        finally:
            os.close(template_fd)
        if not reply.get("ok"):
            raise ForkServerError(f"switching to the new root: {reply.get('error')}")

    def _switch(self, info: rootfs.RootInfo | None) -> None:
        """A new generation of workers (from the new root ``info``, if any): pooled ones are
        replaced, and the old root goes once no worker made from it is left."""
        assert self.pool is not None and self.workers is not None
        workers = self.workers
        previous = self.root
        if info is not None:
            self.root = info
        workers.generation += 1
        self.pool.renew()
        if info is not None and previous is not None and previous.path != info.path:
            generation = workers.generation
            self.roots.drop_when_unused(previous.path, lambda: workers.older_than(generation),
                                        lambda: self.root.path if self.root else None)

    async def _retire_server(self, server: ForkServerClient) -> None:
        assert self.workers is not None
        while self.workers.made_by(server):
            await asyncio.sleep(0.2)
        await server.stop()

    # -- what it looks like ------------------------------------------------------------------
    @property
    def run_path(self) -> list[str]:
        """The runs' sys.path inside the root."""
        return list((self.workers.server_info if self.workers else {}).get("run_path") or [])

    def describe(self) -> dict[str, Any]:
        w = self.workers
        info = w.server_info if w else {}
        return {
            "setup_us": w.setup_costs() if w else {},
            "root": self.root.summary() if self.root else None,
            "cgroup": self.driver.describe() if self.driver else None,
            "pool": self.pool.describe() if self.pool else None,
            "slots": {"total": w.slots.count, "free": w.slots.free, "in_use": w.slots.in_use} if w else None,
            "workers": len(w.live) if w else 0,
            "running": self.running(),
            "fork_server": {k: info.get(k) for k in ("preloaded", "preload_errors", "run_path", "vsz_kb", "filters")},
            "network": self.network.describe() if self.network else None,
        }


def _init_message(s: JailSettings) -> dict[str, Any]:
    profiles = {}
    for lang, prof in s.profiles.items():
        for net in (False, True):
            profiles[s.filter_key(lang, net)] = {**prof.to_wire(), "network": net}
    return {"profiles": profiles, "preload": list(s.jail.preload),
            "python_path": list(s.root.python_path), "env": s.run_env()}
