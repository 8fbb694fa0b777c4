"""Files in sessions (session_write_file, session_read_file, session_list_files, sandboxctl
session cp/ls), through the real daemon.

What the owner sees (bytes exact, owned by the session's uid, listed), what a session's own
code can plant against them (``..``, absolute paths, symbolic links to the host's /etc, a
link swapped in and out while the daemon works, FIFOs), who else can touch them (nobody),
what the sizes are bounded by (the quota, the scratch space, the session's memory, which a
written file becomes part of), and threat 33: nothing outside the session's /work is ever
read or written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Any

import pytest
from conftest import call_as, require
from harness import REPO, DaemonProcess

from sandboxd.client import AsyncClient, SandboxdError
from sandboxd.client.sync import Session

BLOB = bytes(range(256)) * 64 + b"\x00\xff" * 100  # every byte value, NULs included


def refused(fn: Any, *args: Any, **kwargs: Any) -> SandboxdError:
    with pytest.raises(SandboxdError) as info:
        fn(*args, **kwargs)
    return info.value


def memory_of(worker_pid: int) -> tuple[int, int]:
    """(limit, used) of the session's memory cgroup, read from the host: R's (the worker's pid
    1 stays where the fork server made it; R, its child, joins the worker's cgroup)."""
    with open(f"/proc/{worker_pid}/task/{worker_pid}/children", encoding="ascii") as f:
        runner = int(f.read().split()[0])
    with open(f"/proc/{runner}/cgroup", encoding="ascii") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _hid, controllers, path in lines:
        if "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            with open(f"{base}/memory.limit_in_bytes") as a, open(f"{base}/memory.usage_in_bytes") as b:
                return int(a.read()), int(b.read())
    unified = "/sys/fs/cgroup" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "/sys/fs/cgroup/unified"
    path = next(p for hid, _c, p in lines if hid == "0")
    with open(f"{unified}{path}/memory.max") as a, open(f"{unified}{path}/memory.current") as b:
        return int(a.read()), int(b.read())


# -- what a user expects -------------------------------------------------------------------
def test_a_binary_file_is_written_read_back_and_listed(daemon: DaemonProcess) -> None:
    with daemon.client() as c, c.session() as s:
        assert s.write_file("data/in/blob.bin", BLOB) == {"path": "data/in/blob.bin", "size": len(BLOB),
                                                           "mode": 0o644}
        assert s.read_file("data/in/blob.bin") == BLOB
        assert s.read_file("./data//in/./blob.bin") == BLOB  # empty and "." components drop out
        r = s.exec("import os, hashlib\nst = os.stat('/work/data/in/blob.bin')\n"
                   "print(hashlib.sha256(open('data/in/blob.bin', 'rb').read()).hexdigest(), st.st_uid, "
                   "oct(st.st_mode & 0o777), oct(os.stat('data').st_mode & 0o777), os.stat('data').st_uid)")
        digest, uid, mode, dir_mode, dir_uid = r["stdout"].decode().split()

        assert digest == hashlib.sha256(BLOB).hexdigest()
        # the session's own uid owns what was written, with sane modes: it can change or delete it
        assert (int(uid), mode, dir_mode, int(dir_uid)) == (s.info["run_uid"], "0o644", "0o755", s.info["run_uid"])
        listing = s.list_files("data", recursive=True)
        assert listing["truncated"] is False and listing["path"] == "data"
        assert [(e["path"], e["type"]) for e in listing["entries"]] == [("data/in", "dir"),
                                                                        ("data/in/blob.bin", "file")]
        assert listing["entries"][1]["size"] == len(BLOB) and listing["entries"][1]["mode"] == 0o644
        top = s.list_files()
        assert "data" in [e["path"] for e in top["entries"]] and "data/in" not in [e["path"] for e in top["entries"]]
        # a write replaces the file whole; text is UTF-8; a mode is kept; what a cell wrote is read back
        s.write_file("data/in/blob.bin", "héllo\n", mode=0o600)
        assert s.read_file("data/in/blob.bin") == "héllo\n".encode()
        assert s.exec("import os; print(oct(os.stat('data/in/blob.bin').st_mode & 0o777))")["stdout"] == b"0o600\n"
        s.exec("open('from_cell.bin', 'wb').write(bytes(range(10)))")
        assert s.read_file("from_cell.bin") == bytes(range(10))
        assert s.write_file("empty", b"")["size"] == 0 and s.read_file("empty") == b""
        # base64 on the wire (for clients that carry no binary type), and parents: false
        raw = c.call("session_write_file", session_id=s.id, path="b64.bin", content=base64.b64encode(BLOB).decode(),
                     base64=True)
        assert raw["size"] == len(BLOB) and s.read_file("b64.bin") == BLOB
        e = refused(s.write_file, "no/such/dir/f", b"x", parents=False)
        assert (e.code, e.details["path"], e.details["at"]) == ("not_found", "no/such/dir/f", "no"), e
        e = refused(c.call, "session_write_file", session_id=s.id, path="x", content="%%%", base64=True)
        assert (e.code, e.details["field"]) == ("bad_request", "content")
        assert refused(s.read_file, "missing.txt").code == "not_found"
        assert refused(s.list_files, "missing").code == "not_found"
        e = refused(s.read_file, "data")
        assert (e.code, e.details["reason"]) == ("bad_request", "directory")
        e = refused(s.write_file, "data", b"x")
        assert (e.code, e.details["reason"]) == ("bad_request", "directory")
        e = refused(s.list_files, "empty")
        assert (e.code, e.details["reason"]) == ("bad_request", "not_a_directory")
        e = refused(c.call, "session_read_file", session_id=s.id, path="x", size=3)
        assert (e.code, e.details["field"]) == ("bad_request", "size")  # unknown fields are refused by name
        e = refused(s.write_file, "m", b"x", mode=0o4755)
        assert (e.code, e.details["field"]) == ("bad_request", "mode")
        assert s.exec("print(1)")["stdout"] == b"1\n"  # the session is none the worse


def test_the_asyncio_client_has_the_same_file_operations(daemon: DaemonProcess) -> None:
    import asyncio

    async def main() -> None:
        async with AsyncClient(daemon.socket) as c:
            s = await c.session()
            async with s:
                assert (await s.write_file("a/b.bin", BLOB))["size"] == len(BLOB)
                assert await s.read_file("a/b.bin") == BLOB
                assert [e["path"] for e in (await s.list_files("a"))["entries"]] == ["a/b.bin"]

    asyncio.run(main())


def test_a_nodejs_session_has_the_same_files(daemon: DaemonProcess) -> None:
    require(shutil.which("node") is not None, "node is not installed")
    with daemon.client() as c, c.session(language="nodejs") as s:
        s.write_file("in/data.bin", BLOB)
        r = s.exec("const fs = require('fs'); const b = fs.readFileSync('in/data.bin'); "
                   "fs.writeFileSync('out.txt', String(b.length)); b.length")
        assert (r["status"], r["value"]) == ("ok", str(len(BLOB))), r
        assert s.read_file("out.txt") == str(len(BLOB)).encode()
        assert [e["path"] for e in s.list_files("in")["entries"]] == ["in/data.bin"]


def test_files_are_reached_while_an_exec_runs(daemon: DaemonProcess) -> None:
    """File operations do not wait for an exec: they run beside it (docs/protocol.md)."""
    with daemon.client() as c, c.session() as s, daemon.client() as c2:
        other = Session(c2, s.info)
        out: dict[str, Any] = {}
        cell = ("import os, time\nopen('progress', 'w').write('started')\n"
                "for _ in range(2000):\n    if os.path.exists('go'):\n        break\n    time.sleep(0.01)\n"
                "print(open('go').read())")
        t = threading.Thread(target=lambda: out.update(r=s.exec(cell, timeout="30s")))
        t.start()
        try:
            for _ in range(2000):
                try:
                    if other.read_file("progress") == b"started":
                        break
                except SandboxdError as e:
                    assert e.code == "not_found", e
            other.write_file("go", b"hello from outside")
        finally:
            t.join(60)
        assert (out["r"]["status"], out["r"]["stdout"]) == ("ok", b"hello from outside\n"), out


def test_another_uid_cannot_touch_the_files(daemon: DaemonProcess) -> None:
    with daemon.client() as c, c.session() as s:
        s.write_file("secret.txt", b"mine")
        fake = s.id.split("-")[0] + "-999999-000000000000"
        reqs: list[dict[str, Any]] = []
        for sid in (s.id, fake):
            reqs += [{"op": "session_read_file", "id": len(reqs) + 1, "session_id": sid, "path": "secret.txt"},
                     {"op": "session_write_file", "id": len(reqs) + 2, "session_id": sid, "path": "secret.txt",
                      "content": "theirs"},
                     {"op": "session_list_files", "id": len(reqs) + 3, "session_id": sid}]
        responses = call_as("sbx-alice", daemon.socket, reqs)["responses"]
        for mine, never in zip(responses[:3], responses[3:], strict=True):
            assert mine["error"]["code"] == "not_found" and "reason" not in mine["error"], mine
            # the same answer as for an id never issued: nothing leaks, not even that it exists
            assert mine["error"]["message"].replace(s.id, "ID") == never["error"]["message"].replace(fake, "ID")
        assert s.read_file("secret.txt") == b"mine"
        # another session (another uid) sees nothing of this one's /work
        with c.session() as t:
            assert "secret.txt" not in [e["path"] for e in t.list_files()["entries"]]
            assert refused(t.read_file, "secret.txt").code == "not_found"
    # an admin (root runs these tests) may close anyone's session, not read its files
    opened = call_as("sbx-alice", daemon.socket, [{"op": "session_open", "id": 1}])["responses"][0]
    theirs = opened["session"]["session_id"]
    try:
        with daemon.client() as c:
            e = refused(c.call, "session_read_file", session_id=theirs, path=".bashrc")
            assert e.code == "not_found", e
            e = refused(c.call, "session_write_file", session_id=theirs, path="x", content=b"admin")
            assert e.code == "not_found", e
    finally:
        with daemon.client() as c:
            c.call("session_close", session_id=theirs)
    # and a session that ended: its owner learns why
    with daemon.client() as c:
        s2 = c.session()
        s2.close()
        e = refused(c.call, "session_read_file", session_id=s2.id, path="x")
        assert (e.code, e.details.get("reason")) == ("not_found", "closed"), e


# -- what a session's own code plants against them (threat 33) -----------------------------------
def test_paths_out_of_work_are_refused(daemon: DaemonProcess) -> None:
    with daemon.client() as c, c.session() as s:
        for path in ("../etc/passwd", "a/../../etc/passwd", "..", "x/.."):
            e = refused(s.read_file, path)
            assert (e.code, e.details["field"], e.details["reason"]) == ("bad_request", "path", "dotdot"), (path, e)
            assert refused(s.write_file, path, b"x").code == "bad_request"
        for path in ("/etc/passwd", "/work/x", "//etc"):
            e = refused(s.read_file, path)
            assert (e.code, e.details["reason"]) == ("bad_request", "absolute"), (path, e)
        assert "'x'" in refused(s.write_file, "/work/x", b"1").message  # says what to write instead
        for bad in ("", ".", "a\0b", "x" * 256, "/".join(["d"] * 33)):
            assert refused(s.read_file, bad).code == "bad_request", bad
        assert refused(s.list_files, "../").code == "bad_request"


def test_a_planted_symlink_to_etc_is_refused(daemon: DaemonProcess) -> None:
    """The child doing the work runs in the host's mount namespace: a link followed there
    would reach the host's /etc.  None is followed, or replaced."""
    probe = f"sbx-probe-{secrets.token_hex(6)}"
    with daemon.client() as c, c.session() as s:
        r = s.exec("import os\nos.symlink('/etc', 'etc')\nos.symlink('/etc/passwd', 'pw')\n"
                   "os.symlink('/proc/self/root/etc', 'magic')\nos.symlink('.', 'loop')\nos.symlink('../..', 'up')\n"
                   "os.makedirs('real')\nos.symlink('/etc', 'real/deeper')\n"
                   "try:\n    os.link('/etc/passwd', 'hard')\nexcept OSError as e:\n    print(e.errno)")
        assert r["status"] == "ok" and r["stdout"] == b"18\n", r  # a hard link to a root file: EXDEV, another fs
        for path in ("etc/passwd", "pw", "magic/passwd", "loop/pw", "up/etc/passwd", "real/deeper/passwd",
                     "real/deeper"):
            e = refused(s.read_file, path)
            assert (e.code, e.details["reason"]) == ("bad_request", "symlink"), (path, e)
        for path in (f"etc/{probe}", f"real/deeper/{probe}", f"up/etc/{probe}", f"magic/{probe}", "pw", "etc"):
            e = refused(s.write_file, path, b"planted")
            assert (e.code, e.details["reason"]) == ("bad_request", "symlink"), (path, e)
        for path in ("etc", "real/deeper", "magic", "loop"):
            assert refused(s.list_files, path).details["reason"] == "symlink"
        listed = {e["path"]: e["type"] for e in s.list_files(recursive=True)["entries"]}
        assert listed["etc"] == listed["pw"] == listed["real/deeper"] == "symlink"  # listed, not followed
        assert not any(p.startswith(("etc/", "loop/", "up/")) for p in listed), listed
        assert s.exec("import os; print(os.readlink('pw'))")["stdout"] == b"/etc/passwd\n"  # not replaced
    assert not os.path.exists(f"/etc/{probe}") and not os.path.exists(f"/{probe}")


def test_a_link_swapped_in_during_the_walk_leads_nowhere(daemon: DaemonProcess) -> None:
    """TOCTOU: the session's own thread swaps ``d`` between a directory of its own and a link
    to the host's /etc as fast as it can while the daemon reads, writes and lists through it."""
    probe = f"sbx-race-{secrets.token_hex(6)}"
    host_etc = set(os.listdir("/etc"))
    with daemon.client() as c, c.session() as s:
        r = s.exec("import os, threading\nos.makedirs('real')\nopen('real/passwd', 'w').write('inside')\n"
                   "os.symlink('/etc', 'lnk')\nstop = False\n"
                   "def swap():\n    for _ in range(10**7):\n        if stop:\n            return\n"
                   "        try:\n            os.rename('real', 'd'); os.rename('d', 'real')\n"
                   "            os.rename('lnk', 'd'); os.rename('d', 'lnk')\n"
                   "        except OSError:\n            pass\n"
                   "t = threading.Thread(target=swap, daemon=True)\nt.start()")
        assert r["status"] == "ok", r
        outcomes: dict[str, int] = {}
        for _ in range(150):
            calls: tuple[tuple[str, Any], ...] = (("read", lambda: s.read_file("d/passwd")),
                                                 ("write", lambda: s.write_file(f"d/{probe}", b"x", parents=False)),
                                                 ("list", lambda: s.list_files("d")))
            for op, call in calls:
                got: Any
                try:
                    got = call()
                except SandboxdError as e:
                    assert e.code in ("not_found", "bad_request"), e
                    key = f"{op}:{e.details.get('reason', e.code)}"
                    outcomes[key] = outcomes.get(key, 0) + 1
                    continue
                outcomes[f"{op}:ok"] = outcomes.get(f"{op}:ok", 0) + 1
                if op == "read":
                    assert got == b"inside", got  # never the host's /etc/passwd
                elif op == "list":
                    assert {e["path"][2:] for e in got["entries"]} <= {"passwd", probe}, got
        s.exec("stop = True\nt.join()")
        assert s.exec("import os; print(sorted(os.listdir('real')))")["stdout"] in (
            b"['passwd']\n", f"['passwd', '{probe}']\n".encode())
    assert set(os.listdir("/etc")) == host_etc and not os.path.exists(f"/etc/{probe}"), outcomes


def test_a_fifo_planted_by_the_session_does_not_hang_the_daemon(daemon: DaemonProcess) -> None:
    with daemon.client() as c, c.session() as s:
        r = s.exec("import os, socket\nos.mkfifo('pipe')\nos.mkfifo('pipe2')\n"
                   "try:\n    socket.socket(socket.AF_UNIX).bind('sock')\nexcept OSError as e:\n    print(e)")
        assert r["status"] == "ok", r
        e = refused(s.read_file, "pipe")  # nobody writes it: an open that waited would never end
        assert (e.code, e.details["reason"], e.details["kind"]) == ("bad_request", "not_a_file", "fifo"), e
        assert refused(s.read_file, "pipe/x").details["reason"] == "not_a_directory"
        assert c.status()["ok"]  # the daemon answers meanwhile, and after
        kinds = {e["path"]: e["type"] for e in s.list_files()["entries"]}
        assert kinds["pipe"] == "fifo"
        if "sock" in kinds:
            assert kinds["sock"] == "socket" and refused(s.read_file, "sock").details["kind"] == "socket"
        # a write never goes into the FIFO: the name gets a regular file of its own
        s.write_file("pipe2", b"not into the pipe")
        r = s.exec("import os, stat; print(stat.S_ISREG(os.stat('pipe2').st_mode), open('pipe2').read())")
        assert r["stdout"] == b"True not into the pipe\n", r
        assert s.exec("print(2)")["stdout"] == b"2\n"


def test_permissions_are_the_sessions_own(daemon: DaemonProcess) -> None:
    """The kernel checks each access with the session's uid: what it made unreadable stays so."""
    with daemon.client() as c, c.session() as s:
        s.exec("import os\nopen('locked', 'w').write('no')\nos.chmod('locked', 0)\n"
               "os.makedirs('closed/inner')\nopen('closed/inner/f', 'w').write('x')\nos.chmod('closed', 0)")
        e = refused(s.read_file, "locked")
        assert (e.code, e.details["path"]) == ("forbidden", "locked"), e
        assert refused(s.read_file, "closed/inner/f").code == "forbidden"
        assert refused(s.write_file, "closed/new", b"x").code == "forbidden"
        assert refused(s.list_files, "closed").code == "forbidden"
        assert s.list_files("out")["entries"] == []


# -- sizes ----------------------------------------------------------------------------------------
def test_sizes_past_the_quota_and_the_scratch_are_refused(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"quotas": {"default": {"max_files_size": "1M"}}, "jail": {"scratch_size": "6M"}})
    with d.client() as c, c.session() as s:
        e = refused(s.write_file, "big", b"x" * ((1 << 20) + 1))
        assert (e.code, e.details["limit"], e.details["max"]) == ("too_large", "max_files_size", 1 << 20), e
        assert s.write_file("fits", b"x" * (1 << 20))["size"] == 1 << 20
        s.exec("open('grown', 'wb').write(b'y' * (2 << 20))")
        e = refused(s.read_file, "grown")
        assert (e.code, e.details["limit"], e.details["size"]) == ("too_large", "max_files_size", 2 << 20), e
        r = s.exec("open('sparse', 'wb').truncate(15 << 20)")  # holes (a run's files stop at limits.file_size)
        assert r["status"] == "ok", r
        e = refused(s.read_file, "sparse")  # refused by its size, never read
        assert (e.code, e.details["size"]) == ("too_large", 15 << 20), e
        s.exec("import os\nfd = os.open('/tmp/fill', os.O_WRONLY | os.O_CREAT)\ntry:\n"
               "    for _ in range(1000):\n        os.write(fd, b'z' * 65536)\nexcept OSError:\n    pass\n"
               "os.close(fd)")  # the scratch is full now (/tmp shares it)
        e = refused(s.write_file, "more", b"w" * (512 << 10))
        assert (e.code, e.details["limit"]) == ("too_large", "jail.scratch_size"), e
        assert refused(s.read_file, "more").code == "not_found"  # nothing of it was left
        s.exec("import os; os.unlink('/tmp/fill')")
        assert s.write_file("more", b"w" * (512 << 10))["size"] == 512 << 10


