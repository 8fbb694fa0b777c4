"""The bridge's run settings against what the daemon allows its uid (``hello``: the quota, and
the daemon's frame, workers and budgets).

    check(settings, user, hello) -> Bounds(values, errors, warnings)

A value that was given (file, environment, command line) and that the daemon would refuse
on every run is an error: the bridge does not start (``main``), and ``/health`` says the same
words should a reload of the daemon make it so later.  Each names the setting and its value,
what the daemon allows, and the key to change::

    worker_timeout (WORKER_TIMEOUT) 90 s is above what sandboxd allows user sandboxd-http:
    max_timeout 60 s; raise quotas.users.sandboxd-http.max_timeout in sandboxd.yaml, or lower WORKER_TIMEOUT

A default above what the daemon allows (a sandboxd.yaml kept from an older release) is not:
runs get the daemon's limit, and a warning says so and what to raise.  ``values`` is what the
bridge then uses.  Warnings also name settings that work but wait: more runs than the uid gets
at once (they queue in the daemon), more bodies or answers at once than the daemon holds for
one uid (they wait for room, and past its read or queue timeout get 503).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..jail.spec.plans import answer_bound
from .settings import Settings

FRAME_SLACK = 64 << 10  # a run's frame beyond its code: the other fields, the preload's wrapping


@dataclass
class Bounds:
    values: dict[str, float] = field(default_factory=dict)  # timeout_ms, memory, max_output, max_body in use
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def size(n: float) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{int(n) >> shift} {unit}"
    return f"{int(n)} bytes"


def seconds(ms: float) -> str:
    return f"{ms / 1000:g} s"


def values_of(s: Settings) -> dict[str, float]:
    """The run settings as the bridge sends them, before the daemon said anything."""
    return {"timeout_ms": int(s.worker_timeout * 1000), "memory": s.memory, "max_output": s.max_output,
            "max_body": s.max_body}


def check(s: Settings, user: str, hello: dict[str, Any]) -> Bounds:
    quota = hello.get("quota") or {}
    daemon = hello.get("daemon") or {}
    out = Bounds(values_of(s))
    key = f"quotas.users.{user}"

    def bound(name: str, setting: str, variable: str, limit: Any, words: str, change: str,
              show: Callable[[float], str]) -> None:
        value = out.values[name]
        if not isinstance(limit, int) or value <= limit:
            return
        if setting in s.given:
            out.errors.append(f"{setting} ({variable}) {show(value)} is above what sandboxd allows user {user}: "
                              f"{words}; raise {change} in sandboxd.yaml, or lower {variable}")
            return
        out.values[name] = limit
        out.warnings.append(f"{setting} {show(value)} (its default) is above what sandboxd allows user {user}: "
                            f"{words}; runs get {show(limit)} (raise {change} in sandboxd.yaml for more)")

    limit = quota.get("max_timeout_ms")
    bound("timeout_ms", "worker_timeout", "WORKER_TIMEOUT", limit, f"max_timeout {seconds(limit or 0)}",
          f"{key}.max_timeout", seconds)
    limit = quota.get("max_memory")
    bound("memory", "memory", "SANDBOXD_HTTP_MEMORY", limit, f"max_memory {size(limit or 0)}", f"{key}.max_memory",
          size)
    limit = quota.get("max_output")
    bound("max_output", "max_output", "SANDBOXD_HTTP_MAX_OUTPUT", limit, f"max_output {size(limit or 0)}",
          f"{key}.max_output", size)
    frame = daemon.get("max_frame")
    bound("max_body", "max_body", "SANDBOXD_HTTP_MAX_BODY", frame - FRAME_SLACK if isinstance(frame, int) else None,
          f"max_frame {size(frame or 0)}, a request of at most {size((frame or 0) - FRAME_SLACK)}",
          "daemon.max_frame", size)
    concurrent, queued = quota.get("concurrent"), quota.get("queued")
    if isinstance(concurrent, int) and isinstance(queued, int):
        if s.max_workers > concurrent + queued:
            out.errors.append(f"max_workers (MAX_WORKERS) {s.max_workers} is more runs than sandboxd lets user {user} "
                              f"run and queue (concurrent {concurrent} + queued {queued}): the rest would be refused; "
                              f"raise {key}.queued (or {key}.concurrent) in sandboxd.yaml, or lower MAX_WORKERS")
        _waits(s, user, concurrent, queued, daemon, out)
    return out


def _waits(s: Settings, user: str, concurrent: int, queued: int, daemon: dict[str, Any], out: Bounds) -> None:
    workers, reserved = daemon.get("workers"), daemon.get("reserved_workers")
    at_once = concurrent
    if isinstance(workers, int) and isinstance(reserved, int):
        at_once = min(concurrent, workers - reserved)
    if s.max_workers > at_once:
        out.warnings.append(f"max_workers (MAX_WORKERS) {s.max_workers}: user {user} runs at most {at_once} at once "
                            f"(its quota's concurrent {concurrent}; sandboxd's daemon.workers {workers} less "
                            f"daemon.reserved_workers {reserved}): runs beyond {at_once} at once wait in the daemon's "
                            "queue")
    held = min(s.max_workers, concurrent + queued)  # in the daemon at once, running or queued
    body, output = out.values["max_body"], int(out.values["max_output"])
    budget = daemon.get("buffer_budget_per_uid")
    if isinstance(budget, int) and held * body > budget:
        out.warnings.append(f"max_body {size(body)} x {held} requests at once is more than sandboxd holds for one "
                            f"user (daemon.buffer_budget_per_uid {size(budget)}): bodies that large wait for room, "
                            "and past daemon.read_timeout get 503")
    budget = daemon.get("response_budget_per_uid")
    if isinstance(budget, int) and held * answer_bound(output) > budget:
        out.warnings.append(f"max_output {size(output)} (two streams) x {held} runs at once is more than sandboxd "
                            f"holds for one user's answers (daemon.response_budget_per_uid {size(budget)}): runs "
                            "wait for room, and past daemon.queue_timeout get 503")
