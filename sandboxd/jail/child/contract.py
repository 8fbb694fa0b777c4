"""The worker contract: everything the daemon, the fork server, the worker's first process
(pid 1) and the runner R agree on.

A leaf module (it imports only the wire format): fd numbers, exit codes, the setup
error, the step runner, the records that cross process boundaries and the handoff
page.  Every other module of the worker imports its names from here.

Processes.  The fork server makes a worker's pid 1 and R with one copy of its address
space (``_spawn``): pid 1 shares its memory for the moment it takes to fork R and exec
``sandboxd-init`` (a few pages of C, which reaps and reports R's end); R, the one CPython
of the run, does the worker's setup steps (``steps``) and its own (``runner``) and waits
for its request.

Descriptors.  The fork server hands R its fds, placed by the ``fds`` step at ``FD_LINK``
.. ``FD_SYNC`` and then ``FD_EXTRA``...  For user code R keeps fds 0-2 (the run's stdio),
``R_FD_REQUEST`` (the daemon's request pipe) and ``R_FD_LINK``, its end of the *link*, a
SOCK_SEQPACKET pair whose other end is the daemon's.  On the link R first sends
``LINK_ARMED`` with its step timings and three fds attached (its seccomp listener, a
pidfd of itself, the run's scratch filesystem), then ``LINK_READY`` (or, an exec
runtime, ``LINK_WAITING`` once it waits), and just before user code ``LINK_STARTED``:
the daemon's proof that setup is over (user code can write the handoff page, but it
cannot un-send a byte, and a run never holds the link: R closes it first).  What comes
on the link after ``LINK_STARTED`` (a session's cells, an exec runtime's end) is the
run's word: it can only mislead its own report.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

from ...common import protocol

# R's descriptors after the worker's "fds" step; then, from FD_EXTRA, the worker's network
# namespace (runs with network) and its cgroup.procs files (see netns_fd, cgroup_fds).
# FD_SYNC says when pid 1 runs as the run's uid (one byte); FD_LIFELINE reaches EOF when the
# fork server is gone.
(FD_LINK, FD_REQUEST, FD_STDIN, FD_STDOUT, FD_STDERR, FD_LIFELINE, FD_TEMPLATE, FD_SYNC,
 FD_EXTRA) = range(3, 12)
# R's descriptors after its runner's "fds" step (0-2 are the run's stdio).
R_FD_REQUEST, R_FD_LINK = 3, 4
RUNNER_PID = 2  # R, in its own pid namespace (pid 1 is sandboxd-init)
LINK_ARMED = b"L"  # R -> daemon, msgpack timings + [listener, pidfd, scratch]: filter loaded, fds handed over
LINK_READY = b"R"  # R -> daemon, msgpack: a forked runner waits for its request (ready)
LINK_SETUP_ERROR = b"E"  # pid 1 or R -> daemon, msgpack SetupError: a step failed, the worker ends
LINK_STARTED = b"S"  # R -> daemon: setup is over, user code is next
LINK_WAITING = b"W"  # an exec runtime's bootstrap -> daemon: started, waiting for the request (ready)
LINK_DONE = b"D"  # an exec runtime's bootstrap -> daemon, then the exit status: the code is done
LINK_SESSION = b"O"  # a session's runner -> daemon: the session is open, cells may come
LINK_CELL = b"C"  # a session's runner -> daemon, then a msgpack map (JSON from Node): a cell is done
MAX_LINK_MESSAGE = 1 << 16
# In the run's scratch filesystem: its top (what the daemon holds an fd of) is hidden from the run
# under /work; /work is its "work", /tmp its "tmp".
HANDOFF_FILE = ".handoff"  # the handoff page (mapped by R; never reachable by the run's paths)
OUT_DIR = "work/out"  # a run's out/, as the daemon finds it from the scratch's top
DISPLAY_DIR = "/tmp/.display"  # a run's or cell's figures, as PNG files; returned with out/
DISPLAY_FROM_TOP = "tmp/.display"
INIT_REPORT = struct.Struct("=IiqqQ")  # sandboxd-init's record of R's end: magic, wstatus, utime, stime (us), maxrss
INIT_MAGIC = 0x49584253

EXIT_SETUP = 121  # a setup step failed (details on the link, or in the handoff page)


class Become(BaseException):
    """Raised in a child right after ``fork``: unwinds every frame of its parent's stack up
    to ``clean_stack``, which then calls ``fn(*args)``.

    A child forked deep inside the fork server (or inside P) inherits all those frames and
    what their locals hold: the server's table of other workers, messages, the specs.  User
    code could walk to them (``sys._getframe().f_back``).  Unwinding frees them all; the
    child starts again from the bottom holding only ``args``.  It is a BaseException so that
    no ``except Exception`` on the way swallows it.
    """

    def __init__(self, fn: Callable[..., object], *args: object) -> None:
        super().__init__()
        self.fn, self.args = fn, args


def clean_stack(fn: Callable[..., object], *args: object, in_child: Callable[[], bool]) -> None:
    """Run ``fn(*args)``; a ``Become`` raised in a forked child runs its target instead, from
    here.  A child never returns from this: whatever happens, it ends in ``os._exit``."""
    while True:
        try:
            fn(*args)
        except Become as b:
            fn, args = b.fn, b.args  # the traceback, and every frame it held, goes with ``b``
            continue
        except BaseException:
            if in_child():
                os._exit(EXIT_SETUP)
            raise
        if in_child():
            os._exit(EXIT_SETUP)
        return


class SetupError(Exception):
    """A confinement step could not be completed: which one, its errno, what it said.

    Raised where setup fails (in the child, by the fork server's client, by the pool);
    ``verdict.decide`` turns it into the ``sandbox_error`` result.
    """

    def __init__(self, step: str, errno: int, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step, self.errno, self.message = step, errno, message

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "errno": self.errno, "message": self.message}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], default_step: str = "worker") -> SetupError:
        errno = d.get("errno")
        return cls(str(d.get("step") or default_step), errno if isinstance(errno, int) else 0,
                   str(d.get("message") or ""))

    @classmethod
    def from_os_error(cls, step: str, e: BaseException) -> SetupError:
        if isinstance(e, OSError):
            return cls(step, e.errno or 0, str(e))
        return cls(step, 0, f"{type(e).__name__}: {e}")


C = TypeVar("C")


@dataclass(frozen=True)
class Step(Generic[C]):
    """One named setup step: a function of the setup's context."""

    name: str
    run: Callable[[C], object]


def run_steps(steps: Sequence[Step[C]], ctx: C, clock: Callable[[], int] = time.monotonic_ns) -> dict[str, int]:
    """Run the steps in order; return how long each took in microseconds.

    The first that raises ends the list: ``SetupError`` names it and carries its errno.
    """
    took: dict[str, int] = {}
    for step in steps:
        t0 = clock()
        try:
            step.run(ctx)
        except SetupError:
            raise
        except Exception as e:
            raise SetupError.from_os_error(step.name, e) from e
        took[step.name] = (clock() - t0) // 1000
    return took


def _dup_above(fd: int, low: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD, low)


class FdOps:
    """The calls ``remap_fds`` makes, as a seam for tests."""

    dup_above = staticmethod(_dup_above)
    dup2 = staticmethod(os.dup2)
    closerange = staticmethod(os.closerange)


def remap_fds(fds: Sequence[int], start: int, ops: FdOps | Any = FdOps) -> None:
    """Place ``fds`` at ``start``, ``start+1``, ... and close every other fd from ``start`` on."""
    # Temporaries land above the target range, so no dup2 below clobbers a source.
    high = [ops.dup_above(fd, start + len(fds)) for fd in fds]
    for i, fd in enumerate(high):
        ops.dup2(fd, start + i)
    ops.closerange(start + len(fds), 2**31 - 1)


def write_frame(fd: int, obj: object) -> None:
    """One frame on a blocking fd (the child's status pipe)."""
    data = memoryview(protocol.encode(obj))
    while data:
        data = data[os.write(fd, data):]


def drain(fd: int) -> None:
    """Read a non-blocking fd (a wake-up pipe) until it is empty."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


@dataclass(frozen=True)
class ServerState:
    """What the fork server prepared once, inherited by every worker through fork."""

    template_fd: int
    root_id: tuple[int, int]  # (st_dev, st_ino) of the root as the template sees it
    lifeline_fd: int
    init_fd: int  # sandboxd-init, opened by the fork server (pid 1 execs it from this fd)
    filters: dict[str, bytes]
    cap_last: int
    run_path: tuple[str, ...]
    foreign_modules: tuple[str, ...]
    base_env: dict[str, str]
    worker_preload: tuple[str, ...] = ()  # imported by each worker, confined (``preload``)
    worker_warmup: str = ""


@dataclass(frozen=True)
class WorkerSpec:
    """How to build one worker: daemon -> fork server, when the worker is made.

    No host path travels in it: attached to the spawn message come the worker's network
    namespace (when ``network``, made ready by the daemon) and ``cgroups`` open
    ``cgroup.procs`` files.
    """

    uid: int
    gid: int
    cgroups: int
    filter_key: str
    network: bool
    scratch_bytes: int
    scratch_inodes: int
    rlimits: Mapping[str, int]  # ceilings for the whole worker
    hostname: str = "sandbox"
    exec_argv: tuple[str, ...] = ()  # an exec runtime: R execs this once confined (empty: R is the fork)

    def extra_fds(self) -> int:
        """How many fds the spawn message carries: the netns (with network), the cgroups."""
        return int(self.network) + self.cgroups

    def netns_fd(self) -> int | None:
        return FD_EXTRA if self.network else None

    def cgroup_fds(self) -> range:
        first = FD_EXTRA + int(self.network)
        return range(first, first + self.cgroups)

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["rlimits"] = dict(self.rlimits)
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> WorkerSpec:
        return cls(**{**d, "exec_argv": tuple(d.get("exec_argv", ()))})


@dataclass(frozen=True)
class RunnerArgs:
    """All R's own steps take along (everything else of the fork server's is dropped)."""

    filter: bytes  # R's own seccomp program
    base_env: dict[str, str]
    run_path: tuple[str, ...]
    scratch_fd: int  # the scratch filesystem's top, for the daemon (sent with LINK_ARMED)
    exec_argv: tuple[str, ...] = ()  # an exec runtime: what R becomes once confined
    preload: tuple[str, ...] = ()  # modules R imports once confined, before it says it is ready
    warmup: str = ""


@dataclass(frozen=True)
class RunRequest:
    """What one run asks of its worker: daemon -> R, through the request pipe.

    ``session``: the worker becomes a session instead: no code now; ``Cell`` frames follow
    on the same pipe, one at a time.  ``display``: figures shown or left open are returned
    as PNGs.  ``stream``: the caller reads output as it comes (stdout is line-buffered).
    """

    code: str
    rlimits: Mapping[str, int]
    files: Mapping[str, bytes] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    argv: tuple[str, ...] = ("-c",)
    session: bool = False
    display: bool = False
    stream: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "rlimits": dict(self.rlimits), "files": dict(self.files),
                "env": dict(self.env), "argv": list(self.argv), "session": self.session, "display": self.display,
                "stream": self.stream}

    def to_json_frame(self) -> bytes:
        """The request as an exec runtime's bootstrap reads it: a length, then JSON (files base64)."""
        return json_frame({"code": self.code, "env": dict(self.env), "argv": list(self.argv),
                           "session": self.session, "files": encode_files(self.files)})

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> RunRequest:
        return cls(d["code"], d["rlimits"], d.get("files", {}), d.get("env", {}), tuple(d.get("argv", ("-c",))),
                   bool(d.get("session")), bool(d.get("display")), bool(d.get("stream")))


