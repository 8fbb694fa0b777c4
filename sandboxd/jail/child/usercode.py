"""Running the user's code as ``__main__``, as the interpreter would: shared by a run and a session.

A fresh ``__main__`` module, input files written into the working directory, exit
statuses from ``SystemExit``, tracebacks printed from the user's own frames on, and
interpreter shutdown without finalisation (threads, ``atexit``, flushing).  All of it
runs in R, confined.
"""

from __future__ import annotations

import atexit
import builtins
import os
import resource
import sys
import traceback
import types
from collections.abc import Mapping

EXIT_FLUSH_FAILED = 120  # as CPython, when flushing stdout at exit fails


def new_main() -> types.ModuleType:
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    return main


def write_files(files: Mapping[str, bytes], replace: bool) -> None:
    """Files into the working directory (names checked again here); ``replace``: a session's
    later files overwrite what is there (never through a link)."""
    for name, data in files.items():
        parts = name.split("/")
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
            raise ValueError(f"bad file name {name!r}")
        if len(parts) > 1:
            os.makedirs(os.path.dirname(name), mode=0o755, exist_ok=True)
        mode = os.O_TRUNC if replace else os.O_EXCL
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | mode, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def exit_status(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


def from_user_frame(e: BaseException, main: dict[str, object]) -> BaseException:
    """``e`` with its traceback starting at the user's code (our own frames dropped)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_globals is not main and tb.tb_next is not None:
        tb = tb.tb_next
    return e.with_traceback(tb) if tb is not None and tb.tb_frame.f_globals is main else e


def format_exception(e: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(e))
    except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
        return f"{type(e).__name__}\n"


def print_exception(e: BaseException) -> None:
    """The traceback on stderr, as the interpreter prints it (``sys.excepthook`` if set)."""
    try:
        if sys.excepthook is sys.__excepthook__:
            traceback.print_exception(e)  # uses linecache, so the user's source lines are shown
        else:
            sys.excepthook(type(e), e, e.__traceback__)
    except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
        try:
            os.write(2, f"{type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        except BaseException:  # noqa: BLE001
            pass


def flush_stdio() -> bool:
    """Flush stdout and stderr (whatever they are now); False if stdout could not be flushed."""
    ok = True
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            if stream is sys.stdout:
                ok = False
    return ok


def shutdown(status: int, main: dict[str, object]) -> int:
    """Interpreter shutdown without finalisation: threads, atexit, flush."""
    # threading is not in the fork server's image (its after-fork hook costs every worker ~120
    # copied pages): only code that imported it has threads to wait for.
    threading = sys.modules.get("threading")
    steps = (threading._shutdown, atexit._run_exitfuncs) if threading else (atexit._run_exitfuncs,)
    for step in steps:
        try:
            step()
        except SystemExit as e:
            status = exit_status(e)
        except BaseException as e:  # noqa: BLE001
            print_exception(from_user_frame(e, main))
    if not flush_stdio():
        status = status or EXIT_FLUSH_FAILED
    return status


def cpu_ns() -> int:
    """This process's CPU so far, every thread's, to the nanosecond it can: getrusage sums
    the threads' runtimes with the calling thread's current slice in.  (The process CPU
    clock would not: with RLIMIT_CPU set the kernel keeps a process timer, and the clock
    then reads that timer, brought up to date only at ticks.)"""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return int((ru.ru_utime + ru.ru_stime) * 1e9)
