"""verdict.decide: one status per observation, by the precedence in the module docstring.

Pure: observations are built by hand, no worker, no daemon.
"""

from __future__ import annotations

import mmap
import signal
from typing import Any

import pytest

from sandboxd.jail.child.contract import EXIT_SETUP, Handoff, SetupError
from sandboxd.jail.kernel.cgroups import CgroupStats
from sandboxd.jail.workers.verdict import Observation, Result, decide, setup_failed


def exited(code: int) -> int:
    """The wait status of a process that exited with ``code``."""
    return code << 8


def killed(sig: int) -> int:
    """The wait status of a process killed by ``sig`` (no core dump)."""
    return int(sig)


def running_page(exception: str = "") -> dict[str, Any]:
    """A handoff page as the runner leaves it once user code has run."""
    return {"phase": Handoff.DONE, "errno": 0, "started_ns": 123, "step": "", "exception": exception,
            "message": ""}


def frame(wstatus: int, *, started: bool = True, denied: list[list[Any]] | None = None,
          handoff: dict[str, Any] | None = None) -> dict[str, Any]:
    """A worker's end report."""
    return {"wstatus": wstatus, "started": started, "denied": denied or [],
            "handoff": running_page() if handoff is None else handoff}


def obs(exit_frame: dict[str, Any] | None, *, setup_error: SetupError | None = None, killed_for: str | None = None,
        oom_kills: int = 0, pids_max_hits: int = 0) -> Observation:
    return Observation(exit_frame, setup_error, killed_for, CgroupStats(oom_kills=oom_kills,
                                                                        pids_max_hits=pids_max_hits))


def status(o: Observation) -> str:
    return decide(o)[0]


# --- sandbox_error ------------------------------------------------------------------------


def test_setup_error_is_sandbox_error_with_step_and_errno() -> None:
    st, extra = decide(obs(None, setup_error=SetupError("mounts", 1, "mount: Operation not permitted")))
    assert st == "sandbox_error"
    assert extra["error"] == {"step": "mounts", "errno": 1, "message": "mount: Operation not permitted"}
    assert "mounts" in extra["reason"]


def test_setup_error_wins_over_everything_else() -> None:
    o = obs(frame(killed(signal.SIGKILL), denied=[["socket", 1, False]]), setup_error=SetupError("fds", 9, "x"),
            killed_for="output:stdout", oom_kills=1, pids_max_hits=1)
    st, extra = decide(o)
    assert st == "sandbox_error"
    assert extra["error"]["step"] == "fds"


def test_runner_setup_failure_from_the_handoff_page() -> None:
    page = Handoff(mmap.mmap(-1, mmap.PAGESIZE))
    page.setup_failed(SetupError("rlimits", 22, "setrlimit: Invalid argument"))
    st, extra = decide(obs(frame(exited(EXIT_SETUP), started=False, handoff=page.read())))
    assert st == "sandbox_error"
    assert extra["error"] == {"step": "rlimits", "errno": 22, "message": "setrlimit: Invalid argument"}


def test_runner_died_in_setup_without_saying_why() -> None:
    empty = {"phase": Handoff.SETUP, "errno": 0, "started_ns": 0, "step": "", "exception": "", "message": ""}
    st, extra = decide(obs(frame(killed(signal.SIGSEGV), started=False, handoff=empty)))
    assert st == "sandbox_error"
    assert extra["error"] == {"step": "runner", "errno": 0, "message": "the runner died before user code started"}


def test_runner_setup_failure_keeps_its_step_when_the_message_is_empty() -> None:
    page = {"phase": Handoff.SETUP, "errno": 12, "started_ns": 0, "step": "request", "exception": "",
            "message": ""}
    _, extra = decide(obs(frame(exited(EXIT_SETUP), started=False, handoff=page)))
    assert extra["error"] == {"step": "request", "errno": 12, "message": "the runner died before user code started"}


def test_setup_failure_claimed_after_start_is_not_believed() -> None:
    # User code scribbled a setup failure on the page after LINK_STARTED: its own exit status counts.
    forged = {"phase": Handoff.SETUP, "errno": 1, "started_ns": 0, "step": "seccomp", "exception": "",
              "message": "pretend the sandbox broke"}
    st, extra = decide(obs(frame(exited(EXIT_SETUP), started=True, handoff=forged)))
    assert st == "exit_nonzero"
    assert extra["exit_code"] == EXIT_SETUP
    assert "error" not in extra


