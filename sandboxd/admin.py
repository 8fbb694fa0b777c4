"""The daemon as its operators see it: status, usage, reload, root rebuilds, drain, shutdown state.

    admin.status(who, admin)      health, readiness, root, capacity, pools, your usage (admins: everyone's)
    admin.usage_of(uid)           a uid's usage against its quota
    await admin.reload()          re-read the file; apply what can change without a restart
    await admin.rebuild_root()    the base root and every environment's, rebuilt
    admin.drain(who) / undrain()  take no new work (runs, sessions) while what is in flight goes on

Draining is for a node behind a load balancer (docs/fleet.md): ``run`` and ``session_open``
are answered ``unavailable`` (details ``draining: true``: retry elsewhere, nothing started),
while runs in flight, execs in open sessions and everything else go on, and ``status`` says
``draining`` and ``ready: false`` so that the balancer sends nothing new.  The state is kept
in the state directory (``draining``): a daemon restarted by an upgrade comes back drained,
and takes work again only when an operator says ``undrain``.

Ready (``status``'s ``ready`` and ``not_ready``): not stopping, not draining, a root built,
the self-test not failed, the pool warm (a worker made since start), and the environment
``default``, when the configuration declares one, has a build that serves.

Reload validates the new file first (a bad one is rejected and the running configuration
kept), then hands each service its part: the jail (roots, fork servers, pools), the
environments, the run and session tables, the server's bounds, quotas.  Settings that
need a restart (the socket, the state directory, uid ranges) are reported as such.
"""

from __future__ import annotations

import contextlib
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
from .config import Config, ConfigError, environments_dir_problem, jail_settings, load
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
DRAIN_FILE = "draining"  # in the state directory: present while the node is drained


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
        self.drain_path = os.path.join(state_dir, DRAIN_FILE)
        self.drained = self._drained_since()

    # -- what requests see ----------------------------------------------------------------
    def check_available(self) -> None:
        if self.stopping:
            raise RequestError(errors.UNAVAILABLE, "the daemon is shutting down")

    def check_accepting(self, op: str) -> None:
        """New work (``op`` starts a run or a session) is refused while draining."""
        if self.drained is not None:
            raise RequestError(errors.UNAVAILABLE, f"this sandboxd is draining: {op} is for another node "
                               "(sandboxctl undrain ends it)", draining=True)

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

    def not_ready(self, jail: dict[str, Any], environments: dict[str, str], serving: list[str]) -> list[str]:
        """Why this daemon should get no new work now (empty: ready)."""
        why = []
        if self.stopping:
            why.append("sandboxd is stopping")
        if self.drained is not None:
            why.append("sandboxd is draining (sandboxctl undrain)")
        if not jail["root"]:
            why.append("sandboxd has no root yet")
        if self.self_test.get("passed") is False:
            why.append("sandboxd's self-test failed")
        pool = jail["pool"] or {}
        # Warm once the pool has made a worker: under load ready and running may both be 0 for an
        # instant (a run just ended, its successor starting), which must not flap the node.
        if not jail["running"] and not pool.get("hits") and not pool.get("misses") and \
                not any(p.get("ready") for p in (pool.get("profiles") or {}).values()):
            why.append("no warm worker yet")
        state = environments.get("default")
        if state is not None and "default" not in serving:
            why.append(f"the environment default is {state}: no build of it serves")
        return why

    def limits(self) -> dict[str, Any]:
        """What this daemon allows every caller, for ``hello`` (``quota.daemon_limits``)."""
        return quota.daemon_limits(self.config.daemon)

    def status(self, who: Identity, admin: bool) -> dict[str, Any]:
        now = time.time()
        usage = self.usage
        jail = self.jail.describe()
        listed = self.environments.list()
        environments = {e["name"]: e["state"] for e in listed}
        serving = [e["name"] for e in listed if e["build"] is not None]  # "building" may be a first build
        not_ready = self.not_ready(jail, environments, serving)
        out: dict[str, Any] = {
            "server": "sandboxd",
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(now - self.started, 3),
            "stopping": self.stopping,
            "draining": self.drained is not None,
            "draining_since": self.drained,
            "ready": not not_ready,
            "not_ready": not_ready,
            "root": jail["root"],
            "capacity": self.admission.describe(),
            "sessions": self.sessions.describe_all(),
            "environments": environments,
            "serving_environments": serving,
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
    def _drained_since(self) -> float | None:
        try:
            return os.stat(self.drain_path).st_mtime
        except FileNotFoundError:
            return None

    def drain(self, who: Identity) -> dict[str, Any]:
        """Take no new work until ``undrain``; kept across restarts (the state directory's file)."""
        if self.drained is None:
            with open(self.drain_path, "w", encoding="utf-8") as f:
                f.write(f"drained by uid {who.uid} ({who.name}) at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
            self.drained = self._drained_since() or time.time()
            log.info("draining (by uid %d, %s): new runs and sessions are refused, %d runs in flight and %d "
                     "sessions go on", who.uid, who.name, self.runs.in_flight(), self.sessions.open_count())
            self.notifier.notify(status=self.state_words())
        return self.drain_state()

    def undrain(self, who: Identity) -> dict[str, Any]:
        if self.drained is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.drain_path)
            self.drained = None
            log.info("undrained (by uid %d, %s): taking new work", who.uid, who.name)
            self.notifier.notify(status=self.state_words())
        return self.drain_state()

    def state_words(self) -> str:
        """systemd's STATUS= once started."""
        return f"{'draining' if self.drained is not None else 'ready'} on {self.socket_path}"

    def drain_state(self) -> dict[str, Any]:
        running, queued = self.admission.running, len(self.admission.queue)
        return {"draining": self.drained is not None, "draining_since": self.drained, "running": running,
                "queued": queued, "in_flight": self.runs.in_flight(), "sessions": self.sessions.open_count()}

    async def rebuild_root(self, force: bool, progress: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
        return (await self.jail.rebuild_root(force=force, progress=progress)).summary()

    async def reload(self) -> list[str]:
        self.notifier.notify(reloading=1, status="reloading")
        try:
            new = load(self.config.path)
            if problem := environments_dir_problem(new, self.state_dir):  # under the --state-dir this daemon has
                raise ConfigError(self.config.path, [problem])
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
        self.notifier.notify(ready=1, status=self.state_words())
        return changes
