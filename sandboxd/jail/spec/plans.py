"""The immutable plan of one run, as the daemon decided it.

``plan.build`` makes it from a request and the caller's quota; the jail carries it out
and decides nothing.  What crosses into the worker is in ``contract``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


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
    display: bool = False  # figures shown or left open come back as PNGs
    environment: str = ""  # a built environment's stack; "" the base root


@dataclass(frozen=True)
class SessionPlan:
    """One session, decided by the daemon: the worker's limits for its whole life."""

    session_id: str
    language: str = "python3"
    files: Mapping[str, bytes] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    memory_bytes: int = 256 << 20
    cpu_ms: int = 0  # CPU for the whole session; 0: only the caller's hourly budget bounds it
    idle_timeout_ms: int = 600_000
    max_lifetime_ms: int = 3_600_000
    pids: int = 64
    file_size_bytes: int = 16 << 20
    out_files_bytes: int = 8 << 20
    out_files_count: int = 64
    nofile: int = 256
    network: bool = False
    display: bool = False
    environment: str = ""
    cpus: float = 1.0  # CPU bandwidth while an exec runs
    idle_cpus: float = 0.05  # and between execs
    output_bytes: int = 1 << 20  # per stream, kept between execs (then the streams are not read)


ANSWER_OVERHEAD = 64 << 10  # bytes of an answer beyond its output


def answer_bound(output_bytes: int) -> int:
    """What a run (or a cell) holds in the daemon while it runs: its two streams, each up to
    its cap.  Its out/ files and figures (limits.out_files_size each) are read at its end
    and counted when the answer is written."""
    return 2 * output_bytes + ANSWER_OVERHEAD


@dataclass(frozen=True)
class CellPlan:
    """One exec in a session."""

    run_id: str
    code: str
    stdin: bytes = b""
    files: Mapping[str, bytes] = field(default_factory=dict)
    timeout_ms: int = 5000
    output_bytes: int = 1 << 20  # per stream
    display: bool = False


@dataclass(frozen=True)
class EnvLayer:
    """A built environment as the jail needs it: what joins the base root, and sys.path.

    ``site`` is the environment's site-packages; it goes into the environment's root at
    the same path, and on the runs' sys.path after the base root's entries.
    """

    name: str
    site: str
    build_id: str
    system_site_packages: bool = False
    preload: tuple[str, ...] = ()
    warmup: str = ""


@dataclass(frozen=True)
class FilePlan:
    """One operation on a session's /work, decided by the daemon (``sessionfiles.build``)."""

    action: str  # "write", "read" or "list"
    parts: tuple[str, ...]  # the path's components below /work; () is /work itself
    content: bytes = b""  # what a write puts there
    mode: int = 0o644  # the permission bits of a written file
    parents: bool = True  # a write makes missing directories (0755)
    max_bytes: int = 16 << 20  # the largest file read or written
    recursive: bool = False  # a listing goes down into directories
    max_entries: int = 10_000  # entries listed, then the listing is truncated

    @property
    def path(self) -> str:
        return "/".join(self.parts) or "."