def test_setup_phase_page_with_a_clean_exit_after_start_is_ok() -> None:
    forged = {"phase": Handoff.SETUP, "errno": 1, "started_ns": 0, "step": "seccomp", "exception": "",
              "message": "x"}
    assert status(obs(frame(exited(0), started=True, handoff=forged))) == "ok"


def test_setup_phase_is_not_a_setup_error_when_the_daemon_killed_the_run() -> None:
    # Killed before user code started (e.g. the wall clock ran out during setup): the kill's reason counts.
    page = {"phase": Handoff.SETUP, "errno": 0, "started_ns": 0, "step": "", "exception": "", "message": ""}
    assert status(obs(frame(killed(signal.SIGKILL), started=False, handoff=page), killed_for="timeout")) == "timeout"


def test_no_end_report_and_no_oom_is_an_init_failure() -> None:
    st, extra = decide(obs(None))
    assert st == "sandbox_error"
    assert extra["error"] == {"step": "init", "errno": 0,
                              "message": "the worker's init ended without a report"}


# --- output_limit ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_limit_names_the_stream(stream: str) -> None:
    st, extra = decide(obs(frame(killed(signal.SIGKILL)), killed_for=f"output:{stream}"))
    assert st == "output_limit"
    assert stream in extra["reason"]


def test_output_limit_wins_over_memory_cpu_and_syscalls() -> None:
    o = obs(frame(killed(signal.SIGXCPU), denied=[["socket", 1, False]],
                  handoff=running_page("MemoryError")), killed_for="output:stderr", oom_kills=2, pids_max_hits=1)
    assert status(o) == "output_limit"


def test_output_limit_wins_over_a_setup_phase_page() -> None:
    # The daemon killed it: no setup failure is inferred from the page.
    page = {"phase": Handoff.SETUP, "errno": 0, "started_ns": 0, "step": "", "exception": "", "message": ""}
    assert status(obs(frame(killed(signal.SIGKILL), started=False, handoff=page),
                      killed_for="output:stdout")) == "output_limit"


def test_output_limit_without_an_exit_frame() -> None:
    assert status(obs(None, killed_for="output:stdout")) == "output_limit"


# --- memory_limit ------------------------------------------------------------------------


def test_oom_kill_with_a_failed_run_is_memory_limit() -> None:
    st, extra = decide(obs(frame(killed(signal.SIGKILL)), oom_kills=1))
    assert st == "memory_limit"
    assert extra["signal"] == signal.SIGKILL and extra["signal_name"] == "SIGKILL"
    assert "OOM" in extra["reason"]


def test_oom_kill_with_a_non_zero_exit_is_memory_limit() -> None:
    st, extra = decide(obs(frame(exited(1)), oom_kills=1))
    assert st == "memory_limit"
    assert extra["exit_code"] == 1


def test_oom_kill_of_a_helper_in_a_successful_run_is_ok() -> None:
    assert status(obs(frame(exited(0)), oom_kills=1)) == "ok"


def test_uncaught_memory_error_is_memory_limit() -> None:
    st, extra = decide(obs(frame(exited(1), handoff=running_page("MemoryError"))))
    assert st == "memory_limit"
    assert "MemoryError" in extra["reason"]


def test_memory_error_caught_by_the_program_is_ok() -> None:
    assert status(obs(frame(exited(0), handoff=running_page("MemoryError")))) == "ok"


def test_other_exceptions_are_exit_nonzero() -> None:
    assert status(obs(frame(exited(1), handoff=running_page("ValueError")))) == "exit_nonzero"


def test_oom_without_an_exit_frame_is_memory_limit() -> None:
    st, extra = decide(obs(None, oom_kills=1))
    assert st == "memory_limit"
    assert "exit_code" not in extra and "error" not in extra


def test_memory_limit_wins_over_pids_cpu_timeout_and_syscalls() -> None:
    o = obs(frame(killed(signal.SIGXCPU), denied=[["socket", 1, False]]), killed_for="timeout", oom_kills=1,
            pids_max_hits=3)
    assert status(o) == "memory_limit"


