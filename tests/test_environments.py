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
import pwd
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require, require_root
from harness import ENVS_BASE, REPO, DaemonProcess, as_user, configured_index, wait_until

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
    add_sdist(house, "sbxhook", HOOK_SETUP.replace("STATE", repr(state_dir)), "from ._seen import SEEN\n")


def add_sdist(house: str, name: str, setup_py: str, init: str = "") -> None:
    """A source distribution NAME 1.0 in ``house``: its setup.py (package code that runs in the
    build jail, as the build uid) and its package's ``__init__.py``."""
    data = {f"{name}-1.0/setup.py": setup_py, f"{name}-1.0/{name}/__init__.py": init,
            f"{name}-1.0/PKG-INFO": f"Metadata-Version: 1.0\nName: {name}\nVersion: 1.0\n"}
    with tarfile.open(os.path.join(house, f"{name}-1.0.tar.gz"), "w:gz") as tar:
        for path, text in data.items():
            raw = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.fixture
def sdists() -> Iterator[Any]:
    """A wheelhouse of the test's own for source distributions it makes (removed afterwards)."""
    house = tempfile.mkdtemp(prefix="sbx-sdists-")
    os.chmod(house, 0o755)

    def add(name: str, setup_py: str, init: str = "") -> str:
        add_sdist(house, name, setup_py, init)
        return house

    yield add
    shutil.rmtree(house, ignore_errors=True)


def sdist_env(house: str, *requirements: str) -> dict[str, Any]:
    return {"requirements": list(requirements), "find_links": [house], "only_binary": False}


@pytest.fixture
def env_daemon(make_daemon: Any, wheelhouse: str) -> Iterator[Any]:
    """Start a daemon whose environments live in a directory of its own (removed afterwards)."""
    made: list[str] = []

    def start(environments: dict[str, Any], start: bool = True, **overrides: Any) -> DaemonProcess:
        os.makedirs(ENVS_BASE, mode=0o755, exist_ok=True)
        envs = tempfile.mkdtemp(prefix="envs-", dir=ENVS_BASE)
        os.chmod(envs, 0o755)
        made.append(envs)
        daemon = {"environments_dir": envs, **overrides.pop("daemon", {})}
        d: DaemonProcess = make_daemon({"daemon": daemon, "environments": environments, **overrides}, start=start)
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


# -- what a build leaves, and what it may take ------------------------------------------------------
# setup.py of a package that leaves, in its environment, what a red team's did: a directory and a
# file anyone may write (the fork server imports from this tree, as root), set-id bits, ACLs that
# grant a host user what the mode does not (a default one on the environment's top too, which
# files the daemon writes there later would inherit).
LEFTOVERS_SETUP = textwrap.dedent("""\
    import os, struct, sysconfig
    from setuptools import setup
    paths = sysconfig.get_paths()
    site, top = paths["purelib"], paths["data"]
    def acl(named):
        entries = [(0x01, 7, -1), (0x02, named, ALICE), (0x04, 5, -1), (0x10, 7, -1), (0x20, 5, -1)]
        return struct.pack("<I", 2) + b"".join(struct.pack("<HHi", t, p, i) for t, p, i in entries)
    def chmod(path, mode):
        os.chmod(path, mode)
        return path
    d = os.path.join(site, "sbxleft_open")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "__init__.py"), "w") as f:
        f.write("PLANTED = False\\n")
    chmod(os.path.join(d, "__init__.py"), 0o666)
    chmod(d, 0o777)
    os.makedirs(os.path.join(site, "sbxleft_setgid"), exist_ok=True)
    chmod(os.path.join(site, "sbxleft_setgid"), 0o3777)
    open(os.path.join(site, "sbxleft_setuid"), "w").close()
    chmod(os.path.join(site, "sbxleft_setuid"), 0o6755)
    with open(os.path.join(site, "sbxleft_acl.py"), "w") as f:
        f.write("X = 1\\n")
    os.setxattr(os.path.join(site, "sbxleft_acl.py"), "system.posix_acl_access", acl(7))
    os.setxattr(top, "system.posix_acl_default", acl(7))
    setup(name="sbxleft", version="1.0", packages=["sbxleft"])
    """)