def encode_files(files: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in files.items()}


def json_frame(obj: Any) -> bytes:
    """A frame for an exec runtime's bootstrap: a 4-byte big-endian length, then JSON."""
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


@dataclass(frozen=True)
class Cell:
    """One exec of a session: daemon -> R, on the request pipe (after the session's RunRequest)."""

    code: str
    stdin: bytes = b""
    files: Mapping[str, bytes] = field(default_factory=dict)
    display: bool = False

    def frame(self, json_runtime: bool) -> bytes:
        if json_runtime:
            return json_frame({"code": self.code, "stdin": base64.b64encode(self.stdin).decode(),
                               "files": encode_files(self.files), "display": self.display})
        return protocol.encode({"code": self.code, "stdin": self.stdin, "files": dict(self.files),
                                "display": self.display})


class Handoff:
    """A page the runner shares with the daemon: a file at the top of the run's scratch
    filesystem, which no path of the run reaches, mapped by R (no fd of it stays in the run).

    The runner writes its phase, the failing step with errno, the name of an uncaught
    exception, when user code started and, when it is done, its exit status, the time
    and the CPU it used since its request came; the daemon reads it through its fd of
    the scratch's top.  User code can scribble
    on it, which can only mislead its own verdict (it could as well choose its own exit
    status); a setup failure it claims after ``LINK_STARTED`` is not believed.
    """

    LAYOUT = struct.Struct("=IiQ32s64s256s")
    STATUS = struct.Struct("=iQQ")  # the runner's exit status, when it was done, its CPU (ns): after LAYOUT
    SETUP, WAITING, RUNNING, DONE = 0, 1, 2, 3
    SIZE = 4096

    def __init__(self, buf: Any) -> None:
        self.buf = buf  # R's MAP_SHARED mapping of the file; the daemon reads the file's bytes

    def write(self, phase: int, step: str = "", err: int = 0, exc: str = "", message: str = "",
              started_ns: int = 0) -> None:
        self.LAYOUT.pack_into(self.buf, 0, phase, err, started_ns, step.encode()[:32], exc.encode()[:64],
                              message.encode("utf-8", "replace")[:256])

    def setup_failed(self, error: SetupError) -> None:
        self.write(self.SETUP, error.step, error.errno, message=error.message)

    def set_exception(self, exc: str) -> None:
        phase, err, started, step, _old, message = self.LAYOUT.unpack_from(self.buf, 0)
        self.LAYOUT.pack_into(self.buf, 0, phase, err, started, step, exc.encode()[:64], message)

    def finish(self, exit_status: int, cpu_ns: int = 0) -> None:
        """The user's code is over and its output flushed; this is its exit status, and the
        CPU the runner used since its request came."""
        self.STATUS.pack_into(self.buf, self.LAYOUT.size, exit_status, time.monotonic_ns(), max(0, cpu_ns))
        phase, err, started, step, exc, message = self.LAYOUT.unpack_from(self.buf, 0)
        self.LAYOUT.pack_into(self.buf, 0, self.DONE, err, started, step, exc, message)

    def phase(self) -> int:
        return int(self.LAYOUT.unpack_from(self.buf, 0)[0])

    def exit_status(self) -> int:
        return int(self.STATUS.unpack_from(self.buf, self.LAYOUT.size)[0]) & 0xFF

    def done_ns(self) -> int:
        """When ``finish`` was called (the runner's monotonic clock), 0 before."""
        return int(self.STATUS.unpack_from(self.buf, self.LAYOUT.size)[1])

    def cpu_ns(self) -> int:
        """The CPU the runner says it used for the run (0 before ``finish``)."""
        return int(self.STATUS.unpack_from(self.buf, self.LAYOUT.size)[2])

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
