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
import dataclasses
import fcntl
import logging
import logging.handlers
import os
import pwd
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import uvloop

from . import __version__, handlers, listen, logs, quota, selftest, uidcheck
from .common import errors
from .common.errors import RequestError
from .config import DEFAULT_CONFIG, Config, ConfigError, QuotaLimits, jail_settings, load
from .environments import Environments
from .jail.jail import Jail
from .jail.kernel.cgroups import CgroupError
from .jail.kernel.libc import set_name
from .jail.workers.stream import EventSink
from .peer import Identity, PeerCred, identify
from .runs import Runs
from .server import Interim, Server
from .sessions import Sessions
from .systemd import Notifier, activated_unix_socket, listen_fds
from .usage import UsageStore

log = logging.getLogger("sandboxd")
EX_CONFIG = 78
EX_SOFTWARE = 70
MAX_UID = 2**32 - 1  # (uid_t)-1 means "no uid"
# Answers that mean "that request should not have been sent": a flood of them is rate-limited.
REFUSALS = frozenset({errors.BAD_REQUEST, errors.UNKNOWN_OP, errors.FORBIDDEN, errors.NOT_FOUND})


class StartupError(Exception):
    pass


class Daemon:
    def __init__(self, config: Config, socket_path: str | None = None, state_dir: str | None = None) -> None:
        self.config = config
        self.socket_path = socket_path or config.daemon.socket
        self.state_dir = state_dir or config.daemon.state_dir
        self.jail = Jail(jail_settings(config, self.state_dir))
        self.runs = Runs(config, self.jail, UsageStore(None))  # the store is opened once the state dir is ours
        self.sessions = Sessions(config, self.jail, self.runs)
        self.environments = Environments(config, self.jail, self.state_dir)
        self.runs.environment_ready = self.environments.check_ready
        self.server = Server(config.daemon, self._dispatch, refused=self.refused)
        self.notifier = Notifier()
        self.started = time.time()
        self.stopping = False
        self.events: asyncio.Queue[str] = asyncio.Queue()
        self.owns_socket_file = False
        self.self_test: dict[str, Any] = {"enabled": config.daemon.self_test}
        self.last_reload: dict[str, Any] | None = None

    # -- what handlers may ask (handlers.App) ------------------------------------------------
    async def _dispatch(self, cred: PeerCred, req: dict[str, Any], interim: Interim) -> dict[str, Any]:
        who = identify(cred)
        self.runs.admission.check_refusals(who.uid, self._rate_limits(who))
        try:
            return await handlers.dispatch(self, handlers.Call(who, req, interim))
        except RequestError as e:
            if e.code in REFUSALS:
                self.refused(who.uid)
            raise

    def refused(self, uid: int) -> None:
        """A request of ``uid`` was refused before it did anything: it counts against the caller."""
        self.runs.usage.refused(uid, time.time())

    def _rate_limits(self, who: Identity) -> QuotaLimits:
        return quota.effective_limits(self.config.quotas, who) or self.config.quotas.default

    def is_admin(self, who: Identity) -> bool:
        return who.uid == 0 or who.in_group(self.config.daemon.admin_group)

    def limits_for(self, who: Identity) -> QuotaLimits:
        limits = quota.effective_limits(self.config.quotas, who)
        if limits is None:
            raise errors.forbidden(f"user {who.name} (uid {who.uid}) is not allowed to use sandboxd here")
        return limits

    def identity_of(self, uid: int) -> Identity:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
        return identify(PeerCred(0, uid, gid))

    def resolve_uid(self, target: Any) -> int:
        uid: int | None = None
        if isinstance(target, int) and not isinstance(target, bool):
            uid = target
        elif isinstance(target, str) and target.isascii() and target.isdigit():
            uid = int(target)
        if uid is not None:
            if not 0 <= uid < MAX_UID:
                raise errors.bad_request("uid", f"a uid is between 0 and {MAX_UID - 1}")
            return uid
        if isinstance(target, str) and len(target) <= handlers.MAX_NAME:
            try:
                return pwd.getpwnam(target).pw_uid
            except KeyError:
                raise RequestError(errors.NOT_FOUND, f"no user {target!r}", user=target) from None
        raise errors.bad_request("uid", "expected a uid or a user name")

    def check_available(self) -> None:
        if self.stopping:
            raise RequestError(errors.UNAVAILABLE, "the daemon is shutting down")

    def known_uids(self) -> list[int]:
        return self.runs.usage.known_uids()

    def usage_of(self, uid: int) -> dict[str, Any]:
        ident = self.identity_of(uid)
        limits = quota.effective_limits(self.config.quotas, ident)
        running, queued = self.runs.counts(uid)
        return {"uid": uid, "user": ident.name, "usage": self.runs.usage.snapshot(uid, time.time()),
                "running": running, "queued": queued, "quota": quota.limits_dict(limits) if limits else None}

    async def execute(self, who: Identity, req: dict[str, Any], discover: bool = False,
                      events: EventSink | None = None) -> dict[str, Any]:
        return await self.runs.execute(who, self.limits_for(who), req, discover, events)

    async def open_session(self, who: Identity, req: dict[str, Any]) -> dict[str, Any]:
        return await self.sessions.open(who, self.limits_for(who), req)

    async def exec_session(self, who: Identity, req: dict[str, Any], events: EventSink | None) -> dict[str, Any]:
        return await self.sessions.exec(who, self.limits_for(who), req, events)

    def interrupt_session(self, who: Identity, session_id: Any) -> bool:
        return self.sessions.interrupt(who, session_id)

    async def close_session(self, who: Identity, session_id: Any, reason: str) -> dict[str, Any]:
        return await self.sessions.close(who, session_id, reason)

    def list_sessions(self, who: Identity) -> list[dict[str, Any]]:
        return self.sessions.list(who, self.is_admin(who))

    def jobs(self) -> tuple[list[dict[str, Any]], int]:
        return self.runs.jobs(), len(self.runs.admission.queue)

    def list_environments(self) -> list[dict[str, Any]]:
        used: dict[str, int] = {}
        names = [entry.environment for entry in self.runs.running.values() if not entry.session_id]
        names += [live.session.plan.environment for live in self.sessions.live.values()]
        for name in names:
            used[name] = used.get(name, 0) + 1
        return [{**env, "in_use": used.get(env["name"], 0)} for env in self.environments.list()]

    async def build_environment(self, name: str, force: bool,
                                progress: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
        return await self.environments.build(name, force, progress)

    def run_owner(self, run_id: str) -> int | None:
        return self.runs.owner(run_id)

    def config_path(self) -> str:
        return self.config.path

    def kill_run(self, run_id: str, by: Identity) -> None:
        self.runs.kill(run_id, by)

    async def rebuild_root(self, force: bool, progress: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
        return (await self.jail.rebuild_root(force=force, progress=progress)).summary()

    def root_layout(self, environment: str = "") -> tuple[str, list[str]] | None:
        stack = self.jail.stacks.get(environment)
        return None if stack is None else (stack.root.path, self.jail.run_path(environment))

    def status(self, who: Identity) -> dict[str, Any]:
        now = time.time()
        usage = self.runs.usage
        jail = self.jail.describe()
        out: dict[str, Any] = {
            "server": "sandboxd",
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(now - self.started, 3),
            "stopping": self.stopping,
            "root": jail["root"],
            "capacity": self.runs.admission.describe(),
            "sessions": self.sessions.describe_all(),
            "environments": {e["name"]: e["state"] for e in self.environments.list()},
            "pool": {**jail["pool"], "setup_us": jail["setup_us"]},
            "cgroup": jail["cgroup"],
            "network": jail["network"],
            "runtimes": {lang: {"available": rt.available, **({"why_not": rt.why_not} if not rt.available else {})}
                         for lang, rt in self.config.runtimes.items()},
            "slots": jail["slots"],
            "fork_server": jail["fork_server"],
            "self_test": self.self_test,
            "usage_db": usage.error or "ok",
            "connections": self.server.connections,
            "you": {"uid": who.uid, "user": who.name, "admin": self.is_admin(who),
                    "usage": usage.snapshot(who.uid, now), "sessions": self.sessions.counts(who.uid)},
            "last_reload": self.last_reload,
        }
        if self.is_admin(who):
            out["callers"] = {str(uid): usage.snapshot(uid, now) for uid in usage.known_uids()}
        return out

    # -- start-up -------------------------------------------------------------------------
    def _lock_state_dir(self) -> None:
        os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        # The directory itself is the lock: no file to create (it may be read-only) or leave behind.
        fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"another sandboxd is using the state directory {self.state_dir}") from None
        self._state_lock = fd

    async def start(self) -> None:
        _raise_nofile()
        _return_large_buffers()
        self._lock_state_dir()
        usage = UsageStore(os.path.join(self.state_dir, "usage.sqlite"))
        self.runs.use_store(usage)
        self.notifier.notify(status="building root and starting the fork server")
        if usage.lost_at_start:
            log.warning("%d runs were in flight when the previous daemon died; marked lost", usage.lost_at_start)
        for warning in self.config.warnings:
            log.warning("config: %s", warning)
        first, count = self.config.jail.run_uids
        for problem in uidcheck.overlaps(first, count):
            log.warning("jail.run_uids %d-%d overlaps: %s; runs and that user could reach each other",
                        first, first + count - 1, problem)
        await self.jail.start(self.environments.layers())
        if self.config.daemon.self_test:
            self.notifier.notify(status="self-test")
            await self.run_self_test()
        sock = self._socket()
        self.sessions.start()
        self.environments.start_builds()
        await self.server.serve(sock)
        root = self.jail.root
        log.info("sandboxd %s ready on %s (root %s, cgroup %s, %d workers)", __version__, self.socket_path,
                 root.build_id if root else "?", self.jail.driver.kind if self.jail.driver else "?",
                 self.config.daemon.workers)
        self.notifier.notify(ready=1, status=f"ready on {self.socket_path}")

    async def run_self_test(self) -> None:
        """Probe the jail with code that must fail; refuse to start if any escape works."""
        self.self_test = await selftest.run(self.jail, self.config.path, self.state_dir, self.socket_path,
                                            self.config.jail.run_uids)
        if self.self_test["notes"].get("private_dev") is False:
            log.warning("device nodes cannot be made here (no CAP_MKNOD?): runs share the host's /dev/null "
                        "and friends, so locks on them are visible between runs")
        log.info("self-test passed (%d probes, %.0f ms)", len(self.self_test["probes"]),
                 self.self_test["seconds"] * 1000)

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
                e, (StartupError, listen.ListenError, selftest.SelfTestFailed, OSError, CgroupError)))
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
            await self.reload()
        except RequestError as e:
            log.error("reload rejected, keeping the running configuration: %s", e.message)
        return False

    async def handle_sigterm(self) -> bool:
        await self.shutdown()
        return True

    handle_sigint = handle_sigterm

    async def reload(self) -> list[str]:
        self.notifier.notify(reloading=1, status="reloading")
        try:
            new = load(self.config.path)
        except ConfigError as e:
            self.last_reload = {"at": time.time(), "ok": False, "errors": e.errors}
            self.notifier.notify(ready=1, status="reload rejected; running with the previous configuration")
            raise RequestError(errors.BAD_CONFIG, f"the new configuration was rejected: {'; '.join(e.errors)}",
                               errors=e.errors) from None
        changes = [f"{name} changed" for name in ("daemon", "root", "jail", "pool", "limits", "quotas", "profiles")
                   if getattr(new, name) != getattr(self.config, name)]
        fixed = [k for k in ("socket", "socket_group", "socket_mode", "state_dir", "pid_file")
                 if getattr(new.daemon, k) != getattr(self.config.daemon, k)]
        if fixed:
            changes.append(f"daemon.{', daemon.'.join(fixed)}: applied at the next restart")
            new = dataclasses.replace(new, daemon=dataclasses.replace(
                new.daemon, **{k: getattr(self.config.daemon, k) for k in fixed}))
        try:
            changes += await self.jail.reconfigure(jail_settings(new, self.state_dir))
            changes += await self.environments.reconfigure(new)
        except Exception as e:
            self.last_reload = {"at": time.time(), "ok": False, "errors": [str(e)]}
            self.notifier.notify(ready=1, status="reload failed; running with the previous configuration")
            raise RequestError(errors.BAD_CONFIG, f"applying the new configuration failed: {e}") from e
        self.config = new
        d = new.daemon
        self.runs.configure(new)
        self.sessions.configure(new)
        self.server.configure(d)
        logging.getLogger().setLevel(d.log_level.upper())
        for warning in new.warnings:
            log.warning("config: %s", warning)
        self.last_reload = {"at": time.time(), "ok": True, "changes": changes}
        log.info("configuration reloaded: %s", "; ".join(changes) or "no changes")
        self.notifier.notify(ready=1, status=f"ready on {self.socket_path}")
        return changes

    async def shutdown(self) -> None:
        grace = self.config.daemon.shutdown_grace
        log.info("stopping: %d runs in flight get %.0fs to finish", len(self.runs.running), grace)
        self.notifier.notify(stopping=1, status="stopping")
        self.stopping = True
        await self.server.stop_accepting()
        if self.owns_socket_file:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        deadline = time.monotonic() + grace
        while self.runs.running and time.monotonic() < deadline:  # runs and execs in sessions
            await asyncio.sleep(0.02)
        if self.sessions.live:
            log.info("stopping: closing %d sessions", len(self.sessions.live))
        await self.sessions.close_all("daemon_stopped")
        await self.environments.close()
        await self.jail.close(grace=max(0.0, deadline - time.monotonic()))
        for task in list(self.server.tasks):
            task.cancel()
        self.runs.usage.close()
        log.info("stopped")

    async def _watchdog(self) -> None:
        interval = Notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            stacks = list(self.jail.stacks.values())
            if stacks and all(stack.server.alive for stack in stacks):
                self.notifier.notify(watchdog=1)
            else:
                log.error("a fork server is gone; not petting the watchdog")
            await asyncio.sleep(interval)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(300)
            self.runs.usage.prune(time.time())


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


def _raise_nofile() -> None:
    """Connections and worker pipes are fds: use the whole hard limit (systemd sets it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))




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
