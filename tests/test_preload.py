"""Who runs a configured module's code: never the fork server as root, unless the module and
all it imports come from directories only root can change (child/preload.py).

Each test plants code that, run as root with the host's filesystem (as the fork server was),
would leave a file on the host and report uid 0; it must run as the run's uid, in the jail,
or not at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import require_root
from harness import ENVS_BASE, DaemonProcess, wait_until

# Import-time code of a hostile module: what it can do, seen from inside it.
PROBE = """\
import os
MARKER = {marker!r}
try:
    with open(MARKER, "w") as f:
        f.write("written at import")
    WROTE = True
except OSError:
    WROTE = False
UID, EUID, GID = os.getuid(), os.geteuid(), os.getgid()
HOST_ROOT = os.path.exists({here!r})
"""


def make_wheel(house: str, name: str, version: str, files: dict[str, str]) -> None:
    """A wheel of ``files`` (paths inside site-packages) as pip installs it, RECORD and all."""
    dist = f"{name}-{version}.dist-info"
    raw = {path: text.encode() for path, text in files.items()}
    raw[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    raw[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in raw.items()]
    record.append(f"{dist}/RECORD,,")
    with zipfile.ZipFile(os.path.join(house, f"{name}-{version}-py3-none-any.whl"), "w") as z:
        for path, data in raw.items():
            z.writestr(path, data)
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")


@pytest.fixture
def marker() -> Iterator[str]:
    """A host path the probes try to write (as root they could; from a jail they cannot)."""
    path = f"/tmp/sbx-preload-marker-{uuid.uuid4().hex}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


@pytest.fixture
def house() -> Iterator[str]:
    require_root()
    work = tempfile.mkdtemp(prefix="sbx-preload-wheels-")
    os.chmod(work, 0o755)
    yield work
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def envs_dir() -> Iterator[str]:
    os.makedirs(ENVS_BASE, mode=0o755, exist_ok=True)
    path = tempfile.mkdtemp(prefix="envs-", dir=ENVS_BASE)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def operator_dir() -> str:
    """A directory an operator added to the root (/tmp never goes into one)."""
    os.makedirs(ENVS_BASE, mode=0o755, exist_ok=True)
    return tempfile.mkdtemp(prefix="operator-", dir=ENVS_BASE)


def environment_state(d: DaemonProcess, name: str) -> dict[str, Any]:
    with d.client() as c:
        def done() -> dict[str, Any] | None:
            envs = {e["name"]: e for e in c.call("environments")["environments"]}
            return envs[name] if envs[name]["state"] in ("ready", "failed", "outdated") else None
        entry: dict[str, Any] = wait_until(done, 180, interval=0.5)
        return entry


def probe_seen(d: DaemonProcess, module: str, **run: Any) -> tuple[dict[str, Any], Any]:
    """What the module saw at its import, read by a run that did not import it itself."""
    r = d.run(f"import sys, json\nalready = {module!r} in sys.modules\nimport {module} as m\n"
              "print(json.dumps({'already': already, 'wrote': m.WROTE, 'uid': m.UID, 'euid': m.EUID, "
              "'host_root': m.HOST_ROOT}))", **run)
    assert r["status"] == "ok", r
    seen: dict[str, Any] = json.loads(r["stdout"])
    return seen, r


def test_an_environments_preload_runs_confined_in_each_worker(make_daemon: Any, house: str, envs_dir: str,
                                                               marker: str) -> None:
    make_wheel(house, "sbxprobe", "1.0", {"sbxprobe/__init__.py": PROBE.format(marker=marker, here=house)})
    d: DaemonProcess = make_daemon({"daemon": {"environments_dir": envs_dir}, "environments": {
        "probe": {"requirements": ["sbxprobe"], "find_links": [house], "preload": ["sbxprobe"]}}})
    assert environment_state(d, "probe")["state"] == "ready"
    seen, r = probe_seen(d, "sbxprobe", environment="probe")
    assert seen["already"] is True  # preloaded: the run found it imported
    assert (seen["uid"], seen["euid"]) == (r["run_uid"], r["run_uid"]), seen  # was (0, 0): the fork server, root
    assert not os.path.exists(marker), "the preload reached the host's /tmp"  # (it wrote its own /tmp)
    assert seen["host_root"] is False  # it did not see the host's filesystem at all
    with d.client() as c:
        fs = c.status()["fork_server"]["environments"]["probe"]
    assert fs["preloaded_in_workers"] == ["sbxprobe"] and "sbxprobe" in fs["preloaded"], fs
    assert fs["preload_errors"] == {}, fs


def test_a_distribution_that_overwrites_anothers_files_is_refused_at_build(make_daemon: Any, house: str,
                                                                            envs_dir: str, marker: str) -> None:
    # rtevil also ships rtgood/__init__.py (pip installs it over rtgood's without a word)
    make_wheel(house, "rtgood", "1.0", {"rtgood/__init__.py": "GOOD = True\n"})
    make_wheel(house, "rtevil", "1.0", {"rtevil/__init__.py": "",
                                        "rtgood/__init__.py": PROBE.format(marker=marker, here=house)})
    d: DaemonProcess = make_daemon({"daemon": {"environments_dir": envs_dir}, "environments": {
        "mixed": {"requirements": ["rtgood", "rtevil"], "find_links": [house], "preload": ["rtgood"]}}})
    entry = environment_state(d, "mixed")
    assert entry["state"] == "failed", entry
    message = entry["error"]["message"]
    assert "rtgood/__init__.py (rtevil and rtgood)" in message, entry
    assert not os.path.exists(marker)


def test_jail_preload_from_an_operator_directory_is_not_imported_as_root(make_daemon: Any, marker: str) -> None:
    require_root()
    extra = operator_dir()
    try:
        os.chmod(extra, 0o755)
        os.makedirs(os.path.join(extra, "sbxshadow"))
        with open(os.path.join(extra, "sbxshadow", "__init__.py"), "w") as f:
            f.write(PROBE.format(marker=marker, here=extra + "/.."))
        d: DaemonProcess = make_daemon({"root": {"extra_paths": [extra], "python_path": [extra]},
                                        "jail": {"preload": ["sbxshadow", "json"]}})
        seen, r = probe_seen(d, "sbxshadow")
        assert seen["already"] is True
        assert (seen["uid"], seen["euid"]) == (r["run_uid"], r["run_uid"]), seen
        assert not os.path.exists(marker)
        with d.client() as c:
            fs = c.status()["fork_server"]
        # json is the standard library's (root's own directories): shared from the fork server
        assert fs["preloaded_in_workers"] == ["sbxshadow"] and fs["preloaded"][:1] == ["json"], fs
    finally:
        shutil.rmtree(extra, ignore_errors=True)


def test_a_module_that_prints_at_preload_does_not_reach_the_runs_output(make_daemon: Any) -> None:
    require_root()
    extra = operator_dir()
    try:
        os.chmod(extra, 0o755)
        with open(os.path.join(extra, "sbxnoisy.py"), "w") as f:
            f.write("import os, sys\nprint('from python')\nsys.stderr.write('to stderr\\n')\n"
                    "os.write(1, b'straight to fd 1\\n')\n")
        d: DaemonProcess = make_daemon({"root": {"extra_paths": [extra], "python_path": [extra]},
                                        "jail": {"preload": ["sbxnoisy"]}})
        r = d.run("import sys\nprint('sbxnoisy' in sys.modules)")
        assert (r["status"], r["stdout"], r["stderr"]) == ("ok", b"True\n", b""), r
    finally:
        shutil.rmtree(extra, ignore_errors=True)
