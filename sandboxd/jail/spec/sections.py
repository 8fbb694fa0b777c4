"""The jail's settings, declared once (``common.declare``): what goes into the root, how a
run is confined, the pools, a run's default limits, the network of runs, the runtimes and
their syscall profiles.  ``sandboxd.config`` reads them from sandboxd.yaml with the
daemon's own sections; the jail derives what it needs from them (``spec.settings``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ...common import sizes
from ...common.declare import setting

# Never brought into a root, whatever the configuration says.
FORBIDDEN_PREFIXES = ("/proc", "/sys", "/dev", "/run", "/var/run", "/etc/sandboxd", "/root", "/home", "/tmp")


def under(path: str, top: str) -> bool:
    """``path`` is ``top`` or inside it (plain string paths, no link resolution)."""
    top = top.rstrip("/")
    return path == top or path.startswith(top + "/")


def forbidden_prefix(path: str) -> str | None:
    """The forbidden place ``path`` lies in, if any."""
    return next((prefix for prefix in FORBIDDEN_PREFIXES if under(path, prefix)), None)


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
    # dify-sandbox's image ships requests and httpx (code nodes call APIs with them when they have
    # network): Debian's python3-requests and python3-httpx, with what they import.
    *(f"/usr/lib/python3/dist-packages/{name}" for name in (
        "requests", "urllib3", "idna", "certifi", "charset_normalizer", "chardet", "six.py",
        "httpx", "httpcore", "h11", "anyio", "sniffio", "rfc3986")),
)
SCRATCH_PATHS = ("/work", "/var/tmp", "/dev/shm")  # in every run, its own scratch space covers these
DEFAULT_ROOT_EXCLUDE = tuple(
    f"/usr/lib/python{PYVER}/{sub}"
    for sub in ("test", "config-*", "dist-packages", "idlelib", "tkinter", "turtledemo", "ensurepip",
                "lib2to3/tests", "unittest/test", "distutils/tests")
)


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
    session_idle_cpus: float = setting(0.05, sizes.float_range(0.01, 1024.0),
                                       "CPU bandwidth of a session between its execs (threads and timers it left "
                                       "running), in CPUs, at the lowest weight; what it uses is charged to its "
                                       "owner.")
    address_space_slack: int = setting(4 << 30, sizes.byte_size,
                                       "RLIMIT_AS = interpreter size + memory limit + this (0 fails fast).")
    preload: tuple[str, ...] = setting(
        (), sizes.name_list,
        "Modules imported before the runs (administrator only): once in the fork server, shared by every "
        "worker, when the module comes from the interpreter's own directories (the standard library, "
        "Debian's dist-packages: writable by root alone); otherwise by each worker itself, confined as its "
        "run is, while it waits in the pool (no code from an operator-added directory runs as root).")
    warmup: str = setting("", sizes.python_code,
                          "Python run once after preload, in the fork server before its image is frozen when "
                          "every preload module is shared (then with only the trusted directories on sys.path), "
                          "else in each worker after its own preload: first calls whose setup every run would "
                          "otherwise redo, e.g. numpy.linalg.det(numpy.eye(3)). Its output is discarded; an "
                          "error is logged like a failed preload.")
    preload_env: dict[str, str] = setting(
        {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, sizes.str_map,
        "Environment for preloading and runs (keeps BLAS single-threaded so the fork server stays so).")
    build_uid: int = setting(879999, sizes.int_range(1, 2**31 - 2),
                             "uid and gid environment builds run as (pip runs package code): no user or group may "
                             "use it, and it is not a run uid.")
    build_timeout: float = setting(900.0, sizes.duration, "Longest an environment build may take.")
    build_memory: int = setting(4 << 30, sizes.byte_size,
                                "Address space (RLIMIT_AS) of each process of an environment build.")
    build_memory_max: int = setting(
        2 << 30, sizes.byte_size, "Memory of an environment build as a whole, swap off, in a cgroup of its own "
        "(its processes and the files it writes in its /tmp, a tmpfs): a build that reaches it is killed and "
        "fails saying so. Without cgroups (jail.cgroup: none) only build_memory applies.")
    build_pids: int = setting(512, sizes.int_range(16, 100000),
                              "Processes and threads an environment build may have at once (its cgroup's pids.max).")


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
    max_connections_per_run: int = setting(
        512, sizes.int_range(1, 1 << 20),
        "Connections (conntrack entries: TCP, UDP flows, ICMP) one run with network may have at once in the "
        "host's table, which the host's own traffic shares; new ones past it are refused. A run's entries are "
        "deleted when its address is given back.")


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


