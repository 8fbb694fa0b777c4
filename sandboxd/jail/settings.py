"""The jail's view of the configuration: the config's own sections, and what quotas imply.

Nothing is re-declared here: the settings, their defaults and their docs live once in
``sandboxd.config``.  What the jail adds is derived: the ceilings every pooled worker
starts with (the most any caller may ask for), the filter keys, the generated files of
the root and the fork server's environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Config, JailConfig, LimitsSettings, NetworkSettings, PoolSettings, RootSettings, all_quota_maxima
from . import netpolicy, rootfs
from .seccomp import Profile

RUN_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/work",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
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
    root_dir: str | None = None  # default: <state_dir>/roots

    @classmethod
    def from_config(cls, cfg: Config, state_dir: str) -> JailSettings:
        maxima = all_quota_maxima(cfg.quotas)
        profiles = {lang: Profile(lang).extended(lang, p.allow, p.deny, p.errno) for lang, p in cfg.profiles.items()}
        return cls(state_dir=state_dir, root=cfg.root, jail=cfg.jail, pool=cfg.pool, limits=cfg.limits,
                   profiles=profiles, max_memory=max(maxima.max_memory, cfg.limits.memory),
                   max_cpu_ms=int(max(maxima.max_timeout, cfg.limits.timeout) * 1000),
                   network=cfg.network, network_enabled=maxima.network)

    @property
    def root_paths(self) -> tuple[str, ...]:
        return (*self.root.paths, *self.root.extra_paths)

    def filter_key(self, language: str, network: bool) -> str:
        return f"{language}+net" if network else language

    def filter_keys(self) -> list[str]:
        nets = (False, True) if self.network_enabled else (False,)
        return [self.filter_key(lang, net) for lang in self.profiles for net in nets]

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

    def root_spec(self) -> rootfs.RootSpec:
        return rootfs.RootSpec(self.root_paths, self.root.exclude, self.generated_files(),
                               required=(self.root.python,), hard_links=self.root.hard_links)

    def generated_files(self) -> dict[str, bytes]:
        first, count = self.jail.run_uids
        passwd = ["root:x:0:0:root:/root:/usr/sbin/nologin",
                  "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"]
        group = ["root:x:0:", "nogroup:x:65534:"]
        for i in range(count):
            uid = first + i
            passwd.append(f"run{i}:x:{uid}:{uid}:sandboxd run:/work:/usr/sbin/nologin")
            group.append(f"run{i}:x:{uid}:")
        return {"etc/passwd": ("\n".join(passwd) + "\n").encode(), "etc/group": ("\n".join(group) + "\n").encode(),
                "etc/hostname": (self.jail.hostname + "\n").encode(),
                "etc/resolv.conf": netpolicy.resolv_conf(self.resolvers())}

    def forkserver_env(self) -> dict[str, str]:
        """The fork server's own environment: what preloading needs, nothing of the daemon's."""
        return {"PATH": RUN_ENV["PATH"], "LANG": "C.UTF-8", **self.jail.preload_env}

    def run_env(self) -> dict[str, str]:
        """Every run's fresh environment before the request adds its own."""
        return {**RUN_ENV, **self.jail.preload_env}

    def server_identity(self) -> tuple[object, ...]:
        """What a fork server is started from: a change needs a new one."""
        return (self.root.python, self.root.python_path, self.jail.preload, self.jail.preload_env,
                dict(self.profiles))