# --- pids_limit --------------------------------------------------------------------------


def test_refused_fork_and_failed_run_is_pids_limit() -> None:
    st, extra = decide(obs(frame(exited(1)), pids_max_hits=1))
    assert st == "pids_limit"
    assert extra["exit_code"] == 1


def test_refused_fork_in_a_successful_run_is_ok() -> None:
    assert status(obs(frame(exited(0)), pids_max_hits=5)) == "ok"


def test_pids_limit_wins_over_cpu_and_timeout() -> None:
    assert status(obs(frame(killed(signal.SIGXCPU)), killed_for="timeout", pids_max_hits=1)) == "pids_limit"


# --- cpu_limit ---------------------------------------------------------------------------


def test_sigxcpu_is_cpu_limit() -> None:
    st, extra = decide(obs(frame(killed(signal.SIGXCPU))))
    assert st == "cpu_limit"
    assert extra["signal"] == signal.SIGXCPU and extra["signal_name"] == "SIGXCPU"


def test_killed_for_cpu_is_cpu_limit() -> None:
    st, extra = decide(obs(frame(killed(signal.SIGKILL)), killed_for="cpu"))
    assert st == "cpu_limit"
    assert extra["signal"] == signal.SIGKILL


def test_cpu_limit_wins_over_timeout_and_a_denied_syscall() -> None:
    assert status(obs(frame(killed(signal.SIGXCPU), denied=[["socket", 1, False]]),
                      killed_for="timeout")) == "cpu_limit"


# --- timeout -----------------------------------------------------------------------------


def test_wall_clock_kill_is_timeout() -> None:
    st, extra = decide(obs(frame(killed(signal.SIGKILL)), killed_for="timeout"))
    assert st == "timeout"
    assert extra["signal"] == signal.SIGKILL
    assert "wall-clock" in extra["reason"]


def test_timeout_wins_over_a_denied_syscall() -> None:
    assert status(obs(frame(killed(signal.SIGKILL), denied=[["socket", 1, False]]), killed_for="timeout")) == "timeout"


def test_timeout_without_an_exit_frame() -> None:
    assert status(obs(None, killed_for="timeout")) == "timeout"


# --- signaled ----------------------------------------------------------------------------


@pytest.mark.parametrize("why", ["cancelled", "killed"])
def test_cancelled_or_killed_is_signaled_by_sigkill(why: str) -> None:
    st, extra = decide(obs(frame(killed(signal.SIGKILL)), killed_for=why))
    assert st == "signaled"
    assert extra["signal"] == signal.SIGKILL and extra["signal_name"] == "SIGKILL"
    assert why in extra["reason"]


@pytest.mark.parametrize("why", ["cancelled", "killed"])
def test_cancel_reports_sigkill_even_if_the_run_exited_first(why: str) -> None:
    st, extra = decide(obs(frame(exited(0)), killed_for=why))
    assert st == "signaled"
    assert extra["signal"] == signal.SIGKILL
    assert extra["exit_code"] == 0


def test_cancel_wins_over_a_denied_syscall() -> None:
    assert status(obs(frame(killed(signal.SIGKILL), denied=[["socket", 1, False]]),
                      killed_for="cancelled")) == "signaled"


def test_cancel_without_an_exit_frame() -> None:
    st, extra = decide(obs(None, killed_for="killed"))
    assert st == "signaled"
    assert extra["signal"] == signal.SIGKILL


def test_a_real_signal_is_signaled() -> None:
    st, extra = decide(obs(frame(killed(signal.SIGSEGV))))
    assert st == "signaled"
    assert extra["signal"] == signal.SIGSEGV and extra["signal_name"] == "SIGSEGV"
    assert "exit_code" not in extra
    assert "SIGSEGV" in extra["reason"]


def test_a_core_dump_is_still_the_signal() -> None:
    st, extra = decide(obs(frame(killed(signal.SIGABRT) | 0x80)))
    assert st == "signaled"
    assert extra["signal"] == signal.SIGABRT


def test_a_signal_without_a_name() -> None:
    sig = 40  # a real-time signal: not a member of signal.Signals
    st, extra = decide(obs(frame(killed(sig))))
    assert st == "signaled"
    assert extra["signal"] == sig and extra["signal_name"] == "SIG40"


