"""Per-uid usage that survives a restart: runs started and CPU used, in sqlite.

The rolling windows that quotas check (runs in the last minute, CPU in the last hour)
live in memory, in buckets, and are rebuilt at start from per-minute rows.  A run is
recorded as in flight when it is admitted and removed when it ends, so runs still in
flight at start belonged to a daemon that died: they count as ``lost``.  The database
stays small whatever the rate (one row per uid and minute for an hour).  If the database cannot be written (disk
full, read-only) the daemon keeps counting in memory, logs the error once and says
so in ``status``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
WINDOW = 3600.0
FLUSH_DELAY = 0.1  # seconds between a usage event and its commit (see UsageStore._write)
SCHEMA = """
CREATE TABLE IF NOT EXISTS inflight (
    run_id TEXT PRIMARY KEY, uid INTEGER NOT NULL, started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS minutes (
    uid INTEGER NOT NULL, minute INTEGER NOT NULL, runs INTEGER NOT NULL DEFAULT 0,
    cpu_ms REAL NOT NULL DEFAULT 0, PRIMARY KEY (uid, minute));
CREATE TABLE IF NOT EXISTS totals (
    uid INTEGER PRIMARY KEY, runs INTEGER NOT NULL, cpu_ms REAL NOT NULL, last_run REAL,
    lost INTEGER NOT NULL DEFAULT 0);
"""


class Window:
    """Amounts over the last ``span`` seconds, in buckets of ``resolution`` seconds.

    Memory is bounded by span/resolution whatever the rate: a per-run list held for an hour
    would grow by hundreds of thousands of entries under load.
    """

    def __init__(self, span: float, resolution: float) -> None:
        self.span, self.resolution = span, resolution
        self.buckets: collections.deque[list[float]] = collections.deque()  # [start, amount]

    def add(self, ts: float, amount: float = 1.0) -> None:
        start = ts - ts % self.resolution
        if self.buckets and self.buckets[-1][0] >= start:
            self.buckets[-1][1] += amount  # same bucket (or a late arrival: counted as now)
        else:
            self.buckets.append([start, amount])
            self.prune(ts)

    def prune(self, now: float) -> None:
        # A bucket leaves the window ``span`` after it began: usage counts for at most
        # ``span`` (an hour's budget frees within the hour), at least span - resolution.
        while self.buckets and self.buckets[0][0] <= now - self.span:
            self.buckets.popleft()

    def total(self, now: float) -> float:
        self.prune(now)
        return sum(b[1] for b in self.buckets)

    def below_at(self, limit: float, now: float) -> float:
        """When the total will have dropped below ``limit`` (now if it already has)."""
        total = self.total(now)
        for start, amount in self.buckets:
            if total < limit:
                break
            total -= amount
            if total < limit:
                return start + self.span
        return now


@dataclass
class UidUsage:
    starts: Window = field(default_factory=lambda: Window(60.0, 1.0))
    refusals: Window = field(default_factory=lambda: Window(60.0, 1.0))  # in memory only
    cpu: Window = field(default_factory=lambda: Window(WINDOW, 60.0))
    runs_total: int = 0
    cpu_ms_total: float = 0.0
    last_run: float | None = None


class UsageStore:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None
        self.error: str | None = None
        self.uids: dict[int, UidUsage] = collections.defaultdict(UidUsage)
        self.lost_at_start = 0
        self._pending: list[tuple[str, tuple[object, ...]]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        if path:
            self._open(path)

    def open(self, path: str) -> None:
        """Open (or create) the database at ``path`` and load what it holds."""
        self.path = path
        self._open(path)

    def _open(self, path: str) -> None:
        try:
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
            db = sqlite3.connect(path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            now = time.time()
            with db:  # runs still in flight belonged to a daemon that died: count them as lost
                db.execute("BEGIN")
                for (uid,) in db.execute("SELECT uid FROM inflight").fetchall():
                    db.execute("UPDATE totals SET lost = lost + 1 WHERE uid=?", (uid,))
                    self.lost_at_start += 1
                db.execute("DELETE FROM inflight")
                db.execute("DELETE FROM minutes WHERE minute < ?", (int((now - WINDOW) // 60),))
            for uid, minute, runs, cpu in db.execute(
                    "SELECT uid, minute, runs, cpu_ms FROM minutes ORDER BY minute"):
                u = self.uids[uid]
                if minute * 60 >= now - 120:
                    # Minute resolution across a restart: count them at the minute's end (strict).
                    u.starts.add(min(now, minute * 60 + 59.0), runs)
                if cpu:
                    u.cpu.add(minute * 60, cpu)
            for uid, runs, cpu, last in db.execute("SELECT uid, runs, cpu_ms, last_run FROM totals"):
                u = self.uids[uid]
                u.runs_total, u.cpu_ms_total, u.last_run = runs, cpu, last
            self.db = db
        except (sqlite3.Error, OSError) as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        if self.error is None:
            log.error("usage database %s unusable, counting in memory only: %s", self.path, e)
        self.error = f"{type(e).__name__}: {e}"

    def _write(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        """Queue the statements; they are committed together FLUSH_DELAY later.

        The in-memory counters (what quotas are checked against) change at once.  The
        database lags by up to FLUSH_DELAY so that one commit (100-300 us of the loop's
        CPU) serves every run of that window, not two per run: at 50 paced runs a second
        that was a sixth of the daemon's CPU per run (measured, docs/performance.md).  A
        SIGKILL loses at most that window of accounting; a clean stop commits it.  Without
        an event loop (tools, tests) statements are committed immediately.
        """
        if self.db is None:
            return
        self._pending.extend(statements)
        if self._flush_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_handle = loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Commit what is queued, as one transaction."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        statements, self._pending = self._pending, []
        if self.db is None or not statements:
            return
        try:
            with self.db:
                self.db.execute("BEGIN")
                for sql, args in statements:
                    self.db.execute(sql, args)
        except sqlite3.Error as e:
            self._failed(e)

    # -- windows ------------------------------------------------------------------------
    def runs_last_minute(self, uid: int, now: float) -> int:
        return int(self.uids[uid].starts.total(now))

    def runs_free_at(self, uid: int, limit: int, now: float) -> float:
        """When fewer than ``limit`` runs will have started in the last minute."""
        return self.uids[uid].starts.below_at(limit, now)

    def refusals_last_minute(self, uid: int, now: float) -> int:
        u = self.uids.get(uid)
        return int(u.refusals.total(now)) if u else 0

    def refusals_free_at(self, uid: int, limit: int, now: float) -> float:
        return self.uids[uid].refusals.below_at(limit, now)

    def refused(self, uid: int, now: float) -> None:
        """A request of ``uid`` was refused (bad, unknown, forbidden): it counts against the caller."""
        self.uids[uid].refusals.add(now)

    def cpu_last_hour(self, uid: int, now: float) -> float:
        return self.uids[uid].cpu.total(now)

    def cpu_frees_at(self, uid: int, budget_ms: float, now: float) -> float:
        """When enough CPU leaves the hour window for usage to drop below ``budget_ms``."""
        return self.uids[uid].cpu.below_at(budget_ms, now)

    # -- events ---------------------------------------------------------------------------
    def started(self, run_id: str, uid: int, now: float) -> None:
        u = self.uids[uid]
        u.starts.add(now)
        u.runs_total += 1
        u.last_run = now
        self._write(
            ("INSERT OR REPLACE INTO inflight(run_id, uid, started) VALUES (?, ?, ?)", (run_id, uid, now)),
            ("INSERT INTO minutes(uid, minute, runs) VALUES (?, ?, 1) "
             "ON CONFLICT(uid, minute) DO UPDATE SET runs = runs + 1", (uid, int(now // 60))),
            ("INSERT INTO totals(uid, runs, cpu_ms, last_run) VALUES (?, 1, 0, ?) "
             "ON CONFLICT(uid) DO UPDATE SET runs = runs + 1, last_run = excluded.last_run", (uid, now)))

    def finished(self, run_id: str, uid: int, cpu_ms: float, status: str, now: float) -> None:
        u = self.uids[uid]
        if cpu_ms:
            u.cpu.add(now, cpu_ms)
        u.cpu_ms_total += cpu_ms
        self._write(("DELETE FROM inflight WHERE run_id=?", (run_id,)),
                    ("INSERT INTO minutes(uid, minute, cpu_ms) VALUES (?, ?, ?) "
                     "ON CONFLICT(uid, minute) DO UPDATE SET cpu_ms = cpu_ms + excluded.cpu_ms",
                     (uid, int(now // 60), cpu_ms)),
                    ("UPDATE totals SET cpu_ms = cpu_ms + ? WHERE uid=?", (cpu_ms, uid)))

    def charge(self, uid: int, cpu_ms: float, now: float) -> None:
        """CPU not in a run's record: a session's background work between its execs, or what
        a run used after its answer (its last time slice; its other processes' end)."""
        if cpu_ms <= 0:
            return
        u = self.uids[uid]
        u.cpu.add(now, cpu_ms)
        u.cpu_ms_total += cpu_ms
        self._write(("INSERT INTO minutes(uid, minute, cpu_ms) VALUES (?, ?, ?) "
                     "ON CONFLICT(uid, minute) DO UPDATE SET cpu_ms = cpu_ms + excluded.cpu_ms",
                     (uid, int(now // 60), cpu_ms)),
                    ("INSERT INTO totals(uid, runs, cpu_ms, last_run) VALUES (?, 0, ?, NULL) "
                     "ON CONFLICT(uid) DO UPDATE SET cpu_ms = cpu_ms + excluded.cpu_ms", (uid, cpu_ms)))

    def prune(self, now: float) -> None:
        self._write(("DELETE FROM minutes WHERE minute < ?", (int((now - WINDOW) // 60),)))

    def snapshot(self, uid: int, now: float) -> dict[str, object]:
        u = self.uids.get(uid) or UidUsage()  # looking does not create an entry
        return {
            "runs_total": u.runs_total,
            "cpu_ms_total": round(u.cpu_ms_total, 3),
            "runs_last_minute": int(u.starts.total(now)),
            "cpu_ms_last_hour": round(u.cpu.total(now), 3),
            "last_run": u.last_run,
        }

    def known_uids(self) -> list[int]:
        return sorted(self.uids)

    def close(self) -> None:
        self.flush()
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = None