def test_a_written_file_is_the_sessions_memory(daemon: DaemonProcess) -> None:
    """The file's pages are charged to the session's cgroup (its writer joined it), and a
    write that would not fit under the session's memory limit is refused, not OOM-killed."""
    with daemon.client() as c, c.session(memory_mb=96) as s:
        r = s.exec("1")
        require(r["limits_enforced_by"] in ("cgroup1", "cgroup2"), "needs a memory cgroup")
        pid = s.info["worker_pid"]
        _limit, before = memory_of(pid)
        s.write_file("eight.bin", os.urandom(8 << 20))
        _limit, after = memory_of(pid)
        assert after - before >= 7 << 20, (before, after)  # counted against the session, not the daemon
        limit, used = memory_of(pid)
        s.exec(f"hold = b'h' * {limit - used - (10 << 20)}")  # leave the session about 10 MiB
        limit, used = memory_of(pid)
        room = limit - used
        assert room < 12 << 20, room
        e = refused(s.write_file, "too_much.bin", b"m" * (room - (1 << 20)))
        assert (e.code, e.details["limit"]) == ("too_large", "memory_mb"), e
        assert s.exec("len(hold) > 0")["value"] == "True"  # nothing of the session was killed for it
        s.exec("del hold")
        assert s.write_file("now_fits.bin", b"m" * (room - (1 << 20)))["size"] == room - (1 << 20)


