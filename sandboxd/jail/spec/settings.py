"""The jail's view of the configuration: its own sections, and what quotas imply.

Nothing is re-declared here: the settings, their defaults and their docs live once in
``sections`` (``sandboxd.config`` reads them, and ``config.jail_settings`` makes this
object).  What the jail adds is derived: the ceilings every pooled worker starts with
(the most any caller may ask for), the pools and filter keys, how an exec runtime starts,
the runs' path and environment and the fork server's.  What goes into a root is
``root.contents``'.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..policy.seccomp import Profile
from .plans import EnvLayer
from .runtimes import NODE_BOOTSTRAP
from .sections import JailConfig, LimitsSettings, NetworkSettings, PoolSettings, RootSettings, RuntimeSettings

RUN_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/work",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    # matplotlib draws off-screen, with its config and font caches in the scratch space
    # (display: true switches the backend to the one returning figures: jail.display)
    "MPLBACKEND": "Agg",
    "MPLCONFIGDIR": "/tmp/.matplotlib",
    "XDG_CACHE_HOME": "/tmp/.cache",
}


@dataclass(frozen=True)
class JailSettings:
    state_dir: str
    root: RootSettings
    jail: JailConfig
    pool: PoolSettings
    limits: LimitsSettings
    profiles: Mapping[str, Profile]
    max_memory: int  # ceilings of every pooled worker: runs may only lower them
    max_cpu_ms: int
    network: NetworkSettings
    network_enabled: bool  # some quota lets runs ask for network
    runtimes: Mapping[str, RuntimeSettings]  # the available ones
    root_dir: str | None = None  # default: <state_dir>/roots

    def language_of(self, key: str) -> str:
        return key.split("@", 1)[0].split("+", 1)[0]

    def pool_sizes(self, environments: Iterable[str] = ()) -> dict[str, tuple[int, int]]:
        """(minimum, maximum) ready workers of each pool key: each filter key of the base root's
        stack, and python3's of each environment's.  The default environment's pool is what
        python3's would be; other environments' start empty and grow with use.  With a default
        environment the base root's python3 pools start empty as well (few runs go there)."""
        envs = list(environments)
        out = {}
        for key in self.filter_keys():
            rt = self.runtimes[self.language_of(key)]
            sizes = (self.pool.min if rt.pool_min < 0 else rt.pool_min,
                     self.pool.max if rt.pool_max < 0 else rt.pool_max)
            python = self.language_of(key) == "python3"
            out[key] = (0, sizes[1]) if python and DEFAULT_ENVIRONMENT in envs else sizes
            if python:
                for env in envs:
                    out[pool_key(key, env)] = sizes if env == DEFAULT_ENVIRONMENT else (0, sizes[1])
        return out

    def exec_argv(self, language: str, memory: int) -> tuple[str, ...]:
        """How an exec runtime's worker starts, for a run of ``memory`` bytes (empty: fork)."""
        rt = self.runtimes[language]
        if rt.start != "exec":
            return ()
        heap_mb = max(16, int(memory * rt.heap_fraction) >> 20)
        # --max-old-space-size: V8 fails an allocation past it ("heap out of memory", reported as
        # memory_limit) before the cgroup would kill the run; --no-addons: no native code from
        # the run's own files (its scratch is noexec anyway).
        return (rt.interpreter, f"--max-old-space-size={heap_mb}", "--no-addons", *rt.flags, "/" + NODE_BOOTSTRAP)

    def filter_key(self, language: str, network: bool) -> str:
        return f"{language}+net" if network else language

    def filter_keys(self) -> list[str]:
        nets = (False, True) if self.network_enabled else (False,)
        return [self.filter_key(lang, net) for lang in self.runtimes for net in nets]

    def python_path(self, layer: EnvLayer | None = None) -> tuple[str, ...]:
        """sys.path entries of runs beyond the interpreter's own: an environment's site-packages
        first (its numpy, not the one root.python_path's dist-packages may hold), as in a venv."""
        return tuple(dict.fromkeys((*layer_paths(layer), *self.root.python_path)))

    def preload(self, layer: EnvLayer | None = None) -> tuple[str, ...]:
        return layer.preload if layer is not None else self.jail.preload

    def warmup(self, layer: EnvLayer | None = None) -> str:
        return layer.warmup if layer is not None else self.jail.warmup

    def forkserver_env(self) -> dict[str, str]:
        """The fork server's own environment: what preloading needs, nothing of the daemon's."""
        return {"PATH": RUN_ENV["PATH"], "LANG": "C.UTF-8", **self.jail.preload_env}

    def run_env(self) -> dict[str, str]:
        """Every run's fresh environment before the request adds its own."""
        env = {**RUN_ENV, **self.jail.preload_env}
        node = self.runtimes.get("nodejs")
        modules = [p for p in (node.paths if node else ()) if os.path.basename(p.rstrip("/")) == "node_modules"]
        if modules:
            env["NODE_PATH"] = ":".join(modules)  # node_modules directories of runtimes.nodejs.paths
        return env

    def server_identity(self, layer: EnvLayer | None = None) -> tuple[object, ...]:
        """What a fork server is started from: a change needs a new one."""
        return (self.root.python, self.python_path(layer), self.preload(layer), self.warmup(layer),
                self.jail.preload_env, dict(self.profiles))


DEFAULT_ENVIRONMENT = "default"  # the environment python3 runs get unless they ask
DIST_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's, for system_site_packages


def pool_key(filter_key: str, environment: str) -> str:
    """The pool of a filter key in a stack: the base root's (``""``) or an environment's."""
    return f"{filter_key}@{environment}" if environment else filter_key


def environment_of(key: str) -> str:
    return key.split("@", 1)[1] if "@" in key else ""


def layer_paths(layer: EnvLayer | None) -> tuple[str, ...]:
    if layer is None:
        return ()
    return (layer.site, DIST_PACKAGES) if layer.system_site_packages else (layer.site,)
