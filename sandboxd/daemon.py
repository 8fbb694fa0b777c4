"""sandboxd: start-up, signals, reload and shutdown around one event loop.

Start-up order: validate the config, open the usage database, build or reuse the
root and start the fork server (which compiles the seccomp profiles), probe the jail
(self-test), bind the socket or take it from systemd, and only then report READY.
Signal handlers only enqueue; the loop dispatches to ``handle_<signame>``.  SIGHUP
reloads (a bad config is rejected and the old one kept); SIGTERM/SIGINT stop
accepting, give runs in flight ``shutdown_grace`` to finish, kill the rest, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import socket
import sys
import time

import uvloop

from . import __version__, listen, logs, selftest, uidcheck
from .access import Access
from .admin import Admin
from .budget import Budget
from .common.errors import RequestError
from .common.process import raise_nofile, try_lock
from .config import DEFAULT_CONFIG, Config, ConfigError, environments_dir_problem, jail_settings, load
from .environments import Environments
from .handlers import Handlers, Services
from .jail.jail import Jail
from .jail.kernel.cgroups import CgroupError
from .jail.kernel.libc import set_name
from .jail.workers.fsclient import InitMissing
from .quota import Admission
from .runs import Runs
from .server import Server
from .sessions import Sessions
from .systemd import Notifier, activated_unix_socket, listen_fds
from .usage import UsageStore

log = logging.getLogger("sandboxd")
EX_CONFIG = 78
EX_SOFTWARE = 70


class StartupError(Exception):
    pass


class Daemon:
    """Wires the services once (``handlers.Services``) and runs their life: start, signals,
    reload, shutdown.  It is on no request's path: the server hands requests to the handlers,
    which call the services."""

    def __init__(self, config: Config, socket_path: str | None = None, state_dir: str | None = None) -> None:
        self.config = config
        self.socket_path = socket_path or config.daemon.socket
        self.state_dir = state_dir or config.daemon.state_dir
        d = config.daemon
        self.usage = UsageStore(None)  # opened once the state directory is ours
        self.access = Access(config)
        self.admission = Admission(d.workers, d.queue, d.queue_timeout, self.usage, d.reserved_workers)
        self.jail = Jail(jail_settings(config, self.state_dir))
        self.environments = Environments(config, self.jail, self.state_dir)
        answers = Budget(d.response_budget, d.response_budget_per_uid)
        self.runs = Runs(config, self.jail, self.admission, self.usage, self.environments, answers)
        self.sessions = Sessions(config, self.jail, self.runs, self.admission, self.usage, self.access,
                                 self.environments)
        self.server = Server(d, answers)
        self.notifier = Notifier()
        self.admin = Admin(config, self.state_dir, self.access, self.usage, self.admission, self.jail,
                           self.environments, self.runs, self.sessions, self.server, self.notifier)
        self.services = Services(self.access, self.admission, self.runs, self.sessions, self.environments,
                                 self.admin)
        self.events: asyncio.Queue[str] = asyncio.Queue()
        self.owns_socket_file = False

    # -- start-up -------------------------------------------------------------------------
    def _lock_state_dir(self) -> None:
        os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        # The directory itself is the lock: no file to create (it may be read-only) or leave behind.
        fd = try_lock(self.state_dir)
        if fd is None:
            raise StartupError(f"another sandboxd is using the state directory {self.state_dir}")
        self._state_lock = fd

    async def start(self) -> None:
        raise_nofile()
        _return_large_buffers()
        self._lock_state_dir()
        usage = self.usage
        usage.open(os.path.join(self.state_dir, "usage.sqlite"))
        self.notifier.notify(status="building root and starting the fork server")
        if usage.lost_at_start:
            log.warning("%d runs were in flight when the previous daemon died; marked lost", usage.lost_at_start)
        for warning in self.config.warnings:
            log.warning("config: %s", warning)
        first, count = self.config.jail.run_uids
        for problem in uidcheck.overlaps(first, count):
            log.warning("jail.run_uids %d-%d overlaps: %s; runs and that user could reach each other",
                        first, first + count - 1, problem)
        self.environments.not_served(await self.jail.start(self.environments.layers()))
        if self.config.daemon.self_test:
            self.notifier.notify(status="self-test")
            await self.run_self_test()
        sock = self._socket()
        self.admin.socket_path = self.socket_path
        self.sessions.start()
        self.environments.start_builds()
        await self.server.serve(sock, Handlers(self.services))
        root = self.jail.root
        log.info("sandboxd %s ready on %s (root %s, cgroup %s, %d workers)", __version__, self.socket_path,
                 root.build_id if root else "?", self.jail.driver.kind if self.jail.driver else "?",
                 self.config.daemon.workers)
        if self.admin.drained is not None:
            log.warning("draining (since the state directory says so): new runs and sessions are refused until "
                        "sandboxctl undrain")
        self.notifier.notify(ready=1, status=self.admin.state_words())

    async def run_self_test(self) -> None:
        """Probe the jail with code that must fail; refuse to start if any escape works."""
        report = await selftest.run(self.jail, self.config.path, self.state_dir, self.socket_path,
                                    self.config.jail.run_uids)
        self.admin.self_test = report
        if report["notes"].get("private_dev") is False:
            log.warning("device nodes cannot be made here (no CAP_MKNOD?): runs share the host's /dev/null "
                        "and friends, so locks on them are visible between runs")
        log.info("self-test passed (%d probes, %.0f ms)", len(report["probes"]), report["seconds"] * 1000)

    def _socket(self) -> socket.socket:
        activated = activated_unix_socket(listen_fds())
        if activated is not None:
            log.info("using the socket passed by systemd (%s)", activated.getsockname())
            self.socket_path = activated.getsockname() or self.socket_path
            activated.setblocking(False)
            return activated
        d = self.config.daemon
        sock = listen.bind(self.socket_path, d.socket_mode, d.socket_group)
        self.owns_socket_file = True
        return sock

    # -- signals, reload, shutdown ------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.events.put_nowait, sig.name)
        try:
            await self.start()
        except Exception as e:  # noqa: BLE001 - any start-up failure: say why, exit non-zero
            log.error("cannot start: %s", e, exc_info=not isinstance(
                e, (StartupError, listen.ListenError, selftest.SelfTestFailed, OSError, CgroupError, InitMissing)))
            self.notifier.notify(status=f"failed: {e}")
            await self.jail.close()
            return EX_SOFTWARE
        watchdog = loop.create_task(self._watchdog())
        housekeeping = loop.create_task(self._housekeeping())
        try:
            while True:
                event = await self.events.get()
                handler = getattr(self, f"handle_{event.lower()}", None)
                if handler is not None and await handler():
                    return 0
        finally:
            watchdog.cancel()
            housekeeping.cancel()

    async def handle_sighup(self) -> bool:
        try:
            self.config = self.admin.config
            await self.admin.reload()
            self.config = self.admin.config
        except RequestError as e:
            log.error("reload rejected, keeping the running configuration: %s", e.message)
        return False

    async def handle_sigterm(self) -> bool:
        await self.shutdown()
        return True

    handle_sigint = handle_sigterm

    async def shutdown(self) -> None:
        grace = self.admin.config.daemon.shutdown_grace
        log.info("stopping: %d runs in flight get %.0fs to finish", self.runs.in_flight(), grace)
        self.notifier.notify(stopping=1, status="stopping")
        self.admin.stopping = True
        await self.server.stop_accepting()
        if self.owns_socket_file:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        deadline = time.monotonic() + grace
        while self.runs.in_flight() and time.monotonic() < deadline:  # runs and execs in sessions
            await asyncio.sleep(0.02)
        if self.sessions.open_count():
            log.info("stopping: closing %d sessions", self.sessions.open_count())
        await self.sessions.close_all("daemon_stopped")
        await self.environments.close()
        await self.jail.close(grace=max(0.0, deadline - time.monotonic()))
        for task in list(self.server.tasks):
            task.cancel()
        self.usage.close()
        log.info("stopped")

    async def _watchdog(self) -> None:
        interval = Notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            if self.jail.fork_servers_alive():
                self.notifier.notify(watchdog=1)
            else:
                log.error("a fork server is gone; not petting the watchdog")
            await asyncio.sleep(interval)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(300)
            self.usage.prune(time.time())


def _return_large_buffers() -> None:
    """Serve large buffers (outputs, code, files) from mmap so freeing them returns the memory.

    glibc otherwise raises its mmap threshold after the first large free and keeps later
    ones in the heap: measured, the daemon's RSS stayed 7 MiB up after a few 1 MiB
    requests and peaked at 78 MiB on 10 MiB outputs; with a fixed 256 KiB threshold it
    peaks at 41 MiB and comes back to its idle size.
    """
    import ctypes

    m_mmap_threshold = -3
    try:
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 256 << 10)
    except (OSError, AttributeError):  # not glibc
        pass



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sandboxd", description="Run untrusted code in a confined jail for local "
                                "clients (see sandboxd(8)).")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("--socket", help="listen on this Unix socket instead of daemon.socket")
    p.add_argument("--state-dir", help="state directory instead of daemon.state_dir")
    p.add_argument("--foreground", action="store_true", help="stay attached, log to stderr, speak sd_notify")
    p.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="json: one JSON object a line on stderr (default: daemon.log_format)")
    p.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        return EX_CONFIG
    if problem := environments_dir_problem(cfg, args.state_dir):  # the file's own are checked by load
        print(f"sandboxd: {problem}", file=sys.stderr)
        return EX_CONFIG
    if os.geteuid() != 0:
        print("sandboxd: must run as root (it creates namespaces, mounts and cgroups)", file=sys.stderr)
        return EX_SOFTWARE
    set_name("sandboxd")  # what top and perf show (the command line stays python3's)
    if not args.foreground:
        import daemon
        import daemon.pidfile

        pid_file = cfg.daemon.pid_file
        os.makedirs(os.path.dirname(pid_file), mode=0o755, exist_ok=True)
        context = daemon.DaemonContext(pidfile=daemon.pidfile.TimeoutPIDLockFile(pid_file, acquire_timeout=1),
                                       umask=0o022, working_directory="/")
        with context:
            logs.setup(cfg.daemon.log_level, foreground=False, fmt_name=args.log_format or cfg.daemon.log_format)
            return _serve(cfg, args)
    logs.setup(cfg.daemon.log_level, foreground=True, fmt_name=args.log_format or cfg.daemon.log_format)
    return _serve(cfg, args)


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    # uvloop (libuv): less CPU per await and per syscall than asyncio's own loop (measured in
    # docs/performance.md); nothing forks from the daemon without an exec (helpers, builds).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(Daemon(cfg, args.socket, args.state_dir).run())


if __name__ == "__main__":
    sys.exit(main())