# -- sandboxctl ------------------------------------------------------------------------------------
def sandboxctl(d: DaemonProcess, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "sandboxd.ctl", "--socket", d.socket, *args], input=stdin,
                          capture_output=True, cwd=REPO, timeout=120)


def test_sandboxctl_session_cp_both_ways_and_ls(daemon: DaemonProcess) -> None:
    with daemon.client() as c, c.session() as s, tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "blob.bin")
        with open(local, "wb") as f:
            f.write(BLOB)
        os.chmod(local, 0o640)
        p = sandboxctl(daemon, "session", "cp", local, f"{s.id}:in/")
        assert p.returncode == 0 and b"in/blob.bin" in p.stdout, p
        assert s.read_file("in/blob.bin") == BLOB
        assert s.list_files("in")["entries"][0]["mode"] == 0o640  # the local file's mode, as cp keeps it
        p = sandboxctl(daemon, "session", "cp", "-", f"{s.id}:in/stdin.txt", "--mode", "600", stdin=b"piped")
        assert p.returncode == 0 and s.read_file("in/stdin.txt") == b"piped", p
        p = sandboxctl(daemon, "session", "cp", f"{s.id}:in/blob.bin", tmp + "/back.bin")
        assert p.returncode == 0, p
        with open(tmp + "/back.bin", "rb") as f:
            assert f.read() == BLOB
        os.mkdir(tmp + "/dir")
        assert sandboxctl(daemon, "session", "cp", f"{s.id}:in/stdin.txt", tmp + "/dir").returncode == 0
        with open(tmp + "/dir/stdin.txt", "rb") as f:
            assert f.read() == b"piped"
        p = sandboxctl(daemon, "session", "cp", f"{s.id}:in/blob.bin", "-")
        assert p.returncode == 0 and p.stdout == BLOB, p
        p = sandboxctl(daemon, "session", "ls", s.id, "in", "--json")
        listing = json.loads(p.stdout)
        assert listing["ok"] and [e["path"] for e in listing["entries"]] == ["in/blob.bin", "in/stdin.txt"]
        s.exec("import os; os.symlink('/etc', 'in/\\x1b]0;pwned\\x07')")
        p = sandboxctl(daemon, "session", "ls", s.id, "-R")
        assert p.returncode == 0 and b"in/blob.bin" in p.stdout and b"\x1b" not in p.stdout, p  # names escaped
        p = sandboxctl(daemon, "session", "cp", f"{s.id}:../etc/passwd", tmp + "/x")
        assert p.returncode == 125 and b"bad_request" in p.stderr and not os.path.exists(tmp + "/x"), p
        p = sandboxctl(daemon, "session", "cp", local, tmp + "/y")
        assert p.returncode == 127 and b"exactly one" in p.stderr, p
        p = sandboxctl(daemon, "session", "cp", f"{s.id}:missing", tmp + "/z", "--json")
        assert p.returncode == 125 and json.loads(p.stdout)["error"]["code"] == "not_found", p