# --- blocked_syscall ---------------------------------------------------------------------


def test_denied_syscall_and_failed_exit_is_blocked_syscall() -> None:
    st, extra = decide(obs(frame(exited(1), denied=[["socket", 3, False], ["ptrace", 1, False]])))
    assert st == "blocked_syscall"
    assert extra["blocked_syscall"] == "socket"
    assert extra["exit_code"] == 1
    assert "socket" in extra["reason"]


def test_the_first_refused_not_the_first_seen_is_named() -> None:
    # Entries with allowed=True (discovery runs) were not refused.
    st, extra = decide(obs(frame(exited(1), denied=[["openat2", 1, True], ["ptrace", 1, False]])))
    assert st == "blocked_syscall"
    assert extra["blocked_syscall"] == "ptrace"


def test_allowed_entries_alone_are_not_blocked_syscall() -> None:
    assert status(obs(frame(exited(1), denied=[["openat2", 4, True]]))) == "exit_nonzero"


def test_denied_syscall_then_killed_by_a_signal_is_blocked_syscall() -> None:
    st, extra = decide(obs(frame(killed(signal.SIGSEGV), denied=[["mprotect", 1, False]])))
    assert st == "blocked_syscall"
    assert extra["blocked_syscall"] == "mprotect"
    assert extra["signal"] == signal.SIGSEGV


def test_sigsys_is_blocked_syscall() -> None:
    st, extra = decide(obs(frame(killed(signal.SIGSYS))))
    assert st == "blocked_syscall"
    assert extra["blocked_syscall"] == "foreign-architecture syscall"
    assert extra["signal"] == signal.SIGSYS


def test_sigsys_names_a_refused_syscall_if_there_was_one() -> None:
    _, extra = decide(obs(frame(killed(signal.SIGSYS), denied=[["socket", 1, False]])))
    assert extra["blocked_syscall"] == "socket"


def test_denied_syscall_but_exit_zero_is_ok() -> None:
    st, extra = decide(obs(frame(exited(0), denied=[["socket", 7, False]])))
    assert st == "ok"
    assert extra == {"exit_code": 0}


# --- exit_nonzero, ok --------------------------------------------------------------------


@pytest.mark.parametrize("code", [1, 2, 120, EXIT_SETUP, 255])
def test_non_zero_exit(code: int) -> None:
    st, extra = decide(obs(frame(exited(code))))
    assert st == "exit_nonzero"
    assert extra["exit_code"] == code
    assert str(code) in extra["reason"]
    assert "signal" not in extra


def test_exit_zero_is_ok() -> None:
    assert decide(obs(frame(exited(0)))) == ("ok", {"exit_code": 0})


def test_every_status_is_reachable() -> None:
    cases = {
        "sandbox_error": obs(None),
        "output_limit": obs(frame(killed(signal.SIGKILL)), killed_for="output:stdout"),
        "memory_limit": obs(frame(killed(signal.SIGKILL)), oom_kills=1),
        "pids_limit": obs(frame(exited(1)), pids_max_hits=1),
        "cpu_limit": obs(frame(killed(signal.SIGXCPU))),
        "timeout": obs(frame(killed(signal.SIGKILL)), killed_for="timeout"),
        "blocked_syscall": obs(frame(exited(1), denied=[["socket", 1, False]])),
        "signaled": obs(frame(killed(signal.SIGTERM))),
        "exit_nonzero": obs(frame(exited(1))),
        "ok": obs(frame(exited(0))),
    }
    assert {name: status(o) for name, o in cases.items()} == {name: name for name in cases}


def test_extra_fields_are_result_fields() -> None:
    for o in (obs(None), obs(frame(killed(signal.SIGSYS))), obs(frame(exited(3))), obs(None, oom_kills=1)):
        _, extra = decide(o)
        Result(status="x", **extra)  # a key Result does not have would raise TypeError


# --- setup_failed ------------------------------------------------------------------------


def test_setup_failed_result() -> None:
    r = setup_failed(SetupError("spawn", 11, "x"))
    assert isinstance(r, Result)
    assert r.status == "sandbox_error"
    assert r.error == {"step": "spawn", "errno": 11, "message": "x"}
    assert r.exit_code is None and r.signal is None
    assert "spawn" in r.reason