# What a host user (not root, not the build uid) tries on a built environment.
HOST_USER_TRIES = textwrap.dedent("""\
    import json, os, sys
    site, top = sys.argv[1], sys.argv[2]
    tried = {}
    def attempt(name, fn):
        try:
            fn()
            tried[name] = "ok"
        except OSError as e:
            tried[name] = type(e).__name__
    attempt("plant_in_open_dir", lambda: open(os.path.join(site, "sbxleft_open", "evil.py"), "x").close())
    attempt("write_open_file", lambda: open(os.path.join(site, "sbxleft_open", "__init__.py"), "a").close())
    attempt("write_acl_file", lambda: open(os.path.join(site, "sbxleft_acl.py"), "a").close())
    attempt("plant_in_top", lambda: open(os.path.join(top, "evil.py"), "x").close())
    attempt("write_manifest", lambda: open(os.path.join(top, "sandboxd-environment.json"), "a").close())
    print(json.dumps(tried))
    """)


def tree_problems(top: str) -> list[str]:
    """Entries under ``top`` (``top`` too) that are not root's, are writable by group or others,
    carry set-id or sticky bits, or an ACL."""
    problems = []
    for dirpath, dirnames, filenames in os.walk(top):  # each directory as it is walked, top first
        links = [n for n in dirnames if os.path.islink(os.path.join(dirpath, n))]  # not walked
        for path in [dirpath, *(os.path.join(dirpath, n) for n in [*filenames, *links])]:
            st = os.lstat(path)
            if (st.st_uid, st.st_gid) != (0, 0):
                problems.append(f"{path}: owner {st.st_uid}:{st.st_gid}")
            if stat.S_ISLNK(st.st_mode):
                continue
            if st.st_mode & 0o7022:
                problems.append(f"{path}: mode {stat.S_IMODE(st.st_mode):o}")
            acls = [a for a in os.listxattr(path, follow_symlinks=False) if a.startswith("system.posix_acl")]
            if acls:
                problems.append(f"{path}: {', '.join(acls)}")
    return sorted(set(problems))


def test_a_build_leaves_nothing_a_host_user_can_write(env_daemon: Any, sdists: Any) -> None:
    """Item 7: everything a build leaves is root's, without group or other write, set-id bits
    or ACLs, whatever the package made of its modes: no host user can plant code in the tree
    the environment's fork server imports from as root."""
    alice = pwd.getpwnam("sbx-alice").pw_uid
    house = sdists("sbxleft", LEFTOVERS_SETUP.replace("ALICE", str(alice)))
    d: DaemonProcess = env_daemon({"default": sdist_env(house, "sbxleft")})
    entry = ready(d, "default")["default"]
    assert entry["state"] == "ready", entry["error"]
    site = Path(entry["site"])
    top = site.parents[2]
    assert (site / "sbxleft_open" / "__init__.py").exists() and (site / "sbxleft_acl.py").exists()
    helper = Path(d.dir, "host_user_tries.py")
    helper.write_text(HOST_USER_TRIES)
    helper.chmod(0o644)
    p = subprocess.run(["/usr/bin/python3", "-I", str(helper), str(site), str(top)], capture_output=True, text=True,
                       timeout=60, cwd="/", **as_user("sbx-alice"))
    tried = json.loads(p.stdout)
    assert all(v == "PermissionError" for v in tried.values()), tried
    assert tree_problems(str(top)) == []
    assert d.run("import sbxleft_open; print(sbxleft_open.PLANTED)")["stdout"] == b"False\n"
    # A build an older sandboxd took over (another digest, no takeover version in its manifest,
    # modes as the build left them) is normalised at start, before it serves again, and rebuilt.
    assert d.stop() == 0
    manifest = top / "sandboxd-environment.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "takeover"}))
    (site / "sbxleft_open").chmod(0o777)
    old = top.with_name(top.name.replace(entry["build"].split("-")[1], "0" * 12))
    top.rename(old)
    d.start()
    assert tree_problems(str(old)) == [] and "taken over by an older sandboxd" in d.log()
    with d.client() as c:
        def rebuilt_entry() -> dict[str, Any] | None:
            return next((e for e in c.call("environments")["environments"]
                         if e["state"] == "ready" and e["build"] != entry["build"]), None)

        rebuilt = wait_until(rebuilt_entry, 180, 0.5)
    assert rebuilt and tree_problems(str(Path(rebuilt["site"]).parents[2])) == []


SPARSE_SETUP = textwrap.dedent("""\
    import os, sysconfig
    from setuptools import setup
    with open(os.path.join(sysconfig.get_paths()["purelib"], "sbxsparse.bin"), "wb") as f:
        f.truncate(1 << 30)
    setup(name="sbxsparse", version="1.0", packages=["sbxsparse"])
    """)


