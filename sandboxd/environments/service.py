"""Python environments: built by pip in the build jail, kept, served through the jail's stacks.

    Environments(config, jail) -> layers() at start (what is built already, even an older
    build), then builds in the background whatever is missing or out of date;
    build(name) for `build_environment`; list() for `environments`.

An environment is a venv under ``environments_dir``, named ``NAME-DIGEST-STAMP``:
DIGEST covers its settings, the interpreter and the wheelhouses' listings, so an
unchanged environment is found again at start without building (or any network).  A
build runs ``sandboxd.jail.builder.buildjail`` (pip as the build uid, confined); when it
succeeds the daemon, as root and trusting nothing of it, makes the directory its own
(links that lead out of it and special files removed, every file root's), reads the
installed distributions from their metadata, writes the manifest, and only then hands
the environment to the jail, which builds its root (the base root plus its
site-packages, libraries resolved as for any path) and starts its fork server.  A
failed build changes nothing that serves: the previous build of that environment (if
any) goes on, and the failure is kept to be shown.  Older builds of a name are
deleted once a newer one serves.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..common import errors
from ..common.errors import RequestError
from ..config import Config, EnvironmentSettings, environments_dir
from ..jail.builder import run as run_build
from ..jail.builder.buildjail import BuildSpec
from ..jail.jail import Jail
from ..jail.spec.plans import EnvLayer
from . import records
from .takeover import TAKEOVER_VERSION, installed, make_own, tree_size

log = logging.getLogger("sandboxd.environments")
MANIFEST = "sandboxd-environment.json"
SITE = "lib/python{v}/site-packages"
Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class Built:
    """One finished build on disk (its manifest)."""

    name: str
    path: str
    digest: str
    manifest: dict[str, Any]

    def layer(self, settings: EnvironmentSettings) -> EnvLayer:
        return EnvLayer(self.name, site_of(self.path), os.path.basename(self.path),
                        settings.system_site_packages, settings.preload, settings.warmup)


@dataclass
class State:
    settings: EnvironmentSettings
    digest: str
    serving: Built | None = None
    building: asyncio.Task[Built] | None = None
    build_started: float = 0.0
    stage: str = ""
    error: dict[str, Any] | None = None
    waiting: int = 0  # runs and sessions waiting for its first build
    watchers: list[Progress] = field(default_factory=list)


def site_of(path: str) -> str:
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.join(path, SITE.format(v=v))


def digest_of(settings: EnvironmentSettings, python: str) -> str:
    """What decides whether a build is still good: the settings, the interpreter, the
    wheelhouses, and how builds are taken over (a tree an older takeover left is rebuilt)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    h.update(f"takeover {TAKEOVER_VERSION}".encode())
    try:
        h.update(os.path.realpath(python).encode() + str(os.stat(python).st_mtime_ns).encode())
    except OSError:
        h.update(python.encode())
    for d in settings.find_links:
        try:
            listing = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(d) if e.is_file())
        except OSError:
            listing = []
        h.update(json.dumps([d, listing]).encode())
    return h.hexdigest()[:12]


