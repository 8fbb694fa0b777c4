"""The jail's view of the configuration: the config's own sections, and what quotas imply.

Nothing is re-declared here: the settings, their defaults and their docs live once in
``sandboxd.config``.  What the jail adds is derived: the ceilings every pooled worker
starts with (the most any caller may ask for), the filter keys, the generated files of
the root and the fork server's environment.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..config import (
    Config,
    JailConfig,
    LimitsSettings,
    NetworkSettings,
    PoolSettings,
    RootSettings,
    RuntimeSettings,
    all_quota_maxima,
)
from . import netpolicy, rootfs
from .seccomp import BUILTIN, Profile
from .spec import EnvLayer

NODE_BOOTSTRAP = "usr/lib/sandboxd/nodejs-bootstrap.js"  # in the root (a generated file)
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

    @classmethod
    def from_config(cls, cfg: Config, state_dir: str) -> JailSettings:
        maxima = all_quota_maxima(cfg.quotas)
        profiles = {lang: BUILTIN[lang].extended(lang, p.allow, p.deny, p.errno) for lang, p in cfg.profiles.items()
                    if cfg.runtimes[lang].available}
        return cls(state_dir=state_dir, root=cfg.root, jail=cfg.jail, pool=cfg.pool, limits=cfg.limits,
                   profiles=profiles, max_memory=max(maxima.max_memory, cfg.limits.memory, maxima.max_session_memory),
                   max_cpu_ms=int(max(maxima.max_timeout, cfg.limits.timeout, maxima.max_session_lifetime) * 1000),
                   network=cfg.network, network_enabled=maxima.network,
                   runtimes={lang: rt for lang, rt in cfg.runtimes.items() if rt.available})

    @property
    def root_paths(self) -> tuple[str, ...]:
        extra = [p for lang, rt in self.runtimes.items() if lang != "python3" for p in (rt.interpreter, *rt.paths)]
        node = self.runtimes.get("nodejs")
        if node is not None:
            extra += node_shared_builtins(node.interpreter)
        return tuple(dict.fromkeys((*self.root.paths, *self.root.extra_paths, *extra)))

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

    def resolvers(self) -> list[str]:
        """The resolvers runs with network get: the configured ones, or the host's that they may reach."""
        if self.network.dns != ("host",):
            return list(self.network.dns)
        try:
            with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as f:
                found = netpolicy.resolvers_from(f.read())
        except OSError:
            found = []
        policy = netpolicy.Policy(self.network.allow, self.network.deny)
        return [server for server in found if policy.refusal(server) is None]

    def root_spec(self, layer: EnvLayer | None = None) -> rootfs.RootSpec:
        """The base root's spec, or with ``layer`` its environment's: the base root and the
        environment's site-packages (and Debian's dist-packages if it sees them)."""
        return rootfs.RootSpec((*self.root_paths, *layer_paths(layer)), self.root.exclude, self.generated_files(),
                               required=(self.root.python,), hard_links=self.root.hard_links)

    def python_path(self, layer: EnvLayer | None = None) -> tuple[str, ...]:
        """sys.path entries of runs beyond the interpreter's own: an environment's site-packages
        first (its numpy, not the one root.python_path's dist-packages may hold), as in a venv."""
        return tuple(dict.fromkeys((*layer_paths(layer), *self.root.python_path)))

    def preload(self, layer: EnvLayer | None = None) -> tuple[str, ...]:
        return layer.preload if layer is not None else self.jail.preload

    def warmup(self, layer: EnvLayer | None = None) -> str:
        return layer.warmup if layer is not None else self.jail.warmup

    def generated_files(self) -> dict[str, bytes]:
        first, count = self.jail.run_uids
        passwd = ["root:x:0:0:root:/root:/usr/sbin/nologin",
                  "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"]
        group = ["root:x:0:", "nogroup:x:65534:"]
        for i in range(count):
            uid = first + i
            passwd.append(f"run{i}:x:{uid}:{uid}:sandboxd run:/work:/usr/sbin/nologin")
            group.append(f"run{i}:x:{uid}:")
        files = {"etc/passwd": ("\n".join(passwd) + "\n").encode(), "etc/group": ("\n".join(group) + "\n").encode(),
                 "etc/hostname": (self.jail.hostname + "\n").encode(),
                 "etc/resolv.conf": netpolicy.resolv_conf(self.resolvers())}
        if "nodejs" in self.runtimes:
            with open(os.path.join(os.path.dirname(__file__), "nodejs-bootstrap.js"), "rb") as f:
                files[NODE_BOOTSTRAP] = f.read()
        return files

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


@functools.lru_cache(maxsize=4)
def node_shared_builtins(interpreter: str) -> tuple[str, ...]:
    """The JavaScript files a node built with shared builtins loads at start, outside its own
    binary (Debian's nodejs: acorn, cjs-module-lexer, undici under /usr/share/nodejs): without
    them in the root it aborts before running anything.  Its build configuration names them
    (NODE_SHARED_BUILTIN_*_PATH); a node that has none (nodesource's, upstream's) gives ()."""
    try:
        out = subprocess.run([interpreter, "-e", "console.log(JSON.stringify(process.config))"], capture_output=True,
                             timeout=20, env={"PATH": "/usr/bin:/bin"}, check=True).stdout
        defines = json.loads(out).get("target_defaults", {}).get("defines", [])
    except (OSError, subprocess.SubprocessError, ValueError, AttributeError):
        return ()
    files = []
    for define in defines if isinstance(defines, list) else []:
        m = re.fullmatch(r"NODE_SHARED_BUILTIN_\w+_PATH=(/.+)", str(define))
        if m and os.path.isfile(m.group(1)):
            files.append(m.group(1))
            real = os.path.realpath(m.group(1))
            if real != m.group(1):
                files.append(real)  # a link into another package's directory: its target too
    return tuple(dict.fromkeys(files))
