"""A session's worker as the daemon sees it: opened once, then one cell at a time.

    session = await Session.open(worker, plan, rlimits)  # the worker keeps its state from now on
    result = await session.exec(cell, events)            # one cell, one truthful CellResult
    session.interrupt()                                  # KeyboardInterrupt in the running cell
    report = await session.file_op(plan)                 # write, read or list its /work (``files``)
    session.end("closed")                                # kill it; ``ended`` says when it is gone

A session is a pooled worker confined exactly like a run's, whose runner serves
cells instead of one request (``cells``), and it asks its worker for what it needs
through the worker's methods: the request pipe, the streams, R's reports of its cells
on the link, what the cell left in the scratch filesystem, the refused calls since the
last cell, the interrupt, the end.  Its stdout and stderr are read for its
whole life; each cell takes what was written between its start and its report (the
runner flushes before it reports, so nothing of the cell is left behind).  Between execs
the session runs at ``idle_cpus`` and the lowest CPU weight, and what it writes is kept up
to ``output_bytes`` a stream, then that stream is no longer read (its writers block)
until the next exec: threads left running cost neither the daemon nor other runs more
than that, and their CPU is charged to the owner (Sessions).  A cell
that overruns its time or output is interrupted first and keeps the session if it
stops within INTERRUPT_GRACE; otherwise the session is killed and the result says
so (``session_ended``).  File operations run beside a cell, not after it (a read sees a
file as it is at that moment), up to MAX_FILE_OPS at once; while one runs between execs
the session has its exec's CPU bandwidth (the child doing it is in the session's cgroup),
and each counts as use for the idle timeout.  Ending is always a kill of the worker's pid 1: every
process of the session goes with its namespaces, and the worker is cleaned up as
after a run (cgroup, scratch, uid slot, network).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...common import protocol
from ..child.contract import MAX_LINK_MESSAGE, Cell, RunRequest, SetupError
from ..kernel.cgroups import CgroupStats
from ..spec.plans import CellPlan, FilePlan, SessionPlan
from .collect import Seen, as_figures, cap_files
from .files import FileOps
from .pipes import Writer
from .stream import EventSink, Streamer
from .verdict import CellObservation, Observation, Result, decide, decide_cell
from .worker import DRAIN_GRACE, Worker

log = logging.getLogger(__name__)
INTERRUPT_GRACE = 1.0  # seconds an interrupted cell has to stop before its session is killed
OPEN_TIMEOUT = 30.0
MAX_FILE_OPS = 4  # file operations of one session at once
# Why a session ended, as the daemon says it (``not_found`` details, ``sessions``):
# closed, idle_timeout, max_lifetime, killed, cpu_limit, daemon_stopped, and for a
# session that died of what it did: the verdict of its end (memory_limit, timeout,
# signaled, blocked_syscall, sandbox_error) or exited.


@dataclass
class CellResult(Result):
    """A run's result plus what only a cell has."""

    exception: dict[str, str] | None = None  # {"type", "message", "traceback"} of an uncaught exception
    value: str | None = None  # repr() of the cell's last expression, when it is one and not None
    exit_code: int | None = None
    session_ended: bool = False  # the session did not survive this cell
    session_id: str = ""
    exec: int = 0  # the cell's number in its session