def test_a_sparse_file_of_a_build_stays_sparse_in_its_root(env_daemon: Any, sdists: Any) -> None:
    """Item 7: a 1 GiB sparse file (no block allocated) that a package leaves takes no space in
    the environment's root either, which copies files (root.hard_links off, the default)."""
    d: DaemonProcess = env_daemon({"default": sdist_env(sdists("sbxsparse", SPARSE_SETUP), "sbxsparse")},
                                  root={"hard_links": False})
    entry = ready(d, "default")["default"]
    assert entry["state"] == "ready", entry["error"]
    source = os.stat(Path(entry["site"], "sbxsparse.bin"))
    assert source.st_size == 1 << 30 and source.st_blocks == 0  # what the build left: a hole
    env_root = next(p for p in Path(d.state_dir, "roots", "environments", "default").glob("root-*") if p.is_dir())
    copy = os.stat(str(env_root) + entry["site"] + "/sbxsparse.bin")
    assert copy.st_ino != source.st_ino and copy.st_size == 1 << 30
    assert copy.st_blocks * 512 < 1 << 20, f"{copy.st_blocks * 512} bytes allocated for a copy of a hole"
    r = d.run(f"f = open({entry['site'] + '/sbxsparse.bin'!r}, 'rb'); f.seek((1 << 30) - 4); print(f.read())")
    assert r["stdout"] == b"b'\\x00\\x00\\x00\\x00'\n", r


# setup.py of a package that says where its build runs and how many processes it may start.
CGROUP_PROBE_SETUP = textwrap.dedent("""\
    import json, os, signal
    from setuptools import setup
    seen = {"cgroup": open("/proc/self/cgroup").read()}
    children = []
    try:
        for _ in range(200):
            pid = os.fork()
            if pid == 0:
                signal.pause()
                os._exit(0)
            children.append(pid)
    except OSError as e:
        seen["fork_error"] = type(e).__name__
    seen["forks"] = len(children)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with open("sbxcg/_seen.py", "w") as f:
        f.write("SEEN = " + json.dumps(seen) + "\\n")
    setup(name="sbxcg", version="1.0", packages=["sbxcg"])
    """)
# setup.py of a package that takes 2 GiB while it builds.
HOG_SETUP = textwrap.dedent("""\
    from setuptools import setup
    hog = b"\\x01" * (2 << 30)
    setup(name="sbxhog", version="1.0", packages=["sbxhog"])
    """)


def test_a_build_runs_in_a_cgroup_of_its_own_and_stops_at_its_limits(env_daemon: Any, sdists: Any) -> None:
    """Item 7: each build has a cgroup of its own (not the daemon's), with jail.build_memory_max
    and jail.build_pids; a build that reaches its memory limit fails saying so, and its cgroup
    goes with it."""
    sdists("sbxcg", CGROUP_PROBE_SETUP, "from ._seen import SEEN\n")
    house = sdists("sbxhog", HOG_SETUP)
    d: DaemonProcess = env_daemon({"hog": sdist_env(house, "sbxhog"), "probe": sdist_env(house, "sbxcg")},
                                  jail={"build_memory_max": "512M", "build_pids": 64})
    envs = ready(d, "hog", "probe")
    hog = envs["hog"]
    assert hog["state"] == "failed", hog
    assert "jail.build_memory_max" in hog["error"]["message"] and "512.0 MiB" in hog["error"]["message"], hog["error"]
    assert hog["error"]["limit"] == "jail.build_memory_max"
    assert envs["probe"]["state"] == "ready", envs["probe"]["error"]
    assert 0 < envs["probe"]["build_memory_peak_bytes"] < 512 << 20  # its cgroup's peak, for tuning the limit
    r = d.run("import json, sbxcg; print(json.dumps(sbxcg.SEEN))", environment="probe")
    assert r["status"] == "ok", r
    seen = json.loads(r["stdout"])
    parent = d.config["jail"]["cgroup_parent"]
    lines = [ln.split(":", 2) for ln in seen["cgroup"].splitlines()]
    memory = next(path for _, controllers, path in lines if "memory" in controllers.split(",") or controllers == "")
    assert f"/{parent}/build-" in memory, seen["cgroup"]  # not the daemon's own cgroup
    assert seen.get("fork_error") == "BlockingIOError" and seen["forks"] < 64, seen  # jail.build_pids
    with d.client() as c:
        bases = c.status()["cgroup"]["bases"]
    left = [os.path.join(b, n) for b in bases.values() for n in os.listdir(b) if n.startswith("build-")]
    assert left == []  # each build's cgroup went with it


