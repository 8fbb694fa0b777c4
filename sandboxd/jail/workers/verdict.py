"""One truthful verdict per run, from everything the parent observed.

Inputs are the worker's end report (sandboxd-init's wait status and rusage, the
refused syscalls, the runner's handoff page), why the daemon killed the run if it did, and the cgroup's
counters.  Precedence, first match wins:

    sandbox_error   a setup step failed (which step, errno)
    output_limit    the daemon killed the run for writing too much (which stream)
    memory_limit    an OOM kill in the cgroup, an uncaught MemoryError (RLIMIT_AS), or V8 out of heap
    pids_limit      the pids controller refused a fork and the run did not succeed
    cpu_limit       SIGXCPU, or killed by the daemon with the CPU budget spent
    timeout         the daemon's wall clock ended the run
    signaled        killed by the daemon (kill, or the client went away)
    blocked_syscall a refused syscall, and the run failed (or SIGSYS: foreign ABI)
    signaled        killed by a signal
    exit_nonzero    exited with a non-zero status
    ok
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field, fields
from typing import Any

from ..child.contract import Handoff, SetupError
from ..kernel.cgroups import CgroupStats


@dataclass
class Result:
    status: str
    exit_code: int | None = None
    signal: int | None = None
    signal_name: str | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_ms: float = 0.0
    cpu_ms: float = 0.0
    memory_peak_kb: int | None = None
    blocked_syscall: str | None = None
    denied_syscalls: dict[str, int] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    limits_enforced_by: str = "none"
    run_uid: int | None = None
    discovery: dict[str, dict[str, int]] | None = None  # discovery runs: {"allowed": ..., "refused": ...}
    files: dict[str, bytes] = field(default_factory=dict)
    files_truncated: bool = False
    network: dict[str, int] | None = None  # runs with network: bytes and packets out and in
    reason: str = ""
    display: list[dict[str, Any]] = field(default_factory=list)  # figures: [{"mime": "image/png", "data": bin}]
    display_truncated: bool = False  # figures left out (past the out/ size cap, or more than 64)
    streamed: bool = False  # the output also came as "output" events while the run ran

    def to_dict(self) -> dict[str, Any]:
        # Shallow: dataclasses.asdict deep-copies, which for megabytes of output costs real time.
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Observation:
    """What the daemon saw of one run."""

    exit_frame: dict[str, Any] | None
    setup_error: SetupError | None  # reported by P, or the worker could not be made at all
    killed_for: str | None = None  # "timeout", "cpu", "output:stdout", "output:stderr", "cancelled", "killed"
    cgroup: CgroupStats = field(default_factory=CgroupStats)
    runtime_oom: bool = False  # the runtime said it died at its own memory limit (V8's heap)


# Why a session was ended on purpose (Session.end), as a cell in flight is told.
SESSION_ENDS = {"closed": "was closed", "max_lifetime": "reached its max_lifetime",
                "idle_timeout": "was idle too long", "daemon_stopped": "ended as the daemon stopped",
                "retired": "was retired"}


def end_report(init_report: dict[str, int] | None, done_status: int | None, page_status: int | None,
               page: Handoff, started: bool, denied: list[Any]) -> dict[str, Any] | None:
    """The exit frame ``decide`` reads, from what is known of R's end: sandboxd-init's record
    (wait status and rusage), else an exec runtime's word that it is done, else R's handoff
    page saying done (``page_status``, believed only where a cgroup counts the run); None when
    nothing is known (it was killed, or died without a word)."""
    if init_report is not None:
        wstatus, usage = init_report["wstatus"], init_report
    elif done_status is not None:
        wstatus, usage = done_status << 8, None
    elif page_status is not None:
        wstatus, usage = page_status << 8, None
    else:
        return None
    return {"wstatus": wstatus,
            "utime": usage["utime_us"] / 1e6 if usage else None,
            "stime": usage["stime_us"] / 1e6 if usage else None,
            "maxrss_kb": usage["maxrss_kb"] if usage else None,
            "end_ns": page.done_ns() or None, "handoff": page.read(), "started": started, "denied": denied}


def decide(obs: Observation) -> tuple[str, dict[str, Any]]:
    """Return (status, extra fields) for the observation."""
    frame = obs.exit_frame or {}
    handoff = frame.get("handoff") or {}
    denied = [d for d in frame.get("denied", []) if not d[2]]
    first_denied = denied[0][0] if denied else None
    extra: dict[str, Any] = {}

    if obs.setup_error:
        return _sandbox_error(obs.setup_error)
    if (obs.exit_frame is not None and handoff.get("phase") == Handoff.SETUP and not frame.get("started")
            and not obs.killed_for):
        # The runner ended before its code started: a setup or request step failed.
        error = SetupError.from_dict(handoff, default_step="runner")
        return _sandbox_error(error if error.message else
                              SetupError(error.step, error.errno, "the runner died before user code started"))

    if obs.killed_for and obs.killed_for.startswith("output:"):
        stream = obs.killed_for.split(":", 1)[1]
        return "output_limit", {"reason": f"{stream} exceeded its byte limit"}

    wstatus: int | None = frame.get("wstatus")
    code = sig = None
    if wstatus is not None and os.WIFEXITED(wstatus):
        code = os.WEXITSTATUS(wstatus)
    elif wstatus is not None and os.WIFSIGNALED(wstatus):
        sig = os.WTERMSIG(wstatus)
    if code is not None:
        extra["exit_code"] = code
    if sig is not None:
        extra["signal"] = sig
        extra["signal_name"] = _signame(sig)
    succeeded = code == 0

    if obs.cgroup.oom_kills and not succeeded:
        return "memory_limit", {**extra, "reason": "the kernel killed the run at its memory limit (OOM)"}
    if handoff.get("exception") == "MemoryError" and not succeeded:
        return "memory_limit", {**extra, "reason": "an allocation failed at the run's memory limit (MemoryError)"}
    if obs.runtime_oom and not succeeded:
        return "memory_limit", {**extra, "reason": "the JavaScript heap reached the run's memory limit"}
    if obs.cgroup.pids_max_hits and not succeeded:
        return "pids_limit", {**extra, "reason": "a fork failed at the run's process limit"}
    if sig == signal.SIGXCPU or obs.killed_for == "cpu":
        return "cpu_limit", {**extra, "reason": "the run used up its CPU time"}
    if obs.killed_for == "timeout":
        return "timeout", {**extra, "reason": "the run reached its wall-clock time limit"}
    if obs.killed_for in ("cancelled", "killed"):
        return "signaled", {**extra, "signal": signal.SIGKILL, "signal_name": "SIGKILL",
                            "reason": f"the run was {obs.killed_for}"}
    if obs.killed_for in SESSION_ENDS:  # a session ended on purpose while its cell ran
        return "signaled", {**extra, "signal": signal.SIGKILL, "signal_name": "SIGKILL",
                            "reason": f"the session {SESSION_ENDS[obs.killed_for]} while the cell ran"}
    if obs.exit_frame is None:
        if obs.cgroup.oom_kills:
            return "memory_limit", {"reason": "the kernel killed the run at its memory limit (OOM)"}
        return _sandbox_error(SetupError("init", 0, "the worker's init ended without a report"))
    if sig == signal.SIGSYS:
        return "blocked_syscall", {**extra, "blocked_syscall": first_denied or "foreign-architecture syscall",
                                   "reason": "killed for a system call outside the allowed ABI"}
    if first_denied and not succeeded:
        return "blocked_syscall", {**extra, "blocked_syscall": first_denied,
                                   "reason": f"the run failed after the system call {first_denied} was refused"}
    if sig is not None:
        return "signaled", {**extra, "reason": f"killed by {_signame(sig)}"}
    if code:
        return "exit_nonzero", {**extra, "reason": f"exited with status {code}"}
    return "ok", extra


def setup_failed(error: SetupError) -> Result:
    """The result of a run whose worker could not be made or set up: user code never ran."""
    status, extra = decide(Observation(None, error))
    return Result(status=status, **extra)


def _sandbox_error(e: SetupError) -> tuple[str, dict[str, Any]]:
    return "sandbox_error", {"error": e.to_dict(), "reason": f"setup step {e.step} failed"}


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"


@dataclass
class CellObservation:
    """What the daemon saw of one exec in a session."""

    cell: dict[str, Any] | None  # the runner's report of the cell; None: the session ended first
    ended: Observation | None = None  # the session's end, when it ended during the cell
    killed_for: str | None = None  # "timeout", "output:stdout", "output:stderr", "interrupted" (session_interrupt)


def decide_cell(obs: CellObservation) -> tuple[str, dict[str, Any]]:
    """Return (status, extra fields) for one exec.  With a report, the session lives on:

        output_limit    a stream exceeded its byte limit (the cell was interrupted)
        memory_limit    an allocation failed at the session's limit (MemoryError)
        timeout         the cell reached its time limit and was interrupted
        interrupted     session_interrupt raised KeyboardInterrupt in it
        blocked_syscall a refused syscall, and the cell raised
        exception       the cell raised (type, message and traceback in ``exception``)
        ok

    Without one the session is over and ``decide`` names why, as for a run.
    """
    if obs.cell is None:
        status, extra = decide(obs.ended or Observation(None, None, obs.killed_for))
        if status in ("ok", "exit_nonzero"):
            extra["reason"] = f"the session's interpreter exited (status {extra.get('exit_code', 0)}) during the cell"
        elif "reason" in extra:
            extra["reason"] = extra["reason"].replace("the run", "the session")
        return status, extra
    cell = obs.cell
    exc = cell.get("exception") or ""
    found: dict[str, Any] = {}
    if exc:
        found["exception"] = {"type": exc, "message": cell.get("message") or "",
                              "traceback": cell.get("traceback") or ""}
        if cell.get("exit_code") is not None:
            found["exit_code"] = cell["exit_code"]
    if cell.get("value"):
        found["value"] = cell["value"]
    extra = found
    denied = [d for d in cell.get("denied", []) if not d[2]]
    if obs.killed_for and obs.killed_for.startswith("output:"):
        stream = obs.killed_for.split(":", 1)[1]
        return "output_limit", {**extra, "reason": f"{stream} exceeded its byte limit; the cell was interrupted"}
    if exc == "MemoryError":
        return "memory_limit", {**extra, "reason": "an allocation failed at the session's memory limit (MemoryError)"}
    if obs.killed_for == "timeout":
        return "timeout", {**extra, "reason": "the cell reached its time limit and was interrupted"}
    if obs.killed_for == "interrupted" and cell.get("interrupted"):
        return "interrupted", {**extra, "reason": "session_interrupt raised KeyboardInterrupt in the cell"}
    if denied and exc:
        return "blocked_syscall", {**extra, "blocked_syscall": denied[0][0],
                                   "reason": f"the cell failed after the system call {denied[0][0]} was refused"}
    if exc:
        return "exception", {**extra, "reason": f"the cell raised {exc}"}
    return "ok", extra