class SessionFailed(Exception):
    """The session's worker could not be set up; ``result`` says which step failed."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.reason)
        self.result = result


class Session:
    def __init__(self, worker: Worker, plan: SessionPlan) -> None:
        self.worker = worker
        self.plan = plan
        self.loop = asyncio.get_running_loop()
        self.request_w = worker.take_request_pipe()
        self.out, self.err = worker.output_readers(plan.output_bytes, None, self._overflow)
        self.cpu0 = worker.cgroup.cpu_usage_ns()
        self.files_seen: Seen = {}  # out/ files returned so far (a cell returns what is new or changed)
        self.figures_seen: set[str] = set()
        self.figures_said = 0  # the runner's count of figures saved, at the last cell
        self.opened_at = time.monotonic()
        self.last_used = self.opened_at
        self.execs = 0
        self.cell: asyncio.Future[dict[str, Any]] | None = None  # the running cell's report
        self.files: FileOps | None = None  # what does its file operations, once it had one
        self.file_ops = 0  # file operations in progress
        self.killed_for: str | None = None  # why the running cell was interrupted
        self.ended_reason: str | None = None  # set by whoever ends it on purpose
        self.end_result: Result | None = None  # the verdict of the session's end, once over
        self.final: tuple[CgroupStats, float, dict[str, int] | None] | None = None  # its counters at the end
        self.ended: asyncio.Future[str] = self.loop.create_future()  # the reason, once everything is gone
        worker.on_cell = self._reported
        self._watch = self.loop.create_task(self._watch_end())

    # -- life ----------------------------------------------------------------------------
    @classmethod
    async def open(cls, worker: Worker, plan: SessionPlan, rlimits: Mapping[str, int]) -> Session:
        """Make ``worker`` a session; SessionFailed if its runner does not get to serve cells."""
        worker.idle.clear()
        request = RunRequest("", rlimits, plan.files, plan.env, session=True, display=plan.display)
        wire = worker.release(request, plan.memory_bytes, plan.pids)
        session = cls(worker, plan)
        worker.close_stdin()  # cells bring their own stdin; programs they start read EOF
        writer = Writer(session.request_w, wire, keep_open=True)
        try:
            await asyncio.wait_for(asyncio.wait({worker.opened, worker.over},
                                                return_when=asyncio.FIRST_COMPLETED), OPEN_TIMEOUT)
        except TimeoutError:
            session.end("sandbox_error")
        finally:
            writer.abandon()
        if not worker.opened.done():
            session.end("sandbox_error")
            await session.ended
            result = session.end_result
            if result is None or result.status != "sandbox_error":
                error = SetupError("session", 0, "the session's runner did not start serving cells")
                status, extra = decide(Observation(None, error))
                result = Result(status=status, **extra)
            raise SessionFailed(result)
        session._between_execs()
        return session

    @property
    def alive(self) -> bool:
        return not self.ended.done() and self.ended_reason is None

    @property
    def busy(self) -> bool:
        return self.cell is not None and not self.cell.done()

    def end(self, reason: str) -> None:
        """Kill the session (idempotent): ``ended`` resolves once everything of it is gone."""
        if self.ended_reason is None:
            self.ended_reason = reason
        if self.files is not None:
            self.files.kill_all()  # (not in the worker's pid namespace: killed one by one)
        self.worker.kill("cpu" if reason == "cpu_limit" else reason)

    def interrupt(self, why: str = "interrupted") -> bool:
        """KeyboardInterrupt in the running cell; False if none is running."""
        if not self.busy:
            return False
        if self.killed_for is None:
            self.killed_for = why
        self.worker.interrupt()  # gone already: the grace timer decides
        return True

    def cpu_used_ms(self, now: int | None = None) -> float:
        """CPU the session used so far (ms); ``now``: the cgroup's counter, if just read."""
        if self.final is not None:
            return self.final[1]
        if now is None:
            now = self.worker.cgroup.cpu_usage_ns()
        if now is None or self.cpu0 is None:
            return 0.0
        return (now - self.cpu0) / 1e6

    def check_cpu(self, used_ms: float | None = None) -> bool:
        """End the session when it used up its own CPU budget; True if it did."""
        if not self.plan.cpu_ms or not self.alive:
            return False
        if (self.cpu_used_ms() if used_ms is None else used_ms) >= self.plan.cpu_ms:
            self.end("cpu_limit")
            return True
        return False

    async def _watch_end(self) -> None:
        """Once the worker's pid 1 reported (or died): take the verdict, release what is ours."""
        worker = self.worker
        await worker.over
        if self.files is not None:
            self.files.kill_all()
        drained = asyncio.gather(self.out.done, self.err.done)
        done, _ = await asyncio.wait([drained], timeout=DRAIN_GRACE)
        if not done:
            self.out.finish()
            self.err.finish()
        worker.end()  # R is over: nothing else of the session stays
        stats = worker.cgroup.stats()
        status, extra = decide(worker.observation(stats))
        self.end_result = Result(status=status, **extra)
        self.final = (stats, self.cpu_used_ms(), worker.network_counters())
        worker.cpu_spent_ms = self.final[1]
        if self.request_w >= 0:
            os.close(self.request_w)
            self.request_w = -1
        self.out.close()
        self.err.close()
        reason = self.ended_reason
        if reason is None or reason == "sandbox_error":
            reason = "exited" if status in ("ok", "exit_nonzero") else status
        if self.cell is not None and not self.cell.done():
            self.cell.cancel()
        worker.state = "done"
        worker.idle.set()  # the worker's cleanup may remove its cgroup now
        self.ended.set_result(reason)

    # -- cells ---------------------------------------------------------------------------
    def _reported(self, body: bytes) -> None:
        """R says the running cell is done: what it says of it, and what it left (out/ files new
        or changed since the last cell, figures, refused calls)."""
        if self.cell is None or self.cell.done():
            return
        worker = self.worker
        said = _said(body, worker.execs)
        files: dict[str, bytes] = {}
        truncated = False
        figures: list[dict[str, object]] = []
        figures_truncated = False
        # Figures are looked for when the runner says it saved some (its word can only hide its
        # own figures); a Node runner saves none.
        saved = said.get("figures")
        if worker.scratch is not None:
            files, truncated = worker.scratch.out_files(self.plan.out_files_count, self.plan.out_files_bytes,
                                                        self.files_seen)
            if isinstance(saved, int) and saved != self.figures_said:
                figures, figures_truncated = worker.scratch.display(self.plan.out_files_bytes, self.figures_seen)
                self.figures_said = saved
        exit_code = said.get("exit_code")
        self.cell.set_result({
            "exception": _text(said.get("exception"), 128), "message": _text(said.get("message"), 4096),
            "traceback": _text(said.get("traceback"), 1 << 15), "value": _text(said.get("value"), 1 << 15),
            "exit_code": exit_code if isinstance(exit_code, int) and not isinstance(exit_code, bool) else None,
            "interrupted": said.get("interrupted") is True,
            "cpu_ns": said.get("cpu_ns") if isinstance(said.get("cpu_ns"), int) else 0,
            "denied": worker.denials.since_last() if worker.denials else [],
            "files": files, "files_truncated": truncated, "display": figures,
            "display_truncated": figures_truncated})

    def _overflow(self, why: str) -> None:
        if self.busy:
            self._stop_cell(why)
        else:  # between execs: stop reading that stream until the next exec
            (self.out if why == "output:stdout" else self.err).pause()

    def _between_execs(self) -> None:
        """No cell runs: a small CPU bandwidth (once no file operation runs either), and output
        kept up to a cap, then not read."""
        if not self.file_ops:
            self.worker.cgroup.set_cpu(self.plan.idle_cpus, active=False)
        for name, reader in (("stdout", self.out), ("stderr", self.err)):
            reader.limit(self.plan.output_bytes, self._overflow_of_idle(name))

    def _overflow_of_idle(self, stream: str) -> Callable[[], None]:
        return lambda: self._overflow(f"output:{stream}")

    def _overflow_of(self, stream: str) -> Callable[[], None]:
        return lambda: self._stop_cell(f"output:{stream}")

    def _stop_cell(self, why: str) -> None:
        """Interrupt the running cell; if it is still running after the grace, kill the session."""
        if self.interrupt(why):
            cell = self.cell
            self.loop.call_later(INTERRUPT_GRACE, self._kill_if_running, cell, why)

    def _kill_if_running(self, cell: asyncio.Future[dict[str, Any]] | None, why: str) -> None:
        if cell is not None and cell is self.cell and not cell.done():
            log.info("session %s: cell did not stop within %.1fs of its interrupt (%s); killing the session",
                     self.plan.session_id, INTERRUPT_GRACE, why)
            self.end("timeout" if why == "timeout" else "killed")

    def _cpu_timer(self, timers: list[asyncio.TimerHandle], used_ms: float | None = None) -> None:
        if not self.plan.cpu_ms:
            return
        used = self.cpu_used_ms() if used_ms is None else used_ms
        if self.check_cpu(used) or not self.busy:
            return
        left = (self.plan.cpu_ms - used) / 1000 / self.worker.cpus
        timers.append(self.loop.call_later(max(0.002, left), self._cpu_timer, timers))

    async def exec(self, plan: CellPlan, events: EventSink | None = None) -> CellResult:
        """Run one cell (the caller makes sure none is running)."""
        assert not self.busy and self.alive
        worker = self.worker
        self.execs += 1
        seq = self.execs
        self.killed_for = None
        streamer: Streamer | None = None
        if events is not None:
            streamer = Streamer(events, [self.out, self.err], lambda: self._stop_cell("cancelled"))
        worker.cgroup.set_cpu(self.plan.cpus, active=True)
        # What background work (threads, timers) wrote since the last cell comes with this one.
        before = [reader.take(plan.output_bytes, self._overflow_of(name),
                              streamer.sink_for(name) if streamer else None)[0][-plan.output_bytes:]
                  for name, reader in (("stdout", self.out), ("stderr", self.err))]
        self.out.resume()  # (a stream past its cap between execs was no longer read)
        self.err.resume()
        if streamer is not None:
            for name, data in zip(("stdout", "stderr"), before, strict=True):
                if data:
                    streamer.push(name, data)
        cell = self.cell = self.loop.create_future()
        cpu_before = self.cpu_used_ms()
        wire = Cell(plan.code, plan.stdin, plan.files, plan.display or self.plan.display).frame(
            json_runtime=worker.execs)
        started = time.monotonic()
        writer = Writer(self.request_w, wire, keep_open=True)
        timers = [self.loop.call_later(plan.timeout_ms / 1000, self._stop_cell, "timeout")]
        self._cpu_timer(timers, cpu_before)
        try:
            await asyncio.wait({cell, self.ended}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The caller went away: the cell is interrupted (the session lives on if it stops).
            self._stop_cell("cancelled")
            if streamer is not None:
                streamer.close()
            raise
        finally:
            for t in timers:
                t.cancel()
            writer.abandon()
            self.last_used = time.monotonic()
        wall = time.monotonic() - started
        frame = cell.result() if cell.done() and not cell.cancelled() else None
        if frame is None:
            await asyncio.shield(self.ended)
        stdout, stdout_truncated = _joined(before[0], *self.out.take(plan.output_bytes), plan.output_bytes)
        stderr, stderr_truncated = _joined(before[1], *self.err.take(plan.output_bytes), plan.output_bytes)
        if self.alive:
            self._between_execs()
        if streamer is not None:
            await streamer.finish()
            streamer.close()
        ended = None
        if self.final is not None:
            stats, _cpu, network = self.final
        else:  # a cell that ended its session needs the counters that say why
            stats = worker.cgroup.stats() if frame is None else worker.cgroup.usage()
            network = worker.network_counters()
        if frame is None:
            ended = worker.observation(stats)
        status, extra = decide_cell(CellObservation(frame, ended, self.killed_for))
        result = CellResult(status=status, stdout=stdout, stderr=stderr, stdout_truncated=stdout_truncated,
                            stderr_truncated=stderr_truncated, run_uid=worker.slot.uid,
                            limits_enforced_by=worker.limits_enforced_by(), session_id=self.plan.session_id, exec=seq,
                            session_ended=frame is None, streamed=streamer is not None)
        for key, value in extra.items():
            setattr(result, key, value)
        result.wall_ms = round(wall * 1000, 3)
        result.cpu_ms = round(max(0.0, self.cpu_used_ms(stats.cpu_usage_ns) - cpu_before), 3)
        if frame is not None:  # the runner's own count can only raise it (the cgroup lags a slice)
            result.cpu_ms = max(result.cpu_ms, round(frame.get("cpu_ns", 0) / 1e6, 3))
        if stats.memory_peak is not None:
            result.memory_peak_kb = stats.memory_peak // 1024
        result.network = network
        report = frame or {"denied": worker.denials.since_last() if worker.denials else []}
        result.denied_syscalls = {d[0]: d[1] for d in report.get("denied", [])}
        files, truncated = cap_files(report.get("files") or {}, self.plan.out_files_count, self.plan.out_files_bytes)
        result.files = files
        result.files_truncated = truncated or bool(report.get("files_truncated"))
        result.display = as_figures(report.get("display"))
        result.display_truncated = bool(report.get("display_truncated"))
        if frame is None:
            result.reason = f"{result.reason}; the session has ended" if result.reason else "the session has ended"
        return result

    async def file_op(self, plan: FilePlan) -> dict[str, Any]:
        """One operation on the session's /work: the report of the child that did it
        (``FileOps.run``), or ``errno`` EBUSY when MAX_FILE_OPS are in progress already."""
        worker = self.worker
        if self.files is None and self.alive and worker.scratch is not None and worker.forkserver is not None:
            self.files = FileOps(worker.forkserver, worker.spec.uid, worker.spec.gid, worker.cgroup, worker.scratch)
        files = self.files
        if files is None or not self.alive:
            return {"ok": False, "errno": errno.ECANCELED, "at": -1}
        if self.file_ops >= MAX_FILE_OPS:
            return {"ok": False, "errno": errno.EBUSY, "at": -1}
        self.file_ops += 1
        if not self.busy:
            self.worker.cgroup.set_cpu(self.plan.cpus, active=True)
        try:
            return await files.run(plan)
        finally:
            self.file_ops -= 1
            self.last_used = time.monotonic()
            if self.alive and not self.busy and not self.file_ops:
                self.worker.cgroup.set_cpu(self.plan.idle_cpus, active=False)

    def describe(self, now: float) -> dict[str, Any]:
        p = self.plan
        return {"session_id": p.session_id, "language": p.language, "environment": p.environment or None,
                "network": p.network,
                "memory_mb": p.memory_bytes >> 20, "cpu_ms": p.cpu_ms or None,
                "cpu_used_ms": round(self.cpu_used_ms(), 1),
                "idle_timeout_ms": p.idle_timeout_ms, "max_lifetime_ms": p.max_lifetime_ms,
                "age_ms": round((now - self.opened_at) * 1000, 1), "idle_ms": 0.0 if self.busy else
                round((now - self.last_used) * 1000, 1), "execs": self.execs, "busy": self.busy,
                "worker_pid": self.worker.pid, "run_uid": self.worker.slot.uid}

    async def close(self, reason: str = "closed") -> str:
        self.end(reason)
        with contextlib.suppress(asyncio.CancelledError):
            return await asyncio.shield(self.ended)
        return reason


def _joined(before: bytes, data: bytes, truncated: bool, cap: int) -> tuple[bytes, bool]:
    """Output from before a cell and of the cell, within the cap."""
    if not before:
        return data, truncated
    joined = before + data
    return joined[:cap], truncated or len(joined) > cap


def _said(body: bytes, json_runtime: bool) -> dict[str, Any]:
    """A cell's report as the runner sent it (its word: anything else reads as nothing)."""
    try:
        if json_runtime:  # an exec runtime's bootstrap speaks JSON
            said = json.loads(body)
        else:
            said = protocol.decode_body(body, MAX_LINK_MESSAGE, max_items=16, max_containers=4)
    except (protocol.ProtocolError, ValueError, RecursionError):
        said = {}
    return said if isinstance(said, dict) else {}


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""
