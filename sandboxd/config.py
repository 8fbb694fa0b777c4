"""Settings, declared once: name, type, default, converter and one line of doc.

Each section is a frozen dataclass whose fields carry their converter and doc in
``metadata``; the loader, ``sandboxctl check-config``, the shipped YAML and the man
page ``sandboxd.yaml(5)`` all read these declarations.  Errors name the file, the key
and the expected form::

    /etc/sandboxd/sandboxd.yaml: quotas.default.max_memory: expected a size like 256M, 1G
    or a number of bytes, got 'lots'
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import sizes
from .hints import did_you_mean
from .jail.layout import FORBIDDEN_PREFIXES, forbidden_prefix, under

DEFAULT_CONFIG = "/etc/sandboxd/sandboxd.yaml"
LANGUAGES = ("python3", "nodejs")
ALIASES = {"javascript": "nodejs"}  # other names a request may give a language by


def setting(default: Any, convert: Callable[[Any], Any], doc: str) -> Any:
    meta = {"convert": convert, "doc": doc}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"
DEFAULT_ROOT_PATHS = (
    "/usr/bin/python3",
    f"/usr/bin/python{PYVER}",
    f"/usr/lib/python{PYVER}",
    "/etc/ssl/certs",
    "/usr/share/ca-certificates",
    "/usr/lib/ssl",
    "/etc/ssl/openssl.cnf",
    "/usr/share/zoneinfo",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    # Dify's template node renders with jinja2 (Debian's python3-jinja2 and python3-markupsafe): the
    # interpreter's own sys.path has /usr/lib/python3/dist-packages, so runs import them as on the host.
    "/usr/lib/python3/dist-packages/jinja2",
    "/usr/lib/python3/dist-packages/markupsafe",
)
SCRATCH_PATHS = ("/work", "/var/tmp", "/dev/shm")  # in every run, its own scratch space covers these
DEFAULT_ROOT_EXCLUDE = tuple(
    f"/usr/lib/python{PYVER}/{sub}"
    for sub in ("test", "config-*", "dist-packages", "idlelib", "tkinter", "turtledemo", "ensurepip",
                "lib2to3/tests", "unittest/test", "distutils/tests")
)


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
class RootSettings:
    python: str = setting("/usr/bin/python3", sizes.abs_path,
                          "Interpreter the jail runs (and the fork server runs on); must be in paths.")
    paths: tuple[str, ...] = setting(DEFAULT_ROOT_PATHS, sizes.path_list,
                                     "Host paths that appear at the same place inside the root. Nothing "
                                     f"under {', '.join(FORBIDDEN_PREFIXES)}.")
    extra_paths: tuple[str, ...] = setting((), sizes.path_list,
                                           "More paths, added to paths (site-packages dirs...). Libraries "
                                           "their ELF files need are found and added automatically.")
    exclude: tuple[str, ...] = setting(DEFAULT_ROOT_EXCLUDE, sizes.pattern_list,
                                       "Glob patterns of paths left out of the root.")
    python_path: tuple[str, ...] = setting((), sizes.path_list,
                                           "Extra sys.path entries for runs (each must be under a root path).")
    hard_links: bool = setting(False, sizes.boolean,
                               "Hard-link the host's files into the root instead of copying them: builds are "
                               "faster and take no space, but runs then share the host's inodes (a run's read "
                               "lock on such a file meets a host process's lock; its page cache is the host's).")


@dataclass(frozen=True)
class JailConfig:
    run_uids: tuple[int, int] = setting((880000, 1024), sizes.uid_range,
                                        "uid/gid range for runs, low-high; no user or group may use it.")
    hostname: str = setting("sandbox", sizes.text, "Host name inside the jail.")
    scratch_size: int = setting(64 << 20, sizes.byte_size, "tmpfs size of a run's /work, /tmp and /dev/shm.")
    scratch_inodes: int = setting(4096, sizes.int_range(64, 10**7), "Inode cap of that tmpfs.")
    cgroup: str = setting("auto", sizes.choice("auto", "cgroup2", "cgroup1", "none"),
                          "cgroup driver; auto prefers a delegated v2 subtree, then v1, then rlimits only.")
    cgroup_parent: str = setting("sandboxd", sizes.text, "Name of the parent of worker cgroups.")
    cgroup_favordynmods: bool = setting(
        True, sizes.boolean, "Remount cgroup2 with favordynmods (Linux 6.0+): a worker joins its cgroup in "
        "0.2 ms instead of 5 ms; fork/exit get slightly dearer host-wide. Global, so off leaves the mount alone.")
    cpus: float = setting(1.0, sizes.float_range(0.01, 1024.0), "CPU bandwidth of one run, in CPUs.")
    address_space_slack: int = setting(4 << 30, sizes.byte_size,
                                       "RLIMIT_AS = interpreter size + memory limit + this (0 fails fast).")
    preload: tuple[str, ...] = setting((), sizes.name_list,
                                       "Modules imported once in the fork server (administrator only).")
    warmup: str = setting("", sizes.python_code,
                          "Python run once in the fork server after preload, before its image is frozen "
                          "(administrator only, as root): first calls whose setup every run would otherwise "
                          "redo, e.g. numpy.linalg.det(numpy.eye(3)). Its output is discarded; an error is "
                          "logged like a failed preload.")
    preload_env: dict[str, str] = setting(
        {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, sizes.str_map,
        "Environment for preloading and runs (keeps BLAS single-threaded so the fork server stays so).")
    build_uid: int = setting(879999, sizes.int_range(1, 2**31 - 2),
                             "uid and gid environment builds run as (pip runs package code): no user or group may "
                             "use it, and it is not a run uid.")
    build_timeout: float = setting(900.0, sizes.duration, "Longest an environment build may take.")
    build_memory: int = setting(4 << 30, sizes.byte_size, "Address space of an environment build's processes.")


@dataclass(frozen=True)
class NetworkSettings:
    pool: str = setting("10.231.0.0/16", sizes.cidr,
                        "IPv4 range the interfaces of runs with network take addresses from, four per run; it must "
                        "not overlap a network of the host, and each daemon needs its own.")
    allow: tuple[str, ...] = setting((), sizes.cidr_list,
                                     "Destinations opened even where the default deny covers them, e.g. an internal "
                                     "API: [10.1.2.3/32].")
    deny: tuple[str, ...] = setting((), sizes.cidr_list,
                                    "More destinations refused, on top of the default deny: loopback, the host's own "
                                    "addresses, RFC 1918, CGNAT, link-local, multicast, reserved, and their IPv6 "
                                    "equivalents.")
    dns: tuple[str, ...] = setting(("host",), sizes.resolvers,
                                   "Resolvers of runs with network (the root's /etc/resolv.conf): host for the host's "
                                   "own that runs may reach, or a list of addresses, each an allowed destination.")
    proxy: str = setting("", sizes.url, "HTTP_PROXY and HTTPS_PROXY of runs with network (an allowed destination), "
                         "e.g. http://10.0.0.9:3128; empty for none.")
    no_proxy: str = setting("", sizes.optional_text, "NO_PROXY of runs with network.")


@dataclass(frozen=True)
class PoolSettings:
    min: int = setting(2, sizes.int_range(0, 1024), "Ready workers kept per profile (with and without network).")
    max: int = setting(8, sizes.int_range(0, 4096), "Most ready workers per profile under load.")


@dataclass(frozen=True)
class LimitsSettings:
    timeout: float = setting(5.0, sizes.duration, "Wall-clock limit of a run that does not ask for one.")
    memory: int = setting(256 << 20, sizes.byte_size, "Memory limit of a run that does not ask for one.")
    output: int = setting(1 << 20, sizes.byte_size, "stdout and stderr cap each, unless the run asks for less.")
    pids: int = setting(64, sizes.int_range(2, 100000), "Processes and threads a run may have.")
    nofile: int = setting(256, sizes.int_range(16, 1 << 20), "Open files a process may have.")
    file_size: int = setting(16 << 20, sizes.byte_size, "Largest file a run may write (RLIMIT_FSIZE).")
    out_files: int = setting(64, sizes.int_range(0, 100000), "Most files returned from the run's out/ folder.")
    out_files_size: int = setting(8 << 20, sizes.byte_size, "Most bytes returned from out/, all files.")


@dataclass(frozen=True)
class QuotaLimits:
    concurrent: int = setting(4, sizes.int_range(1, 100000), "Runs of this caller executing at once.")
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
class ProfileSettings:
    allow: tuple[str, ...] = setting((), sizes.name_list, "Syscalls added to the built-in allowlist.")
    deny: tuple[str, ...] = setting((), sizes.name_list, "Syscalls removed from it (refused and reported).")
    errno: dict[str, int] = setting({}, sizes.errno_map,
                                    "Syscalls refused silently with this errno, e.g. {clone3: ENOSYS}.")


@dataclass(frozen=True)
class RuntimeSettings:
    enabled: str = setting("yes", sizes.tristate, "true, false, or auto: when the interpreter is installed here.")
    interpreter: str = setting("", sizes.optional_text,
                               "The runtime's interpreter, an absolute path; empty for root.python (python3).")
    paths: tuple[str, ...] = setting((), sizes.path_list,
                                     "More host paths for the root: the runtime's own files (its libraries are "
                                     "found and added automatically).")
    start: str = setting("fork", sizes.choice("fork", "exec"),
                         "How a warm worker starts: fork (a copy of the fork server's interpreter; python3) or "
                         "exec (the interpreter is started in the confined worker, then waits; nodejs).")
    flags: tuple[str, ...] = setting((), sizes.flag_list, "Extra command-line flags of the interpreter (exec).")
    heap_fraction: float = setting(0.75, sizes.float_range(0.1, 0.95),
                                   "nodejs: V8's heap limit as a fraction of the run's memory, so that a heap "
                                   "blow-up fails inside V8 (memory_limit) before the kernel kills it.")
    pool_min: int = setting(-1, sizes.int_range(-1, 1024), "Ready workers kept of this runtime; -1: pool.min.")
    pool_max: int = setting(-1, sizes.int_range(-1, 4096), "Most ready workers of this runtime; -1: pool.max.")
    available: bool = True  # resolved at load: enabled, and the interpreter is on this host
    why_not: str = ""


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
    preload: tuple[str, ...] = setting((), sizes.name_list,
                                       "Modules imported once in the environment's fork server, as jail.preload.")
    warmup: str = setting("", sizes.python_code, "Python run once in the environment's fork server after its "
                          "preload, as jail.warmup.")


# Each runtime's defaults, over RuntimeSettings': Python forks from the fork server, Node is
# exec'd inside a confined worker (V8 runs threads: it cannot be forked once started).
RUNTIME_DEFAULTS: dict[str, dict[str, Any]] = {
    "python3": {},
    "nodejs": {"enabled": "auto", "interpreter": "/usr/bin/node", "start": "exec", "pool_min": 1, "pool_max": 4},
}
START = {"python3": "fork", "nodejs": "exec"}  # what each language's bootstrap supports


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


class ConfigError(Exception):
    """The file's errors: ``errors`` as "key: message" strings, ``located`` as records with
    the file, key, line and column (1-based; None where the file does not say)."""

    def __init__(self, path: str, errors: list[str], text: str | None = None,
                 mark: tuple[int, int] | None = None) -> None:
        self.path = path
        self.errors = errors
        self.located = locate(path, errors, text, mark)
        super().__init__("\n".join(_where(e) + e["message"] if not e["key"] else
                                   f"{_where(e)}{e['key']}: {e['message']}" for e in self.located))


def _where(e: dict[str, Any]) -> str:
    return f"{e['file']}:{e['line']}:{e['column']}: " if e["line"] else f"{e['file']}: "


def locate(path: str, errors: list[str], text: str | None,
           mark: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Each "key.path: message" error with where the key is written in ``text``."""
    positions = _key_positions(text) if text is not None and mark is None else {}
    out = []
    for error in errors:
        key, sep, message = error.partition(": ")
        if not sep or " " in key:
            key, message = "", error
        line, column = mark or (None, None)
        parts = key.split(".") if key else []
        for n in range(len(parts), 0, -1):  # the deepest key the file has (a missing one: its parent)
            found = positions.get(tuple(parts[:n]))
            if found:
                line, column = found
                break
        out.append({"file": path, "key": key or None, "line": line, "column": column, "message": message})
    return out


