"""One worker as the daemon sees it, and the execution of one plan on it.

A worker is born confined and waits; ``execute`` tightens its cgroup to the plan,
releases the request (code, files, env, rlimits) and stdin, reads stdout/stderr with
a byte cap each, and ends the run by the parent's clock: wall timeout, CPU budget
(polled from the cgroup) and output overflow all kill the worker's pid 1, which
takes the whole pid namespace with it.  The verdict comes from ``verdict.decide``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from ...common import protocol
from ..child.contract import MAX_STATUS_EXTRA, RunRequest, SetupError, WorkerSpec
from ..kernel.cgroups import Limits, WorkerCgroup
from ..net.network import Lease, Network
from ..policy.limits import RlimitPolicy
from ..spec.plans import RunPlan
from .fsclient import SpawnedWorker
from .pipes import CappedReader, FrameReader, Writer
from .slots import Slot
from .stream import EventSink, Streamer
from .verdict import Observation, Result, decide

log = logging.getLogger(__name__)
DRAIN_GRACE = 0.2  # seconds the run's pipes may stay open after its report
CANCEL_GRACE = 1.0  # seconds a cancelled run is given to die before what it used is read
V8_OOM = b"JavaScript heap out of memory"  # what V8 prints when it dies at its heap limit


class Worker:
    def __init__(self, spawned: SpawnedWorker, spec: WorkerSpec, slot: Slot, cgroup: WorkerCgroup,
                 generation: int, cpus: float, rlimits: RlimitPolicy, network: Network | None = None,
                 lease: Lease | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.proc = spawned
        self.spec = spec
        self.slot = slot
        self.cgroup = cgroup
        self.generation = generation
        self.cpus = cpus
        self.rlimits = rlimits
        self.network, self.lease = network, lease
        self.state = "starting"
        self.plan: RunPlan | None = None
        self.started: float | None = None
        self.setup_error: SetupError | None = None
        self.cpu_spent_ms = 0.0  # what the run used, once it is over (cancelled runs too)
        self.setup_us: dict[str, int] = {}  # how long each setup step took
        self.exit_frame: dict[str, Any] | None = None
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.exited: asyncio.Future[None] = self.loop.create_future()  # the status pipe closed
        self.reported: asyncio.Future[None] = self.loop.create_future()  # exit frame or closed: run over
        self.reaped: asyncio.Future[int] = self.loop.create_future()
        self.killed_for: str | None = None
        self.forkserver: object = None  # which fork server made it (reload drains old ones)
        self.idle = asyncio.Event()  # clear while a run is reading this worker's cgroup
        self.idle.set()
        self.opened: asyncio.Future[None] = self.loop.create_future()  # a session's runner serves cells
        self.on_cell: Callable[[dict[str, Any]], None] | None = None  # a session's cell reports
        self.status = FrameReader(spawned.status_r, max_frame=spec.out_max_bytes + MAX_STATUS_EXTRA)
        spawned.status_r = -1
        self._pump = self.loop.create_task(self._read_status())

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read_status(self) -> None:
        while (frame := await self.status.frames.get()) is not None:
            kind = frame.get("t")
            if kind == "ready":
                self.state = "ready"
                setup = frame.get("setup_us")
                self.setup_us = setup if isinstance(setup, dict) else {}
                if not self.ready.done():
                    self.ready.set_result(None)
            elif kind == "setup_error":
                self.setup_error = SetupError.from_dict(frame)
            elif kind == "session":
                if not self.opened.done():
                    self.opened.set_result(None)
            elif kind == "cell":
                if self.on_cell is not None:
                    self.on_cell(frame)
            elif kind == "exit":
                self.exit_frame = frame
                if not self.reported.done():
                    self.reported.set_result(None)  # everything of the run is dead by now
        if self.status.error:
            log.error("worker %d: bad status frame: %s", self.pid, self.status.error)
        if not self.ready.done():
            handoff = (self.exit_frame or {}).get("handoff") or {}
            if self.setup_error is None and handoff.get("step"):
                self.setup_error = SetupError.from_dict(handoff)
            self.ready.set_exception(self.setup_error or SetupError("worker", 0, "worker exited during setup"))
            self.ready.exception()  # consumed here; waiters re-raise it
        self.state = "exited"
        self.exited.set_result(None)
        if not self.reported.done():
            self.reported.set_result(None)

    def on_reaped(self, wstatus: int) -> None:
        if not self.reaped.done():
            self.reaped.set_result(wstatus)

    def kill(self, reason: str = "killed") -> None:
        if self.killed_for is None:
            self.killed_for = reason
        if self.proc.pidfd < 0:
            return  # already reaped and cleaned up
        self.cgroup.unthrottle()
        try:
            signal.pidfd_send_signal(self.proc.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError as e:
            log.error("worker %d: pidfd_send_signal: %s", self.pid, e)
        if self.cgroup.driver.kind == "cgroup2":
            self.cgroup.kill()

    def close_fds(self) -> None:
        self.proc.close()
        if self.lease is not None and self.network is not None:
            self.network.release(self.lease)

    async def execute(self, plan: RunPlan, events: EventSink | None = None) -> Result:
        self.idle.clear()
        try:
            return await self._execute(plan, events)
        finally:
            self.idle.set()

    def release(self, request: RunRequest, memory: int, pids: int) -> bytes:
        """Tighten the cgroup to the run (or session) and encode its request for the runtime."""
        self.state = "running"
        if self.cgroup.driver.kind != "none":
            self.cgroup.set_limits(Limits(memory, pids + 1, self.cpus))
        return request.to_json_frame() if self.spec.exec_argv else protocol.encode(request.to_wire())

    def output_readers(self, cap: int, streamer: Streamer | None, on_overflow: Callable[[str], None],
                       ) -> tuple[CappedReader, CappedReader]:
        """Readers of the run's stdout and stderr (the worker's fds pass to them)."""
        out = CappedReader(self.proc.stdout_r, cap, lambda: on_overflow("output:stdout"),
                           streamer.sink_for("stdout") if streamer else None)
        err = CappedReader(self.proc.stderr_r, cap, lambda: on_overflow("output:stderr"),
                           streamer.sink_for("stderr") if streamer else None)
        self.proc.stdout_r = self.proc.stderr_r = -1
        return out, err

    async def _execute(self, plan: RunPlan, events: EventSink | None) -> Result:
        self.plan = plan
        rlimits = self.rlimits.for_limits(memory=plan.memory_bytes, cpu_ms=plan.cpu_ms,
                                          file_size=plan.file_size_bytes, nofile=plan.nofile, pids=plan.pids)
        request = RunRequest(plan.code, rlimits, plan.files, plan.env, display=plan.display,
                             stream=events is not None)
        wire = self.release(request, plan.memory_bytes, plan.pids)
        cpu0 = self.cgroup.cpu_usage_ns()
        streamer = Streamer(events, [], lambda: self.kill("cancelled")) if events is not None else None
        out, err = self.output_readers(plan.output_bytes, streamer, self.kill)
        if streamer is not None:
            streamer.readers = [out, err]
        self.started = time.monotonic()
        request_writer = Writer(self.proc.request_w, wire)
        stdin_writer = Writer(self.proc.stdin_w, plan.stdin)
        self.proc.request_w = self.proc.stdin_w = -1
        timers = [self.loop.call_later(plan.timeout_ms / 1000, self.kill, "timeout")]
        if cpu0 is not None and plan.cpu_ms < plan.timeout_ms * self.cpus:
            timers.append(self.loop.call_later(plan.cpu_ms / 1000 / self.cpus, self._cpu_check, plan, cpu0, timers))
        try:
            await self.reported
            # The runner closed its stdout and stderr before it reported, so normally both
            # are at EOF already.  Processes it left behind may still hold them while they
            # die (under load that took seconds for a fork bomb); what they wrote before the
            # run ended is in the pipes: take it and stop waiting.
            drained = asyncio.gather(out.done, err.done)
            done, _ = await asyncio.wait([drained], timeout=DRAIN_GRACE)
            if not done:
                self.cgroup.unthrottle()
                out.finish()
                err.finish()
                await drained
        except asyncio.CancelledError:
            # The client went away (or the daemon is stopping): kill the run, and let it die
            # before charging it, so what it used counts against the caller all the same.
            self.kill("cancelled")
            if streamer is not None:
                streamer.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self.reported), CANCEL_GRACE)
            self.cpu_spent_ms = self._cpu_since(cpu0, frame=self.exit_frame)
            raise
        finally:
            for t in timers:
                t.cancel()
            request_writer.abandon()
            stdin_writer.abandon()
            out.close()
            err.close()
            self.state = "done"
        wall = time.monotonic() - self.started
        if streamer is not None:
            await streamer.finish()
            streamer.close()
        result = self._result(plan, out, err, cpu0, wall)
        result.streamed = streamer is not None
        return result

    def _cpu_since(self, cpu0: int | None, now_ns: int | None = None, frame: dict[str, Any] | None = None) -> float:
        """CPU the run has used (ms): the cgroup's counter, else the runner's rusage."""
        if now_ns is None:
            now_ns = self.cgroup.cpu_usage_ns()
        if now_ns is not None and cpu0 is not None:
            return round((now_ns - cpu0) / 1e6, 3)
        if frame and frame.get("utime") is not None:
            return round(float(frame["utime"] + frame["stime"]) * 1000, 3)
        return 0.0

    def _cpu_check(self, plan: RunPlan, cpu0: int, timers: list[asyncio.TimerHandle]) -> None:
        now = self.cgroup.cpu_usage_ns()
        if now is None or self.state != "running":
            return
        used_ms = (now - cpu0) / 1e6
        if used_ms >= plan.cpu_ms:
            self.kill("cpu")
            return
        delay = max(0.002, (plan.cpu_ms - used_ms) / 1000 / self.cpus)
        timers.append(self.loop.call_later(delay, self._cpu_check, plan, cpu0, timers))

    def _result(self, plan: RunPlan, out: CappedReader, err: CappedReader, cpu0: int | None,
                wall: float) -> Result:
        stats = self.cgroup.stats()
        frame = self.exit_frame
        status, extra = decide(Observation(frame, self.setup_error, self.killed_for, stats,
                                           runtime_oom=self.spec.exec_argv != () and V8_OOM in err.buf[-4096:]))
        result = Result(status=status, stdout=bytes(out.buf), stderr=bytes(err.buf),
                        stdout_truncated=out.truncated, stderr_truncated=err.truncated,
                        limits_enforced_by=self.cgroup.driver.kind if self.cgroup.driver.kind != "none" else "rlimit",
                        run_uid=self.slot.uid)
        for key, value in extra.items():
            setattr(result, key, value)
        handoff = (frame or {}).get("handoff") or {}
        result.wall_ms = round(wall * 1000, 3)
        if frame and handoff.get("started_ns") and frame.get("end_ns"):
            inside = (frame["end_ns"] - handoff["started_ns"]) / 1e6  # the start is the run's word:
            if 0 <= inside <= result.wall_ms:  # believed only within what the daemon saw
                result.wall_ms = round(inside, 3)
        result.cpu_ms = self.cpu_spent_ms = self._cpu_since(cpu0, stats.cpu_usage_ns, frame)
        if stats.memory_peak is not None:
            result.memory_peak_kb = stats.memory_peak // 1024
        elif frame:
            result.memory_peak_kb = int(frame.get("maxrss_kb") or 0)
        if self.lease is not None and self.network is not None:
            result.network = self.network.counters(self.lease)
        if frame:
            result.denied_syscalls = {d[0]: d[1] for d in frame.get("denied", [])}
            if plan.discover:
                result.discovery = {"allowed": {d[0]: d[1] for d in frame.get("denied", []) if d[2]},
                                    "refused": {d[0]: d[1] for d in frame.get("denied", []) if not d[2]}}
            files, truncated = _cap_files(frame.get("files") or {}, plan.out_files_count, plan.out_files_bytes)
            result.files = files
            result.files_truncated = truncated or bool(frame.get("files_truncated"))
            result.display = _figures(frame.get("display"))
        return result


def _cap_files(files: dict[str, bytes], max_count: int, max_bytes: int) -> tuple[dict[str, bytes], bool]:
    out: dict[str, bytes] = {}
    total = 0
    truncated = False
    for name in sorted(files):
        data = files[name]
        if len(out) >= max_count or total + len(data) > max_bytes:
            truncated = True
            continue
        out[name] = data
        total += len(data)
    return out, truncated


def _figures(raw: Any) -> list[dict[str, Any]]:
    """The figures of a report, as the protocol shows them: [{"mime": "image/png", "data": bin}]."""
    if not isinstance(raw, list):
        return []
    return [{"mime": "image/png", "data": f["data"]} for f in raw
            if isinstance(f, dict) and isinstance(f.get("data"), bytes)]
