"""One run from request to record: plan, admission, the jail, usage; and the runs in flight.

    plan.build (the request against the caller's quota) -> the environment serves ->
    Admission.admit (concurrency, queue, rate, CPU budget) -> Jail.run (a warm worker,
    one verdict) -> usage and log

The table of runs in flight (run id -> caller, plan, worker) lives here, in the daemon:
``jobs`` lists it, ``kill`` finds a run's worker in it, and a session's exec is entered
in it too (``admitted``), so that it is admitted, charged and listed as a run is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from . import logs, plan
from .budget import Budget
from .common import errors
from .common.errors import RequestError
from .config import Config, QuotaLimits
from .environments import Environments
from .jail.jail import Jail
from .jail.policy.profiles import refusal_advice
from .jail.spec.plans import RunPlan, answer_bound
from .jail.workers.stream import EventSink
from .jail.workers.verdict import Result
from .jail.workers.worker import Worker
from .peer import Identity
from .quota import Admission
from .usage import UsageStore

log = logging.getLogger("sandboxd.run")


@dataclass
class RunEntry:
    run_id: str
    caller: Identity
    started: float  # time.monotonic() when admitted
    timeout_ms: int
    memory_bytes: int
    network: bool
    language: str
    environment: str = ""
    session_id: str | None = None  # an exec in this session
    worker: Worker | None = None  # once the jail has one for it
    killed: bool = False
    killed_by: Identity | None = None  # whose kill op (an owner's or an admin's)
    on_kill: Callable[[], None] | None = None  # a session's exec: killing it ends the session
    answer_bytes: int = 0  # the most its answer can hold (held from the answers' budget meanwhile)

    @classmethod
    def for_plan(cls, run_id: str, caller: Identity, p: RunPlan) -> RunEntry:
        return cls(run_id, caller, time.monotonic(), p.timeout_ms, p.memory_bytes, p.network, p.language,
                   p.environment, answer_bytes=answer_bound(p.output_bytes))

    def bind(self, worker: Worker) -> None:
        self.worker = worker
        if self.killed:  # killed while it waited for a worker
            worker.kill("killed")

    def kill(self, by: Identity | None = None) -> None:
        self.killed = True
        self.killed_by = by
        if self.on_kill is not None:
            self.on_kill()
        elif self.worker is not None:
            self.worker.kill("killed")

    def describe(self, now: float) -> dict[str, Any]:
        w = self.worker
        return {"run_id": self.run_id, "caller_uid": self.caller.uid, "caller": self.caller.name,
                "worker_pid": w.pid if w else None, "run_uid": w.slot.uid if w else None,
                "age_ms": round((now - self.started) * 1000, 1), "timeout_ms": self.timeout_ms,
                "memory_mb": self.memory_bytes >> 20, "network": self.network, "language": self.language,
                "environment": self.environment or None, "session_id": self.session_id}


class Runs:
    def __init__(self, config: Config, jail: Jail, admission: Admission, usage: UsageStore,
                 environments: Environments, answers: Budget) -> None:
        self.config = config
        self.jail = jail
        self.admission = admission
        self.answers = answers  # the server's budget of answers not yet taken
        self.usage = usage
        self.environments = environments
        self.running: dict[str, RunEntry] = {}
        self.started_at = time.time()
        self._seq = 0

    def configure(self, config: Config) -> None:
        self.config = config

    def new_run_id(self) -> str:
        self._seq += 1
        return f"r{int(self.started_at) % 100000:05d}-{self._seq}"

    async def execute(self, who: Identity, limits: QuotaLimits, req: dict[str, Any],
                      discover: bool = False, events: EventSink | None = None) -> dict[str, Any]:
        """Admit and run one request; the result record plus run_id."""
        run_id = self.new_run_id()
        run_plan = plan.build(req, limits, self.config, run_id)
        if discover:
            run_plan = replace(run_plan, discover=True)
        if run_plan.environment:
            self.environments.check_ready(run_plan.environment)
        entry = RunEntry.for_plan(run_id, who, run_plan)

        async def work() -> Result:
            return await self.jail.run(run_plan, bind=entry.bind, events=events)

        return await self.admitted(entry, limits, work, lambda: entry.worker.cpu_spent_ms if entry.worker else 0.0)

    async def admitted(self, entry: RunEntry, limits: QuotaLimits, work: Callable[[], Awaitable[Result]],
                       spent: Callable[[], float]) -> dict[str, Any]:
        """Admission, the run table, usage and the log around one piece of work (a run or an
        exec in a session); ``spent`` says what it used if it is cancelled."""
        who, run_id = entry.caller, entry.run_id
        await self._hold_answer(who.uid, entry.answer_bytes)
        try:
            await self.admission.admit(who.uid, limits)
        except BaseException:
            self.answers.give(who.uid, entry.answer_bytes)
            raise
        started = time.time()
        entry.started = time.monotonic()
        self.running[run_id] = entry
        self.usage.started(run_id, who.uid, started)
        status, cpu_ms, syscall = "internal", 0.0, None
        try:
            result = await work()
            status, cpu_ms, syscall = result.status, result.cpu_ms, result.blocked_syscall
        except BaseException:
            status = "cancelled"
            cpu_ms = spent()  # what a cancelled run used counts all the same
            raise
        finally:
            del self.running[run_id]
            self.answers.give(who.uid, entry.answer_bytes)  # the answer's own bytes are counted as it goes out
            self.admission.release(who.uid)
            self.usage.finished(run_id, who.uid, cpu_ms, status, time.time())
            if entry.worker is not None and entry.session_id is None:
                entry.worker.settled.add_done_callback(partial(self._settled, who.uid, cpu_ms))
            wall_ms = (time.time() - started) * 1000
            if log.isEnabledFor(logging.INFO):  # the line and its fields are built for every run
                self._log_run(entry, status, syscall, wall_ms, cpu_ms)
        record = result.to_dict()
        record["run_id"] = run_id
        if result.blocked_syscall:
            record["advice"] = refusal_advice(result.blocked_syscall, entry.network)
        if entry.killed_by is not None and result.status == "signaled":
            record["killed_by"] = {"uid": entry.killed_by.uid, "user": entry.killed_by.name}
        if result.status == "sandbox_error":
            log.error("run %s uid=%d sandbox error: %s", run_id, who.uid, result.error)
        return record

    @contextlib.asynccontextmanager
    async def answer_held(self, uid: int, n: int) -> AsyncIterator[None]:
        """An answer of up to ``n`` bytes being built for ``uid`` outside a run (a session's file
        read), held from the answers' budget as a run's is."""
        await self._hold_answer(uid, n)
        try:
            yield
        finally:
            self.answers.give(uid, n)

    async def _hold_answer(self, uid: int, n: int) -> None:
        """Count a run's output before its answer is built (answer_bound): a caller whose answers not yet taken and
        whose runs in flight could hold more than its share of the answers' budget waits (the
        queue's time at most), then is told it is busy.  (Unread 24 MiB answers, pipelined, took
        the daemon to 1 GB past a 128 MiB budget: they were counted only once written.)"""
        if self.answers.fits(uid, n):
            self.answers.take(uid, n)
            return
        try:
            async with asyncio.timeout(self.config.daemon.queue_timeout):
                await self.answers.reserve(uid, n)
        except TimeoutError:
            held = self.answers.held(uid)
            raise RequestError(errors.BUSY, f"your answers not yet taken and your runs in flight may hold "
                               f"{held} bytes, and this run's answer up to {n} more, past the "
                               f"{self.answers.per_uid} the daemon keeps for one caller: read your answers, or ask "
                               "for less max_output", retry_after_ms=1000) from None

    def _settled(self, uid: int, charged_ms: float, settled: asyncio.Future[float]) -> None:
        """The run's worker is gone: charge what its answer could not yet count (its last
        time slice, what its other processes used while they were being ended)."""
        if not settled.cancelled() and settled.result() > charged_ms:
            self.usage.charge(uid, settled.result() - charged_ms, time.time())

    @staticmethod
    def _log_run(entry: RunEntry, status: str, syscall: str | None, wall_ms: float, cpu_ms: float) -> None:
        who, run_id = entry.caller, entry.run_id
        log.info("%s %s uid=%d (%s) status=%s%s wall=%.1fms cpu=%.1fms%s", "exec" if entry.session_id else "run",
                 run_id, who.uid, who.name, status, f" syscall={syscall}" if syscall else "", wall_ms, cpu_ms,
                 f" killed by uid {entry.killed_by.uid}" if entry.killed_by else "",
                 extra=logs.fields(run_id=run_id, caller_uid=who.uid, caller=who.name, status=status,
                                   syscall=syscall, language=entry.language, session_id=entry.session_id,
                                   wall_ms=round(wall_ms, 1), cpu_ms=round(cpu_ms, 1),
                                   killed_by=entry.killed_by.uid if entry.killed_by else None))

    def jobs(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [entry.describe(now) for entry in list(self.running.values())]

    def owner(self, run_id: str) -> int | None:
        entry = self.running.get(run_id)
        return entry.caller.uid if entry is not None else None

    def kill(self, run_id: str, by: Identity | None = None) -> bool:
        entry = self.running.get(run_id)
        if entry is None:
            return False
        entry.kill(by)
        return True

    def counts(self, uid: int) -> tuple[int, int]:
        """(running, queued) runs of ``uid``."""
        return self.admission.running_by_uid.get(uid, 0), self.admission.queued_by_uid.get(uid, 0)

    def queued(self) -> int:
        return len(self.admission.queue)

    def in_flight(self) -> int:
        """Runs and execs in sessions running now."""
        return len(self.running)

    def environments_in_use(self) -> list[str]:
        """The environment of each run in flight (not of session execs: their sessions count)."""
        return [entry.environment for entry in self.running.values() if not entry.session_id]