def _key_positions(text: str) -> dict[tuple[str, ...], tuple[int, int]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    found: dict[tuple[str, ...], tuple[int, int]] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    here = (*prefix, str(key.value))
                    found[here] = (key.start_mark.line + 1, key.start_mark.column + 1)
                    walk(value, here)

    walk(root, ())
    return found


def declared(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if "convert" in f.metadata]


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _convert_section(cls: type[Any], raw: Any, prefix: str, errors: list[str], partial: bool = False) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(f"{prefix}: expected a mapping of settings, got {raw!r}")
        return {}
    fields = {f.name: f for f in declared(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            errors.append(f"{prefix}.{key}: unknown setting" + did_you_mean(str(key), fields))
            continue
        try:
            out[key] = fields[key].metadata["convert"](value)
        except ValueError as e:
            errors.append(f"{prefix}.{key}: expected {e}, got {value!r}")
    return out


def parse(data: Any, path: str = "<config>") -> Config:
    """Validate a loaded YAML document; raise ``ConfigError`` listing every problem."""
    errors: list[str] = []
    warnings: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, ["expected a mapping of sections at the top level"])
    known = {*SECTIONS, "quotas", "profiles", "runtimes", "environments"}
    for key in data:
        if key not in known:
            errors.append(f"{key}: unknown section" + did_you_mean(str(key), sorted(known)))
    sections = {name: cls(**_convert_section(cls, data.get(name), name, errors)) for name, cls in SECTIONS.items()}
    quotas = _parse_quotas(data.get("quotas"), errors)
    profiles = _parse_profiles(data.get("profiles"), errors)
    runtimes = _parse_runtimes(data.get("runtimes"), sections["root"], errors, warnings)
    environments = _parse_environments(data.get("environments"), errors)
    cfg = Config(path=path, quotas=quotas, profiles=profiles, runtimes=runtimes, environments=environments,
                 **sections)
    _cross_checks(cfg, errors, warnings)
    if errors:
        raise ConfigError(path, errors)
    return dataclasses.replace(cfg, warnings=tuple(warnings))


def _parse_quotas(raw: Any, errors: list[str]) -> QuotaPolicy:
    if raw is None:
        return QuotaPolicy()
    if not isinstance(raw, dict):
        errors.append(f"quotas: expected a mapping, got {raw!r}")
        return QuotaPolicy()
    for key in raw:
        if key not in ("default", "users", "groups", "deny_unlisted"):
            errors.append(f"quotas.{key}: unknown setting (expected default, users, groups or deny_unlisted)")
    default = QuotaLimits(**_convert_section(QuotaLimits, raw.get("default"), "quotas.default", errors))
    tables: dict[str, dict[str, Mapping[str, Any]]] = {}
    for table in ("users", "groups"):
        entries = raw.get(table) or {}
        if not isinstance(entries, dict):
            errors.append(f"quotas.{table}: expected a mapping of names (or numeric ids) to limits")
            entries = {}
        tables[table] = {str(name): _convert_section(QuotaLimits, limits, f"quotas.{table}.{name}", errors)
                         for name, limits in entries.items()}
    deny = raw.get("deny_unlisted", False)
    if not isinstance(deny, bool):
        errors.append(f"quotas.deny_unlisted: expected true or false, got {deny!r}")
        deny = False
    return QuotaPolicy(default, tables["users"], tables["groups"], deny)


def _parse_runtimes(raw: Any, root: RootSettings, errors: list[str],
                    warnings: list[str]) -> dict[str, RuntimeSettings]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append("runtimes: expected a mapping of language names to runtimes")
        raw = {}
    for name in raw:
        if name not in LANGUAGES:
            errors.append(f"runtimes.{name}: unknown language (known: {', '.join(LANGUAGES)}; a language needs a "
                          "bootstrap of sandboxd's own)")
    out: dict[str, RuntimeSettings] = {}
    for lang in LANGUAGES:
        given = _convert_section(RuntimeSettings, raw.get(lang), f"runtimes.{lang}", errors)
        rt = RuntimeSettings(**{**RUNTIME_DEFAULTS[lang], **given})
        key = f"runtimes.{lang}"
        if rt.start != START[lang]:
            errors.append(f"{key}.start: {lang} workers start by {START[lang]}, got {rt.start}")
        interpreter = rt.interpreter or (root.python if lang == "python3" else "")
        if not interpreter.startswith("/"):
            errors.append(f"{key}.interpreter: expected an absolute path, got {rt.interpreter!r}")
            interpreter = "/"
        available, why_not = rt.enabled != "no", "" if rt.enabled != "no" else f"{key}.enabled is false"
        if available and rt.enabled == "auto" and not os.path.exists(interpreter):
            available, why_not = False, f"{interpreter} is not installed on this host"
            warnings.append(f"{key}: {why_not}: {lang} runs are refused (install it and reload to have them)")
        out[lang] = dataclasses.replace(rt, interpreter=interpreter, available=available, why_not=why_not)
    return out


def _parse_environments(raw: Any, errors: list[str]) -> dict[str, EnvironmentSettings]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append("environments: expected a mapping of environment names to environments")
        return {}
    out = {}
    for name, body in raw.items():
        if not isinstance(name, str) or not sizes.ENVIRONMENT_NAME.fullmatch(name):
            errors.append(f"environments.{name}: a name is 1-32 of a-z, 0-9, '_' and '-', starting with a letter "
                          "or digit")
            continue
        given = _convert_section(EnvironmentSettings, body, f"environments.{name}", errors)
        env = EnvironmentSettings(**given)
        if not env.requirements:
            errors.append(f"environments.{name}.requirements: an environment installs at least one requirement")
        if not env.index_url and not env.extra_index_urls and not env.find_links:
            errors.append(f"environments.{name}: pip needs somewhere to get packages: index_url, extra_index_urls "
                          "or find_links")
        out[name] = env
    return out


def environments_dir(cfg: Config, state_dir: str | None = None) -> str:
    """Where built environments live (daemon.environments_dir, else under the state directory)."""
    return cfg.daemon.environments_dir or os.path.join(state_dir or cfg.daemon.state_dir, "environments")


def _parse_profiles(raw: Any, errors: list[str]) -> dict[str, ProfileSettings]:
    profiles = {lang: ProfileSettings() for lang in LANGUAGES}
    if raw is None:
        return profiles
    if not isinstance(raw, dict):
        errors.append("profiles: expected a mapping of language names to profiles")
        return profiles
    for name, body in raw.items():
        if name not in LANGUAGES:
            errors.append(f"profiles.{name}: unknown language (known: {', '.join(LANGUAGES)})")
            continue
        profiles[name] = ProfileSettings(**_convert_section(ProfileSettings, body, f"profiles.{name}", errors))
    return profiles


def _cross_checks(cfg: Config, errors: list[str], warnings: list[str]) -> None:
    from .jail.seccomp import unknown_syscalls

    all_paths = (*cfg.root.paths, *cfg.root.extra_paths)
    for key, paths in (("root.paths", cfg.root.paths), ("root.extra_paths", cfg.root.extra_paths)):
        for p in paths:
            if prefix := forbidden_prefix(os.path.normpath(p)):
                errors.append(f"{key}: {p} is under {prefix}, which never goes into a root (users', the "
                              f"system's or the daemon's private files); put the libraries elsewhere, e.g. /opt")
    if not any(under(cfg.root.python, p) for p in all_paths):
        errors.append(f"root.python: {cfg.root.python} is not under any of root.paths / root.extra_paths")
    for p in cfg.root.python_path:
        inside = any(under(p, q) or under(q, p) for q in all_paths)
        if not inside:
            errors.append(f"root.python_path: {p} holds nothing of root.paths / root.extra_paths")
    if cfg.pool.min > cfg.pool.max:
        errors.append(f"pool.min: expected at most pool.max ({cfg.pool.max}), got {cfg.pool.min}")
    first, count = cfg.jail.run_uids
    pooled = sum(rt.pool_max if rt.pool_max >= 0 else cfg.pool.max for rt in cfg.runtimes.values() if rt.available)
    needed = cfg.daemon.workers + 2 * pooled + 2
    if count < needed:
        errors.append(f"jail.run_uids: expected at least {needed} uids (workers + 2 x the pooled workers of each "
                      f"runtime, +2), got {count}")
    for name, prof in cfg.profiles.items():
        for key, names in (("allow", prof.allow), ("deny", prof.deny), ("errno", tuple(prof.errno))):
            bad = unknown_syscalls(names)
            if bad:
                errors.append(f"profiles.{name}.{key}: unknown system call(s) {', '.join(bad)}")
    for table, entries in (("users", cfg.quotas.users), ("groups", cfg.quotas.groups)):
        for name in entries:
            if not name.isdigit() and not _exists(table, name):
                warnings.append(f"quotas.{table}.{name}: no such {table[:-1]} on this host (entry unused)")
    _network_checks(cfg, errors, warnings)
    _environment_checks(cfg, errors, warnings)
    if cfg.limits.timeout > cfg.quotas.default.max_timeout:
        warnings.append("limits.timeout is above quotas.default.max_timeout; runs get the quota's maximum")


def _environment_checks(cfg: Config, errors: list[str], warnings: list[str]) -> None:
    first, count = cfg.jail.run_uids
    if first <= cfg.jail.build_uid < first + count:
        errors.append(f"jail.build_uid: {cfg.jail.build_uid} is one of jail.run_uids: builds and runs must never "
                      "share a uid")
    where = environments_dir(cfg)
    if cfg.daemon.environments_dir and not cfg.daemon.environments_dir.startswith("/"):
        errors.append(f"daemon.environments_dir: expected an absolute path, got {cfg.daemon.environments_dir!r}")
    elif cfg.environments and (prefix := forbidden_prefix(os.path.normpath(where)) or next(
            (p for p in SCRATCH_PATHS if under(os.path.normpath(where), p)), None)):
        errors.append(f"daemon.environments_dir: {where} is under {prefix}; environments go into roots at the same "
                      "path, and nothing there ever does (or a run's scratch space covers it there): set it elsewhere, "
                      "e.g. /var/lib/sandboxd/environments")
    for table, entries in (("users", cfg.quotas.users), ("groups", cfg.quotas.groups), ("", {"default": {
            "environments": cfg.quotas.default.environments}})):
        for name, limits in entries.items():
            for env in limits.get("environments", ()):
                if env != "*" and env not in cfg.environments:
                    key = f"quotas.{table}.{name}" if table else "quotas.default"
                    warnings.append(f"{key}.environments: {env} is not one of environments (entry unused)")


def _network_checks(cfg: Config, errors: list[str], warnings: list[str]) -> None:
    import ipaddress
    import urllib.parse

    from .jail.netpolicy import Policy

    net = cfg.network
    pool = ipaddress.ip_network(net.pool)
    if pool.version != 4:
        errors.append(f"network.pool: expected an IPv4 network, got {net.pool}")
    elif pool.num_addresses // 4 < cfg.jail.run_uids[1]:
        errors.append(f"network.pool: {net.pool} has room for {pool.num_addresses // 4} runs (4 addresses each), "
                      f"fewer than jail.run_uids ({cfg.jail.run_uids[1]}); give it at least "
                      f"/{32 - (4 * cfg.jail.run_uids[1] - 1).bit_length()}")
    policy = Policy(net.allow, net.deny)
    for server in net.dns:
        if server != "host" and (why := policy.refusal(server)):
            errors.append(f"network.dns: runs may not reach {server} ({why}); add it to network.allow or use a "
                          "resolver they may reach")
    if net.proxy:
        host = urllib.parse.urlsplit(net.proxy).hostname or ""
        try:
            why = policy.refusal(host)
        except ValueError:
            why = None  # a name: resolved when runs use it
        if why:
            errors.append(f"network.proxy: runs may not reach {host} ({why}); add it to network.allow")


def _exists(table: str, name: str) -> bool:
    try:
        if table == "users":
            pwd.getpwnam(name)
        else:
            grp.getgrnam(name)
        return True
    except KeyError:
        return False


def load(path: str = DEFAULT_CONFIG) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        m = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        raise ConfigError(path, [f"not valid YAML: {problem}" + (f" ({context})" if context else "")], text,
                          (m.line + 1, m.column + 1) if m is not None else None) from None
    ambiguous = _decimal_modes(text)
    try:
        cfg = parse(data, os.path.abspath(path))
    except ConfigError as e:
        raise ConfigError(e.path, [*ambiguous, *e.errors], text) from None
    if ambiguous:
        raise ConfigError(os.path.abspath(path), ambiguous, text)
    return cfg


MODE_KEYS = (("daemon", "socket_mode"),)


def _decimal_modes(text: str) -> list[str]:
    """Modes written as unquoted decimal digits (660): YAML reads them as decimal numbers,
    not the octal the digits look like (0660 and 0o660 are octal to it)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    out = []
    for section, key in MODE_KEYS:
        node = _child(_child(root, section), key)
        if isinstance(node, yaml.ScalarNode) and node.style is None and re.fullmatch(r"[1-9][0-9]*", node.value):
            out.append(f'{section}.{key}: {node.value} unquoted is the decimal number {node.value} to YAML, '
                       f'not the octal mode it looks like: write "0{node.value}" (quoted)')
    return out


def _child(node: Any, key: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


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
