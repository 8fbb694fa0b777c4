"""The build jail: pip installs an environment as an unprivileged uid in namespaces of its own.

``buildjail.main([SPEC.json])`` (started by ``run.build`` through the launcher, as root) joins
the build's own cgroup (memory and pids limits, made by the daemon), then makes a new
mount, pid, IPC, UTS and network namespace (an empty one, or the one the daemon made
ready for a build that reaches an index through the runs' egress policy), then its
steps, in order:

    mounts -> root -> credentials -> limits -> seccomp -> venv -> pip

``mounts`` builds a root on a tmpfs: the host's ``/usr`` (and the merged-/usr links)
read-only, a few files of ``/etc`` (certificates, the loader's cache, the
alternatives), a generated passwd/group, ``/dev`` with five nodes, ``/proc`` of the
new pid namespace, a ``/tmp`` of its own, the wheelhouses read-only and the new
environment's directory read-write -- nothing else of the host (no ``/home``, no
``/root``, no ``/var``, no state of the daemon).  ``root`` pivots into it.
``credentials`` become the build uid with no capabilities; ``limits`` set rlimits;
``seccomp`` refuses the kernel's attack surface (mounts, namespaces, ptrace,
keyrings, bpf, io_uring, modules...).  Then ``python3 -m venv`` and ``pip install``
run as child processes; pip's output is turned into progress lines.  Installing
packages runs their code (build backends, setup.py): here it runs as a uid that owns
nothing but the environment it is building, sees nothing it could learn from, and dies
with the namespace when pip is done.

Every line this writes on stdout is JSON: ``{"stage": ...}`` progress, the last one
``{"stage": "done"}`` or ``{"stage": "error", "message": ..., "log": [...]}``.  They are
the build's word: the daemon shows them, and trusts nothing else of them.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..child.contract import SetupError, Step, run_steps
from ..kernel import libc

JAIL_ROOT = "/tmp/.build-root"  # inside the helper's own mount namespace (a tmpfs there)
ETC_FILES = ("alternatives", "ssl", "ca-certificates", "ca-certificates.conf", "ld.so.cache", "ld.so.conf",
             "ld.so.conf.d", "localtime", "nsswitch.conf", "hosts", "host.conf", "gai.conf", "protocols",
             "services", "mime.types", "python3", "python3.11", "debian_version", "os-release")
USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
REFUSED = ("mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "ptrace", "process_vm_readv",
           "process_vm_writev", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
           "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "io_uring_setup",
           "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at", "reboot", "swapon",
           "swapoff", "acct", "quotactl", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick",
           "mount_setattr", "lookup_dcookie", "iopl", "ioperm", "syslog", "settimeofday", "clock_settime",
           "adjtimex", "clock_adjtime", "personality", "vhangup")
TAIL = 40  # lines of pip's output kept for an error report


@dataclass
class BuildSpec:
    """What the daemon asks of one build (JSON in the spec file)."""

    venv: str  # the environment's directory (made by the daemon, owned by the build uid)
    uid: int
    gid: int
    requirements: list[str]
    index_url: str = ""
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    only_binary: bool = True
    system_site_packages: bool = False
    memory: int = 4 << 30
    netns_fd: int = -1  # a network namespace to join (made ready by the daemon); -1: none, an empty one
    proxy: str = ""
    cgroup_procs: list[str] = field(default_factory=list)  # the build's cgroup(s): joined before anything else

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @property
    def network(self) -> bool:
        return self.netns_fd >= 0

    def local_paths(self) -> list[str]:
        """What the build reads from the host, read-only: the wheelhouses, and for a local
        index (file:///srv/pypi/simple) the directory above it (its pages link to ../files)."""
        indexes = [url[len("file://"):] for url in (self.index_url, *self.extra_index_urls) if url.startswith("file:")]
        return list(dict.fromkeys([*self.find_links, *(os.path.dirname(p.rstrip("/")) or "/" for p in indexes)]))

    @classmethod
    def load(cls, path: str) -> BuildSpec:
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))

    def pip_args(self) -> list[str]:
        args = ["install", "--no-input", "--disable-pip-version-check", "--no-cache-dir", "--progress-bar", "off",
                "--compile", "--no-build-isolation"]  # build backends come from the environment, not from an index
        if self.only_binary:
            args += ["--only-binary", ":all:"]
        if self.index_url:
            args += ["--index-url", self.index_url]
        elif not self.extra_index_urls:
            args.append("--no-index")
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for d in self.find_links:
            args += ["--find-links", d]
        return [*args, "-r", "/tmp/requirements.txt"]


def say(stage: str, **info: Any) -> None:
    sys.stdout.write(json.dumps({"stage": stage, **info}) + "\n")
    sys.stdout.flush()


