"""Preload and warm-up: which process may run a configured module's code, and running it.

The fork server is root with every capability and the host's filesystem: any code it runs
runs as root, and anything it imports stays in its memory to run again when it forks (a
module can patch what the server calls).  So it imports a configured module only when the
module and everything it imports come from **trusted directories**: the interpreter's own
entries on the runs' path (its standard library, Debian's dist-packages), each root-owned
and writable by root alone down to /, which is code the daemon already trusts (it imports
its own dependencies from there, as root).  The import runs with sys.path cut down to those
directories, so a dependency cannot come from anywhere else either, and it is done only if
the runs would find the same module there (an environment's or an operator-added directory
earlier on their path would shadow it: then the runs' copy is the one to load).

Everything else -- an environment's packages (pip installs them; a requirement may ship files
of another distribution), modules in operator-added directories, an environment's warm-up --
is imported by each worker's runner R after its confinement, seccomp included, while it waits
in the pool: as the run's uid, with no capabilities, in the run's namespaces and root.  What
a worker imports costs its CPU and memory (no sharing with the server's image): the price of
not running package code as root.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import io
import os
import stat
import sys
from collections.abc import Iterator, Sequence

WARMUP = "(warmup)"  # the key of a warm-up's error among the preload errors


def trusted_dirs(paths: Sequence[str]) -> tuple[str, ...]:
    """Those of ``paths`` that only root can change: every component from / down owned by
    uid 0 and not writable by group or others (Debian's /usr/local/lib/python3*/dist-packages
    is group-writable by staff: not trusted)."""
    return tuple(p for p in paths if _root_only(p))


def _root_only(path: str) -> bool:
    path = os.path.normpath(path)
    if not path.startswith("/"):
        return False
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        try:
            st = os.lstat("/".join(parts[:i]) or "/")
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode) or st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
    return True


def located_in(name: str, path: Sequence[str]) -> str | None:
    """Where the top package of ``name`` comes from on ``path`` (its file or directory), or None."""
    spec = importlib.machinery.PathFinder.find_spec(name.partition(".")[0], list(path))
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        return spec.origin
    locations = list(spec.submodule_search_locations or [])
    return locations[0] if len(locations) == 1 else None  # a namespace package spans directories


def split(modules: Sequence[str], run_path: Sequence[str], trusted: Sequence[str]
          ) -> tuple[list[str], list[str], dict[str, str]]:
    """(imported by the server, imported by each worker, not found anywhere)."""
    roots = tuple(p.rstrip("/") + "/" for p in trusted)
    shared: list[str] = []
    in_workers: list[str] = []
    missing: dict[str, str] = {}
    for name in modules:
        if name.partition(".")[0] in sys.builtin_module_names:
            shared.append(name)
            continue
        where = located_in(name, run_path)
        if where is None:
            missing[name] = f"ModuleNotFoundError: No module named {name!r} on the runs' path"
        elif where.startswith(roots) and located_in(name, trusted) == where:
            shared.append(name)
        else:
            in_workers.append(name)
    return shared, in_workers, missing


@contextlib.contextmanager
def only_on(path: Sequence[str]) -> Iterator[None]:
    """sys.path is ``path`` while the block runs (imports resolve there and nowhere else)."""
    saved = sys.path[:]
    sys.path[:] = list(path)
    try:
        yield
    finally:
        sys.path[:] = saved


def import_all(modules: Sequence[str], path: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Import ``modules`` with sys.path = ``path``: (imported, errors by module)."""
    done: list[str] = []
    errors: dict[str, str] = {}
    with only_on(path):
        for name in modules:
            try:
                importlib.import_module(name)
                done.append(name)
            except Exception as e:  # noqa: BLE001 - reported to the daemon, which logs it
                cause = e.__cause__ or e.__context__  # what a package's own message hides
                errors[name] = f"{type(e).__name__}: {e}" + (f" (from {type(cause).__name__}: {cause})"[:600]
                                                               if cause is not None else "")
    return done, errors


def warm_up(code: str, path: Sequence[str]) -> str:
    """Run warm-up code once with sys.path = ``path``, in a namespace of its own that is dropped
    afterwards, its Python-level output discarded; its error, if any."""
    if not code:
        return ""
    try:
        with only_on(path), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            exec(compile(code, "<warmup>", "exec", dont_inherit=True), {"__name__": "__warmup__"})
    except BaseException as e:  # noqa: BLE001 - SystemExit too: reported, the process lives on
        return f"{type(e).__name__}: {e}"[:600]
    return ""


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """fds 1 and 2 on /dev/null while the block runs: in a worker they are the run's stdout and
    stderr, and a module printing at import (from C, too) must not write into the run's output."""
    saved = [os.dup(1), os.dup(2)]
    null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def in_worker(modules: Sequence[str], warmup: str, path: Sequence[str]) -> dict[str, object]:
    """A confined worker's own preload and warm-up, before it says it is ready: what it
    reports (errors by module, whether the warm-up ran)."""
    if not modules and not warmup:
        return {}
    with quiet_fds(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        done, errors = import_all(modules, path)
        failed = warm_up(warmup, path)
    if failed:
        errors[WARMUP] = failed
    errors = dict(list(errors.items())[:16])  # the report fits a link message
    return {"preloaded": done[:256], "errors": errors, "warmed_up": bool(warmup) and not failed}
