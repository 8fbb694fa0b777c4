"""The jail as one object: roots, cgroups, fork servers, uid slots and warm pools.

    jail = Jail(settings)
    await jail.start(layers)          # build/reuse the roots, start the fork servers, warm the pools
    result = await jail.run(plan)     # one confined run, one truthful Result
    await jail.close()

A *stack* is a root with the fork server whose workers run in it: the base root (the
configured paths), and one per built environment (the base root plus the
environment's site-packages, with its own preloads).  Pools are keyed by filter key
and stack (``python3+net@default``).  ``run`` never raises for anything the run does;
a worker that cannot be set up gives a ``sandbox_error`` result naming the failed
step (``verdict.decide`` writes it, as every verdict).  Making and cleaning up
workers is ``workers``, building roots ``roots``; this module switches stacks,
roots and configurations without dropping runs in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..common.tasks import Tasks
from .builder import run as run_build
from .builder.buildjail import BuildSpec
from .child.contract import SetupError
from .kernel import cgroup_detect, mounts
from .kernel.cgroups import CgroupDriver
from .net.network import Network
from .policy.seccomp import unfiltered
from .root import contents, rootfs, template
from .root.roots import Roots
from .spec.plans import EnvLayer, RunPlan, SessionPlan
from .spec.settings import JailSettings, environment_of, pool_key
from .workers.fsclient import ForkServerClient, ForkServerError, locate_init
from .workers.pool import Pool
from .workers.session import Session, SessionFailed
from .workers.stream import EventSink
from .workers.verdict import Result, setup_failed
from .workers.worker import Worker
from .workers.workers import Stack, Workers

log = logging.getLogger(__name__)
# Settings a running jail cannot change: they take effect at the next start.
FIXED_JAIL = ("run_uids", "cgroup", "cgroup_parent")


class Jail:
    def __init__(self, settings: JailSettings) -> None:
        self.settings = settings
        self.driver: CgroupDriver | None = None
        self.workers: Workers | None = None
        self.pool: Pool[Worker] | None = None
        self.stacks: dict[str, Stack] = {}  # "" the base root's; environments' by name
        self.layers: dict[str, EnvLayer] = {}
        self.network: Network | None = None
        self.tasks = Tasks("jail")
        self.init_path = ""  # sandboxd-init, found at start
        self._switching = asyncio.Lock()  # root rebuilds, environments and reconfigurations, one at a time

    @property
    def root(self) -> rootfs.RootInfo | None:
        """The base root."""
        stack = self.stacks.get("")
        return stack.root if stack else None

    def roots_of(self, environment: str) -> Roots:
        base = self.settings.root_dir or f"{self.settings.state_dir}/roots"
        return Roots(base if not environment else f"{base}/environments/{environment}")

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, layers: Mapping[str, EnvLayer] | None = None) -> dict[str, str]:
        """Build (or reuse) the roots and start serving; the environments whose root could not be
        made (their name -> why), which do not serve."""
        s = self.settings
        self.init_path = locate_init()
        self.layers = dict(layers or {})
        roots = {"": self._ensure_root(None)}
        refused: dict[str, str] = {}
        for name, layer in list(self.layers.items()):
            try:
                roots[name] = self._ensure_root(layer)
            except rootfs.RootError as e:
                log.error("environment %s: build %s does not serve: %s", name, layer.build_id, e)
                refused[name] = str(e)
                del self.layers[name]
        self.driver = cgroup_detect.detect(s.jail.cgroup_parent, s.jail.cgroup)
        if self.driver.kind != "none" and s.jail.cgroup_favordynmods:
            log.info("cgroup: %s", cgroup_detect.favor_dynamic_modifications())
        stale = self.driver.cleanup_stale()
        if stale:
            log.warning("removed %d worker cgroups left by an earlier daemon", len(stale))
        for lang, prof in s.profiles.items():
            for name in unfiltered(prof):
                log.warning("profiles.%s.allow lists %s: it is allowed without its usual argument checks", lang, name)
        self.workers = Workers(s, self.driver, self.stacks)
        if s.network_enabled:
            self.network = Network(s.network, s.root.python)
            await self.network.start()
            self.workers.network = self.network
        for name, info in roots.items():
            self.stacks[name] = await self._stack(s, info, self.layers.get(name))
        self.pool = Pool(self.workers.make, self.workers.retire, s.pool_sizes(self.layers))
        self.pool.start()
        return refused

    def _ensure_root(self, layer: EnvLayer | None) -> rootfs.RootInfo:
        """At start (nothing to serve yet): reuse or build the root in this process."""
        info = self.roots_of(layer.name if layer else "").ensure(contents.root_spec(self.settings, layer))
        log.info("root%s %s: %s (%d files, %d libraries, %.3fs)", f" of environment {layer.name}" if layer else "",
                 "reused" if info.reused else "built", info.path, info.files, info.libraries, info.seconds)
        for warning in info.warnings:
            log.warning("root: %s", warning)
        return info

    async def _stack(self, s: JailSettings, root: rootfs.RootInfo, layer: EnvLayer | None) -> Stack:
        """Start the fork server of ``root`` (its template mount namespace first)."""
        server = ForkServerClient(s.root.python, s.forkserver_env(), self._reaped)
        template_fd = await template.build(root.path, s.root.python)
        root_fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            info = await server.start({**_init_message(s, layer), "root_id": mounts.root_id(root.path),
                                       "init": self.init_path},
                                      [root_fd, template_fd])
        except BaseException:
            await server.stop()
            raise
        finally:
            os.close(root_fd)
            os.close(template_fd)
        for name, error in info.get("preload_errors", {}).items():
            log.error("preload %s failed%s: %s", name, f" in environment {layer.name}" if layer else "", error)
        if info.get("tasks", 1) != 1:
            await server.stop()
            raise ForkServerError(
                f"the fork server has {info['tasks']} threads after preloading; a preload module "
                "started threads (set e.g. OPENBLAS_NUM_THREADS=1 in jail.preload_env)")
        return Stack(layer.name if layer else "", root, server, info, s.server_identity(layer), layer)

    def _reaped(self, pid: int, wstatus: int) -> None:
        if self.workers is not None:
            self.workers.on_reaped(pid, wstatus)

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
            for stack in list(self.stacks.values()):
                await stack.server.stop()  # it kills and reaps whatever is left
            await w.finish_all()
        if self.network is not None:
            await self.network.close()
        self.tasks.cancel()
        if self.driver is not None:
            self.driver.close()

    def fork_servers_alive(self) -> bool:
        """Every stack's fork server is up (the watchdog pets systemd only then)."""
        return bool(self.stacks) and all(stack.server.alive for stack in self.stacks.values())

    def running(self) -> int:
        return sum(1 for w in self.workers.live.values() if w.state == "running") if self.workers else 0

    def root_layout(self, environment: str = "") -> tuple[str, list[str]] | None:
        """(root directory, the runs' sys.path) of a stack, once it is built."""
        stack = self.stacks.get(environment)
        return None if stack is None else (stack.root.path, self.run_path(environment))

    # -- runs -----------------------------------------------------------------------------
    async def run(self, plan: RunPlan, bind: Callable[[Worker], None] | None = None,
                  events: EventSink | None = None) -> Result:
        """Carry out ``plan``; ``bind`` learns the worker first (so the run can be killed);
        with ``events`` its output is streamed as it comes."""
        try:
            worker, key, one_off = await self._worker(plan.language, plan.network, plan.memory_bytes,
                                                      plan.environment, plan.discover)
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
            worker, key, one_off = await self._worker(plan.language, plan.network, plan.memory_bytes,
                                                      plan.environment)
        except SetupError as e:
            raise SessionFailed(setup_failed(e)) from None
        if not one_off and self.pool is not None:
            self.pool.done(key)  # the pool tops itself up now: this worker is not coming back
        rlimits = worker.rlimits.for_limits(memory=plan.memory_bytes, cpu_ms=plan.cpu_ms or plan.max_lifetime_ms,
                                            file_size=plan.file_size_bytes, nofile=plan.nofile, pids=plan.pids)
        log.debug("session %s on worker %d (%s)", plan.session_id, worker.pid, key)
        return await Session.open(worker, plan, rlimits)

    async def _worker(self, language: str, network: bool, memory: int, environment: str = "",
                      discover: bool = False) -> tuple[Worker, str, bool]:
        """A ready worker for a run or session: (worker, its pool key, made for it alone)."""
        s = self.settings
        assert self.pool is not None and self.workers is not None
        if language not in s.runtimes:
            raise ValueError(f"unknown language {language!r}")
        if environment not in self.stacks:
            raise SetupError("environment", 0, f"the environment {environment} is not ready")
        key = pool_key(s.filter_key(language, network), environment)
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

    # -- roots, environments and configuration -------------------------------------------------
    async def build_environment(self, spec: BuildSpec,
                                progress: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
        """Run an environment's build jail (pip as the build uid, confined, in a cgroup of its
        own); what it used; BuildFailed if it fails."""
        j = self.settings.jail
        return await run_build.build(spec, self.settings.root.python, j.build_timeout, self.network, progress,
                                     self.driver, run_build.BuildLimits(j.build_memory_max, j.build_pids))

    async def rebuild_root(self, force: bool = False, progress: rootfs.Progress | None = None) -> rootfs.RootInfo:
        """Rebuild the base root and every environment's (they hold the base root too)."""
        async with self._switching:  # one rebuild at a time; a second waits and then reuses or rebuilds
            base = await self._rebuild("", force, progress)
            for name in list(self.layers):
                await self._rebuild(name, force, None)
            return base

    async def use_environment(self, layer: EnvLayer, progress: rootfs.Progress | None = None) -> rootfs.RootInfo:
        """Serve ``layer`` (a newly built environment, or its first build): its root and fork
        server; the previous ones of that name go once their workers are done."""
        async with self._switching:
            assert self.pool is not None
            s = self.settings
            info = await self.roots_of(layer.name).build(contents.root_spec(s, layer), progress=progress)
            old = self.stacks.get(layer.name)
            self.stacks[layer.name] = await self._stack(s, info, layer)
            self.layers[layer.name] = layer
            self.pool.resize(s.pool_sizes(self.layers))
            self._renew(layer.name, old)
            return info

    async def drop_environment(self, name: str) -> None:
        """Serve an environment no more (removed from the configuration)."""
        async with self._switching:
            old = self.stacks.pop(name, None)
            self.layers.pop(name, None)
            if self.pool is not None:
                self.pool.resize({k: (0, 0) for k in self.pool.keys if environment_of(k) == name})
                self.pool.resize(self.settings.pool_sizes(self.layers))
            self._renew(name, old)

    async def _rebuild(self, name: str, force: bool, progress: rootfs.Progress | None) -> rootfs.RootInfo:
        stack = self.stacks[name]
        spec = contents.root_spec(self.settings, stack.layer)
        info = await self.roots_of(name).build(spec, force=force, progress=progress)
        previous = dataclasses.replace(stack)
        if info.path != stack.root.path:
            await self._template(stack, info)
            stack.root = info
            self._renew(name, previous)
        else:
            stack.root = info
        return info

    async def reconfigure(self, new: JailSettings) -> list[str]:
        """Apply new settings without dropping runs in flight; return what changed.

        Pool sizes and CPU shares apply at once.  A different root swaps the templates;
        different profiles, preloads or interpreter start new fork servers (the old ones
        keep their running workers until they end).  Either way pooled workers are
        replaced.  The uid range and cgroup placement need a restart.
        """
        async with self._switching:
            return await self._reconfigure(new)

    async def _reconfigure(self, new: JailSettings) -> list[str]:
        old = self.settings
        assert self.pool is not None and self.workers is not None
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
        self.settings = self.workers.settings = new
        for name, stack in list(self.stacks.items()):
            new_spec = contents.root_spec(new, stack.layer)
            root_changed = contents.root_spec(old, stack.layer).digest() != new_spec.digest()
            info = await self.roots_of(name).build(new_spec) if root_changed else stack.root
            what = f"environment {name}'s" if name else "the"
            if stack.identity != new.server_identity(stack.layer):
                self.stacks[name] = await self._stack(new, info, stack.layer)
                self._renew(name, stack)
                changes.append(f"{what} fork server restarted (profiles, preload or interpreter changed)")
            elif root_changed:
                previous = dataclasses.replace(stack)
                await self._template(stack, info)
                stack.root = info
                self._renew(name, previous)
            if root_changed:
                changes.append(f"{what} root rebuilt ({info.build_id})")
        self.pool.resize(new.pool_sizes(self.layers))
        self.workers.generation += 1
        self.pool.renew()
        return changes

    async def _template(self, stack: Stack, info: rootfs.RootInfo) -> None:
        """A stack's fork server gets a template mount namespace made from ``info``'s root."""
        template_fd = await template.build(info.path, self.settings.root.python)
        try:
            reply, _ = await stack.server.call({"op": "template", "root_id": mounts.root_id(info.path)},
                                               fds=[template_fd])
        finally:
            os.close(template_fd)
        if not reply.get("ok"):
            raise ForkServerError(f"switching to the new root: {reply.get('error')}")

    def _renew(self, name: str, previous: Stack | None) -> None:
        """A new generation of workers: pooled ones are replaced; ``previous`` (what the stack
        ``name`` was) goes once no worker made from it is left: its fork server (if it is not
        the one serving now) and its root (if another serves now)."""
        assert self.pool is not None and self.workers is not None
        workers = self.workers
        workers.generation += 1
        self.pool.renew()
        if previous is None:
            return
        generation = workers.generation
        current = self.stacks.get(name)
        if current is None or current.server is not previous.server:
            self.tasks.spawn(self._retire_server(previous.server))
        if current is None or current.root.path != previous.root.path:
            self.roots_of(name).drop_when_unused(
                previous.root.path, lambda: workers.older_than(generation),
                lambda: self.stacks[name].root.path if name in self.stacks else None)

    async def _retire_server(self, server: ForkServerClient) -> None:
        assert self.workers is not None
        while self.workers.made_by(server):
            await asyncio.sleep(0.2)
        await server.stop()

    # -- what it looks like ------------------------------------------------------------------
    def run_path(self, environment: str = "") -> list[str]:
        """The runs' sys.path inside a stack's root."""
        stack = self.stacks.get(environment)
        return list((stack.info if stack else {}).get("run_path") or [])

    def describe(self) -> dict[str, Any]:
        w = self.workers
        base = self.stacks.get("")
        info = base.info if base else {}
        return {
            "setup_us": w.setup_costs() if w else {},
            "root": base.root.summary() if base else None,
            "cgroup": self.driver.describe() if self.driver else None,
            "pool": self.pool.describe() if self.pool else None,
            "slots": {"total": w.slots.count, "free": w.slots.free, "in_use": w.slots.in_use} if w else None,
            "workers": len(w.live) if w else 0,
            "running": self.running(),
            "fork_server": {
                **_preload_status(info),
                **{k: info.get(k) for k in ("run_path", "vsz_kb", "filters")},
                "environments": {name: {"root": st.root.build_id, **_preload_status(st.info)}
                                 for name, st in self.stacks.items() if name},
            },
            "network": self.network.describe() if self.network else None,
        }


def _preload_status(info: dict[str, Any]) -> dict[str, Any]:
    """What a stack preloaded and where: in its fork server (trusted directories only) or in
    each worker, confined (child/preload.py); the workers' part as the last ready one said."""
    here = info.get("worker_preload") or {}
    in_workers = list(info.get("preloaded_in_workers") or [])
    return {"preloaded": [*(info.get("preloaded") or []), *(here.get("preloaded") or [])],
            "preloaded_in_workers": in_workers,
            "preload_errors": {**(info.get("preload_errors") or {}), **(here.get("errors") or {})},
            "warmed_up": here.get("warmed_up") if info.get("warmup_in_workers") else info.get("warmed_up"),
            "warmup_in_workers": bool(info.get("warmup_in_workers"))}


def _init_message(s: JailSettings, layer: EnvLayer | None) -> dict[str, Any]:
    profiles = {}
    for lang, prof in s.profiles.items():
        for net in (False, True):
            profiles[s.filter_key(lang, net)] = {**prof.to_wire(), "network": net}
    return {"profiles": profiles, "preload": list(s.preload(layer)), "warmup": s.warmup(layer),
            "shared_preload": layer is None,  # an environment's packages never load in the fork server
            "python_path": list(s.python_path(layer)), "env": s.run_env()}
