"""Test fixtures: real daemons on temporary sockets, and real test users.

Everything here runs as root against the real kernel features.  A test that needs
something this host lacks is skipped with the reason, unless SANDBOXD_MUST_WORK=1
(CI) turns the skip into a failure.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import importlib.util
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bridge import BridgeProcess
from harness import CGROUP_PARENT, HERE, USERS, DaemonProcess, as_user, daemon_dir, ensure_test_users, merge

MUST_WORK = os.environ.get("SANDBOXD_MUST_WORK") == "1"

# The MCP tests need the SDK, which is not in .venv (it needs newer starlette, uvicorn and anyio
# than Debian's): `make system` runs them with .venv-mcp's pytest.
collect_ignore = [] if importlib.util.find_spec("mcp") else ["test_mcp.py"]


def require(condition: bool, reason: str) -> None:
    """Skip when the host lacks something; fail instead under SANDBOXD_MUST_WORK=1."""
    if condition:
        return
    if MUST_WORK:
        pytest.fail(f"SANDBOXD_MUST_WORK=1 but: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (namespaces, mounts, cgroups, setuid)")


@pytest.fixture(scope="session")
def test_users() -> Iterator[dict[str, pwd.struct_passwd]]:
    """Real users and groups for multi-user tests (created once, removed at the end)."""
    require_root()
    require(shutil.which("useradd") is not None, "useradd is missing")
    remove = ensure_test_users()
    yield {u: pwd.getpwnam(u) for u in USERS}
    remove()


def call_as(user: str, socket_path: str, requests: list[dict[str, Any]], timeout: float = 120) -> dict[str, Any]:
    """Send requests over a new connection as ``user`` (real setuid), return the helper's JSON."""
    helper_dir = tempfile.mkdtemp(prefix="sbx-helper-")
    os.chmod(helper_dir, 0o755)
    helper = os.path.join(helper_dir, "peer_call.py")
    shutil.copy(os.path.join(HERE, "peer_call.py"), helper)
    os.chmod(helper, 0o644)
    try:
        proc = subprocess.run(["/usr/bin/python3", "-I", helper, socket_path], input=json.dumps(requests).encode(),
                              capture_output=True, timeout=timeout, cwd="/", **as_user(user))
    finally:
        shutil.rmtree(helper_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peer_call failed: {proc.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def unb64(obj: Any) -> bytes:
    return base64.b64decode(obj["b64"])


@pytest.fixture(scope="session", autouse=True)
def no_cgroups_left_behind() -> Iterator[None]:
    """Daemons remove their cgroups; a jail run inside this process (test_22) may leave its
    (empty) parents, with this process still in them.  Leave the host as we found it."""
    yield
    me = str(os.getpid())
    for hierarchy in [*glob.glob("/sys/fs/cgroup/*/"), "/sys/fs/cgroup/"]:
        for path in glob.glob(os.path.join(hierarchy, CGROUP_PARENT + "*")):
            for top, _dirs, _files in os.walk(path, topdown=False):  # children before parents
                with contextlib.suppress(OSError):
                    if me in Path(top, "cgroup.procs").read_text().split():
                        Path(hierarchy, "cgroup.procs").write_text(me)
                with contextlib.suppress(OSError):
                    os.rmdir(top)


@pytest.fixture(scope="session")
def daemon(test_users: Any) -> Iterator[DaemonProcess]:
    """One daemon shared by the tests that do not change its configuration."""
    require_root()
    d = DaemonProcess(daemon_dir()).start()
    yield d
    d.close()
    shutil.rmtree(d.dir, ignore_errors=True)


@pytest.fixture
def make_daemon(test_users: Any) -> Iterator[Any]:
    """Start daemons with their own configuration; all are stopped afterwards."""
    require_root()
    started: list[DaemonProcess] = []

    def make(overrides: dict[str, Any] | None = None, start: bool = True) -> DaemonProcess:
        # Their roots hard-link the host's root-owned files (0.1 s) instead of copying them
        # (2 s each, a hundred times a suite); the shared daemon above and test_rootfs keep the
        # default, copies, whose promise (no host inode in the root) test_tenants checks.
        d = DaemonProcess(daemon_dir(), merge({"root": {"hard_links": True}}, overrides or {}))
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.close()
        shutil.rmtree(d.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def bridges(test_users: Any) -> Iterator[Callable[..., BridgeProcess]]:
    """Start sandboxd-http processes (as sbx-http) for a daemon's socket; all are stopped afterwards."""
    started: list[BridgeProcess] = []

    def start(daemon_socket: str, env: dict[str, str] | None = None, config: dict[str, Any] | None = None,
              **kw: Any) -> BridgeProcess:
        b = BridgeProcess(daemon_socket, env, **kw)
        if config is not None:
            path = os.path.join(b.dir, "http.yaml")
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"http": config}, f)  # JSON is YAML
            os.chmod(path, 0o644)
            b.args = (*b.args, "--config", path)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.close()
