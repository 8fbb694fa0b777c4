"""Per-uid usage that survives a restart: runs started and CPU used, in sqlite.

The rolling windows that quotas check (runs in the last minute, CPU in the last hour)
live in memory and are rebuilt from the database at start.  A run is written when it
is admitted and updated when it ends; runs still marked running at start belonged to
a daemon that died and are marked ``lost``.  If the database cannot be written (disk
full, read-only) the daemon keeps counting in memory, logs the error once and says
so in ``status``.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
WINDOW = 3600.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, uid INTEGER NOT NULL, started REAL NOT NULL,
    finished REAL, cpu_ms REAL NOT NULL DEFAULT 0, status TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_started ON runs(started);
CREATE TABLE IF NOT EXISTS totals (
    uid INTEGER PRIMARY KEY, runs INTEGER NOT NULL, cpu_ms REAL NOT NULL, last_run REAL);
"""


@dataclass
class UidUsage:
    starts: collections.deque[float] = field(default_factory=collections.deque)
    cpu: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)
    runs_total: int = 0
    cpu_ms_total: float = 0.0
    last_run: float | None = None

    def prune(self, now: float) -> None:
        while self.starts and self.starts[0] < now - 60:
            self.starts.popleft()
        while self.cpu and self.cpu[0][0] < now - WINDOW:
            self.cpu.popleft()


class UsageStore:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None
        self.error: str | None = None
        self.uids: dict[int, UidUsage] = collections.defaultdict(UidUsage)
        self.lost_at_start = 0
        if path:
            self._open(path)

    def _open(self, path: str) -> None:
        try:
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
            db = sqlite3.connect(path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            now = time.time()
            cur = db.execute("UPDATE runs SET status='lost', finished=? WHERE status='running'", (now,))
            self.lost_at_start = cur.rowcount
            db.execute("DELETE FROM runs WHERE started < ?", (now - WINDOW,))
            for uid, started, finished, cpu in db.execute(
                    "SELECT uid, started, finished, cpu_ms FROM runs ORDER BY started"):
                u = self.uids[uid]
                u.starts.append(started)
                if cpu:
                    u.cpu.append((finished or started, cpu))
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
        """Run the statements as one transaction (one commit per event, not per statement)."""
        if self.db is None:
            return
        try:
            with self.db:
                self.db.execute("BEGIN")
                for sql, args in statements:
                    self.db.execute(sql, args)
        except sqlite3.Error as e:
            self._failed(e)

    # -- windows ------------------------------------------------------------------------
    def runs_last_minute(self, uid: int, now: float) -> tuple[int, float]:
        """(runs started in the last 60 s, when the oldest of them leaves the window)."""
        u = self.uids[uid]
        u.prune(now)
        return len(u.starts), (u.starts[0] + 60 if u.starts else now)

    def cpu_last_hour(self, uid: int, now: float) -> float:
        u = self.uids[uid]
        u.prune(now)
        return sum(c for _, c in u.cpu)

    def cpu_frees_at(self, uid: int, budget_ms: float, now: float) -> float:
        """When enough CPU leaves the hour window for usage to drop below ``budget_ms``."""
        u = self.uids[uid]
        total = sum(c for _, c in u.cpu)
        for ts, c in u.cpu:
            total -= c
            if total < budget_ms:
                return ts + WINDOW
        return now

    # -- events ---------------------------------------------------------------------------
    def started(self, run_id: str, uid: int, now: float) -> None:
        u = self.uids[uid]
        u.starts.append(now)
        u.runs_total += 1
        u.last_run = now
        self._write(
            ("INSERT OR REPLACE INTO runs(run_id, uid, started, status) VALUES (?, ?, ?, 'running')",
             (run_id, uid, now)),
            ("INSERT INTO totals(uid, runs, cpu_ms, last_run) VALUES (?, 1, 0, ?) "
             "ON CONFLICT(uid) DO UPDATE SET runs = runs + 1, last_run = excluded.last_run", (uid, now)))

    def finished(self, run_id: str, uid: int, cpu_ms: float, status: str, now: float) -> None:
        u = self.uids[uid]
        if cpu_ms:
            u.cpu.append((now, cpu_ms))
        u.cpu_ms_total += cpu_ms
        self._write(("UPDATE runs SET finished=?, cpu_ms=?, status=? WHERE run_id=?", (now, cpu_ms, status, run_id)),
                    ("UPDATE totals SET cpu_ms = cpu_ms + ? WHERE uid=?", (cpu_ms, uid)))

    def prune(self, now: float) -> None:
        self._write(("DELETE FROM runs WHERE started < ?", (now - WINDOW,)))

    def snapshot(self, uid: int, now: float) -> dict[str, object]:
        u = self.uids[uid]
        u.prune(now)
        return {
            "runs_total": u.runs_total,
            "cpu_ms_total": round(u.cpu_ms_total, 3),
            "runs_last_minute": len(u.starts),
            "cpu_ms_last_hour": round(sum(c for _, c in u.cpu), 3),
            "last_run": u.last_run,
        }

    def known_uids(self) -> list[int]:
        return sorted(self.uids)

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = None
