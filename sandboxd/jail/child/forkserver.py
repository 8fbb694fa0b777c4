"""The fork server: a clean, single-threaded process that makes workers.

The daemon starts it with ``exec`` (never a fork of itself), an empty environment
and one SOCK_SEQPACKET socket, and sends it the root (a directory fd) and the root's
template mount namespace (an fd: ``template`` makes it).  It prepares once -- one BPF
program per profile, the syscall-name table (for the daemon, which names refused
calls), ``sandboxd-init`` opened, the administrator's preload modules -- then freezes
the GC and serves commands:

    {"op": "spawn", "spec": {...}}  -> {"ok": true, "pid": P}  + fds
                                       [pidfd, status_r, link, request_w, stdin_w, stdout_r, stderr_r]
    {"op": "template", "root": DIR} -> {"ok": true}   (after a root rebuild)
    {"op": "files", "request": {...}} -> {"ok": true, "pid": P} + [pidfd]
                                       (a child that does one operation on a session's /work: ``files``)

and reports ``{"event": "reaped", "pid": P, "wstatus": S}`` when a worker's pid 1 has
been reaped (then nothing of that run is left).  Each worker is made straight into
a new pid namespace (``unshare(CLONE_NEWPID)``, spawn, ``setns`` back), so pid 1 is its
run's pid 1: ``_spawn`` makes it share the server's memory while it forks R and execs
``sandboxd-init``, so a worker costs one copy of this address space, R's.  When the daemon goes
away (EOF) every worker is killed and the server exits; its own death is seen by
workers through the lifeline pipe and PDEATHSIG.

What the server knows never reaches a run: no host path passes through it (the root,
its template and the cgroups come as fds), and a worker leaves the server's stack behind at fork
(``contract.Become``): it starts again from the bottom with only its own spec.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import select
import signal
import socket
import stat
import sys
from typing import Any

import msgpack

from ..kernel import libc
from ..policy import seccomp as sc
from . import _spawn, files, preload  # type: ignore[attr-defined]
from .contract import Become, ServerState, WorkerSpec, clean_stack, drain
from .runner import runner_main

MAX_MESSAGE = 1 << 20


class ForkServer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.workers: dict[int, int] = {}  # pid of pid 1 -> run uid
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.lifeline_r, self.lifeline_w = os.pipe2(os.O_CLOEXEC)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.state: ServerState | None = None
        self.template_fd = -1

    # -- preparation ------------------------------------------------------------------
    def prepare(self, init: dict[str, Any], root_fd: int, template_fd: int) -> dict[str, Any]:
        self.template_fd = os.dup(template_fd)
        init_fd = os.open(init["init"], os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(init_fd)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            raise ValueError(f"{init['init']} is not an executable file")
        filters = {key: sc.compile_profile(sc.Profile.from_wire(key, p), p["network"])
                   for key, p in init["profiles"].items()}
        own = own_sys_path(root_fd)
        run_path = run_sys_path(own, init["python_path"])
        trusted = preload.trusted_dirs(own)
        shared, in_workers, preload_errors = preload.split(init["preload"], run_path, trusted)
        if not init.get("shared_preload", False):  # an environment's: none of it here
            shared, in_workers = [], [*shared, *in_workers]
        preloaded, errors = preload.import_all(shared, trusted)
        preload_errors.update(errors)
        warmup, worker_warmup = (init["warmup"], "") if not in_workers and init.get("shared_preload") else \
            ("", init["warmup"])
        warmup_error = preload.warm_up(warmup, trusted)
        if warmup_error:
            preload_errors[preload.WARMUP] = warmup_error
        cap_last = libc.cap_last_cap()
        self.state = ServerState(
            template_fd=self.template_fd,
            root_id=tuple(init["root_id"]),  # type: ignore[arg-type]
            lifeline_fd=self.lifeline_r,
            init_fd=init_fd,
            filters=filters,
            cap_last=cap_last,
            run_path=run_path,
            foreign_modules=foreign_modules(run_path, root_fd),
            base_env=dict(init["env"]),
            worker_preload=tuple(in_workers),
            worker_warmup=worker_warmup,
        )
        forget_foreign_modules(self.state.foreign_modules)
        gc.collect()
        gc.freeze()  # no copy-on-write faults from the first collection in every worker
        return {
            "ok": True,
            "filters": {k: len(v) // 8 for k, v in filters.items()},
            "syscall_names": sc.syscall_names(),
            "audit_arch": sc.native_audit_arch(),
            "preloaded": preloaded,
            "preloaded_in_workers": in_workers,
            "preload_errors": preload_errors,
            "warmed_up": bool(warmup) and not warmup_error,
            "warmup_in_workers": bool(worker_warmup),
            "tasks": len(os.listdir("/proc/self/task")),
            "run_path": list(run_path),
            "vsz_kb": _status_kb("VmSize"),
            "rss_kb": _status_kb("VmRSS"),
        }

    # -- serving ----------------------------------------------------------------------
    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while True:
            ready, _, _ = select.select([self.sock, self.wake_r], [], [])
            if self.wake_r in ready:
                drain(self.wake_r)
                self.reap()
            if self.sock in ready:
                try:
                    data, fds = _recv(self.sock)
                except ConnectionError:
                    data, fds = b"", []
                if not data:
                    self.shutdown()
                    return
                try:
                    self.handle(msgpack.unpackb(data, raw=False, strict_map_key=False), fds)
                finally:
                    if pid_is_parent():
                        for fd in fds:
                            os.close(fd)

    def handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        try:
            if op == "spawn":
                pid, ours = self.spawn(WorkerSpec.from_wire(msg["spec"]), fds)
                try:
                    self.reply({"ok": True, "pid": pid}, ours)
                finally:
                    for fd in ours:
                        os.close(fd)
            elif op == "files" and len(fds) >= 3:
                pid, pidfd = self.file_op(msg["request"], fds)
                try:
                    self.reply({"ok": True, "pid": pid}, [pidfd])
                finally:
                    os.close(pidfd)
            elif op == "template" and len(fds) == 1:
                old = self.template_fd
                self.template_fd = os.dup(fds[0])
                assert self.state is not None
                self.state = dataclasses.replace(self.state, template_fd=self.template_fd,
                                                 root_id=tuple(msg["root_id"]))
                os.close(old)
                self.reply({"ok": True})
            else:
                self.reply({"ok": False, "error": f"unknown op {op!r} (or its fds missing)"})
        except Exception as e:  # noqa: BLE001 - the daemon gets the reason, the server lives on
            self.reply({"ok": False, "error": f"{type(e).__name__}: {e}"})

    def reply(self, obj: dict[str, Any], fds: list[int] | None = None) -> None:
        data = msgpack.packb(obj, use_bin_type=True)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)

    def spawn(self, spec: WorkerSpec, extra: list[int]) -> tuple[int, list[int]]:
        """Make pid 1 and R (``_spawn``) with the worker's pipes, then ``extra`` (its netns, its
        cgroup.procs files) for R."""
        assert self.state is not None
        if len(extra) != spec.extra_fds():
            raise ValueError(f"spawn came with {len(extra)} fds, the spec needs {spec.extra_fds()}")
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        link_ours, link_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        request_r, request_w = os.pipe2(os.O_CLOEXEC)
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
        stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        link_r, link_d = link_theirs.detach(), link_ours.detach()
        runner_fds = [link_r, request_r, stdin_r, stdout_w, stderr_w, self.lifeline_r, self.template_fd, sync_r, *extra]
        ours = [status_r, link_d, request_w, stdin_w, stdout_r, stderr_r]
        per_worker = [status_w, sync_r, sync_w, link_r, request_r, stdin_r, stdout_w, stderr_w]
        pid = -1
        try:
            libc.unshare(libc.CLONE_NEWPID)
            try:
                pid = _spawn.spawn(self.state.init_fd, status_w, sync_w, spec.uid, spec.gid)
            finally:
                if pid == 0:
                    _ROLE[0] = "worker"
                else:
                    libc.setns(self.own_pidns, libc.CLONE_NEWPID)
            if pid == 0:
                raise Become(runner_main, spec, self.state, runner_fds)
        except BaseException:
            if pid_is_parent():
                for fd in ours:
                    os.close(fd)
            raise
        finally:
            if pid_is_parent():
                for fd in per_worker:
                    os.close(fd)
        self.workers[pid] = spec.uid
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            for fd in ours:
                os.close(fd)
            raise
        return pid, [pidfd, *ours]

    def file_op(self, request: dict[str, Any], fds: list[int]) -> tuple[int, int]:
        """Fork the child that does one operation on a session's files (``files.main``); it is
        reaped like any child, and reported to nobody: the daemon holds its pidfd."""
        pid = os.fork()
        if pid == 0:
            _ROLE[0] = "files"
            raise Become(files.main, request, list(fds))
        try:
            return pid, os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            raise

    def reap(self) -> None:
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.workers.pop(pid, None) is not None:
                self.sock.send(msgpack.packb({"event": "reaped", "pid": pid, "wstatus": wstatus}))

    def shutdown(self) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(self.workers):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


_ROLE = ["server"]  # "worker" in a forked child (not a pid: nothing here may name the server)


def pid_is_parent() -> bool:
    return _ROLE[0] == "server"


def own_sys_path(root_fd: int) -> list[str]:
    """This interpreter's own sys.path entries that the root holds."""
    return [p for p in sys.path[1:] if p.startswith("/") and _is_dir_in(root_fd, p)]


