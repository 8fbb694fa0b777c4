"""Sessions: which are open, whose they are, and what became of those that ended.

    open  -> plan.build_session (the quota's bounds) -> caps (per caller, daemon-wide)
          -> Jail.open_session (a pooled worker becomes the session) -> the table
    exec  -> the caller's own session, not busy -> plan.build_cell -> Runs.admitted
          (admission, run table, usage, as a run) -> Session.exec
    files -> the caller's own session -> sessionfiles.build -> Session.file_op (a child of the
          fork server, the session's uid in its cgroup) -> sessionfiles.answer
    close / interrupt / list, and a sweep each second: idle and lifetime limits, the
    session's own CPU budget, and CPU used between execs charged to its caller.

A session is its owner's alone: to anyone else it does not exist (``not_found``, the
same answer as for an id never issued); admins may list, close and kill any.  When
a session ends, its id is remembered (a bounded number of them) with why, and the
owner's next call on it gets ``not_found`` with that ``reason``.  Ids carry the
daemon instance that issued them, so after a restart an old id gets
``reason: daemon_restarted``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from . import plan, sessionfiles
from .access import Access
from .common import errors
from .common.errors import RequestError
from .config import Config, QuotaLimits
from .environments import Environments
from .jail.jail import Jail
from .jail.spec.plans import answer_bound
from .jail.workers import files
from .jail.workers.session import CellResult, Session, SessionFailed
from .jail.workers.stream import EventSink
from .peer import Identity
from .quota import Admission
from .runs import RunEntry, Runs
from .usage import UsageStore

log = logging.getLogger("sandboxd.session")
SWEEP_SECONDS = 1.0
REMEMBER_ENDED = 4096  # ended session ids kept, with why, for their owners' next call
SESSION_ID = re.compile(r"s([0-9a-f]{6})-([0-9]+)-([0-9a-f]{12})")


@dataclass
class Entry:
    owner: Identity
    session: Session
    limits: QuotaLimits
    cpu_charged_ms: float = 0.0  # of its CPU, what its owner has been charged
    run_id: str | None = None  # the exec running now
    closing: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Sessions:
    def __init__(self, config: Config, jail: Jail, runs: Runs, admission: Admission, usage: UsageStore,
                 access: Access, environments: Environments) -> None:
        self.config = config
        self.jail = jail
        self.runs = runs
        self.admission = admission
        self.usage = usage
        self.access = access
        self.environments = environments
        self.instance = secrets.token_hex(3)
        self.live: dict[str, Entry] = {}
        self.ended: collections.OrderedDict[str, tuple[int, str]] = collections.OrderedDict()
        self.opening: collections.Counter[int] = collections.Counter()  # opens in progress, per uid
        self._seq = 0
        self._sweeper: asyncio.Task[None] | None = None

    def configure(self, config: Config) -> None:
        self.config = config

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    # -- open, exec, interrupt, close ------------------------------------------------------
    async def open(self, who: Identity, limits: QuotaLimits, req: dict[str, Any]) -> dict[str, Any]:
        self._seq += 1
        session_id = f"s{self.instance}-{self._seq}-{secrets.token_hex(6)}"
        session_plan = plan.build_session(req, limits, self.config, session_id)
        if session_plan.environment:
            self.environments.check_ready(session_plan.environment)
        mine = sum(1 for e in self.live.values() if e.owner.uid == who.uid) + self.opening[who.uid]
        if mine >= limits.sessions:
            raise RequestError(errors.QUOTA_EXCEEDED, f"you have {mine} sessions open; the limit is {limits.sessions}",
                               limit="sessions", value=limits.sessions)
        cap = self.config.daemon.sessions
        if len(self.live) + sum(self.opening.values()) >= cap:
            raise RequestError(errors.BUSY, f"the daemon has {cap} sessions open, its limit; retry later",
                               limit="daemon.sessions", retry_after_ms=1000)
        self.admission.check_budget(who.uid, limits)
        self.opening[who.uid] += 1
        try:
            session = await self.jail.open_session(session_plan)
        except SessionFailed as e:
            log.error("session for uid %d could not be opened: %s", who.uid, e.result.error or e.result.reason)
            raise RequestError(errors.UNAVAILABLE, f"the session could not be set up: {e.result.reason}",
                               status=e.result.status, error=e.result.error) from None
        finally:
            self.opening[who.uid] -= 1
            if self.opening[who.uid] <= 0:
                del self.opening[who.uid]
        entry = Entry(who, session, limits)
        self.live[session_id] = entry
        session.ended.add_done_callback(lambda f: self._ended(session_id, f))
        log.info("session %s opened by uid %d (%s, %d MiB)", session_id, who.uid, session_plan.language,
                 session_plan.memory_bytes >> 20)
        return self.describe(session_id, entry)

    async def exec(self, who: Identity, limits: QuotaLimits, req: dict[str, Any],
                   events: EventSink | None) -> dict[str, Any]:
        session_id, entry = await self._for_use(who, req.get("session_id"))
        session = entry.session
        if session.busy or entry.run_id is not None:
            raise RequestError(errors.BUSY, f"session {session_id} is running exec {entry.run_id}; the execs of "
                               "a session run one at a time", session_id=session_id, retry_after_ms=100)
        run_id = self.runs.new_run_id()
        cell = plan.build_cell(req, limits, self.config, run_id, session.plan.language)
        p = session.plan
        run = RunEntry(run_id, who, time.monotonic(), cell.timeout_ms, p.memory_bytes, p.network, p.language,
                       p.environment, session_id=session_id, worker=session.worker,
                       on_kill=lambda: session.end("killed"),
                       answer_bytes=answer_bound(cell.output_bytes))
        entry.run_id = run_id
        charged = [0.0]  # the cell's CPU, charged with the exec as a run's is

        async def work() -> CellResult:
            result = await session.exec(cell, events)
            charged[0] = result.cpu_ms
            return result

        try:
            return await self.runs.admitted(run, limits, work, lambda: 0.0)
        finally:
            entry.run_id = None
            entry.cpu_charged_ms += charged[0]
            self._charge(entry)  # and what ran between execs

    async def files(self, who: Identity, limits: QuotaLimits, req: dict[str, Any]) -> dict[str, Any]:
        """session_write_file, session_read_file, session_list_files: the owner's only (an
        admin's neither, as for exec: it is the session's data).  They run beside an exec."""
        session_id, entry = await self._for_use(who, req.get("session_id"))
        file_plan = sessionfiles.build(str(req.get("op")), req, limits)
        async with self.runs.answer_held(who.uid, files.answer_bytes(file_plan)):
            report = await entry.session.file_op(file_plan)
            answer = sessionfiles.answer(file_plan, report, session_id)
        log.info("session %s: %s %r by uid %d (%s)", session_id, file_plan.action, file_plan.path, who.uid,
                 f"{answer['size']} bytes" if "size" in answer else f"{len(answer['entries'])} entries")
        return answer

    def interrupt(self, who: Identity, session_id: Any) -> bool:
        session_id, entry = self._own(who, session_id, admin_too=True)
        interrupted = entry.session.interrupt()
        log.info("session %s interrupted by uid %d (%s)", session_id, who.uid,
                 "a cell was running" if interrupted else "nothing was running")
        return interrupted

    async def close(self, who: Identity, session_id: Any, reason: str = "closed") -> dict[str, Any]:
        session_id, entry = self._own(who, session_id, admin_too=True)
        if who.uid != entry.owner.uid:
            reason = "killed"
            log.warning("session %s of uid %d closed by uid %d", session_id, entry.owner.uid, who.uid)
        entry.closing = True
        info = self.describe(session_id, entry)
        reason = await entry.session.close(reason)
        return {**info, "ended": reason}

    async def close_all(self, reason: str = "daemon_stopped") -> None:
        entries = list(self.live.values())
        for entry in entries:
            entry.session.end(reason)
        if entries:
            await asyncio.wait([asyncio.shield(e.session.ended) for e in entries], timeout=10.0)
        if self._sweeper is not None:
            self._sweeper.cancel()

    # -- what there is -----------------------------------------------------------------------
    def listed(self, who: Identity, admin: bool) -> list[dict[str, Any]]:
        return [self.describe(sid, e) for sid, e in list(self.live.items()) if admin or e.owner.uid == who.uid]

    def describe(self, session_id: str, entry: Entry) -> dict[str, Any]:
        return {**entry.session.describe(time.monotonic()), "owner_uid": entry.owner.uid, "owner": entry.owner.name,
                "exec_run_id": entry.run_id}

    def counts(self, uid: int) -> int:
        return sum(1 for e in self.live.values() if e.owner.uid == uid)

    def open_count(self) -> int:
        return len(self.live)

    def environments_in_use(self) -> list[str]:
        return [e.session.plan.environment for e in self.live.values()]

    def describe_all(self) -> dict[str, Any]:
        return {"open": len(self.live), "limit": self.config.daemon.sessions,
                "busy": sum(1 for e in self.live.values() if e.session.busy)}

    async def _for_use(self, who: Identity, session_id: Any) -> tuple[str, Entry]:
        """The caller's session, ready to be used (an exec, a file operation): the one place
        where a session is fetched to work in it -- a paused one would be restored here."""
        return self._own(who, session_id)

    def _own(self, who: Identity, session_id: Any, admin_too: bool = False) -> tuple[str, Entry]:
        """The caller's live session of that id; not_found (with why, to its owner) otherwise."""
        if not isinstance(session_id, str) or not session_id:
            raise errors.bad_request("session_id", "required, a string (from session_open)")
        entry = self.live.get(session_id)
        admin = admin_too and self.access.is_admin(who)
        if entry is not None and (entry.owner.uid == who.uid or admin) and entry.session.alive:
            return session_id, entry
        details: dict[str, Any] = {"session_id": session_id[:64]}
        ended = self.ended.get(session_id)
        if ended is not None and (ended[0] == who.uid or admin):
            details["reason"] = ended[1]
        elif entry is not None and entry.owner.uid == who.uid:
            details["reason"] = "closing"
        else:
            m = SESSION_ID.fullmatch(session_id)
            if m is not None and m.group(1) != self.instance and ended is None:
                # Issued by an earlier daemon (ids carry their instance): whoever asks learns only that.
                details["reason"] = "daemon_restarted"
        why = f" ({details['reason']})" if "reason" in details else ""
        raise RequestError(errors.NOT_FOUND, f"no session {session_id[:64]} of yours is open{why}", **details)

    def _ended(self, session_id: str, fut: asyncio.Future[str]) -> None:
        entry = self.live.pop(session_id, None)
        reason = "killed" if fut.cancelled() else fut.result()
        if entry is None:
            return
        self._charge(entry)
        self.ended[session_id] = (entry.owner.uid, reason)
        while len(self.ended) > REMEMBER_ENDED:
            self.ended.popitem(last=False)
        log.info("session %s of uid %d ended: %s (%d execs)", session_id, entry.owner.uid, reason,
                 entry.session.execs)

    # -- limits over time ------------------------------------------------------------------------
    def _charge(self, entry: Entry) -> None:
        """Charge the owner what the session used beyond what it has been charged for."""
        used = entry.session.cpu_used_ms()
        delta = used - entry.cpu_charged_ms
        if delta > 0:
            self.usage.charge(entry.owner.uid, delta, time.time())
            entry.cpu_charged_ms = used

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                self.sweep(time.monotonic())
            except Exception:  # a sweep must never stop: log and go on
                log.exception("session sweep failed")

    def sweep(self, now: float) -> None:
        for session_id, entry in list(self.live.items()):
            s = entry.session
            if not s.alive or entry.closing:
                continue
            if (now - s.opened_at) * 1000 >= s.plan.max_lifetime_ms:
                log.info("session %s reached its lifetime of %d ms", session_id, s.plan.max_lifetime_ms)
                s.end("max_lifetime")
                continue
            idle = not s.busy and not s.file_ops and entry.run_id is None
            if idle and (now - s.last_used) * 1000 >= s.plan.idle_timeout_ms:
                log.info("session %s idle for %d ms", session_id, s.plan.idle_timeout_ms)
                s.end("idle_timeout")
                continue
            if s.check_cpu():
                continue
            if entry.run_id is None:
                before = entry.cpu_charged_ms
                self._charge(entry)
                if entry.cpu_charged_ms > before and self._over_budget(entry):
                    log.info("session %s: its owner's CPU budget is spent; it used CPU between execs", session_id)
                    s.end("cpu_limit")

    def _over_budget(self, entry: Entry) -> bool:
        limits = self.access.limits(entry.owner) or entry.limits
        if not limits.cpu_seconds_per_hour:
            return False
        return self.usage.cpu_last_hour(entry.owner.uid, time.time()) >= limits.cpu_seconds_per_hour * 1000
