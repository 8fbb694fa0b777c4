"""One worker as the daemon sees it -- its pipes, its state, its end -- and the execution of
one plan on it.

A worker is two processes: ``sandboxd-init`` (pid 1 of its namespace, a few pages of C)
and R, the runner, the one CPython of the run, born confined and waiting.  The daemon
holds everything else a supervisor used to be: the link (R's messages and, with the
first, R's seccomp listener, a pidfd of R and the scratch filesystem's top), the
listener itself (``denials``: refused calls named and answered from this loop), the
status pipe (sandboxd-init's record of R's wait status and rusage), the run's stdio, and
a pidfd of pid 1, whose death takes the whole namespace with it.

    starting -> ready -> running | session -> done -> exited

``execute`` tightens the cgroup to the plan, releases the request (code, files, env,
rlimits) and stdin, reads stdout/stderr with a byte cap each, and ends the run by the
daemon's clock: wall timeout, CPU budget (polled from the cgroup) and output overflow
all kill pid 1.  The run is over when sandboxd-init reports R's end -- or sooner, when R
has written "done" on its handoff page and both streams have reached their end (then
the answer does not wait for R's address space to be torn down).  Files the run left
in ``out/`` are read through the scratch's fd once nothing of the run is left; the
verdict comes from ``verdict.decide``.  A session is the same worker, serving cells
(``session``) through the methods below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from ...common import protocol
from ..child.contract import (
    HANDOFF_FILE,
    LINK_ARMED,
    LINK_CELL,
    LINK_DONE,
    LINK_READY,
    LINK_SESSION,
    LINK_SETUP_ERROR,
    LINK_STARTED,
    LINK_WAITING,
    Handoff,
    RunRequest,
    SetupError,
    WorkerSpec,
)
from ..kernel.cgroups import CgroupStats, Limits, WorkerCgroup
from ..net.network import Lease, Network
from ..policy.limits import RlimitPolicy
from ..spec.plans import RunPlan
from .collect import Scratch, as_figures
from .denials import Denials, SyscallNames
from .fsclient import ForkServerClient, SpawnedWorker
from .link import MAX_FDS, InitStatus, Link, decode_map, decode_timings
from .pipes import CappedReader, Writer
from .slots import Slot
from .stream import EventSink, Streamer
from .verdict import Observation, Result, decide, end_report

log = logging.getLogger(__name__)
DRAIN_GRACE = 0.2  # seconds the run's pipes may stay open after its end
CANCEL_GRACE = 1.0  # seconds a cancelled run is given to die before what it used is read
GONE_GRACE = 5.0  # seconds to wait for the namespace to be empty before reading out/
V8_OOM = b"JavaScript heap out of memory"  # what V8 prints when it dies at its heap limit
LINK_MESSAGES_AFTER_START = 4096  # what a run may send on the link (cells, its end) before it is no longer read


class Worker:
    def __init__(self, spawned: SpawnedWorker, spec: WorkerSpec, slot: Slot, cgroup: WorkerCgroup,
                 generation: int, cpus: float, rlimits: RlimitPolicy, names: SyscallNames,
                 network: Network | None = None, lease: Lease | None = None, discover: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.proc = spawned
        self.spec = spec
        self.slot = slot
        self.cgroup = cgroup
        self.generation = generation
        self.cpus = cpus
        self.rlimits = rlimits
        self.names = names
        self.network, self.lease = network, lease
        self.discover = discover
        self.execs = bool(spec.exec_argv)  # an exec runtime (its bootstrap speaks JSON and says when it is done)
        self.state = "starting"
        self.plan: RunPlan | None = None
        self.setup_error: SetupError | None = None
        self.setup_us: dict[str, int] = {}  # how long each setup step took
        self.started = False  # LINK_STARTED came: user code runs from now on
        self.done_status: int | None = None  # an exec runtime's word that its code is done, and how
        self.killed_for: str | None = None
        self.cpu_spent_ms = 0.0  # what the run used, once it is over (cancelled runs too)
        self.forkserver: ForkServerClient | None = None  # which fork server made it (reload drains old ones)
        self.runner_pidfd = -1
        self.cpu0: int | None = None  # the cgroup's CPU counter when the run was released
        self.preload_report: dict[str, Any] = {}  # R's own preload and warm-up, if it had any
        # The run's CPU once nothing of it is left (ms): the scheduler charges a task's last
        # time slice to its cgroup only when it is switched out, so what the answer says may
        # lag by that slice; this is what the run is charged in the end (Runs.admitted).
        self.settled: asyncio.Future[float] = self.loop.create_future()
        self.scratch: Scratch | None = None
        self.denials: Denials | None = None
        self.on_cell: Callable[[bytes], None] | None = None  # a session's cell reports
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.opened: asyncio.Future[None] = self.loop.create_future()  # a session's runner serves cells
        self.over: asyncio.Future[None] = self.loop.create_future()  # R's end is known (or cannot be)
        self.gone: asyncio.Future[int] = self.loop.create_future()  # pid 1 reaped: nothing of it is left
        self.idle = asyncio.Event()  # clear while a run is reading this worker's cgroup
        self.idle.set()
        self._armed_at = 0
        self._streams: tuple[CappedReader, CappedReader] | None = None
        self._handoff: Handoff | None = None
        self._fast_end = False  # the run may end on its page and its streams (a cgroup counts its CPU)
        self._link_budget = LINK_MESSAGES_AFTER_START
        self._link = Link(self.loop, spawned.link, self._said, self._maybe_over)
        self._status = InitStatus(self.loop, spawned.status_r, self._maybe_over)
        spawned.link = spawned.status_r = -1  # (theirs now)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def init_report(self) -> dict[str, int] | None:
        """sandboxd-init's record of R's end (wait status and rusage), once it came."""
        return self._status.report

    # -- what the worker says ------------------------------------------------------------
    def _said(self, kind: bytes, body: bytes, fds: list[int]) -> None:
        """One message of R (or of its runtime's bootstrap).  Before LINK_STARTED it is setup's
        word; after it, the run's: it can only mislead its own report, and only so much of it
        is read.  Fds that come with any message but the first are closed, never kept."""
        if self.started:
            self._link_budget -= 1
            if self._link_budget <= 0:
                self._link.close()  # a run flooding its link: what it still says is not read
                return
        if kind == LINK_ARMED and self.denials is None and len(fds) == MAX_FDS and not self.started:
            listener, pidfd, top = fds
            fds[:] = [-1, -1, -1]
            self.denials = Denials(listener, self.names, self.discover)
            self.runner_pidfd = pidfd
            self.scratch = Scratch(top, self.spec.uid, self.spec.gid)
            self.setup_us = decode_timings(body)
            self._armed_at = time.monotonic_ns()
        elif kind in (LINK_READY, LINK_WAITING) and self.state == "starting" and self.denials is not None:
            if (kind == LINK_WAITING) == self.execs:
                if body:  # what R preloaded itself, confined (child/preload.py)
                    self.preload_report = decode_map(body)
                if self.execs:
                    self.setup_us["runtime"] = (time.monotonic_ns() - self._armed_at) // 1000
                self.state = "ready"
                if not self.ready.done():
                    self.ready.set_result(None)
        elif kind == LINK_SETUP_ERROR and not self.started:
            self.setup_error = SetupError.from_dict(decode_map(body))
        elif kind == LINK_STARTED and self.state in ("running", "session"):
            self.started = True
            self._maybe_over()  # (its streams may have ended before this message was read)
        elif not self.started:
            return
        elif kind == LINK_DONE and self.execs and self.state == "running" and body.isdigit():
            self.done_status = int(body) & 0xFF
            self._maybe_over()
        elif kind == LINK_SESSION and self.state == "session":
            if not self.opened.done():
                self.opened.set_result(None)
        elif kind == LINK_CELL and self.on_cell is not None:
            self.on_cell(body)

    def on_reaped(self, wstatus: int) -> None:
        """The fork server reaped pid 1: the namespace is empty, the run is over whatever it said."""
        if not self.gone.done():
            self.gone.set_result(wstatus)
        self._maybe_over()

    def _maybe_over(self) -> None:
        """R's end is known when sandboxd-init reported it, when pid 1 is gone, or -- with a
        cgroup counting the run's CPU -- when R's own word came: a forked runner's page says
        done and both streams are at their end; an exec runtime said so on the link."""
        if self.over.done():
            return
        ended = self.init_report is not None or self._status.fd < 0 or self.gone.done()
        if not ended and self._fast_end and self.started:
            if self.execs:
                ended = self.done_status is not None
            elif self._streams is not None and all(s.done.done() for s in self._streams):
                ended = self.handoff().phase() == Handoff.DONE
        if not ended:
            return
        if not self.ready.done():
            self.ready.set_exception(self.setup_error or SetupError("worker", 0, "worker exited during setup"))
            self.ready.exception()  # consumed here; waiters re-raise it
        self.over.set_result(None)

    def handoff(self) -> Handoff:
        """R's handoff page, read through the scratch's fd (kept once R's end is known)."""
        if self._handoff is not None:
            return self._handoff
        data = self.scratch.read_handoff(HANDOFF_FILE, Handoff.SIZE) if self.scratch else b"\0" * Handoff.SIZE
        page = Handoff(bytearray(data))
        if self.over.done():
            self._handoff = page
        return page

    # -- what the daemon does to it ---------------------------------------------------------
    def kill(self, reason: str = "killed") -> None:
        """Kill the run for ``reason`` (the first reason given is the one the verdict names)."""
        if self.killed_for is None:
            self.killed_for = reason
        self.end()

    def end(self) -> None:
        """End everything of the worker: SIGKILL to its pid 1 takes the whole namespace."""
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

    def interrupt(self) -> bool:
        """SIGINT to R (a KeyboardInterrupt in a session's running cell)."""
        if self.runner_pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.runner_pidfd, signal.SIGINT)
        except OSError:
            return False
        return True

    def close_fds(self) -> None:
        """After the worker is gone: its fds, its scratch filesystem, its network namespace."""
        self._link.close()
        self._status.close()
        self.proc.close()
        if self.denials is not None:
            self.denials.close()
        if self.scratch is not None and self.scratch.top >= 0:
            os.close(self.scratch.top)
            self.scratch.top = -1
        if self.runner_pidfd >= 0:
            os.close(self.runner_pidfd)
            self.runner_pidfd = -1
        if self.lease is not None and self.network is not None:
            self.network.release(self.lease)

    def release(self, request: RunRequest, memory: int, pids: int) -> bytes:
        """Tighten the cgroup to the run (or session) and encode its request for the runtime."""
        self.state = "session" if request.session else "running"
        if self.cgroup.driver.kind != "none":
            self.cgroup.set_limits(Limits(memory, pids + 1, self.cpus))
        return request.to_json_frame() if self.execs else protocol.encode(request.to_wire())

    def take_request_pipe(self) -> int:
        """The request pipe, for a session that writes its cells on it (its fd, now the caller's)."""
        fd, self.proc.request_w = self.proc.request_w, -1
        return fd

    def close_stdin(self) -> None:
        """A session's programs read EOF (cells bring their own stdin)."""
        Writer(self.proc.stdin_w, b"")
        self.proc.stdin_w = -1

    def output_readers(self, cap: int, streamer: Streamer | None, on_overflow: Callable[[str], None],
                       ) -> tuple[CappedReader, CappedReader]:
        """Readers of the run's stdout and stderr (the worker's fds pass to them)."""
        out = CappedReader(self.proc.stdout_r, cap, lambda: on_overflow("output:stdout"),
                           streamer.sink_for("stdout") if streamer else None)
        err = CappedReader(self.proc.stderr_r, cap, lambda: on_overflow("output:stderr"),
                           streamer.sink_for("stderr") if streamer else None)
        self.proc.stdout_r = self.proc.stderr_r = -1
        return out, err

    def network_counters(self) -> dict[str, int] | None:
        return self.network.counters(self.lease) if self.lease is not None and self.network is not None else None

    def limits_enforced_by(self) -> str:
        return self.cgroup.driver.kind if self.cgroup.driver.kind != "none" else "rlimit"

    def end_report(self) -> dict[str, Any] | None:
        """What is known of R's end, as ``verdict.decide`` reads it (None: nothing)."""
        page = self.handoff()
        said = page.exit_status() if self._fast_end and self.started and page.phase() == Handoff.DONE else None
        return end_report(self.init_report, self.done_status, said, page, self.started,
                          self.denials.report() if self.denials else [])

    def observation(self, stats: CgroupStats, runtime_oom: bool = False) -> Observation:
        return Observation(self.end_report(), self.setup_error, self.killed_for, stats, runtime_oom=runtime_oom)

    async def everything_gone(self, timeout: float = GONE_GRACE) -> None:
        """Until pid 1 is reaped (the namespace is empty), ending it if need be."""
        self.end()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.gone), timeout)

    # -- a run --------------------------------------------------------------------------
    async def execute(self, plan: RunPlan, events: EventSink | None = None) -> Result:
        self.idle.clear()
        try:
            return await self._execute(plan, events)
        finally:
            self.idle.set()

    async def _execute(self, plan: RunPlan, events: EventSink | None) -> Result:
        self.plan = plan
        rlimits = self.rlimits.for_limits(memory=plan.memory_bytes, cpu_ms=plan.cpu_ms,
                                          file_size=plan.file_size_bytes, nofile=plan.nofile, pids=plan.pids)
        request = RunRequest(plan.code, rlimits, plan.files, plan.env, display=plan.display,
                             stream=events is not None)
        wire = self.release(request, plan.memory_bytes, plan.pids)
        cpu0 = self.cpu0 = self.cgroup.cpu_usage_ns()
        self._fast_end = cpu0 is not None
        streamer = Streamer(events, [], lambda: self.kill("cancelled")) if events is not None else None
        out, err = self.output_readers(plan.output_bytes, streamer, self.kill)
        self._streams = (out, err)
        for reader in self._streams:
            reader.done.add_done_callback(lambda _f: self._maybe_over())
        if streamer is not None:
            streamer.readers = [out, err]
        started = time.monotonic()
        request_writer = Writer(self.proc.request_w, wire)
        stdin_writer = Writer(self.proc.stdin_w, plan.stdin)
        self.proc.request_w = self.proc.stdin_w = -1
        timers = [self.loop.call_later(plan.timeout_ms / 1000, self.kill, "timeout")]
        if cpu0 is not None and plan.cpu_ms < plan.timeout_ms * self.cpus:
            timers.append(self.loop.call_later(plan.cpu_ms / 1000 / self.cpus, self._cpu_check, plan, cpu0, timers))
        try:
            await self.over
            if self.done_status is not None:
                self.end()  # an exec runtime said it is done: its own teardown is not the run's
            # R closed its stdout and stderr before it ended, so normally both are at EOF
            # already.  Processes it left behind may still hold them while they die (under
            # load that took seconds for a fork bomb); what they wrote before the run ended
            # is in the pipes: take it and stop waiting.
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
                await asyncio.wait_for(asyncio.shield(self.over), CANCEL_GRACE)
            self.cpu_spent_ms = self._cpu_since(cpu0)
            raise
        finally:
            for t in timers:
                t.cancel()
            request_writer.abandon()
            stdin_writer.abandon()
            out.close()
            err.close()
            self.state = "done"
        wall = time.monotonic() - started
        # Nothing of the run may still be writing out/ while it is read; with nothing there the
        # answer does not wait for the namespace to go (the kill follows within microseconds).
        if self.scratch is not None and self.scratch.anything_to_collect():
            await self.everything_gone()
            files, truncated = self.scratch.out_files(plan.out_files_count, plan.out_files_bytes)
            display, display_truncated = self.scratch.display(plan.out_files_bytes)
        else:
            self.end()
            files, truncated, display, display_truncated = {}, False, [], False
        if streamer is not None:
            await streamer.finish()
            streamer.close()
        result = self._result(plan, out, err, cpu0, wall)
        result.files, result.files_truncated, result.display = files, truncated, as_figures(display)
        result.display_truncated = display_truncated
        result.streamed = streamer is not None
        return result

    def settle(self) -> None:
        """Every process of the worker is gone: its CPU is all in its cgroup now."""
        if not self.settled.done():
            self.settled.set_result(self._cpu_since(self.cpu0))

    def _cpu_since(self, cpu0: int | None, now_ns: int | None = None) -> float:
        """CPU the run has used (ms): the cgroup's counter, else the runner's rusage."""
        if now_ns is None:
            now_ns = self.cgroup.cpu_usage_ns()
        if now_ns is not None and cpu0 is not None:
            return round((now_ns - cpu0) / 1e6, 3)
        if self.init_report is not None:
            return round((self.init_report["utime_us"] + self.init_report["stime_us"]) / 1000, 3)
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
        obs = self.observation(stats, runtime_oom=self.execs and V8_OOM in err.buf[-4096:])
        status, extra = decide(obs)
        result = Result(status=status, stdout=bytes(out.buf), stderr=bytes(err.buf),
                        stdout_truncated=out.truncated, stderr_truncated=err.truncated,
                        limits_enforced_by=self.limits_enforced_by(), run_uid=self.slot.uid)
        for key, value in extra.items():
            setattr(result, key, value)
        report = obs.exit_frame
        handoff = (report or {}).get("handoff") or {}
        result.wall_ms = round(wall * 1000, 3)
        if report and handoff.get("started_ns") and report.get("end_ns"):
            inside = (report["end_ns"] - handoff["started_ns"]) / 1e6  # the start is the run's word:
            if 0 <= inside <= result.wall_ms:  # believed only within what the daemon saw
                result.wall_ms = round(inside, 3)
        result.cpu_ms = self.cpu_spent_ms = self._cpu_since(cpu0, stats.cpu_usage_ns)
        if report and report.get("utime") is None and not self.execs:
            # Ended on R's word: the cgroup has not been charged R's last slice yet (a run
            # that fits in one slice reads 0).  R's own count can only raise the figure.
            result.cpu_ms = max(result.cpu_ms, round(self.handoff().cpu_ns() / 1e6, 3))
        if stats.memory_peak is not None:
            result.memory_peak_kb = stats.memory_peak // 1024
        elif report:
            result.memory_peak_kb = int(report.get("maxrss_kb") or 0)
        result.network = self.network_counters()
        denied = self.denials.report() if self.denials else []
        result.denied_syscalls = {d[0]: d[1] for d in denied}
        if plan.discover:
            result.discovery = {"allowed": {d[0]: d[1] for d in denied if d[2]},
                                "refused": {d[0]: d[1] for d in denied if not d[2]}}
        return result