def run_sys_path(own: list[str], extra: list[str]) -> tuple[str, ...]:
    """The runs' sys.path: the interpreter's own entries, with the configured extras (an
    environment's site-packages first) before its site directories, as a venv orders them:
    an environment's numpy wins over one in Debian's dist-packages."""
    std = [p for p in own if not p.rstrip("/").endswith(("dist-packages", "site-packages"))]
    site = [p for p in own if p not in std]
    return tuple(dict.fromkeys([*std, *extra, *site]))


def _is_dir_in(root_fd: int, path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path.lstrip("/") or ".", dir_fd=root_fd).st_mode)
    except OSError:
        return False


def foreign_modules(run_path: tuple[str, ...], root_fd: int | None = None) -> tuple[str, ...]:
    """Modules loaded from outside the root (the daemon's own): forgotten before user code.

    With ``root_fd``, also those whose file the root lacks although their directory is on
    the runs' path: the root holding /usr/lib/python3/dist-packages/jinja2 puts that
    directory on it, and the daemon's msgpack, loaded from there, must not stay importable.
    """
    roots = tuple(p.rstrip("/") + "/" for p in run_path)
    out = []
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        if name == "__main__" or (path and (not path.startswith(roots) or
                                            (root_fd is not None and not _is_file_in(root_fd, path)))):
            out.append(name)
    return tuple(out)


