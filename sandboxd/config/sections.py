"""The daemon's own settings, declared once (``common.declare``), and the whole file as one
``Config``: the daemon's sections, the jail's (``jail.spec.sections``), quotas, profiles,
runtimes and environments."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..common import sizes
from ..common.declare import declared, setting
from ..jail.spec.runtimes import ALIASES, LANGUAGES
from ..jail.spec.sections import (
    JailConfig,
    LimitsSettings,
    NetworkSettings,
    PoolSettings,
    ProfileSettings,
    RootSettings,
    RuntimeSettings,
)

DEFAULT_CONFIG = "/etc/sandboxd/sandboxd.yaml"


@dataclass(frozen=True)
class DaemonSettings:
    socket: str = setting("/run/sandboxd/sandboxd.sock", sizes.abs_path, "Unix socket clients connect to.")
    socket_group: str = setting("sandboxd", sizes.optional_text,
                                "Group owning the socket (mode socket_mode); if it does not exist, root only.")
    socket_mode: int = setting(0o660, sizes.octal_mode, "Permissions of the socket, quoted octal.")
    state_dir: str = setting("/var/lib/sandboxd", sizes.abs_path,
                             "Where the root, the usage database and the pid file live.")
    environments_dir: str = setting("", sizes.optional_text,
                                    "Where built environments are kept (their site-packages go into roots at the "
                                    "same path, so not under /tmp or /home); empty: <state_dir>/environments.")
    pid_file: str = setting("/run/sandboxd/sandboxd.pid", sizes.abs_path,
                            "Pid file written when the daemon detaches (without --foreground).")
    admin_group: str = setting("sandboxd-admin", sizes.optional_text,
                               "Members may use admin operations (root always may); empty for root only.")
    workers: int = setting(8, sizes.int_range(1, 4096), "Global capacity: runs executing at once.")
    queue: int = setting(64, sizes.int_range(0, 100000), "Runs that may wait for capacity; beyond that: busy.")
    queue_timeout: float = setting(30.0, sizes.duration, "Longest a run waits in the queue before busy.")
    environment_wait: float = setting(30.0, sizes.duration,
                                      "Longest a run or session waits for the first build of its environment (one "
                                      "that has never served) before unavailable; it then waits for a worker too.")
    reserved_workers: int = setting(2, sizes.int_range(0, 4096),
                                    "The last free workers, kept for callers below their fair share: a caller "
                                    "holding workers * its weight / (the weights of the callers running or "
                                    "waiting, plus one for a caller yet to come) or more does not take them. So "
                                    "one caller alone gets at most workers - this, and a newcomer starts at once "
                                    "while others hold the rest (at most workers - 1 are ever kept).")
    sessions: int = setting(64, sizes.int_range(0, 100000),
                            "Sessions open at once, all callers (each holds a worker, a run uid and its memory); "
                            "beyond: busy.")
    max_frame: int = setting(16 << 20, sizes.byte_size, "Largest request frame accepted.")
    max_connections: int = setting(1024, sizes.int_range(1, 1000000), "Open client connections, all users.")
    max_connections_per_uid: int = setting(64, sizes.int_range(1, 100000), "Open client connections per caller uid.")
    buffer_budget: int = setting(256 << 20, sizes.byte_size,
                                 "Bytes of request frames the daemon holds at once, all connections (charged as "
                                 "they arrive; frames up to 64K are never held back by it).")
    buffer_budget_per_uid: int = setting(64 << 20, sizes.byte_size,
                                         "Bytes of request frames one caller uid may have the daemon hold at once.")
    response_budget: int = setting(512 << 20, sizes.byte_size,
                                   "Bytes of answers written but not yet taken, all connections; past it, callers "
                                   "with answers waiting get nothing more read until they take them.")
    response_budget_per_uid: int = setting(128 << 20, sizes.byte_size,
                                           "Bytes of answers not yet taken by one caller uid before the daemon stops "
                                           "reading its requests.")
    idle_timeout: float = setting(300.0, sizes.duration, "A connection without a request is closed after this.")
    read_timeout: float = setting(10.0, sizes.duration, "A started frame must be complete within this.")
    write_timeout: float = setting(30.0, sizes.duration, "A client must take its response within this.")
    shutdown_grace: float = setting(10.0, sizes.duration, "On SIGTERM, runs in flight get this long to finish.")
    self_test: bool = setting(True, sizes.boolean, "Probe the jail before reporting ready (refuse if it leaks).")
    log_level: str = setting("info", sizes.choice("debug", "info", "warning", "error"), "Log verbosity.")
    log_format: str = setting("text", sizes.choice("text", "json"),
                              "text (the journal's native fields under systemd, with python3-systemd), or json: "
                              "one JSON object a line on stderr.")


@dataclass(frozen=True)
class QuotaLimits:
    concurrent: int = setting(4, sizes.int_range(1, 100000), "Runs of this caller executing at once.")
    weight: float = setting(1.0, sizes.float_range(0.01, 1000.0),
                            "This caller's share of contended workers relative to others (daemon.reserved_workers; "
                            "the queue serves the caller with the fewest running runs per weight first).")
    queued: int = setting(16, sizes.int_range(0, 100000), "Runs of this caller waiting; beyond: quota_exceeded.")
    runs_per_minute: int = setting(600, sizes.int_range(0, 10**9), "Runs started per minute (0: no limit).")
    cpu_seconds_per_hour: float = setting(3600.0, sizes.float_range(0, 10**9),
                                          "CPU seconds used per rolling hour (0: no limit).")
    max_timeout: float = setting(60.0, sizes.duration, "Longest timeout_ms a run may ask for.")
    max_memory: int = setting(1 << 30, sizes.byte_size, "Most memory_mb a run may ask for.")
    max_output: int = setting(8 << 20, sizes.byte_size, "Most output per stream a run may ask for.")
    max_files_size: int = setting(16 << 20, sizes.byte_size, "Most bytes of input files (and of out/ files).")
    network: bool = setting(False, sizes.boolean, "Whether runs may ask for network access.")
    sessions: int = setting(4, sizes.int_range(0, 10000),
                            "Sessions this caller may have open at once (0: none); beyond: quota_exceeded.")
    max_session_memory: int = setting(512 << 20, sizes.byte_size, "Most memory_mb a session may ask for.")
    max_session_idle: float = setting(600.0, sizes.duration,
                                      "Longest idle_timeout_ms a session may ask for, and its default: a session "
                                      "without an exec for that long is closed.")
    max_session_lifetime: float = setting(3600.0, sizes.duration,
                                          "Longest max_lifetime_ms a session may ask for, and its default.")
    environments: tuple[str, ...] = setting(("*",), sizes.environment_names,
                                            "Environments this caller's runs and sessions may ask for; * for all.")


@dataclass(frozen=True)
class EnvironmentSettings:
    requirements: tuple[str, ...] = setting((), sizes.requirement_list,
                                            "What pip installs, one requirement an item in pip's syntax (pins "
                                            "encouraged: numpy==1.26.4); options are the keys below, not items.")
    index_url: str = setting("", sizes.index_url,
                             "The package index (a PEP 503 simple index), e.g. https://pypi.org/simple; null: none.")
    extra_index_urls: tuple[str, ...] = setting((), sizes.url_list, "More indexes pip may use.")
    find_links: tuple[str, ...] = setting((), sizes.path_list,
                                          "Local directories of wheels (a wheelhouse), for hosts without an index.")
    only_binary: bool = setting(True, sizes.boolean,
                                "Wheels only; false lets pip build source distributions, inside the build jail.")
    system_site_packages: bool = setting(False, sizes.boolean,
                                         "Whether the host's Debian dist-packages are visible to the environment's "
                                         "runs (pip then installs only what they lack).")
    preload: tuple[str, ...] = setting(
        (), sizes.name_list, "Modules each worker of the environment imports itself, confined as its run is, "
        "while it waits in the pool: package code never runs in a fork server (it runs as root). Costs each "
        "worker the import's CPU and memory.")
    warmup: str = setting("", sizes.python_code, "Python each worker of the environment runs after its preload, "
                          "confined, as jail.warmup.")


@dataclass(frozen=True)
class QuotaPolicy:
    default: QuotaLimits = field(default_factory=QuotaLimits)
    users: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # user name or uid -> overrides
    groups: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # group name or gid -> overrides
    deny_unlisted: bool = False


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    root: RootSettings = field(default_factory=RootSettings)
    jail: JailConfig = field(default_factory=JailConfig)
    pool: PoolSettings = field(default_factory=PoolSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    quotas: QuotaPolicy = field(default_factory=QuotaPolicy)
    profiles: Mapping[str, ProfileSettings] = field(default_factory=lambda: {lang: ProfileSettings()
                                                                             for lang in LANGUAGES})
    runtimes: Mapping[str, RuntimeSettings] = field(default_factory=dict)
    environments: Mapping[str, EnvironmentSettings] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def runtime(self, language: str) -> RuntimeSettings | None:
        """The runtime a request's language names (aliases too), if this daemon runs it."""
        rt = self.runtimes.get(ALIASES.get(language, language))
        return rt if rt is not None and rt.available else None


SECTIONS: dict[str, type[Any]] = {
    "daemon": DaemonSettings,
    "root": RootSettings,
    "jail": JailConfig,
    "pool": PoolSettings,
    "limits": LimitsSettings,
    "network": NetworkSettings,
}




def all_quota_maxima(policy: QuotaPolicy) -> QuotaLimits:
    """The most generous value of each limit across default, users and groups (jail ceilings)."""
    values: dict[str, Any] = {}
    for f in declared(QuotaLimits):
        candidates = [getattr(policy.default, f.name)]
        for table in (policy.users, policy.groups):
            candidates += [o[f.name] for o in table.values() if f.name in o]
        if isinstance(candidates[0], tuple):  # lists (environments): all their entries
            values[f.name] = tuple(dict.fromkeys(v for c in candidates for v in c))
        else:
            values[f.name] = max(candidates)
    return QuotaLimits(**values)