# -- the steps ------------------------------------------------------------------------------------
def build_mounts(spec: BuildSpec) -> None:
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    # What is bound in by path is opened first: the staging tmpfs may cover it (a wheelhouse under /tmp).
    sources = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in (*spec.local_paths(), spec.venv)}
    os.makedirs("/tmp", exist_ok=True)
    libc.mount("build", "/tmp", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=8m,mode=0755")
    root = JAIL_ROOT
    libc.mount("build-root", _mkdir(root), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=2g,mode=0755")
    _bind("/usr", root + "/usr")
    for name in USR_LINKS:
        _link_or_bind("/" + name, root)
    _mkdir(root + "/etc")
    for name in ETC_FILES:
        _link_or_bind("/etc/" + name, root)
    if spec.network and os.path.exists("/etc/resolv.conf"):
        _bind(os.path.realpath("/etc/resolv.conf"), root + "/etc/resolv.conf")
    _write(root + "/etc/passwd", f"root:x:0:0::/nonexistent:/usr/sbin/nologin\n"
                                 f"build:x:{spec.uid}:{spec.gid}::/tmp/home:/usr/sbin/nologin\n")
    _write(root + "/etc/group", f"root:x:0:\nbuild:x:{spec.gid}:\n")
    libc.mount("dev", _mkdir(root + "/dev"), "tmpfs", libc.MS_NOSUID | libc.MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        _write(root + "/dev/" + name, "")
        libc.mount("/dev/" + name, root + "/dev/" + name, None, libc.MS_BIND)
    os.symlink("/proc/self/fd", root + "/dev/fd")
    libc.mount("shm", _mkdir(root + "/dev/shm"), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=64m,mode=1777")
    libc.mount("proc", _mkdir(root + "/proc"), "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
    libc.mount("tmp", _mkdir(root + "/tmp"), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=2g,mode=1777")
    for d in spec.local_paths():
        _bind(f"/proc/self/fd/{sources[d]}", root + d)
    _bind(f"/proc/self/fd/{sources[spec.venv]}", root + spec.venv, writable=True)
    for fd in sources.values():
        os.close(fd)
    with open(root + "/tmp/requirements.txt", "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in spec.requirements))
    os.makedirs(root + "/tmp/home", mode=0o700)
    os.chown(root + "/tmp/home", spec.uid, spec.gid)


def enter_root(spec: BuildSpec) -> None:
    os.chdir(JAIL_ROOT)
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)  # the old root, stacked under the new one
    os.chdir("/")


def drop_credentials(spec: BuildSpec) -> None:
    if spec.uid == 0 or spec.gid == 0:
        raise OSError(1, "refusing to build as uid or gid 0")
    libc.drop_bounding_set(libc.cap_last_cap())
    os.setgroups([])
    os.setresgid(spec.gid, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)
    libc.capset_empty()
    if os.getresuid() != (spec.uid,) * 3 or libc.capget() != (0, 0, 0):
        raise OSError(1, "the build's credentials did not stick")
    libc.prctl(libc.PR_SET_DUMPABLE, 0)  # pip (this uid) cannot ptrace or read this process


def set_limits(spec: BuildSpec) -> None:
    import resource

    for which, value in ((resource.RLIMIT_AS, spec.memory), (resource.RLIMIT_FSIZE, 2 << 30),
                         (resource.RLIMIT_NPROC, 512), (resource.RLIMIT_NOFILE, 4096), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))


def load_seccomp(spec: BuildSpec) -> None:
    import seccomp

    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in REFUSED:
        try:
            f.add_rule(seccomp.ERRNO(1), name)
        except (RuntimeError, ValueError, OSError):
            pass  # not a system call on this architecture
    f.load()


BUILD_STEPS: tuple[Step[BuildSpec], ...] = (
    Step("mounts", build_mounts),
    Step("root", enter_root),
    Step("credentials", drop_credentials),
    Step("limits", set_limits),
    Step("seccomp", load_seccomp),  # last before pip
)


# -- pip --------------------------------------------------------------------------------------------
HOST_PIP = "/usr/lib/python3/dist-packages/pip/__init__.py"  # Debian's python3-pip
PIP_WHEELS = "/usr/share/python-wheels"  # python3-pip-whl, which python3-venv depends on


def host_pip() -> list[str] | None:
    """Debian's pip as a command that can fill another interpreter's venv (pip --python):
    python3-pip's when installed, else the pip wheel python3-venv brings (run from the zip)."""
    if os.path.isfile(HOST_PIP):
        return ["/usr/bin/python3", "-m", "pip"]
    wheels = sorted(glob.glob(os.path.join(PIP_WHEELS, "pip-*-py3-none-any.whl")))
    return ["/usr/bin/python3", os.path.join(wheels[-1], "pip")] if wheels else None
PROGRESS = (
    (re.compile(r"^Collecting (\S+)"), "resolving"),
    (re.compile(r"^Processing (\S+)"), "resolving"),
    (re.compile(r"^Looking in (?:indexes|links): (.+)"), "resolving"),
    (re.compile(r"^\s*Downloading (\S+)"), "downloading"),
    (re.compile(r"^Building wheels? for (.+)"), "building"),
    (re.compile(r"^Installing collected packages: (.+)"), "installing"),
    (re.compile(r"^Successfully installed (.+)"), "installed"),
)


def run_logged(argv: list[str], env: dict[str, str], stage: str) -> tuple[int, list[str]]:
    """Run a step of the build; report its progress; its exit status and last lines."""
    say(stage)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd="/tmp", close_fds=True)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip()[:500]
        if not line:
            continue
        tail.append(line)
        for pattern, what in PROGRESS:
            m = pattern.match(line)
            if m:
                say(what, detail=m.group(1)[:300])
                break
    return proc.wait(), list(tail)


def build(spec: BuildSpec) -> int:
    # Bytecode is compiled here, once: the environment is read-only to runs, which would
    # otherwise compile every module they import from source on every run.
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp/home", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
           "PIP_NO_INPUT": "1", "PIP_CONFIG_FILE": "/dev/null"}
    if spec.proxy:
        env.update(HTTP_PROXY=spec.proxy, HTTPS_PROXY=spec.proxy, http_proxy=spec.proxy, https_proxy=spec.proxy)
    # Wheels only: an empty venv, filled by Debian's pip running on its interpreter (pip
    # --python), so neither pip nor setuptools lands in what runs import, and no ensurepip
    # (7 of a small build's 8 seconds).  Source builds need a build backend in the venv
    # (--no-build-isolation): that venv gets pip and setuptools from ensurepip.
    outside = host_pip() if spec.only_binary else None
    venv = ["/usr/bin/python3", "-m", "venv", *(["--without-pip"] if outside else []),
            *(["--system-site-packages"] if spec.system_site_packages else []), spec.venv]
    status, tail = run_logged(venv, env, "venv")
    if status != 0:
        say("error", message=f"python3 -m venv failed (exit {status})", log=tail)
        return 1
    pip = ([*outside, "--python", f"{spec.venv}/bin/python"] if outside else [f"{spec.venv}/bin/python", "-m", "pip"])
    status, tail = run_logged([*pip, *spec.pip_args()], env, "pip")
    if status != 0:
        errors = [line for line in tail if line.startswith("ERROR")] or tail[-3:]
        say("error", message=f"pip install failed (exit {status}): {errors[-1] if errors else 'no output'}", log=tail)
        return 1
    say("done")
    return 0


def join_cgroup(spec: BuildSpec) -> None:
    """Into the build's own cgroup(s), first: every process of the build is born in it, and
    what the build takes counts against its limits, not the daemon's."""
    for path in spec.cgroup_procs:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def main(argv: list[str]) -> NoReturn:
    spec = BuildSpec.load(argv[0])
    t0 = time.monotonic()
    try:
        join_cgroup(spec)
    except OSError as e:
        say("error", message=f"build jail: joining its cgroup: {e}", log=[])
        os._exit(1)
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS
    try:
        if spec.network:
            libc.setns(spec.netns_fd, libc.CLONE_NEWNET)  # made ready by the daemon: its own interface, policed
            os.close(spec.netns_fd)
        else:
            flags |= libc.CLONE_NEWNET
        libc.unshare(flags)
    except OSError as e:
        say("error", message=f"build jail: namespaces: {e}", log=[])
        os._exit(1)
    pid = os.fork()
    if pid == 0:  # pid 1 of the build's namespace: everything of the build dies with it
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        try:
            run_steps(BUILD_STEPS, spec)
        except SetupError as e:
            say("error", message=f"build jail: step {e.step} failed: {e.message}", log=[])
            os._exit(1)
        os._exit(build(spec))
    _, wstatus = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wstatus)
    if code < 0:
        say("error", message=f"the build was killed by signal {-code}", log=[])
    say("exit", status=code, seconds=round(time.monotonic() - t0, 3))
    os._exit(0 if code == 0 else 1)


def _mkdir(path: str) -> str:
    os.makedirs(path, mode=0o755, exist_ok=True)
    return path


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _link_or_bind(host: str, root: str) -> None:
    """``host`` at the same place under ``root``: the same link where it is one (merged /usr:
    /bin -> usr/bin), else bound in when it exists."""
    if os.path.islink(host):
        os.symlink(os.readlink(host), root + host)
    elif os.path.exists(host):
        _bind(host, root + host)


def _bind(source: str, target: str, writable: bool = False) -> None:
    """Bind ``source`` at ``target`` (made to match: a directory or a file), read-only unless ``writable``."""
    if os.path.isdir(source):
        _mkdir(target)
    else:
        _mkdir(os.path.dirname(target))
        _write(target, "")
    libc.mount(source, target, None, libc.MS_BIND | libc.MS_REC)
    flags = libc.MS_BIND | libc.MS_REMOUNT | libc.MS_NOSUID | libc.MS_NODEV
    libc.mount(None, target, None, flags if writable else flags | libc.MS_RDONLY)

