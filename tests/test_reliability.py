"""Hostile clients, faults and the start-up self-test, against real daemons.

During every attack another uid must still get a run promptly.
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import pytest
from conftest import call_as, require
from harness import REPO, DaemonProcess, fd_count, raw_socket, rss_kb, wait_until

from sandboxd.common import protocol

PROMPT = 3.0  # seconds within which another uid's run must finish during an attack


def alice_runs_promptly(d: DaemonProcess) -> None:
    t0 = time.monotonic()
    out = call_as("sbx-alice", d.socket, [{"op": "run", "code": "print('alice')"}])
    assert out["responses"][0]["result"]["status"] == "ok", out
    assert time.monotonic() - t0 < PROMPT


HOSTILE = {"daemon": {"read_timeout": "1s", "idle_timeout": "3s", "write_timeout": "2s",
                      "max_connections_per_uid": 50, "max_connections": 5000}}


def test_slow_senders_holding_partial_frames(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon(HOSTILE)
    socks = []
    for i in range(40):
        s = raw_socket(d.socket)
        header = protocol.HEADER.pack(100)
        s.sendall(header[: 1 + i % 3] if i % 2 else header + b"\x82")
        socks.append(s)
    alice_runs_promptly(d)
    time.sleep(1.5)  # read_timeout: every half-sent frame is dropped
    for s in socks:
        s.settimeout(2)
        assert s.recv(64) == b""
        s.close()
    alice_runs_promptly(d)


def test_thousands_of_idle_connections(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon(HOSTILE)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert d.proc is not None
    # The baseline once the daemon has served a run and its pool has settled: the event loop's
    # one-time fds (libuv keeps a spare for EMFILE) and the pool's grown target are in it.
    alice_runs_promptly(d)
    with d.client() as c:
        assert wait_until(lambda: all(p["ready"] == p["target"] and not p["starting"]
                                      for p in c.status()["pool"]["profiles"].values()), 20)
    fds_before = fd_count(d.proc.pid)
    socks, refused = [], 0
    try:
        for _ in range(2000):
            socks.append(raw_socket(d.socket, timeout=None))  # blocking: a full backlog waits, not fails
        time.sleep(0.5)
        for s in socks:  # past the per-uid limit the daemon answers quota_exceeded and closes
            s.setblocking(False)
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            if data:
                body = msgpack.unpackb(data[4:], raw=False)
                assert body["error"]["code"] == "quota_exceeded" and body["error"]["limit"] == "connections"
                refused += 1
        assert refused >= 2000 - 50
        alice_runs_promptly(d)
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with d.client() as c:  # the idle ones are closed after idle_timeout (3 s)
        assert wait_until(lambda: c.status()["connections"] == 1, 10)
    # (the pool's workers hold fds too: wait for the one the run used to be replaced)
    pid = d.proc.pid
    assert wait_until(lambda: fd_count(pid) <= fds_before + 2, 10), fd_count(pid)


def test_clients_that_never_read_their_responses(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon(HOSTILE)
    socks = []
    frame = protocol.encode({"op": "run", "code": "print('x' * 4_000_000)", "max_output": 8 << 20})
    for _ in range(6):
        s = raw_socket(d.socket)
        for _ in range(3):
            s.sendall(frame)
        socks.append(s)
    alice_runs_promptly(d)
    assert d.proc is not None
    with d.client() as c:  # after write_timeout (2 s) the daemon gives up on them
        assert wait_until(lambda: c.status()["connections"] == 1, 10)
    assert rss_kb(d.proc.pid) < 200_000
    for s in socks:
        s.close()
    alice_runs_promptly(d)


def test_connection_flood_from_one_uid(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon(HOSTILE)
    stop = threading.Event()
    opened = [0]

    def flood() -> None:
        while not stop.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(d.socket)
                opened[0] += 1
            except OSError:
                pass
            s.close()

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        for _ in range(3):
            alice_runs_promptly(d)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert opened[0] > 1000


def test_sigkill_with_runs_in_flight_leaves_nothing_and_keeps_usage(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"daemon": {"workers": 16, "reserved_workers": 0}, "pool": {"min": 2, "max": 4}})
    with d.client() as c:
        for _ in range(5):
            c.run("pass")
    results: list[Any] = []

    def long_run() -> None:
        try:
            with d.client() as c:
                results.append(c.run("import os, time\nif os.fork() == 0: time.sleep(60)\ntime.sleep(60)",
                                     timeout_ms=30000))
        except OSError as e:  # ConnectionError is one
            results.append(e)

    threads = [threading.Thread(target=long_run) for _ in range(16)]
    for t in threads:
        t.start()
    with d.client() as c:
        assert wait_until(lambda: len(c.call("jobs")["jobs"]) == 16, 20)
    # The usage database lags the counters by a few milliseconds (usage.FLUSH_DELAY, more
    # while the loop is busy starting 16 workers): what a SIGKILL may lose is documented.
    time.sleep(0.5)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    for t in threads:
        t.join(10)
    assert len(results) == 16 and all(isinstance(r, OSError) for r in results)  # no half answers
    assert wait_until(lambda: not d.run_uid_processes(), 5)  # nothing of the old runs survives
    d.start()
    with d.client() as c:
        usage = c.call("usage")["users"][0]["usage"]
        assert usage["runs_total"] == 5 + 16  # the admitted runs still count against the quota
        assert c.run("print('back')")["stdout"] == b"back\n"
    assert "runs were in flight when the previous daemon died" in d.log()


def test_damaged_root_is_rebuilt_at_start(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon()
    with d.client() as c:
        root = c.status()["root"]["path"]
    assert d.stop() == 0
    os.unlink(os.path.join(root, "usr/lib/python3.11/json/__init__.py"))
    d.start()
    assert "is damaged" in d.log() and "rebuilding" in d.log()
    with d.client() as c:
        assert c.run("import json; print(json.dumps(1))")["stdout"] == b"1\n"


def test_read_only_state_dir_keeps_serving_and_says_so(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon()
    assert d.stop() == 0
    subprocess.run(["mount", "--bind", d.state_dir, d.state_dir], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", d.state_dir], check=True)
    try:
        d.start()
        with d.client() as c:
            assert c.run("print(1)")["stdout"] == b"1\n"
            assert c.status()["usage_db"] != "ok"
    finally:
        d.close()
        subprocess.run(["umount", d.state_dir], check=True)


def test_full_state_dir_keeps_serving_and_says_so(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon(start=False)
    os.makedirs(d.state_dir)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", d.state_dir], check=True)
    try:
        d.start()
        filler = os.path.join(d.state_dir, "filler")
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        with d.client() as c:
            for _ in range(20):
                assert c.run("print(1)")["stdout"] == b"1\n"
            assert c.status()["usage_db"] != "ok"
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.close()
        subprocess.run(["umount", "-l", d.state_dir], check=True)


def test_self_test_refuses_a_jail_that_leaks(make_daemon: Any) -> None:
    # A profile that lets socket() through fails the "no network" probe: the daemon must not start.
    d: DaemonProcess = make_daemon({"profiles": {"python3": {"allow": ["socket"]}}}, start=False)
    with pytest.raises(RuntimeError, match="did not become ready"):
        d.start(timeout=60)
    assert d.proc is not None and d.proc.returncode == 70
    assert "self-test failed: the jail allowed no_socket_without_network; refusing to start" in d.log()
    assert not os.path.exists(d.socket)


def test_without_cap_mknod_runs_work_and_the_shared_dev_is_reported(make_daemon: Any) -> None:
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    d: DaemonProcess = make_daemon(start=False)
    d.wrapper = ["setpriv", "--bounding-set", "-mknod", "--"]
    d.start()
    with d.client() as c:
        assert c.status()["self_test"]["notes"] == {"private_dev": False}
        assert c.run("open('/dev/null', 'w').write('x'); print(len(open('/dev/urandom', 'rb').read(4)))")[
            "stdout"] == b"4\n"
    assert "device nodes cannot be made here" in d.log()


def test_own_device_nodes_in_the_normal_case(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        assert c.status()["self_test"]["notes"] == {"private_dev": True}


def test_run_uids_that_real_users_hold_are_reported(make_daemon: Any, tmp_path: Any) -> None:
    alice = pwd.getpwnam("sbx-alice").pw_uid
    overlapping = {"jail": {"run_uids": f"{alice}-{alice + 63}"}, "pool": {"min": 0, "max": 1},
                   "daemon": {"workers": 2}}
    d: DaemonProcess = make_daemon(overlapping)
    assert f"overlaps: user sbx-alice has uid {alice}" in d.log()  # at start, in the daemon's log
    # ... and the check the package's postinst runs, on the same file (exit 1), and on a free range.
    check = [sys.executable, "-m", "sandboxd.uidcheck"]
    p = subprocess.run([*check, d.config_path], capture_output=True, cwd=REPO)
    assert p.returncode == 1 and f"user sbx-alice has uid {alice}" in p.stderr.decode()
    free = tmp_path / "free.yaml"
    free.write_text("jail: {run_uids: \"879000-879063\"}\n")
    assert subprocess.run([*check, str(free)], capture_output=True, cwd=REPO).returncode == 0


def test_self_test_can_be_switched_off(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"daemon": {"self_test": False}})
    with d.client() as c:
        assert c.status()["self_test"] == {"enabled": False}


def test_a_second_daemon_on_the_same_state_dir_or_cgroup_is_refused(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon()
    # The same state directory; then a state directory of its own but the same cgroup parent.
    for name, state_dir, refusal in (("twin", d.state_dir, "another sandboxd is using the state directory"),
                                     ("cousin", os.path.join(d.dir, "cousin-state"),
                                      "another sandboxd is using the cgroup parent")):
        twin = DaemonProcess(d.dir, d.config)
        twin.socket = os.path.join(d.dir, f"{name}.sock")
        twin.notify_path = os.path.join(d.dir, f"{name}-notify.sock")
        twin.log_path = os.path.join(d.dir, f"{name}.log")
        twin.state_dir = state_dir
        try:
            with pytest.raises(RuntimeError):
                twin.start(timeout=30)
            assert refusal in twin.log()
        finally:
            twin.close()
    with d.client() as c:
        assert c.run("print(1)")["stdout"] == b"1\n"
