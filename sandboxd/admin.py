"""The daemon as its operators see it: status, usage, reload, root rebuilds, shutdown state.

    admin.status(who, admin)      health, root, capacity, pools, your usage (admins: everyone's)
    admin.usage_of(uid)           a uid's usage against its quota
    await admin.reload()          re-read the file; apply what can change without a restart
    await admin.rebuild_root()    the base root and every environment's, rebuilt

Reload validates the new file first (a bad one is rejected and the running configuration
kept), then hands each service its part: the jail (roots, fork servers, pools), the
environments, the run and session tables, the server's bounds, quotas.  Settings that
need a restart (the socket, the state directory, uid ranges) are reported as such.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from . import __version__, quota
from .access import Access
from .common import errors
from .common.errors import RequestError
from .config import Config, ConfigError, jail_settings, load
from .environments import Environments
from .jail.jail import Jail
from .peer import Identity
from .quota import Admission
from .runs import Runs
from .server import Server
from .sessions import Sessions
from .systemd import Notifier
from .usage import UsageStore

log = logging.getLogger("sandboxd")
FIXED_DAEMON = ("socket", "socket_group", "socket_mode", "state_dir", "pid_file")  # need a restart


class Admin:
    def __init__(self, config: Config, state_dir: str, access: Access, usage: UsageStore, admission: Admission,
                 jail: Jail, environments: Environments, runs: Runs, sessions: Sessions, server: Server,
                 notifier: Notifier) -> None:
        self.config = config
        self.state_dir = state_dir
        self.access, self.usage, self.admission = access, usage, admission
        self.jail, self.environments, self.runs, self.sessions = jail, environments, runs, sessions
        self.server, self.notifier = server, notifier
        self.started = time.time()
        self.stopping = False
        self.socket_path = config.daemon.socket
        self.self_test: dict[str, Any] = {"enabled": config.daemon.self_test}
        self.last_reload: dict[str, Any] | None = None

    # -- what requests see ----------------------------------------------------------------
    def check_available(self) -> None:
        if self.stopping:
            raise RequestError(errors.UNAVAILABLE, "the daemon is shutting down")

    def refused(self, uid: int) -> None:
        """A request of ``uid`` was refused before it did anything: it counts against the caller."""
        self.usage.refused(uid, time.time())

    def config_path(self) -> str:
        return self.config.path

    def known_uids(self) -> list[int]:
        return self.usage.known_uids()

    def usage_of(self, uid: int) -> dict[str, Any]:
        ident = self.access.identity_of(uid)
        limits = self.access.limits(ident)
        running, queued = self.runs.counts(uid)
        return {"uid": uid, "user": ident.name, "usage": self.usage.snapshot(uid, time.time()),
                "running": running, "queued": queued, "quota": quota.limits_dict(limits) if limits else None}

    def root_layout(self, environment: str = "") -> tuple[str, list[str]] | None:
        """(root directory, the runs' sys.path) of a stack, once it is built."""
        return self.jail.root_layout(environment)

    def status(self, who: Identity, admin: bool) -> dict[str, Any]:
        now = time.time()
        usage = self.usage
        jail = self.jail.describe()
        out: dict[str, Any] = {
            "server": "sandboxd",
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(now - self.started, 3),
            "stopping": self.stopping,
            "root": jail["root"],
            "capacity": self.admission.describe(),
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
            "you": {"uid": who.uid, "user": who.name, "admin": admin,
                    "usage": usage.snapshot(who.uid, now), "sessions": self.sessions.counts(who.uid)},
            "last_reload": self.last_reload,
        }
        if admin:
            out["callers"] = {str(uid): usage.snapshot(uid, now) for uid in usage.known_uids()}
        return out

    # -- changes ------------------------------------------------------------------------------
    async def rebuild_root(self, force: bool, progress: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
        return (await self.jail.rebuild_root(force=force, progress=progress)).summary()

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
        fixed = [k for k in FIXED_DAEMON if getattr(new.daemon, k) != getattr(self.config.daemon, k)]
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
        self.access.configure(new)
        self.admission.configure(d.workers, d.queue, d.queue_timeout, d.reserved_workers)
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