# -- what sandboxctl shows of packages ---------------------------------------------------------------
# Terminal escapes a package can put where sandboxctl prints: a distribution's name and version
# (METADATA of a .dist-info it plants), and the error its module raises on import.
OSC52_SRC, TITLE_SRC = r"\x1b]52;c;cHduZWQ=\x07\x1b[2J", r"\x1b]0;pwned\x07"  # clipboard, screen; title
OSC52, TITLE = (x.encode().decode("unicode_escape") for x in (OSC52_SRC, TITLE_SRC))
ANSI_SETUP = textwrap.dedent(f"""\
    import os, sysconfig
    from setuptools import setup
    info = os.path.join(sysconfig.get_paths()["purelib"], "sbxansi_meta-1.0.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: sbx{OSC52_SRC}ansi\\nVersion: 1.0{TITLE_SRC}\\n\\n")
    setup(name="sbxansi", version="1.0", packages=["sbxansi"])
    """)
ANSI_INIT = f'raise ImportError("not today{TITLE_SRC}")\n'


def test_package_strings_reach_sandboxctl_escaped(env_daemon: Any, sdists: Any) -> None:
    """Item 8 (threat 28): what a package says of itself reaches an administrator's terminal
    only escaped -- on a terminal, and as much when sandboxctl's output is piped (ssh host
    sandboxctl ..., a pager, watch): the terminal at the far end of a pipe is a terminal too."""
    from harness import on_a_terminal

    d: DaemonProcess = env_daemon({"default": sdist_env(sdists("sbxansi", ANSI_SETUP, ANSI_INIT), "sbxansi")})
    entry = ready(d, "default")["default"]
    assert entry["state"] == "ready", entry["error"]
    assert {"name": f"sbx{OSC52}ansi", "version": f"1.0{TITLE}"} in entry["packages"]  # the data is kept as is
    env = dict(os.environ, SANDBOXD_SOCKET=d.socket)
    for args in (["env", "list"], ["root", "why", "sbxansi"]):
        cmd = [sys.executable, "-m", "sandboxd.ctl", *args]
        p = subprocess.run(cmd, capture_output=True, cwd=REPO, env=env, timeout=120)
        rc, tty = on_a_terminal(cmd, dict(env, PYTHONPATH=REPO))
        for out in (p.stdout + p.stderr, tty):
            assert b"\x1b" not in out and b"\x07" not in out, (args, out)
        if args == ["env", "list"]:
            assert p.returncode == 0 and b"sbx\\x1b]52;c;cHduZWQ=\\x07\\x1b[2Jansi==1.0\\x1b]0;pwned\\x07" in p.stdout
        else:
            assert b"not today\\x1b]0;pwned\\x07" in p.stdout, p.stdout
    p = subprocess.run([sys.executable, "-m", "sandboxd.ctl", "env", "list", "--json"], capture_output=True, cwd=REPO,
                       env=env, timeout=60)
    assert b"\x1b" not in p.stdout and f"sbx{OSC52}ansi" in [x["name"] for e in json.loads(p.stdout)["environments"]
                                                              for x in e["packages"]]


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


# A build that waits for the test: its setup.py (in the build jail, where the wheelhouse is bound
# read-only at its own path) goes on once the file GO exists there.
GATED_SETUP = textwrap.dedent("""\
    import os, time
    from setuptools import setup
    for _ in range(3000):
        if os.path.exists(GO):
            break
        time.sleep(0.1)
    setup(name="sbxgated", version="1.0", packages=["sbxgated"])
    """)


def gated_house(sdists: Any) -> tuple[str, str]:
    """A wheelhouse with sbxgated, whose build waits for the returned file to exist (written twice:
    its setup.py names a file in the wheelhouse, whose path the first write gives)."""
    house = sdists("sbxgated", "", "VERSION = 'gated'\n")
    go = os.path.join(house, "go")
    add_sdist(house, "sbxgated", GATED_SETUP.replace("GO", repr(go)), "VERSION = 'gated'\n")
    return house, go


def environment(d: DaemonProcess, name: str) -> dict[str, Any]:
    with d.client() as c:
        entry: dict[str, Any] = next(e for e in c.call("environments")["environments"] if e["name"] == name)
        return entry


