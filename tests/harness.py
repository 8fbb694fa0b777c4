"""A real sandboxd for tests and the benchmark: started in the foreground on a temporary
socket, ready when it sends READY=1 on its NOTIFY_SOCKET."""

from __future__ import annotations

import copy
import errno
import fcntl
import grp
import os
import pwd
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgpack
import yaml

from sandboxd.client import Client, Result

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
UID_BLOCK = 64  # each test daemon its own run uids, as two daemons must never share them
TEST_UID_RANGE = (870000, UID_BLOCK * 128)
CGROUP_PARENT = f"sandboxd-test-{os.getpid()}"
BUILD_UID_BASE = 879000  # + the daemon's uid block: above every block's run uids, below the bench's

# sbx-http and sbx-mcp: the uids sandboxd-http and sandboxd-mcp run as in tests (clients of the
# socket like any other).
USERS = {"sbx-alice": ["sbx-clients"], "sbx-bob": ["sbx-clients", "sbx-team"], "sbx-carol": [],
         "sbx-http": ["sbx-clients"], "sbx-mcp": ["sbx-clients"]}
GROUPS = ["sbx-clients", "sbx-team", "sbx-admins"]

BASE_CONFIG: dict[str, Any] = {
    "daemon": {"socket_group": "sbx-clients", "admin_group": "sbx-admins", "workers": 8, "queue": 64,
               "shutdown_grace": "5s", "log_level": "info"},
    "jail": {"run_uids": f"{TEST_UID_RANGE[0]}-{TEST_UID_RANGE[0] + TEST_UID_RANGE[1] - 1}",
             "cgroup_parent": CGROUP_PARENT},
    "pool": {"min": 1, "max": 4},
    "quotas": {"default": {"concurrent": 16, "queued": 64, "runs_per_minute": 1000000,
                           "cpu_seconds_per_hour": 1000000, "max_output": "16M", "max_timeout": "30s",
                           "max_memory": "1G", "max_files_size": "16M", "network": True}},
}


def shipped_config(users: dict[str, str] | None = None) -> dict[str, Any]:
    """etc/sandboxd/sandboxd.yaml as the package installs it, with the test's socket group and
    admin group, and ``users`` renamed (e.g. sandboxd-http -> sbx-http, the tests' bridge user)."""
    with open(os.path.join(REPO, "etc", "sandboxd", "sandboxd.yaml"), encoding="utf-8") as f:
        cfg: dict[str, Any] = yaml.safe_load(f) or {}
    entries = cfg.get("quotas", {}).get("users", {})
    for old, new in (users or {}).items():
        entries[new] = entries.pop(old)
    return merge(cfg, {"daemon": {"socket_group": "sbx-clients", "admin_group": "sbx-admins",
                                  "shutdown_grace": "5s"}})


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class Child:
    """A process a test started: stopped with SIGTERM (killed if it does not stop in time)."""

    proc: subprocess.Popen[bytes] | None = None
    log_path = ""

    def log(self) -> str:
        """What it wrote to its log file so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class DaemonProcess(Child):
    """A sandboxd started in the foreground, ready when it sends READY=1."""

    count = 0

    def __init__(self, workdir: str, overrides: dict[str, Any] | None = None,
                 base: dict[str, Any] | None = None) -> None:
        """``base``: the configuration under ``overrides`` (BASE_CONFIG unless given, e.g. the
        shipped file's); the daemon's own cgroup parent, uids and pool are added either way."""
        self.dir = workdir
        self.socket = os.path.join(workdir, "sandboxd.sock")
        self.state_dir = os.path.join(workdir, "state")
        self.config_path = os.path.join(workdir, "sandboxd.yaml")
        self.log_path = os.path.join(workdir, "daemon.log")
        self.notify_path = os.path.join(workdir, "notify.sock")
        DaemonProcess.count += 1  # each daemon its own cgroup parent, as two daemons must never share one
        self._block_lock, block = claim_uid_block()
        first = TEST_UID_RANGE[0] + UID_BLOCK * block
        self.uid_range = (first, UID_BLOCK)
        self.build_uid = BUILD_UID_BASE + block  # builds of two test daemons never share a uid either
        own = {"jail": {"cgroup_parent": f"{CGROUP_PARENT}-{DaemonProcess.count}",
                        "run_uids": f"{first}-{first + UID_BLOCK - 1}", "build_uid": self.build_uid},
               # each daemon its own address pool too (a /24: four addresses for each of its 64 uids)
               "network": {"pool": f"10.232.{block}.0/24"}}
        self.config = merge(merge(BASE_CONFIG if base is None else base, own), overrides or {})
        self.write_config(self.config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.wrapper: list[str] = []  # a command the daemon is started under (e.g. setpriv)
        self.notify: socket.socket | None = None
        self.messages: list[str] = []

    def run_uid_processes(self) -> list[tuple[int, int]]:
        """Host processes running as one of this daemon's run uids."""
        return run_uid_processes(*self.uid_range)

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        with open(self.config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f)

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)
        self.notify.bind(self.notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "sandboxd.daemon", "--foreground", "--config", self.config_path,
                 "--socket", self.socket, "--state-dir", self.state_dir],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, preexec_fn=_die_with_parent)
        if not self.wait_for("READY=1", timeout):
            self.kill()
            raise RuntimeError(f"sandboxd did not become ready:\n{self.log()}")
        return self

    def wait_for(self, text: str, timeout: float) -> bool:
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.notify.settimeout(0.2)
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                if self.proc is not None and self.proc.poll() is not None:
                    return False  # exited, and every message it sent has been read
                continue
            self.messages.append(msg)
            if text in msg.split("\n"):
                return True
        return False

    def client(self, timeout: float | None = 120) -> Client:
        return Client(self.socket, timeout=timeout)

    def run(self, code: str, **options: Any) -> Result:
        with self.client() as c:
            return c.run(code, **options)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self.notify is not None:
                self.notify.close()
            if self._block_lock >= 0:
                os.close(self._block_lock)  # its uids may go to another test daemon now
                self._block_lock = -1


