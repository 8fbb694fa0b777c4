"""Python environments, built by the daemon in its build jail, through the real daemon.

Offline and deterministic: the wheels (a pure-Python package in two versions and one
with a C extension linking libyaml, which no default root holds) and a source
distribution whose setup.py probes its surroundings are made here, into a wheelhouse
of the test's own.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require, require_root
from harness import ENVS_BASE, REPO, DaemonProcess, configured_index, wait_until

from sandboxd.client import SandboxdError

LIBYAML = "/usr/lib/x86_64-linux-gnu/libyaml-0.so.2"

PURE = 'from setuptools import setup\nsetup(name="sbxpure", version="{v}", packages=["sbxpure"])\n'
PACKAGES: dict[str, dict[str, str]] = {
    "sbxpure-1": {"setup.py": PURE.format(v="1.0"), "sbxpure/__init__.py": 'VERSION = "1.0"\n'},
    "sbxpure-2": {"setup.py": PURE.format(v="2.0"), "sbxpure/__init__.py": 'VERSION = "2.0"\n'},
    "sbxyaml": {
        "setup.py": textwrap.dedent("""\
            from setuptools import Extension, setup
            setup(name="sbxyaml", version="0.1",
                  ext_modules=[Extension("sbxyaml", ["sbxyaml.c"], libraries=[":libyaml-0.so.2"])])
            """),
        "sbxyaml.c": textwrap.dedent("""\
            #define PY_SSIZE_T_CLEAN
            #include <Python.h>
            const char *yaml_get_version_string(void);
            static PyObject *version(PyObject *self, PyObject *args) {
                return PyUnicode_FromString(yaml_get_version_string());
            }
            static PyMethodDef methods[] = {{"libyaml_version", version, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
            static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sbxyaml", NULL, -1, methods};
            PyMODINIT_FUNC PyInit_sbxyaml(void) { return PyModule_Create(&module); }
            """)},
}
# A source distribution whose build (setup.py runs as the build uid, in the build jail) tries
# what a hostile package would, and leaves what it saw in the package it installs.
HOOK_SETUP = textwrap.dedent("""\
    import json, os, socket, sysconfig
    from setuptools import setup
    seen = {"uid": os.getuid(), "gid": os.getgid()}
    def attempt(name, fn):
        try:
            seen[name] = "ok: " + repr(fn())[:200]
        except Exception as e:
            seen[name] = "refused: " + type(e).__name__
    attempt("read_shadow", lambda: open("/etc/shadow").read())
    attempt("write_etc", lambda: open("/etc/sbx-test-pwned", "w").write("x"))
    attempt("write_usr", lambda: open("/usr/sbx-test-pwned", "w").write("x"))
    attempt("list_home", lambda: os.listdir("/home"))
    attempt("list_root", lambda: os.listdir("/root"))
    attempt("list_state", lambda: os.listdir(STATE))
    attempt("proc_1", lambda: open("/proc/1/environ").read())
    attempt("tcp_out", lambda: socket.create_connection(("127.0.0.1", 22), timeout=1))
    attempt("unshare", lambda: os.unshare(os.CLONE_NEWNS))
    attempt("link_out", lambda: os.symlink("/etc/shadow", os.path.join(sysconfig.get_paths()["purelib"], "leak")))
    with open("sbxhook/_seen.py", "w") as f:
        f.write("SEEN = " + json.dumps(seen) + "\\n")
    setup(name="sbxhook", version="1.0", packages=["sbxhook"])
    """)


@pytest.fixture(scope="module")
def wheelhouse() -> Iterator[str]:
    require_root()
    require(shutil.which("gcc") is not None and os.path.exists("/usr/include/python3.11/Python.h"),
            "gcc and python3-dev are needed to build the test's C extension (make dev installs them)")
    require(os.path.exists(LIBYAML), "libyaml-0.so.2 is needed (libyaml-0-2, installed with python3-yaml)")
    work = tempfile.mkdtemp(prefix="sbx-wheels-")
    house = os.path.join(work, "house")
    os.makedirs(house)
    for name, files in PACKAGES.items():
        src = os.path.join(work, name)
        for rel, text in files.items():
            Path(src, rel).parent.mkdir(parents=True, exist_ok=True)
            Path(src, rel).write_text(text)
        subprocess.run(["/usr/bin/python3", "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", house, src], check=True, capture_output=True, timeout=300)
    add_pth_wheel(house)
    os.chmod(work, 0o755)
    yield house
    shutil.rmtree(work, ignore_errors=True)


def add_pth_wheel(house: str) -> None:
    """A wheel whose .pth would run code at every interpreter start if site processed it."""
    files = {"sbxpth.py": b"OK = 1\n",
             "sbxpth-startup.pth": b"import sys; sys.stderr.write('PTH RAN\\n')\n",
             "sbxpth-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: sbxpth\nVersion: 1.0\n",
             "sbxpth-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                           b"Tag: py3-none-any\n"}
    record = []
    for name, raw in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(raw)}")
    record.append("sbxpth-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(os.path.join(house, "sbxpth-1.0-py3-none-any.whl"), "w") as z:
        for name, raw in files.items():
            z.writestr(name, raw)
        z.writestr("sbxpth-1.0.dist-info/RECORD", "\n".join(record) + "\n")


def add_hook_sdist(house: str, state_dir: str) -> None:
    setup_py = HOOK_SETUP.replace("STATE", repr(state_dir))
    data = {"sbxhook-1.0/setup.py": setup_py, "sbxhook-1.0/sbxhook/__init__.py": "from ._seen import SEEN\n",
            "sbxhook-1.0/PKG-INFO": "Metadata-Version: 1.0\nName: sbxhook\nVersion: 1.0\n"}
    with tarfile.open(os.path.join(house, "sbxhook-1.0.tar.gz"), "w:gz") as tar:
        for name, text in data.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.fixture
def env_daemon(make_daemon: Any, wheelhouse: str) -> Iterator[Any]:
    """Start a daemon whose environments live in a directory of its own (removed afterwards)."""
    made: list[str] = []

    def start(environments: dict[str, Any], start: bool = True, **overrides: Any) -> DaemonProcess:
        os.makedirs(ENVS_BASE, mode=0o755, exist_ok=True)
        envs = tempfile.mkdtemp(prefix="envs-", dir=ENVS_BASE)
        os.chmod(envs, 0o755)
        made.append(envs)
        d: DaemonProcess = make_daemon({"daemon": {"environments_dir": envs}, "environments": environments,
                                        **overrides}, start=start)
        return d

    yield start
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def house_env(house: str, *requirements: str, **extra: Any) -> dict[str, Any]:
    return {"requirements": list(requirements), "find_links": [house], **extra}


def ready(d: DaemonProcess, *names: str, timeout: float = 180) -> dict[str, dict[str, Any]]:
    """Wait until the named environments are done building; their entries."""
    with d.client() as c:
        def done() -> dict[str, dict[str, Any]] | None:
            envs = {e["name"]: e for e in c.call("environments")["environments"]}
            return envs if all(envs[n]["state"] in ("ready", "failed", "outdated") for n in names) else None
        found: dict[str, dict[str, Any]] = wait_until(done, timeout, interval=0.5)
        return found


def versions(entry: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["version"] for p in entry["packages"]}


# -- what runs get ---------------------------------------------------------------------------------
def test_runs_import_their_environment_and_nothing_else(env_daemon: Any, wheelhouse: str) -> None:
    d: DaemonProcess = env_daemon(
        {"default": house_env(wheelhouse, "sbxpure==1.0", "sbxyaml", preload=["sbxyaml"]),
         "two": house_env(wheelhouse, "sbxpure==2.0", "sbxpth", preload=["sbxpure"],
                          warmup="import sbxpure\nsbxpure.WARMED = sbxpure.VERSION")},
        quotas={"users": {"sbx-alice": {"environments": ["two"]}}})
    envs = ready(d, "default", "two")
    assert envs["default"]["state"] == envs["two"]["state"] == "ready", envs
    assert versions(envs["default"])["sbxpure"] == "1.0" and versions(envs["default"])["sbxyaml"] == "0.1"
    assert versions(envs["two"])["sbxpure"] == "2.0" and "sbxyaml" not in versions(envs["two"])
    assert Path(envs["two"]["site"], "sbxpth-startup.pth").exists()
    assert envs["default"]["size_bytes"] > 0 and envs["default"]["build_seconds"] > 0
    with d.client() as c:
        # The default environment, with the C extension's library found and brought along.
        r = c.run("import sys, sbxpure, sbxyaml\nprint(sbxpure.VERSION, sbxyaml.libyaml_version(), "
                  "'sbxyaml' in sys.modules)")
        assert (r["status"], r["stdout"].split()[0]) == ("ok", b"1.0"), r
        assert r["stdout"].split()[1].startswith(b"0.")
        # Another version of the same package, side by side.
        assert c.run("import sbxpure; print(sbxpure.VERSION)", environment="two")["stdout"] == b"2.0\n"
        # Its warm-up ran in its own workers (package code never runs in a fork server), after
        # its preload; not in the default's.
        r = c.run("import sbxpure; print(sbxpure.WARMED)", environment="two")
        assert (r["status"], r["stdout"]) == ("ok", b"2.0\n"), r
        assert c.run("import sbxpure; print(hasattr(sbxpure, 'WARMED'))")["stdout"] == b"False\n"
        assert c.status()["fork_server"]["environments"]["two"]["warmed_up"] is True
        # A package's .pth is installed but never processed: no code of it runs at start.
        r = c.run("import sbxpth; print(sbxpth.OK)", environment="two")
        assert (r["status"], r["stdout"], r["stderr"]) == ("ok", b"1\n", b""), r
        r = c.run("import sbxyaml", environment="two")
        assert r["status"] == "exit_nonzero" and b"No module named 'sbxyaml'" in r["stderr"]
        # Preloaded in its own fork server only: a run of "default" finds it imported already.
        assert c.run("import sys; print('sbxyaml' in sys.modules)")["stdout"] == b"True\n"
        assert c.run("import sys; print('sbxyaml' in sys.modules)", environment="two")["stdout"] == b"False\n"
        with pytest.raises(SandboxdError) as e:
            c.run("1", environment="nosuch")
        assert (e.value.code, e.value.details["field"]) == ("bad_request", "environment")
        assert e.value.details["known"] == ["default", "two"]
        with pytest.raises(SandboxdError) as e:
            c.run("1", language="nodejs", environment="two")
        assert e.value.code == "bad_request"
        # Sessions get them too.
        with c.session(environment="two") as s:
            assert s.exec("import sbxpure; sbxpure.VERSION")["value"] == "'2.0'"
        # root why knows about environments.
        why = c.call("root_why", module="sbxyaml", environment="two")
        assert not why["importable"]
        assert any("environment default has sbxyaml" in a for a in why["advice"]), why["advice"]
        assert any("environments.two.requirements" in a for a in why["advice"])
        assert c.call("root_why", module="sbxyaml")["importable"]
        st = c.status()
        assert st["environments"] == {"default": "ready", "two": "ready"}
    # The libraries of an environment (sbxyaml's libyaml) join its own root only.
    roots = Path(d.state_dir, "roots")
    env_root = next((roots / "environments" / "default").glob("root-*[0-9a-f]"))
    base_root = next(p for p in roots.glob("root-*[0-9a-f]") if p.is_dir())
    assert (env_root / LIBYAML.lstrip("/")).exists()
    assert not (base_root / LIBYAML.lstrip("/")).exists()
    # A quota's list of environments: alice may use "two" only (and runs without one get the base root).
    from conftest import call_as
    out = call_as("sbx-alice", d.socket, [
        {"op": "run", "id": 1, "code": "import sbxpure; print(sbxpure.VERSION)", "environment": "two"},
        {"op": "run", "id": 2, "code": "import sbxpure", "environment": "default"},
        {"op": "run", "id": 3, "code": "import sbxpure"}])
    first, second, third = out["responses"]
    assert first["result"]["status"] == "ok"
    assert (second["error"]["code"], second["error"]["field"]) == ("forbidden", "environment")
    assert third["result"]["status"] == "exit_nonzero"  # the base root: no environment for her by default


def test_package_code_runs_confined_in_the_build_jail(env_daemon: Any, wheelhouse: str) -> None:
    house = tempfile.mkdtemp(prefix="sbx-hook-")
    os.chmod(house, 0o755)
    try:
        d: DaemonProcess = env_daemon({"default": {"requirements": ["sbxhook"], "find_links": [house],
                                                   "only_binary": False}}, start=False)
        add_hook_sdist(house, d.state_dir)
        d.start()
        envs = ready(d, "default")
        assert envs["default"]["state"] == "ready", envs["default"]["error"]
        r = d.run("import json, sbxhook, os\nprint(json.dumps(sbxhook.SEEN))\n"
                  "print(os.path.lexists(os.path.join(os.path.dirname(os.path.dirname(sbxhook.__file__)), 'leak')))")
        assert r["status"] == "ok", r
        seen_line, link_line = r["stdout"].decode().splitlines()
        seen = json.loads(seen_line)
        assert (seen["uid"], seen["gid"]) == (d.build_uid, d.build_uid)  # jail.build_uid: never root
        for probe in ("read_shadow", "write_etc", "write_usr", "list_home", "list_root", "list_state",
                      "proc_1", "tcp_out", "unshare"):
            assert seen[probe].startswith("refused"), (probe, seen[probe])
        assert not os.path.exists("/etc/sbx-test-pwned") and not os.path.exists("/usr/sbx-test-pwned")
        # It could plant a link to /etc/shadow in its environment (setup.py runs more than once: it exists)...
        assert seen["link_out"] in ("ok: None", "refused: FileExistsError"), seen["link_out"]
        assert link_line == "False"  # ...which was taken out before the environment served
        assert not Path(envs["default"]["site"], "leak").exists()
    finally:
        shutil.rmtree(house, ignore_errors=True)


# -- building, failing, keeping --------------------------------------------------------------------
def test_a_failed_build_keeps_the_previous_one_serving(env_daemon: Any, wheelhouse: str) -> None:
    d: DaemonProcess = env_daemon({"default": house_env(wheelhouse, "sbxpure==1.0")})
    first = ready(d, "default")["default"]
    config = dict(d.config, environments={"default": house_env(wheelhouse, "sbxpure==1.0", "nosuchpackage==9")})
    d.write_config(config)
    with d.client() as c:
        reply = c.call("reload")
        assert any("default changed" in ch for ch in reply["changes"]), reply
        def failed() -> dict[str, Any] | None:
            return next((e for e in c.call("environments")["environments"] if e["error"] is not None), None)

        entry = wait_until(failed, 120, interval=0.5)
        assert entry["state"] == "outdated" and entry["build"] == first["build"]
        assert "nosuchpackage" in entry["error"]["message"] + " ".join(entry["error"]["log"])
        assert c.run("import sbxpure; print(sbxpure.VERSION)")["stdout"] == b"1.0\n"  # still serving
        with pytest.raises(SandboxdError) as e:
            c.call("build_environment", name="default")
        assert e.value.code == "build_failed" and "nosuchpackage" in e.value.message + json.dumps(e.value.details)
    p = subprocess.run([sys.executable, "-m", "sandboxd.ctl", "env", "list"], capture_output=True, cwd=REPO,
                       env=dict(os.environ, SANDBOXD_SOCKET=d.socket), timeout=60)
    assert b"outdated" in p.stdout and b"last build failed" in p.stdout, p.stdout


def test_a_restart_reuses_the_build(env_daemon: Any, wheelhouse: str) -> None:
    d: DaemonProcess = env_daemon({"default": house_env(wheelhouse, "sbxpure==1.0")})
    first = ready(d, "default")["default"]
    assert d.stop() == 0
    t0 = time.monotonic()
    d.start()
    with d.client() as c:
        entry = next(e for e in c.call("environments")["environments"] if e["name"] == "default")
        assert entry["state"] == "ready" and entry["build"] == first["build"]  # at once: nothing rebuilt
        assert c.run("import sbxpure; print(sbxpure.VERSION)")["stdout"] == b"1.0\n"
    assert time.monotonic() - t0 < 60
    assert "reusing build" in d.log()


def test_a_rebuild_while_runs_are_in_flight_loses_none(env_daemon: Any, wheelhouse: str) -> None:
    d: DaemonProcess = env_daemon({"default": house_env(wheelhouse, "sbxpure==1.0")})
    first = ready(d, "default")["default"]
    statuses: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with d.client() as c:
            while not stop.is_set():
                statuses.append(c.run("import sbxpure, time; time.sleep(0.05); print(sbxpure.VERSION)")["status"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        events: list[dict[str, Any]] = []
        with d.client() as c:
            reply = c.call("build_environment", name="default", progress=events.append)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert reply["environment"]["build"] != first["build"] and reply["environment"]["state"] == "ready"
    stages = [e["stage"] for e in events]
    for stage in ("venv", "pip", "resolving", "installing", "root", "ready"):
        assert stage in stages, stages
    assert len(statuses) > 10 and set(statuses) == {"ok"}, statuses
    assert not Path(first["site"]).exists()  # the older build is gone once the new one serves


def test_sandboxctl_env_commands(env_daemon: Any, wheelhouse: str) -> None:
    d: DaemonProcess = env_daemon({"default": house_env(wheelhouse, "sbxpure==2.0")})
    ready(d, "default")
    env = dict(os.environ, SANDBOXD_SOCKET=d.socket)
    p = subprocess.run([sys.executable, "-m", "sandboxd.ctl", "env", "list"], capture_output=True, cwd=REPO, env=env,
                       timeout=60)
    assert p.returncode == 0 and b"default" in p.stdout and b"sbxpure==2.0" in p.stdout and b"ready" in p.stdout
    p = subprocess.run([sys.executable, "-m", "sandboxd.ctl", "env", "build", "default", "--json"],
                       capture_output=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)  # stdout: the one result object; progress events on stderr
    assert result["ok"] is True and result["environment"]["state"] == "ready", result
    events = [json.loads(line) for line in p.stderr.decode().splitlines() if line.startswith("{")]
    assert any(e["event"] == "progress" and e["stage"] == "installing" for e in events), events
    p = subprocess.run([sys.executable, "-m", "sandboxd.ctl", "env", "build", "default", "--if-changed"],
                       capture_output=True, cwd=REPO, env=env, timeout=60)
    assert p.returncode == 0 and b"up to date" in p.stderr, p.stderr


def test_check_config_refuses_bad_environments(tmp_path: Path) -> None:
    from sandboxd.config import ConfigError, parse
    with pytest.raises(ConfigError) as e:
        parse({"environments": {"Bad Name": {}, "a": {"requirements": ["-r /etc/shadow"], "find_links": ["/x"]},
                                "b": {"requirements": ["x"]}, "c": {"requirements": ["x"], "index_url": "ftp://x"}},
               "daemon": {"environments_dir": "/tmp/envs"}})
    text = "\n".join(e.value.errors)
    assert "environments.Bad Name" in text
    assert "environments.a.requirements: expected requirements without pip options" in text
    assert "environments.b: pip needs somewhere to get packages" in text
    assert "environments.c.index_url" in text
    assert "daemon.environments_dir: /tmp/envs is under /tmp" in text


# -- a real index --------------------------------------------------------------------------------------
def test_a_real_environment_with_numpy_and_pandas(env_daemon: Any) -> None:
    index = configured_index()
    if index is None:
        pytest.skip("no package index is configured on this host that the test may use (a local file:// one)")
    d: DaemonProcess = env_daemon({"default": {"requirements": ["numpy", "pandas"], "index_url": index,
                                               "preload": ["numpy", "pandas"]}})
    envs = ready(d, "default", timeout=600)
    assert envs["default"]["state"] == "ready", envs["default"]["error"]
    assert {"numpy", "pandas"} <= set(versions(envs["default"]))
    with d.client() as c:
        r = c.run("import pandas as pd\nprint(pd.DataFrame({'a': [1, 2, 3]}).a.sum())", timeout_ms=30000)
        assert (r["status"], r["stdout"]) == ("ok", b"6\n"), r
        # Preloaded from the environment, not from Debian's dist-packages (an older numpy there
        # came first on the fork server's path, and pandas refused it).
        r = c.run("import sys, numpy; print('pandas' in sys.modules, numpy.__file__.startswith(sys.path[3]))")
        assert r["stdout"] == b"True True\n", (r, d.log()[-2000:])


def test_dify_dependency_routes_list_the_default_environment(env_daemon: Any, wheelhouse: str) -> None:
    """sandboxd-http's dependency routes speak for the environment its runs get."""
    import httpx
    from bridge import BridgeProcess

    d: DaemonProcess = env_daemon({"default": house_env(wheelhouse, "sbxpure==1.0")})
    ready(d, "default")
    with BridgeProcess(d.socket) as b, \
            httpx.Client(base_url=b.url, headers=b.headers, timeout=60, trust_env=False) as c:
        body = c.get("/v1/sandbox/dependencies", params={"language": "python3"}).json()
        assert body["code"] == 0 and {"name": "sbxpure", "version": "1.0"} in body["data"]["dependencies"], body
        assert c.get("/v1/sandbox/dependencies", params={"language": "nodejs"}).json()["data"] == \
            {"dependencies": []}
        r = c.post("/v1/sandbox/run", json={"language": "python3", "code": "import sbxpure; print(sbxpure.VERSION)",
                                            "preload": "", "enable_network": False}).json()
        assert r["data"]["stdout"] == "1.0\n" and r["data"]["error"] == "", r
        # Rebuilding is a sandboxd admin's: the bridge's uid is not one.
        r = c.post("/v1/sandbox/dependencies/update", json={"language": "python3"})
        assert r.status_code == 403 and "admin" in r.json()["message"], r.text


def test_without_python3_pip_the_build_uses_the_pip_wheel_of_python3_venv(wheelhouse: str, tmp_path: Path,
                                                                           monkeypatch: Any) -> None:
    """python3-pip is only suggested by the package: without it, builds fill the venv with the pip
    wheel python3-venv brings (python3-pip-whl), run from the zip."""
    from sandboxd.jail.builder import buildjail

    monkeypatch.setattr(buildjail, "HOST_PIP", str(tmp_path / "no-python3-pip"))
    command = buildjail.host_pip()
    require(command is not None, "python3-pip-whl (a dependency of python3-venv) is not installed")
    assert command is not None and command[1].startswith(buildjail.PIP_WHEELS)
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    subprocess.run([*command, "--python", str(venv / "bin" / "python"), "install", "-q", "--no-index",
                    "--only-binary", ":all:", "--find-links", wheelhouse, "sbxpure==1.0"], check=True,
                   capture_output=True, timeout=120)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sbxpure; print(sbxpure.VERSION)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "1.0\n", out