def test_runs_wait_for_the_first_build_of_their_environment(env_daemon: Any, sdists: Any) -> None:
    """A run that finds its environment's first build under way waits for it (as it would for a
    worker), and sandboxd-http's /health is not ready until the environment serves."""
    import httpx
    from bridge import BridgeProcess

    house, go = gated_house(sdists)
    d: DaemonProcess = env_daemon({"default": sdist_env(house, "sbxgated")}, daemon={"environment_wait": "10m"})
    assert environment(d, "default")["state"] == "building"
    with d.client() as c:  # the daemon's own readiness (a balancer's) says so too
        st = c.status()
    assert st["serving_environments"] == [] and not st["ready"], st["not_ready"]
    assert "the environment default is building: no build of it serves" in st["not_ready"], st["not_ready"]
    with BridgeProcess(d.socket) as b:
        health = httpx.get(b.url + "/health", trust_env=False)
        assert health.status_code == 503 and "environment default" in health.json()["reason"] and \
            "building" in health.json()["reason"], health.text
        results: list[Any] = []
        t = threading.Thread(target=lambda: results.append(d.run("import sbxgated; print(sbxgated.VERSION)")))
        t.start()
        try:
            assert wait_until(lambda: environment(d, "default")["waiting"] == 1, 60), environment(d, "default")
        finally:
            Path(go).touch()
            t.join(300)
        assert results and (results[0]["status"], results[0]["stdout"]) == ("ok", b"gated\n"), results
        assert environment(d, "default")["waiting"] == 0
        assert wait_until(lambda: httpx.get(b.url + "/health", trust_env=False).status_code == 200, 30)


def test_a_run_that_waits_its_limit_says_how_long_the_build_has_run(env_daemon: Any, sdists: Any) -> None:
    """Environment b's build waits for a's (one at a time): a run for b says how long since b's build
    was asked for (it said the host's uptime: the clock started at 0) and what it waits for."""
    house, go = gated_house(sdists)
    d: DaemonProcess = env_daemon({"a": sdist_env(house, "sbxgated"), "b": sdist_env(house, "sbxgated")},
                                  daemon={"environment_wait": "1s"})
    try:
        with d.client() as c:
            with pytest.raises(SandboxdError) as e:
                c.run("print(1)", environment="b")
            uptime = c.call("status")["uptime_s"]
        assert e.value.code == "unavailable" and "daemon.environment_wait" in e.value.message, e.value
        assert "waiting for another build" in e.value.message, e.value
        building_for = int(e.value.message.split("being built (for ")[1].split("s,")[0])
        assert building_for <= uptime + 1, (e.value.message, uptime)  # counted from the build, not from 0
    finally:
        Path(go).touch()


def test_a_state_dir_whose_environments_no_root_can_hold_is_refused(make_daemon: Any, wheelhouse: str) -> None:
    """--state-dir under /tmp (as every test daemon's is): environments would go under it, and
    their site-packages never into a root -- runs got ModuleNotFoundError from a 'ready' one."""
    d: DaemonProcess = make_daemon({"environments": {"default": house_env(wheelhouse, "sbxpure==1.0")}}, start=False)
    with pytest.raises(RuntimeError):
        d.start(timeout=30)
    assert d.proc is not None and d.proc.wait(30) == 78
    assert f"--state-dir {d.state_dir} (environments go to {d.state_dir}/environments)" in d.log()
    assert "is under /tmp" in d.log() and "daemon.environments_dir" in d.log()


def test_an_environment_whose_site_packages_cannot_join_its_root_never_serves(env_daemon: Any,
                                                                              wheelhouse: str) -> None:
    """A build served by a daemon whose root.exclude then covers it (at start), and a build that
    the exclude covers from the first (a rebuild): neither serves; both say why."""
    from sandboxd.config import DEFAULT_ROOT_EXCLUDE

    d: DaemonProcess = env_daemon({"default": house_env(wheelhouse, "sbxpure==1.0")})
    assert ready(d, "default")["default"]["state"] == "ready"
    assert d.run("import sbxpure; print(sbxpure.VERSION)")["stdout"] == b"1.0\n"
    assert d.stop() == 0
    envs = d.config["daemon"]["environments_dir"]
    d.write_config(dict(d.config, root={**d.config.get("root", {}),
                                        "exclude": [*DEFAULT_ROOT_EXCLUDE, envs + "/*"]}))
    d.start()
    entry = ready(d, "default")["default"]
    assert entry["state"] == "failed" and "excluded by root.exclude" in entry["error"]["message"], entry
    with d.client() as c, pytest.raises(SandboxdError) as e:
        c.run("import sbxpure")
    assert e.value.code == "unavailable" and "excluded by root.exclude" in e.value.message, e.value
    assert "does not serve" in d.log()


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
    odd: list[Any] = []  # (what a run that was not ok said, for the message)
    stop = threading.Event()

    def load() -> None:
        with d.client() as c:
            while not stop.is_set():
                r = c.run("import sbxpure, time; time.sleep(0.05); print(sbxpure.VERSION)")
                statuses.append(r["status"])
                if r["status"] != "ok":
                    odd.append(r)

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
    errors_logged = [line for line in d.log().splitlines() if " ERROR " in line][:5]
    assert len(statuses) > 10 and set(statuses) == {"ok"}, (Counter(statuses), odd[:3], errors_logged)
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