class Environments:
    def __init__(self, config: Config, jail: Jail, state_dir: str) -> None:
        self.config = config
        self.jail = jail
        self.base = environments_dir(config, state_dir)
        self.states: dict[str, State] = {}
        self._lock = asyncio.Lock()  # one build at a time
        self._tasks: set[asyncio.Task[Any]] = set()
        for name, settings in config.environments.items():
            self.states[name] = State(settings, digest_of(settings, config.root.python))

    # -- start, reload -------------------------------------------------------------------------
    def layers(self) -> dict[str, EnvLayer]:
        """At start: the environments already built (the newest of each, even if out of date)."""
        if not self.states and not os.path.isdir(self.base):
            return {}  # none configured, none ever built: nothing to make on disk
        os.makedirs(self.base, mode=0o755, exist_ok=True)
        found = self._scan()
        out = {}
        for name, st in self.states.items():
            builds = found.get(name, [])
            current = [b for b in builds if b.digest == st.digest]
            st.serving = (current or builds)[0] if (current or builds) else None
            if st.serving is not None and st.serving.manifest.get("takeover", 1) < TAKEOVER_VERSION:
                # An older daemon's build (modes as the build left them): normalised before it
                # serves again, and rebuilt in the background (its digest is not current).
                try:
                    make_own(st.serving.path)
                    log.warning("environment %s: build %s was taken over by an older sandboxd: its modes are "
                                "normalised now, and it is rebuilt", name, os.path.basename(st.serving.path))
                except OSError as e:
                    log.error("environment %s: build %s cannot be normalised (%s): it does not serve",
                              name, os.path.basename(st.serving.path), e)
                    st.serving = None
            if st.serving is not None:
                out[name] = st.serving.layer(st.settings)
                log.info("environment %s: %s build %s", name, "reusing" if current else "serving the previous",
                         os.path.basename(st.serving.path))
        for leftover in os.listdir(self.base):
            if leftover.endswith(".partial"):
                shutil.rmtree(os.path.join(self.base, leftover), ignore_errors=True)
        return out

    def not_served(self, refused: dict[str, str]) -> None:
        """At start: builds the jail could not make a root of (name -> why) do not serve; they are
        built again (start_builds), and fail the same way while the cause stays."""
        for name, why in refused.items():
            st = self.states[name]
            st.serving = None
            st.error = {"message": why, "log": [], "at": time.time()}

    def start_builds(self) -> None:
        """Build, in the background, every environment with no build of its current settings."""
        for name, st in self.states.items():
            if st.serving is None or st.serving.digest != st.digest:
                self._spawn_build(name)

    async def reconfigure(self, config: Config) -> list[str]:
        changes = []
        self.config = config
        for name in list(self.states):
            if name not in config.environments:
                gone = self.states.pop(name)
                if gone.building is not None:
                    gone.building.cancel()
                await self.jail.drop_environment(name)
                self._remove_builds(name, keep=None)
                changes.append(f"environment {name} removed")
        for name, settings in config.environments.items():
            digest = digest_of(settings, config.root.python)
            st = self.states.get(name)
            if st is None:
                self.states[name] = State(settings, digest)
                changes.append(f"environment {name} added: building")
                self._spawn_build(name)
            elif st.digest != digest:
                st.settings, st.digest = settings, digest
                changes.append(f"environment {name} changed: rebuilding (the previous build serves meanwhile)")
                self._spawn_build(name)
        return changes

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled on the way out
                pass

    # -- what runs ask --------------------------------------------------------------------------
    async def wait_ready(self, name: str) -> None:
        """Return once ``name`` serves: a run (or session) that finds its first build under way waits
        for it, as it would for a worker, at most daemon.environment_wait; else ``unavailable``, why."""
        st = self.states.get(name)
        building = None if st is None or st.serving is not None else st.building
        if st is not None and building is not None and not building.done():
            st.waiting += 1
            try:
                async with asyncio.timeout(self.config.daemon.environment_wait):
                    await asyncio.wait({building})  # neither cancels the build nor raises its failure
            except TimeoutError:
                pass
            finally:
                st.waiting -= 1
        self.check_ready(name)

    def check_ready(self, name: str) -> None:
        """Raise ``unavailable`` (with why) unless ``name`` serves."""
        st = self.states.get(name)
        if st is None:
            raise errors.bad_request("environment", f"no environment {name!r} here", known=sorted(self.states))
        if st.serving is None:
            if st.building is not None and not st.building.done():
                wait = self.config.daemon.environment_wait
                raise RequestError(errors.UNAVAILABLE, f"environment {name} is being built (for "
                                   f"{time.monotonic() - st.build_started:.0f}s, {st.stage or 'starting'}); runs "
                                   f"wait {wait:g}s for it (daemon.environment_wait); retry",
                                   environment=name, retry_after_ms=2000)
            why = (st.error or {}).get("message", "it has not been built")
            raise RequestError(errors.UNAVAILABLE, f"environment {name} cannot serve: {why}", environment=name)

    # -- building ---------------------------------------------------------------------------------
    def _spawn_build(self, name: str, force: bool = False) -> asyncio.Task[Built]:
        st = self.states[name]
        if st.building is not None and not st.building.done():
            return st.building
        task = asyncio.get_running_loop().create_task(self._build(name, force))
        st.building = task
        st.build_started, st.stage = time.monotonic(), "waiting for another build"  # one at a time
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())  # seen: reported below
        return task

    async def build(self, name: str, force: bool, progress: Progress) -> dict[str, Any]:
        """``build_environment``: build now (or join the build under way); what serves after it."""
        st = self.states.get(name)
        if st is None:
            raise errors.bad_request("name", f"no environment {name!r} in the configuration", known=sorted(self.states))
        st.watchers.append(progress)
        try:
            running = st.building is not None and not st.building.done()
            if not running and not force and st.serving is not None and st.serving.digest == st.digest:
                progress("ready", {"message": "the environment is up to date"})
            else:
                try:
                    await asyncio.shield(self._spawn_build(name, force=force and not running))
                except RequestError:
                    raise
                except Exception as e:
                    raise RequestError(errors.INTERNAL, f"building {name}: {type(e).__name__}: {e}") from e
        finally:
            st.watchers.remove(progress)
        return self.describe(name)

    def _report(self, st: State, stage: str, info: dict[str, Any]) -> None:
        st.stage = stage
        for watcher in list(st.watchers):
            watcher(stage, info)

    async def _build(self, name: str, force: bool) -> Built:
        st = self.states[name]
        async with self._lock:
            st.stage = "starting"
            st.error = None
            try:
                built = await self._build_locked(name, st)
            except RequestError as e:
                st.error = {"message": e.message, "log": e.details.get("log", []), "at": time.time(),
                            **({"limit": e.details["limit"]} if "limit" in e.details else {})}
                log.error("environment %s: build failed: %s", name, e.message)
                self._report(st, "failed", {"message": e.message})
                raise
            except asyncio.CancelledError:
                raise
            except Exception as e:
                st.error = {"message": f"{type(e).__name__}: {e}", "log": [], "at": time.time()}
                log.exception("environment %s: build failed", name)
                self._report(st, "failed", {"message": st.error["message"]})
                raise RequestError(errors.BUILD_FAILED, f"building {name}: {st.error['message']}") from e
            st.serving = built
            self._remove_builds(name, keep=built.path)
            log.info("environment %s: build %s serves (%s packages, %.1fs)", name, os.path.basename(built.path),
                     len(built.manifest["packages"]), built.manifest["build_seconds"])
            self._report(st, "ready", {"build": os.path.basename(built.path)})
            return built

    async def _build_locked(self, name: str, st: State) -> Built:
        cfg = self.config
        settings, digest = st.settings, st.digest
        final = os.path.join(self.base, f"{name}-{digest}-{time.strftime('%Y%m%dT%H%M%S')}{os.urandom(2).hex()}")
        # The venv is built in a directory of root's that nobody else may enter: whatever modes
        # the build gives its tree, no host user can reach into it -- to plant a file, or to
        # open one and keep it -- before it is taken over and moved out, its modes normalised.
        partial = final + ".partial"
        venv = os.path.join(partial, os.path.basename(final))
        uid = cfg.jail.build_uid
        os.mkdir(partial, mode=0o700)
        os.chmod(partial, 0o700)  # whatever the umask
        os.mkdir(venv, mode=0o755)
        os.chown(venv, uid, uid)
        t0 = time.monotonic()
        try:
            usage = await self._run_jail(st, venv, settings)
            self._report(st, "checking", {})
            removed = make_own(venv)
            clash = records.clashes(site_of(venv))
            if clash:
                raise RequestError(errors.BUILD_FAILED, records.describe(clash))
            packages = installed(site_of(venv))
            manifest = {"name": name, "digest": digest, "requirements": list(settings.requirements),
                        "packages": packages, "built_at": time.time(), "build_seconds": round(time.monotonic() - t0, 1),
                        "size_bytes": tree_size(venv), "removed": removed[:20],
                        "build_memory_peak_bytes": usage.get("memory_peak"), "takeover": TAKEOVER_VERSION,
                        "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
            path = os.path.join(venv, MANIFEST)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)  # the build's own "manifest": not a word of it is taken
            elif os.path.lexists(path):
                os.unlink(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1)
            os.rename(venv, final)
            os.rmdir(partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        built = Built(name, final, digest, manifest)
        self._report(st, "root", {})
        try:
            await self.jail.use_environment(built.layer(settings),
                                            progress=lambda stage, info: self._report(st, f"root:{stage}", info))
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        return built

    async def _run_jail(self, st: State, venv: str, settings: EnvironmentSettings) -> dict[str, Any]:
        """Build ``venv`` in the build jail; what the build used (``run_build.build``'s answer)."""
        cfg = self.config
        if run_build.needs_network(settings.index_url, settings.extra_index_urls) and self.jail.network is None:
            raise RequestError(errors.UNAVAILABLE, "this environment needs its index, and network for runs is not "
                               "set up on this daemon (no quota allows network): give it find_links instead, or "
                               "allow network to some caller")
        spec = BuildSpec(venv=venv, uid=cfg.jail.build_uid, gid=cfg.jail.build_uid,
                         requirements=list(settings.requirements), index_url=settings.index_url,
                         extra_index_urls=list(settings.extra_index_urls), find_links=list(settings.find_links),
                         only_binary=settings.only_binary, system_site_packages=settings.system_site_packages,
                         memory=cfg.jail.build_memory, proxy=cfg.network.proxy)
        try:
            return await self.jail.build_environment(spec, lambda stage, info: self._report(st, stage, info))
        except run_build.BuildFailed as e:
            details: dict[str, Any] = {"log": e.log}
            if e.limit:
                details["limit"] = e.limit
            raise RequestError(errors.BUILD_FAILED, e.message, **details) from None

    def _scan(self) -> dict[str, list[Built]]:
        """Finished builds on disk, newest first per name."""
        out: dict[str, list[Built]] = {}
        try:
            entries = sorted(os.listdir(self.base), reverse=True)
        except FileNotFoundError:
            return out
        for entry in entries:
            m = re.fullmatch(r"(.+)-([0-9a-f]{12})-[0-9T]+[0-9a-f]{4}", entry)
            path = os.path.join(self.base, entry)
            if m is None or not os.path.isdir(path):
                continue
            try:
                with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
                    manifest = json.load(f)
            except (OSError, ValueError):
                continue
            out.setdefault(m.group(1), []).append(Built(m.group(1), path, m.group(2), manifest))
        return out

    def _remove_builds(self, name: str, keep: str | None) -> None:
        for built in self._scan().get(name, []):
            if built.path != keep:
                shutil.rmtree(built.path, ignore_errors=True)

    # -- what there is ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.states)

    def describe(self, name: str) -> dict[str, Any]:
        st = self.states[name]
        b = st.serving
        m = b.manifest if b else {}
        state = ("building" if st.building is not None and not st.building.done() else
                 "failed" if st.error and b is None else
                 "ready" if b is not None and b.digest == st.digest else
                 "outdated" if b is not None else "missing")
        return {"name": name, "state": state, "build": os.path.basename(b.path) if b else None,
                "requirements": list(st.settings.requirements), "packages": m.get("packages", []),
                "size_bytes": m.get("size_bytes"), "build_seconds": m.get("build_seconds"),
                "build_memory_peak_bytes": m.get("build_memory_peak_bytes"),
                "built_at": m.get("built_at"), "python": m.get("python"), "site": site_of(b.path) if b else None,
                "preload": list(st.settings.preload), "system_site_packages": st.settings.system_site_packages,
                "error": st.error, "stage": st.stage if state == "building" else None, "waiting": st.waiting}

    def list(self, in_use: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Every environment; ``in_use``: the environment of each run and session there is now."""
        used = collections.Counter(in_use)
        return [{**self.describe(name), "in_use": used.get(name, 0)} for name in self.names()]
