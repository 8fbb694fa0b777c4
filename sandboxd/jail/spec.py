"""What the daemon hands down: how to build a worker, and what one run asks of it.

``WorkerSpec`` travels daemon -> fork server when a worker is made; ``RunRequest``
travels daemon -> runner through the worker's request pipe when its code is released.
Both are plain data; the child decides nothing (``StepFailure`` is how it reports).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunPlan:
    """One run, decided by the daemon: every limit is final here (quotas already applied)."""

    run_id: str
    code: str
    language: str = "python3"
    stdin: bytes = b""
    files: Mapping[str, bytes] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_ms: int = 5000
    cpu_ms: int = 5000
    memory_bytes: int = 256 << 20
    pids: int = 64
    output_bytes: int = 1 << 20  # per stream
    file_size_bytes: int = 16 << 20  # largest single file the run may write
    out_files_bytes: int = 8 << 20  # total of out/ returned
    out_files_count: int = 64
    nofile: int = 256
    network: bool = False
    discover: bool = False


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    uid: int
    gid: int
    cgroup_procs: tuple[str, ...]
    filter_key: str
    network: bool
    scratch_bytes: int
    scratch_inodes: int
    rlimits: Mapping[str, int]  # ceilings for the whole worker
    out_max_bytes: int
    out_max_files: int
    discover: bool = False
    hostname: str = "sandbox"

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["cgroup_procs"] = list(self.cgroup_procs)
        d["rlimits"] = dict(self.rlimits)
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> WorkerSpec:
        d = dict(d)
        d["cgroup_procs"] = tuple(d["cgroup_procs"])
        return cls(**d)


@dataclass(frozen=True)
class RunRequest:
    code: str
    rlimits: Mapping[str, int]
    files: Mapping[str, bytes] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    argv: tuple[str, ...] = ("-c",)

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "rlimits": dict(self.rlimits), "files": dict(self.files),
                "env": dict(self.env), "argv": list(self.argv)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> RunRequest:
        return cls(d["code"], d["rlimits"], d.get("files", {}), d.get("env", {}), tuple(d.get("argv", ("-c",))))


class Handoff:
    """A shared anonymous page between the supervisor and the runner (no fd involved).

    The runner writes its phase, the failing step with errno, the name of an uncaught
    exception, when user code started and, when it is done, its exit status; the
    supervisor reads it.  User code can scribble on it, which can only mislead its own
    verdict (it could as well choose its own exit status).
    """

    LAYOUT = struct.Struct("=IiQ32s64s256s")
    STATUS = struct.Struct("=i")  # the runner's exit status, after LAYOUT
    SETUP, WAITING, RUNNING, DONE = 0, 1, 2, 3

    def __init__(self, buf: Any) -> None:
        self.buf = buf  # mmap.mmap(-1, 4096) shared across fork

    def write(self, phase: int, step: str = "", err: int = 0, exc: str = "", message: str = "",
              started_ns: int = 0) -> None:
        self.LAYOUT.pack_into(self.buf, 0, phase, err, started_ns, step.encode()[:32], exc.encode()[:64],
                              message.encode("utf-8", "replace")[:256])

    def set_exception(self, exc: str) -> None:
        phase, err, started, step, _old, message = self.LAYOUT.unpack_from(self.buf, 0)
        self.LAYOUT.pack_into(self.buf, 0, phase, err, started, step, exc.encode()[:64], message)

    def finish(self, exit_status: int) -> None:
        """The user's code is over and its output flushed; this is its exit status."""
        self.STATUS.pack_into(self.buf, self.LAYOUT.size, exit_status)
        phase, err, started, step, exc, message = self.LAYOUT.unpack_from(self.buf, 0)
        self.LAYOUT.pack_into(self.buf, 0, self.DONE, err, started, step, exc, message)

    def phase(self) -> int:
        return int(self.LAYOUT.unpack_from(self.buf, 0)[0])

    def exit_status(self) -> int:
        return int(self.STATUS.unpack_from(self.buf, self.LAYOUT.size)[0]) & 0xFF

    def read(self) -> dict[str, Any]:
        phase, err, started, step, exc, message = self.LAYOUT.unpack_from(self.buf, 0)
        return {
            "phase": phase,
            "errno": err,
            "started_ns": started,
            "step": step.rstrip(b"\0").decode("utf-8", "replace"),
            "exception": exc.rstrip(b"\0").decode("utf-8", "replace"),
            "message": message.rstrip(b"\0").decode("utf-8", "replace"),
        }