BLOCK_LOCKS = "/tmp/sandboxd-test-uid-blocks"


def recv_frame(s: socket.socket) -> Any:
    """One response frame read straight off a raw socket; None when the daemon closed it."""
    header = _recv_exact(s, 4)
    body = None if header is None else _recv_exact(s, struct.unpack(">I", header)[0])
    return None if body is None else msgpack.unpackb(body, raw=False, strict_map_key=False)


def raw_socket(path: str, timeout: float | None = 30.0) -> socket.socket:
    """A plain connection to the daemon, for tests that write frames themselves."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


# -- what the host looks like, from /proc -----------------------------------------------------
def run_uid_processes(lo: int = TEST_UID_RANGE[0], n: int = TEST_UID_RANGE[1]) -> list[tuple[int, int]]:
    """(pid, uid) of every host process whose uid is in ``lo`` .. ``lo + n - 1``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="ascii") as f:
                uid = int(f.read().split("Uid:")[1].split()[0])
        except (OSError, IndexError):
            continue
        if lo <= uid < lo + n:
            found.append((int(name), uid))
    return found


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def host_mounts() -> int:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return sum(1 for _ in f)


def as_user(user: str) -> dict[str, Any]:
    """subprocess keyword arguments that run a child as ``user``, with its groups."""
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(user, pw.pw_gid)}


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def on_a_terminal(cmd: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, bytes]:
    """Run ``cmd`` with a pseudo-terminal as its stdin, stdout and stderr; everything it wrote."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd="/",
                                start_new_session=True)
    finally:
        os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([master], [], [], 0.5)
            if not readable:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError as e:  # EIO: the terminal's last writer closed it
                if e.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return proc.returncode, out


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _die_with_parent() -> None:
    """A test daemon must not outlive a killed test run: its uid block goes back to the
    pool when the run's lock file is released, and the next run would share it."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def claim_uid_block() -> tuple[int, int]:
    """A block of run uids no other test daemon on this host holds (any process): (lock fd, index)."""
    os.makedirs(BLOCK_LOCKS, exist_ok=True)
    for index in range(1, TEST_UID_RANGE[1] // UID_BLOCK):
        fd = os.open(os.path.join(BLOCK_LOCKS, str(index)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, index
        except BlockingIOError:
            os.close(fd)
    raise RuntimeError("every test uid block is in use")


def daemon_dir() -> str:
    """A work directory other users can traverse (pytest's own tmp dirs are 0700)."""
    path = tempfile.mkdtemp(prefix="sandboxd-test-")
    os.chmod(path, 0o755)
    return path


def ensure_test_users() -> Callable[[], None]:
    """Create the test users and groups that do not exist; return a function removing them."""
    created_users, created_groups = [], []
    for g in GROUPS:
        try:
            grp.getgrnam(g)
        except KeyError:
            subprocess.run(["groupadd", g], check=True)
            created_groups.append(g)
    for user, groups in USERS.items():
        try:
            pwd.getpwnam(user)
        except KeyError:
            cmd = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"]
            if groups:
                cmd += ["--groups", ",".join(groups)]
            subprocess.run([*cmd, user], check=True)
            created_users.append(user)

    def remove() -> None:
        for user in created_users:
            subprocess.run(["userdel", user], check=False)
        for g in created_groups:
            subprocess.run(["groupdel", g], check=False)

    return remove


# Environments of test daemons: not under /tmp, because environments go into roots at their path.
ENVS_BASE = "/var/lib/sandboxd-test-environments"


def configured_index() -> str | None:
    """The package index this host's pip is configured with (pip config), if it is a local one or
    answers; None otherwise."""
    try:
        out = subprocess.run(["/usr/bin/python3", "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(("index-url", "extra-index-url")):
            for url in value.strip("'\"").split():
                if url.startswith("file://") and os.path.isdir(url[len("file://"):]):
                    return url
    return None
