"""The daemon end to end: every op, every error code, quotas from real users,
concurrency, reload, drain, disconnects, socket activation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import pytest
from conftest import b64, call_as
from harness import REPO, DaemonProcess, daemon_dir, merge, raw_socket, recv_frame, run_uid_processes, wait_until

from sandboxd import __version__
from sandboxd.client import AsyncClient, Client, Result, SandboxdError


def send(s: socket.socket, obj: Any = None, body: bytes | None = None) -> None:
    if body is None:
        body = msgpack.packb(obj, use_bin_type=True)
    s.sendall(struct.pack(">I", len(body)) + body)


def error_code(resp: dict[str, Any]) -> str:
    assert resp["ok"] is False, resp
    return str(resp["error"]["code"])


# -- ops --------------------------------------------------------------------------------------
def test_hello(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        h = c.hello()
    assert h["server"] == "sandboxd" and h["version"] == __version__ and h["protocol"] == 1
    assert h["uid"] == 0 and h["admin"] is True
    assert h["quota"]["concurrent"] == 16 and h["quota"]["max_timeout_ms"] == 30000


def test_many_requests_on_one_connection_echo_their_ids(daemon: DaemonProcess) -> None:
    s = raw_socket(daemon.socket)
    ids: list[Any] = ["a", 2, None, 3.5, b"\x00id", True]
    for rid in ids:
        send(s, {"op": "hello", "id": rid})
    for rid in ids:  # pipelined: answered in order
        assert recv_frame(s)["id"] == rid
    send(s, {"op": "run", "id": "r", "code": "print(6*7)"})
    resp = recv_frame(s)
    assert resp["id"] == "r" and resp["ok"] and resp["result"]["stdout"] == b"42\n"
    s.close()


def test_status_jobs_usage(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        c.run("print(1)")
        st = c.status()
        assert st["version"] == __version__ and st["uptime_s"] > 0
        assert st["root"]["files"] > 1000 and st["root"]["build_id"]
        assert st["capacity"]["capacity"] == 8
        assert st["self_test"]["passed"] is True
        assert st["you"]["uid"] == 0 and st["you"]["usage"]["runs_total"] >= 1
        assert "0" in st["callers"]  # admins see everyone
        jobs = c.call("jobs")
        assert jobs["jobs"] == [] and jobs["queued"] == 0
        usage = c.call("usage")
        assert usage["users"][0]["uid"] == 0 and usage["users"][0]["usage"]["runs_total"] >= 1
        for bad in (-2, 2**32 - 1, 2**64 - 1, "99999999999999999999"):  # found by make fuzz
            with pytest.raises(SandboxdError) as e:
                c.call("usage", uid=bad)
            assert e.value.code == "bad_request" and e.value.details["field"] == "uid"


def test_jobs_lists_and_kill_ends_a_run(daemon: DaemonProcess) -> None:
    result: dict[str, Any] = {}

    def long_run() -> None:
        result.update(daemon.run("import time; time.sleep(30)", timeout_ms=30000))

    t = threading.Thread(target=long_run)
    t.start()
    deadline = time.monotonic() + 10
    jobs: list[dict[str, Any]] = []
    with daemon.client() as c:
        while not (jobs and jobs[0]["run_uid"]) and time.monotonic() < deadline:
            jobs = c.call("jobs")["jobs"]  # (a run is listed from admission; its worker follows)
            time.sleep(0.05)
        assert len(jobs) == 1
        job = jobs[0]
        assert job["caller_uid"] == 0 and job["timeout_ms"] == 30000 and job["run_uid"] >= 870000
        assert c.call("kill", run_id=job["run_id"])["killed"] == job["run_id"]
        with pytest.raises(SandboxdError) as e:
            c.call("kill", run_id="no-such-run")
        assert e.value.code == "not_found"
    t.join(10)
    assert result["status"] == "signaled" and result["signal_name"] == "SIGKILL"
    assert "killed" in result["reason"]


def test_async_client(daemon: DaemonProcess) -> None:
    async def go() -> list[Result]:
        async with AsyncClient(daemon.socket) as c:
            return [await c.run(f"print({i})") for i in range(3)]

    results = asyncio.run(go())
    assert [r["stdout"] for r in results] == [b"0\n", b"1\n", b"2\n"]


# -- error codes ------------------------------------------------------------------------------
def test_frame_too_large_closes_the_connection(daemon: DaemonProcess) -> None:
    s = raw_socket(daemon.socket)
    s.sendall(struct.pack(">I", 64 << 20))
    resp = recv_frame(s)
    assert error_code(resp) == "frame_too_large" and resp["error"]["max_frame"] == 16 << 20
    assert recv_frame(s) is None  # closed
    s.close()


def test_bad_frames_and_requests_are_answered(daemon: DaemonProcess) -> None:
    s = raw_socket(daemon.socket)
    send(s, body=b"\xc1garbage")
    assert error_code(recv_frame(s)) == "bad_frame"
    send(s, [1, 2, 3])
    assert error_code(recv_frame(s)) == "bad_frame"
    send(s, {"id": 1})
    resp = recv_frame(s)
    assert error_code(resp) == "bad_request" and resp["error"]["field"] == "op"
    send(s, {"op": "launch_missiles", "id": 2})
    resp = recv_frame(s)
    assert error_code(resp) == "unknown_op" and resp["id"] == 2 and "run" in resp["error"]["known"]
    send(s, {"op": "hello", "id": [1, 2]})
    assert recv_frame(s)["error"]["field"] == "id"
    send(s, {"op": "run", "id": 3, "code": 5})
    resp = recv_frame(s)
    assert error_code(resp) == "bad_request" and resp["error"]["field"] == "code"
    send(s, {"op": "run", "id": 4, "code": "1", "timeout_ms": 10**9})
    resp = recv_frame(s)
    assert error_code(resp) == "forbidden" and resp["error"]["field"] == "timeout_ms"
    for req, field in (({"op": "hello", "bogus": 1}, "bogus"), ({"op": "status", "verbose": True}, "verbose"),
                       ({"op": "usage", "uid": "0"}, "uid"), ({"op": "usage", "all": "yes"}, "all"),
                       ({"op": "kill", "run_id": 7}, "run_id"), ({"op": "rebuild_root", "progress": 1}, "progress"),
                       ({1: 2, "op": "hello"}, "1")):
        send(s, req)  # every operation names a field it does not have, or a wrong type
        resp = recv_frame(s)
        assert error_code(resp) == "bad_request" and resp["error"]["field"] == field, (req, resp)
    send(s, {"op": "hello", "id": 5})  # the connection still works after all of that
    assert recv_frame(s)["ok"] is True
    s.close()


def test_truncated_frame_then_close_does_not_hurt(daemon: DaemonProcess) -> None:
    s = raw_socket(daemon.socket)
    s.sendall(struct.pack(">I", 1000) + b"\x81\xa2op")
    s.close()
    with daemon.client() as c:
        assert c.hello()["ok"]


def test_busy_when_capacity_and_queue_are_full(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"daemon": {"workers": 1, "queue": 0}, "pool": {"min": 1, "max": 1}})
    t = threading.Thread(target=d.run, args=("import time; time.sleep(1.5)",))
    t.start()
    time.sleep(0.5)
    with pytest.raises(SandboxdError) as e, d.client() as c:
        c.run("print(1)")
    assert e.value.code == "busy"
    t.join()


def test_unavailable_while_shutting_down(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"daemon": {"shutdown_grace": "5s"}})
    c = d.client()
    c.hello()
    t = threading.Thread(target=d.run, args=("import time; time.sleep(1.5)",))
    t.start()
    time.sleep(0.4)
    d.signal(signal.SIGTERM)
    time.sleep(0.3)
    requests: list[tuple[str, dict[str, Any]]] = [("run", {"code": "print(1)"}), ("hello", {}), ("usage", {}),
                                                  ("jobs", {})]
    for op, fields in requests:
        with pytest.raises(SandboxdError) as e:  # new requests on a connection that is open
            c.call(op, **fields)
        assert e.value.code == "unavailable", op
    assert c.status()["stopping"] is True  # status still answers, and says so
    c.close()
    t.join()
    assert d.proc is not None and d.proc.wait(10) == 0


# -- users, access, quotas --------------------------------------------------------------------
QUOTA_CONFIG = {
    "quotas": {
        "default": {"concurrent": 4, "queued": 4, "network": False, "max_memory": "256M"},
        "users": {"sbx-alice": {"concurrent": 1, "queued": 0}},
        "groups": {"sbx-team": {"network": True, "max_memory": "512M"}},
    },
    "daemon": {"admin_group": "sbx-admins"},
}


def test_socket_group_controls_who_may_connect(daemon: DaemonProcess, test_users: Any) -> None:
    import grp

    st = os.stat(daemon.socket)
    assert st.st_mode & 0o777 == 0o660 and st.st_uid == 0 and st.st_gid == grp.getgrnam("sbx-clients").gr_gid
    assert call_as("sbx-carol", daemon.socket, [{"op": "hello"}]) == {"connect_error": "Permission denied",
                                                                        "errno": 13}
    out = call_as("sbx-alice", daemon.socket, [{"op": "hello", "id": 1}])
    hello = out["responses"][0]
    assert hello["ok"] and hello["uid"] == test_users["sbx-alice"].pw_uid and hello["admin"] is False


def test_admin_ops_are_forbidden_for_others(daemon: DaemonProcess) -> None:
    out = call_as("sbx-alice", daemon.socket, [{"op": op, "id": op} for op in ("jobs", "reload", "rebuild_root")]
                  + [{"op": "usage", "user": "root"}, {"op": "usage"}, {"op": "status"}, {"op": "usage", "all": True}])
    r = out["responses"]
    assert [error_code(x) for x in r[:4]] == ["forbidden"] * 4
    assert error_code(r[6]) == "forbidden"  # everyone's usage is for admins
    assert r[4]["ok"] and r[4]["users"][0]["user"] == "sbx-alice"
    assert r[5]["ok"] and "callers" not in r[5]  # only admins see everyone


def test_quotas_per_user_and_group(make_daemon: Any, test_users: Any) -> None:
    d: DaemonProcess = make_daemon(QUOTA_CONFIG)
    sleeper = {"op": "run", "code": "import time; time.sleep(1.5); print('slept')", "id": "s"}
    holder: dict[str, Any] = {}
    t = threading.Thread(target=lambda: holder.update(call_as("sbx-alice", d.socket, [sleeper])))
    t.start()
    time.sleep(0.5)
    # alice is at her concurrency (1) with no queue: refused; bob still runs promptly.
    alice = call_as("sbx-alice", d.socket, [{"op": "run", "code": "print(1)"}])["responses"][0]
    assert error_code(alice) == "quota_exceeded" and alice["error"]["limit"] == "queued"
    t0 = time.monotonic()
    bob = call_as("sbx-bob", d.socket, [{"op": "run", "code": "print('bob')"}])["responses"][0]
    assert bob["result"]["stdout"] == b64(b"bob\n") and time.monotonic() - t0 < 1.0
    t.join()
    assert holder["responses"][0]["result"]["status"] == "ok"
    # bob's group allows network and more memory; alice is refused, never silently capped.
    bob = call_as("sbx-bob", d.socket, [{"op": "run", "code": "pass", "network": True, "memory_mb": 512},
                                        {"op": "hello"}])["responses"]
    assert bob[0]["result"]["status"] == "ok" and bob[1]["quota"]["network"] is True
    alice = call_as("sbx-alice", d.socket, [{"op": "run", "code": "pass", "network": True},
                                            {"op": "run", "code": "pass", "memory_mb": 512}])["responses"]
    assert [error_code(a) for a in alice] == ["forbidden", "forbidden"]
    assert alice[1]["error"]["limit"] == 256


def test_deny_unlisted(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"quotas": {"deny_unlisted": True, "users": {"sbx-bob": {}}}})
    alice = call_as("sbx-alice", d.socket, [{"op": op} for op in ("hello", "status", "usage")]
                    + [{"op": "run", "code": "pass"}, {"op": "root_why", "module": "json"}])["responses"]
    assert [error_code(a) for a in alice] == ["forbidden"] * 5  # an unlisted caller may do nothing
    bob = call_as("sbx-bob", d.socket, [{"op": "hello"}, {"op": "status"}, {"op": "usage"}])["responses"]
    assert all(r["ok"] for r in bob)


def test_group_membership_is_read_per_request(make_daemon: Any, test_users: Any) -> None:
    d: DaemonProcess = make_daemon({"daemon": {"admin_group": "sbx-admins"}})
    assert error_code(call_as("sbx-bob", d.socket, [{"op": "jobs"}])["responses"][0]) == "forbidden"
    subprocess.run(["gpasswd", "-a", "sbx-bob", "sbx-admins"], check=True, capture_output=True)
    try:
        assert call_as("sbx-bob", d.socket, [{"op": "jobs"}])["responses"][0]["ok"]
    finally:
        subprocess.run(["gpasswd", "-d", "sbx-bob", "sbx-admins"], check=True, capture_output=True)


def test_concurrency_cap_holds_under_50_parallel_requests(make_daemon: Any) -> None:
    # one caller, so no workers kept for others (daemon.reserved_workers): the cap alone is pinned
    d: DaemonProcess = make_daemon({"daemon": {"workers": 4, "queue": 100, "reserved_workers": 0},
                                    "pool": {"min": 2, "max": 4},
                                    "quotas": {"default": {"concurrent": 50, "queued": 100}}})
    code = "import time\nt0 = time.monotonic(); time.sleep(0.2); print(t0, time.monotonic())"

    def one(_: int) -> Result:
        with d.client() as c:
            return c.run(code)

    with concurrent.futures.ThreadPoolExecutor(50) as ex:
        results = list(ex.map(one, range(50)))
    assert all(r["status"] == "ok" for r in results)
    spans = [tuple(map(float, r["stdout"].split())) for r in results]
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 4, peak
    assert peak >= 3  # and the capacity is actually used


def test_per_uid_concurrency_is_atomic(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"daemon": {"workers": 8, "queue": 100},
                     "quotas": {"default": {"concurrent": 2, "queued": 100}}})
    code = "import time\nt0 = time.monotonic(); time.sleep(0.15); print(t0, time.monotonic())"

    def one(_: int) -> Result:
        with d.client() as c:
            return c.run(code)

    with concurrent.futures.ThreadPoolExecutor(20) as ex:
        results = list(ex.map(one, range(20)))
    spans = sorted(tuple(map(float, r["stdout"].split())) for r in results)
    peak = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert peak <= 2


def test_rate_limit(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"quotas": {"default": {"runs_per_minute": 3}}})
    with d.client() as c:
        for _ in range(3):
            c.run("pass")
        with pytest.raises(SandboxdError) as e:
            c.run("pass")
    assert e.value.code == "quota_exceeded" and e.value.details["limit"] == "runs_per_minute"
    assert 49_000 < e.value.details["retry_after_ms"] <= 60_000  # 1 s buckets: never past the minute


def test_cpu_budget(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"quotas": {"default": {"cpu_seconds_per_hour": 0.5}}})
    with d.client() as c:
        r = c.run("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass")
        assert r["cpu_ms"] >= 500
        with pytest.raises(SandboxdError) as e:
            c.run("pass")
    assert e.value.code == "quota_exceeded" and e.value.details["limit"] == "cpu_seconds_per_hour"
    assert 3_500_000 < e.value.details["retry_after_ms"] <= 3_600_000  # never past the hour


def test_usage_survives_a_restart(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon()
    with d.client() as c:
        for _ in range(3):
            c.run("pass")
    assert d.stop() == 0
    d.start()
    with d.client() as c:
        usage = c.call("usage")["users"][0]["usage"]
    assert usage["runs_total"] == 3 and usage["runs_last_minute"] == 3 and usage["cpu_ms_total"] > 0


# -- reload, shutdown, disconnect -------------------------------------------------------------
def test_sighup_reload_applies_a_good_config_and_rejects_a_bad_one(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon()
    before = os.stat(d.config_path).st_mtime
    long_run: dict[str, Any] = {}
    t = threading.Thread(target=lambda: long_run.update(d.run("import time; time.sleep(1.5); print('kept')")))
    t.start()
    time.sleep(0.3)
    d.write_config(merge(d.config, {"quotas": {"default": {"concurrent": 3}}, "pool": {"min": 2}}))
    assert os.stat(d.config_path).st_mtime >= before
    d.signal(signal.SIGHUP)
    assert d.wait_for("READY=1", 30)
    with d.client() as c:
        assert c.hello()["quota"]["concurrent"] == 3
    # A bad config is rejected, logged, and the running one kept.
    with open(d.config_path, "a", encoding="utf-8") as f:
        f.write("limits:\n  memory: plenty\n")
    d.signal(signal.SIGHUP)
    time.sleep(1.0)
    with d.client() as c:
        assert c.hello()["quota"]["concurrent"] == 3
        assert c.status()["last_reload"]["ok"] is False
    assert "reload rejected" in d.log() and "limits.memory" in d.log()
    t.join()
    assert long_run["status"] == "ok" and long_run["stdout"] == b"kept\n"  # in flight across both reloads


def test_reload_op_restarts_the_fork_server_for_new_profiles(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon()
    with d.client() as c:
        r = c.run("import fcntl; fcntl.flock(open('/usr/lib/python3.11/os.py'), fcntl.LOCK_SH)")
        assert r["status"] == "blocked_syscall" and r["blocked_syscall"] == "flock"
        d.write_config(merge(d.config, {"profiles": {"python3": {"allow": ["flock"]}}}))
        changes = c.call("reload")["changes"]
        assert any("fork server restarted" in ch for ch in changes)
        r = c.run("import fcntl; fcntl.flock(open('/usr/lib/python3.11/os.py'), fcntl.LOCK_SH); print('ok')")
        assert r["status"] == "ok", r
        d.write_config(merge(d.config, {"jail": {"cpus": "many"}}))
        with pytest.raises(SandboxdError) as e:
            c.call("reload")
        assert e.value.code == "bad_config" and "jail.cpus" in e.value.message


def test_sigterm_lets_runs_finish_then_exits_zero(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"daemon": {"shutdown_grace": "5s"}})
    finished: dict[str, Any] = {}
    t = threading.Thread(target=lambda: finished.update(d.run("import time; time.sleep(1); print('done')")))
    t.start()
    time.sleep(0.3)
    d.signal(signal.SIGTERM)
    t.join(10)
    assert finished["status"] == "ok" and finished["stdout"] == b"done\n"
    assert d.proc is not None and d.proc.wait(10) == 0
    assert not os.path.exists(d.socket)
    d.wait_for("never", 0.5)  # collect the notifications sent while stopping
    assert any("STOPPING=1" in m for m in d.messages)


def test_sigterm_to_the_whole_process_group_still_drains(make_daemon: Any) -> None:
    # Ctrl-C in a terminal, `timeout`, or `kill -- -PGID` reach the fork server too: it must
    # leave ending to the daemon, and the daemon must not wait for reports that cannot come.
    d: DaemonProcess = make_daemon({"daemon": {"shutdown_grace": "5s"}}, start=False)
    d.wrapper = ["setsid"]  # its own process group, so the test can signal the whole group
    d.start()
    finished: dict[str, Any] = {}
    t = threading.Thread(target=lambda: finished.update(d.run("import time; time.sleep(0.5); print('done')")))
    t.start()
    with d.client() as c:  # the run is in flight before the signal
        assert wait_until(lambda: c.call("jobs")["jobs"], 10)
    assert d.proc is not None
    t0 = time.monotonic()
    os.killpg(d.proc.pid, signal.SIGTERM)
    t.join(10)
    assert finished["status"] == "ok" and finished["stdout"] == b"done\n"
    assert d.proc.wait(10) == 0 and time.monotonic() - t0 < 3
    assert "fork server exited unexpectedly" not in d.log()


def test_sigterm_kills_runs_past_the_grace_period(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"daemon": {"shutdown_grace": "1s"}})
    result: dict[str, Any] = {}

    def long_run() -> None:
        try:
            result.update(d.run("import time; time.sleep(30)", timeout_ms=30000))
        except (ConnectionError, OSError) as e:
            result["error"] = str(e)

    t = threading.Thread(target=long_run)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc is not None and d.proc.wait(15) == 0
    assert time.monotonic() - t0 < 8
    t.join(5)
    assert result.get("status") == "signaled" or "error" in result
    assert d.run_uid_processes() == []


def test_a_client_that_disconnects_mid_run_gets_its_run_killed(daemon: DaemonProcess) -> None:
    s = raw_socket(daemon.socket)
    send(s, {"op": "run", "id": 1, "code": "import time, os\nprint(os.getuid(), flush=True)\ntime.sleep(60)",
             "timeout_ms": 30000})
    with daemon.client() as c:
        deadline = time.monotonic() + 10
        jobs: list[Any] = []
        while not jobs and time.monotonic() < deadline:
            jobs = c.call("jobs")["jobs"]
        assert len(jobs) == 1
        uid = jobs[0]["run_uid"]
        s.close()
        t0 = time.monotonic()
        while c.call("jobs")["jobs"] and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert c.call("jobs")["jobs"] == []
        assert time.monotonic() - t0 < 1.0
    assert wait_until(lambda: not run_uid_processes(uid, 1), 3, 0.02) or _slot_reused(daemon, uid)


def _slot_reused(daemon: DaemonProcess, uid: int) -> bool:
    with daemon.client() as c:
        return bool(c.status()["slots"]["in_use"])


def test_socket_activation(test_users: Any) -> None:
    d = DaemonProcess(daemon_dir())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = os.path.join(d.dir, "activated.sock")
    listener.bind(path)
    listener.listen(16)
    fd = listener.fileno()
    d.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.notify.bind(d.notify_path)
    # What systemd does: the socket at fd 3, LISTEN_PID naming the daemon's own pid, then exec.
    wrapper = (f"import os, sys; os.dup2({fd}, 3); os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
               f"NOTIFY_SOCKET={d.notify_path!r}); os.execv(sys.executable, [sys.executable, '-m', 'sandboxd.daemon', "
               f"'--foreground', '--config', {d.config_path!r}, '--state-dir', {d.state_dir!r}])")
    with open(d.log_path, "ab") as log:
        d.proc = subprocess.Popen([sys.executable, "-c", wrapper], pass_fds=[fd], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=REPO)
    try:
        assert d.wait_for("READY=1", 60), d.log()
        with Client(path) as c:
            assert c.run("print('activated')")["stdout"] == b"activated\n"
        assert "using the socket passed by systemd" in d.log()
    finally:
        d.close()
        listener.close()