def _is_file_in(root_fd: int, path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path.lstrip("/"), dir_fd=root_fd).st_mode)
    except OSError:
        return False


def forget_foreign_modules(names: tuple[str, ...]) -> None:
    """Drop the daemon's own modules from sys.modules, once, here rather than in every
    runner: user code then cannot ``import sandboxd`` or msgpack from memory (the root does
    not hold them).  Code already loaded keeps its references; nothing the server or a
    worker runs later imports them by name again (see child.py)."""
    for name in names:
        sys.modules.pop(name, None)


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds that came with it."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 16)
    return data, list(fds)


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main(argv: list[str]) -> None:
    """The launcher's entry (``argv``: the socket's fd): the server, and every worker forked
    from it, run from here."""
    clean_stack(_serve, int(argv[0]), in_child=lambda: not pid_is_parent())


def _serve(fd: int) -> None:
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    # The daemon alone decides when the fork server ends (it closes the socket, or dies and
    # PDEATHSIG follows): a Ctrl-C or a SIGTERM sent to the whole process group must not
    # take it away while the daemon is still draining runs.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    libc.set_name("sbx-forkserver")
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    server = ForkServer(sock)
    data, fds = _recv(sock)
    init = msgpack.unpackb(data, raw=False, strict_map_key=False)
    try:
        if len(fds) != 2:
            raise ValueError(f"the init message came with {len(fds)} fds, expected the root and its template")
        answer = server.prepare(init, fds[0], fds[1])
    except Exception as e:  # noqa: BLE001
        answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        for extra in fds:
            os.close(extra)
    server.reply(answer)
    if answer.get("ok"):
        server.serve()
