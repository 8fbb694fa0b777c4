"""The jail as one object: root, cgroups, fork server, uid slots and warm pools.

    jail = Jail(settings)
    await jail.start()                # build/reuse the root, start the fork server, warm the pools
    result = await jail.run(plan)     # one confined run, one truthful Result
    await jail.close()

``run`` never raises for anything the run does; a worker that cannot be set up gives a
``sandbox_error`` result naming the failed step.  Every worker is cleaned up after
its pid 1 has been reaped: cgroup removed, then its uid slot freed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import cgroups, limits, rootfs
from .cgroups import CgroupDriver, Limits
from .fsclient import ForkServerClient, ForkServerError
from .pool import Pool
from .seccomp import Profile, unfiltered
from .slots import SlotPool
from .spec import RunPlan, WorkerSpec
from .verdict import Result
from .worker import Worker, WorkerFailed

log = logging.getLogger(__name__)
REAP_TIMEOUT = 10.0
RUN_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/work",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
}


@dataclass(frozen=True)
class JailSettings:
    state_dir: str
    root_paths: tuple[str, ...]
    root_exclude: tuple[str, ...] = ()
    python: str = "/usr/bin/python3"
    python_path: tuple[str, ...] = ()
    uid_first: int = 880000
    uid_count: int = 1024
    hostname: str = "sandbox"
    scratch_bytes: int = 64 << 20
    scratch_inodes: int = 4096
    cgroup: str = "auto"
    cgroup_parent: str = "sandboxd"
    cgroup_favordynmods: bool = True
    cpus: float = 1.0
    as_slack: int = 1 << 30
    pool_min: int = 2
    pool_max: int = 8
    preload: tuple[str, ...] = ()
    preload_env: Mapping[str, str] = field(default_factory=dict)
    profiles: Mapping[str, Profile] = field(default_factory=lambda: {"python3": Profile("python3")})
    # ceilings every pooled worker is started with; plans may only lower them
    max_memory: int = 2 << 30
    pool_memory: int = 256 << 20  # memory limit a waiting worker has: the common request needs no change
    max_cpu_ms: int = 600_000
    max_pids: int = 256
    max_nofile: int = 1024
    max_file_size: int = 64 << 20
    max_out_bytes: int = 16 << 20
    max_out_files: int = 256
    root_dir: str | None = None  # default: <state_dir>/roots

    def filter_key(self, language: str, network: bool) -> str:
        return f"{language}+net" if network else language

    def root_spec(self) -> rootfs.RootSpec:
        return rootfs.RootSpec(self.root_paths, self.root_exclude, self.generated_files(),
                               required=(self.python,))

    def generated_files(self) -> dict[str, bytes]:
        passwd = ["root:x:0:0:root:/root:/usr/sbin/nologin",
                  "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"]
        group = ["root:x:0:", "nogroup:x:65534:"]
        for i in range(self.uid_count):
            uid = self.uid_first + i
            passwd.append(f"run{i}:x:{uid}:{uid}:sandboxd run:/work:/usr/sbin/nologin")
            group.append(f"run{i}:x:{uid}:")
        return {"etc/passwd": ("\n".join(passwd) + "\n").encode(), "etc/group": ("\n".join(group) + "\n").encode(),
                "etc/hostname": (self.hostname + "\n").encode()}


class Jail:
    def __init__(self, settings: JailSettings) -> None:
        self.settings = settings
        self.root: rootfs.RootInfo | None = None
        self.driver: CgroupDriver | None = None
        self.forkserver: ForkServerClient | None = None
        self.forkserver_info: dict[str, Any] = {}
        self.slots = SlotPool(settings.uid_first, settings.uid_count)
        self.pool: Pool | None = None
        self.workers: dict[int, Worker] = {}  # host pid of pid 1 -> worker
        self.running: dict[str, Worker] = {}  # run id -> worker
        self.generation = 0
        self.started_at = time.time()
        self._cleanups: set[asyncio.Task[None]] = set()
        self._run_seq = 0
        self._rebuilding = asyncio.Lock()  # root rebuilds and reconfigurations, one at a time
        self.setup_samples: collections.deque[dict[str, int]] = collections.deque(maxlen=200)

    @property
    def root_base(self) -> str:
        return self.settings.root_dir or os.path.join(self.settings.state_dir, "roots")

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.root = rootfs.ensure_root(s.root_spec(), self.root_base)
        rootfs.remove_stale_roots(self.root_base, [self.root.path])
        log.info("root %s: %s (%d files, %d libraries, %.3fs)", "reused" if self.root.reused else "built",
                 self.root.path, self.root.files, self.root.libraries, self.root.seconds)
        for warning in self.root.warnings:
            log.warning("root: %s", warning)
        self.driver = cgroups.detect(s.cgroup_parent, s.cgroup)
        if self.driver.kind != "none" and s.cgroup_favordynmods:
            log.info("cgroup: %s", cgroups.favor_dynamic_modifications())
        stale = self.driver.cleanup_stale()
        if stale:
            log.warning("removed %d worker cgroups left by an earlier daemon", len(stale))
        for lang, prof in s.profiles.items():
            for name in unfiltered(prof):
                log.warning("profiles.%s.allow lists %s: it is allowed without its usual argument checks", lang, name)
        env = {"PATH": RUN_ENV["PATH"], "LANG": "C.UTF-8", **s.preload_env}
        self.forkserver = ForkServerClient(s.python, env, self._on_reaped)
        self.forkserver_info = await self.forkserver.start(self._init_message())
        for name, error in self.forkserver_info.get("preload_errors", {}).items():
            log.error("preload %s failed: %s", name, error)
        if self.forkserver_info.get("tasks", 1) != 1:
            raise ForkServerError(
                f"the fork server has {self.forkserver_info['tasks']} threads after preloading; a preload module "
                "started threads (set e.g. OPENBLAS_NUM_THREADS=1 in jail.preload_env)")
        keys = [s.filter_key(lang, net) for lang in s.profiles for net in (False, True)]
        self.pool = Pool(self._make_worker, self._retire, keys, s.pool_min, s.pool_max)
        self.pool.start()

    def _init_message(self) -> dict[str, Any]:
        s = self.settings
        assert self.root is not None
        profiles = {}
        for lang, prof in s.profiles.items():
            for net in (False, True):
                profiles[s.filter_key(lang, net)] = {
                    "allow": list(prof.allow), "errno": dict(prof.errno), "ioctls": list(prof.ioctls),
                    "prctls": list(prof.prctls), "network": net}
        return {"root": self.root.path, "profiles": profiles, "preload": list(s.preload),
                "python_path": list(s.python_path), "env": {**RUN_ENV, **s.preload_env}}

    async def close(self, grace: float = 0.0) -> None:
        if self.pool:
            await self.pool.close()
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for worker in list(self.running.values()):
            worker.kill("killed")
        if self._cleanups:
            # Reaps are reported by the fork server: without it, waiting would only take time.
            alive = self.forkserver is not None and self.forkserver.alive
            await asyncio.wait(list(self._cleanups), timeout=REAP_TIMEOUT if alive else 0.5)
        if self.forkserver:
            await self.forkserver.stop()  # it kills and reaps whatever is left
        for task in list(self._cleanups):
            task.cancel()
        for worker in list(self.workers.values()):
            await worker.idle.wait()
            self._finish_cleanup(worker, closing=True)
        for task in list(self._cleanups):
            task.cancel()
        if self.driver is not None:
            self.driver.close()

    async def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no cleanup is pending (tests use it to check nothing is left)."""
        deadline = time.monotonic() + timeout
        while self._cleanups and time.monotonic() < deadline:
            await asyncio.wait(list(self._cleanups), timeout=deadline - time.monotonic())
        return not self._cleanups

    # -- workers ------------------------------------------------------------------------
    async def _make_worker(self, key: str, urgent: bool = False, discover: bool = False) -> Worker:
        """Start a worker; ``urgent`` ones (a request waits) get full CPU weight from the start."""
        s = self.settings
        assert self.driver is not None and self.forkserver is not None
        slot = await self.slots.acquire(timeout=30.0)
        try:
            cgroup = self.driver.create(f"w{slot.index}", Limits(s.pool_memory, s.max_pids + 1, s.cpus, active=urgent),
                                        slot.index)
        except BaseException:
            self.slots.release(slot)
            raise
        vsz = int(self.forkserver_info.get("vsz_kb", 0)) * 1024 + (64 << 20)
        spec = WorkerSpec(
            worker_id=f"{key}/{slot.index}",
            uid=slot.uid,
            gid=slot.gid,
            cgroup_procs=tuple(cgroup.procs_files),
            filter_key=key,
            network=key.endswith("+net"),
            scratch_bytes=s.scratch_bytes,
            scratch_inodes=s.scratch_inodes,
            rlimits=limits.for_run(as_base=vsz, memory=s.max_memory, as_slack=s.as_slack, cpu_ms=s.max_cpu_ms,
                                   file_size=s.max_file_size, nofile=s.max_nofile, pids=s.max_pids,
                                   cgroup=self.driver.kind != "none"),
            out_max_bytes=s.max_out_bytes,
            out_max_files=s.max_out_files,
            discover=discover,
            hostname=s.hostname,
        )
        try:
            spawned = await self.forkserver.spawn(spec)
        except BaseException:
            cgroup.remove()
            self.slots.release(slot)
            raise
        worker = Worker(spawned, spec, slot, cgroup, key, self.generation, s.cpus, vsz, s.as_slack)
        worker.forkserver = self.forkserver
        worker.ready.add_done_callback(
            lambda f: None if f.cancelled() or f.exception() else self.setup_samples.append(worker.setup_us))
        self.workers[worker.pid] = worker
        self._track_cleanup(worker)
        return worker

    def _on_reaped(self, pid: int, wstatus: int) -> None:
        worker = self.workers.get(pid)
        if worker is not None:
            worker.on_reaped(wstatus)

    def _retire(self, worker: Worker) -> None:
        worker.kill("retired")

    def _track_cleanup(self, worker: Worker) -> None:
        task = asyncio.get_running_loop().create_task(self._cleanup(worker))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _cleanup(self, worker: Worker) -> None:
        await worker.exited
        try:
            await asyncio.wait_for(asyncio.shield(worker.reaped), REAP_TIMEOUT)
        except TimeoutError:
            log.warning("worker %d: not reaped %.0fs after its status pipe closed; killing its cgroup",
                      worker.pid, REAP_TIMEOUT)
            worker.kill("killed")
        await worker.idle.wait()  # the run's result has read the cgroup's counters
        self._finish_cleanup(worker)

    def _finish_cleanup(self, worker: Worker, closing: bool = False) -> None:
        if self.workers.pop(worker.pid, None) is None:
            return
        worker.close_fds()
        if worker.cgroup.remove(timeout=2.0 if closing else 0.0):
            self.slots.release(worker.slot)
            return
        if closing:
            log.error("worker %d: cgroup not removed at shutdown", worker.pid)
            return
        # Something of the run is still dying.  The uid slot comes back only with an empty,
        # removed cgroup; keep trying (without blocking the loop) rather than lose the slot.
        task = asyncio.get_running_loop().create_task(self._release_when_removed(worker))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

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

    # -- runs -----------------------------------------------------------------------------
    def new_run_id(self) -> str:
        self._run_seq += 1
        return f"r{int(self.started_at) % 100000:05d}-{self._run_seq}"

    async def run(self, plan: RunPlan, caller_uid: int | None = None) -> Result:
        s = self.settings
        assert self.pool is not None
        if plan.language not in s.profiles:
            raise ValueError(f"unknown language {plan.language!r}")
        key = s.filter_key(plan.language, plan.network)
        try:
            if plan.discover:
                worker = await self._make_worker(key, urgent=True, discover=True)
                await worker.ready
            else:
                worker = await self.pool.acquire(key)
        except WorkerFailed as e:
            return Result(status="sandbox_error", error=e.error, reason=f"setup step {e.error.get('step')} failed")
        except (TimeoutError, ForkServerError, OSError) as e:
            return Result(status="sandbox_error", error={"step": "spawn", "errno": getattr(e, "errno", 0) or 0,
                                                         "message": str(e)}, reason="no worker could be started")
        worker.caller_uid = caller_uid
        self.running[plan.run_id] = worker
        try:
            return await worker.execute(plan)
        finally:
            self.running.pop(plan.run_id, None)
            if not plan.discover:
                self.pool.done(key)

    def kill_run(self, run_id: str) -> bool:
        worker = self.running.get(run_id)
        if worker is None:
            return False
        worker.kill("killed")
        return True

    async def build_root(self, settings: JailSettings, force: bool = False,
                         progress: rootfs.Progress | None = None) -> rootfs.RootInfo:
        """Build (or reuse) the root in a child process, so this loop keeps serving meanwhile."""
        spec = settings.root_spec()
        os.makedirs(self.root_base, mode=0o755, exist_ok=True)
        spec_file = os.path.join(self.root_base, f".spec-{os.getpid()}.json")
        with open(spec_file, "w", encoding="utf-8") as f:
            f.write(spec.to_json())
        argv = [sys.executable, "-m", "sandboxd.jail.rootfs", spec_file, self.root_base]
        if force:
            argv.append("--force")
        last: dict[str, Any] = {}
        try:
            async for line in _child_lines(argv):
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

    async def rebuild_root(self, force: bool = False, progress: rootfs.Progress | None = None) -> rootfs.RootInfo:
        async with self._rebuilding:  # one rebuild at a time; a second waits and then reuses or rebuilds
            return await self._rebuild_root(force, progress)

    async def _rebuild_root(self, force: bool, progress: rootfs.Progress | None) -> rootfs.RootInfo:
        assert self.forkserver is not None and self.pool is not None
        info = await self.build_root(self.settings, force=force, progress=progress)
        if self.root is None or info.path != self.root.path:
            reply, _ = await self.forkserver.call({"op": "template", "root": info.path})
            if not reply.get("ok"):
                raise ForkServerError(f"switching to the new root: {reply.get('error')}")
            previous = self.root
            self.root = info
            self.generation += 1
            self.pool.renew()
            if previous is not None:
                asyncio.get_running_loop().create_task(self._drop_root_later(previous.path))
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
        async with self._rebuilding:
            return await self._reconfigure(new)

    async def _reconfigure(self, new: JailSettings) -> list[str]:
        old = self.settings
        assert self.pool is not None and self.forkserver is not None
        changes: list[str] = []
        fixed = [k for k in ("uid_first", "uid_count", "cgroup", "cgroup_parent", "state_dir", "root_dir")
                 if getattr(old, k) != getattr(new, k)]
        if fixed:
            changes.append(f"jail {', '.join(fixed)}: applied at the next restart")
            new = dataclasses.replace(new, **{k: getattr(old, k) for k in fixed})
        if new == old:
            return changes
        root_changed = old.root_spec().digest() != new.root_spec().digest()
        server_changed = any(getattr(old, k) != getattr(new, k)
                             for k in ("python", "python_path", "preload", "preload_env", "profiles"))
        self.settings = new
        self.pool.resize(new.pool_min, new.pool_max)
        previous_root = self.root
        if root_changed:
            self.root = await self.build_root(new)
            changes.append(f"root rebuilt ({self.root.build_id})")
        if server_changed:
            old_server = self.forkserver
            env = {"PATH": RUN_ENV["PATH"], "LANG": "C.UTF-8", **new.preload_env}
            server = ForkServerClient(new.python, env, self._on_reaped)
            try:
                info = await server.start(self._init_message())
            except BaseException:
                self.settings, self.root = old, previous_root
                await server.stop()
                raise
            self.forkserver, self.forkserver_info = server, info
            asyncio.get_running_loop().create_task(self._retire_server(old_server))
            changes.append("fork server restarted (profiles, preload or interpreter changed)")
        elif root_changed and self.root is not None:
            reply, _ = await self.forkserver.call({"op": "template", "root": self.root.path})
            if not reply.get("ok"):
                self.settings, self.root = old, previous_root
                raise ForkServerError(f"switching to the new root: {reply.get('error')}")
        self.generation += 1
        self.pool.renew()
        if root_changed and previous_root is not None:
            asyncio.get_running_loop().create_task(self._drop_root_later(previous_root.path))
        return changes

    async def _retire_server(self, server: ForkServerClient) -> None:
        while any(w.forkserver is server for w in self.workers.values()):
            await asyncio.sleep(0.2)
        await server.stop()

    async def _drop_root_later(self, path: str) -> None:
        """Delete an old root once no worker made from it is left (that root only: another
        rebuild may be writing its own next to it)."""
        generation = self.generation
        while any(w.generation < generation for w in self.workers.values()):
            await asyncio.sleep(0.5)
        if self.root is None or os.path.realpath(path) != os.path.realpath(self.root.path):
            rootfs.remove_root(self.root_base, path)

    def setup_costs(self) -> dict[str, float]:
        """Median microseconds of each setup step over the last workers made."""
        steps: dict[str, list[int]] = {}
        for sample in self.setup_samples:
            for name, us in sample.items():
                steps.setdefault(name, []).append(us)
        return {name: float(statistics.median(v)) for name, v in steps.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "setup_us": self.setup_costs(),
            "root": self.root.summary() if self.root else None,
            "cgroup": self.driver.describe() if self.driver else None,
            "pool": self.pool.describe() if self.pool else None,
            "slots": {"total": self.slots.count, "free": self.slots.free, "in_use": self.slots.in_use},
            "workers": len(self.workers),
            "running": len(self.running),
            "fork_server": {k: self.forkserver_info.get(k) for k in ("preloaded", "preload_errors", "run_path",
                                                                      "vsz_kb", "filters")},
        }


async def _child_lines(argv: list[str]) -> AsyncIterator[str]:
    """Run ``argv`` and yield its output lines, without threads (asyncio's own subprocess
    support waits for children from a thread in Python 3.11; this daemon has one thread)."""
    loop = asyncio.get_running_loop()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, close_fds=True)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        queue.put_nowait(chunk)
        if not chunk:
            loop.remove_reader(fd)

    loop.add_reader(fd, readable)
    buf = b""
    try:
        while True:
            chunk = await queue.get()
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
    finally:
        loop.remove_reader(fd)
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        while proc.poll() is None:  # it closed its output: its exit is a moment away
            await asyncio.sleep(0.005)
