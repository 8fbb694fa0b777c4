"""sandboxd-http as a node behind a load balancer (docs/fleet.md): /health/live, /health/ready,
/capacity, the HAProxy agent-check port, the daemon's drain (sandboxctl drain / undrain), the
bridge's own drain on SIGTERM, and which failures are retryable (503) and which are not (502).

A real daemon and the real bridge (as the unprivileged sbx-http), on 127.0.0.1 only; what
`make fleet` does with three nodes and HAProxy, this does with one node and no containers.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from bridge import BridgeProcess
from harness import REPO, DaemonProcess, as_user, wait_until

from sandboxd.client import SandboxdError

httpx = pytest.importorskip("httpx")
from test_http import data_of, dify_client, metric, refused, run  # noqa: E402 - after the skip

AGENT = {"agent_listen": "127.0.0.1:0"}


def get(b: BridgeProcess, path: str) -> tuple[int, dict[str, Any]]:
    r = httpx.get(b.url + path, trust_env=False, timeout=10)
    body: dict[str, Any] = r.json()
    return r.status_code, body


def agent(b: BridgeProcess) -> str:
    """What HAProxy's agent-check reads: connect, read to the end."""
    assert b.agent_port
    with socket.create_connection(("127.0.0.1", b.agent_port), timeout=10) as s:
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode()


def ctl(d: DaemonProcess, *args: str, user: str | None = None) -> tuple[int, dict[str, Any]]:
    p = subprocess.run([sys.executable, "-m", "sandboxd.ctl", "--socket", d.socket, "--json", *args],
                       capture_output=True, cwd=REPO, timeout=120, **(as_user(user) if user else {}))
    return p.returncode, json.loads(p.stdout)


def in_background(target: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=target)
    t.start()
    return t


def test_readiness_capacity_and_the_agent_follow_the_daemon(make_daemon: Any,
                                                             bridges: Callable[..., BridgeProcess]) -> None:
    d: DaemonProcess = make_daemon({"daemon": {"workers": 2}}, start=False)
    b = bridges(d.socket, config=AGENT)
    assert get(b, "/health/live") == (200, {"status": "live", "draining": False})
    code, body = get(b, "/health/ready")
    assert code == 503 and body["status"] == "not_ready" and "not reachable" in body["reasons"][0], body
    assert agent(b) == "down\n"
    code, cap = get(b, "/capacity")
    assert code == 200 and cap["ready"] is False and cap["agent"] == "down" and cap["workers"] == 0
    d.start()
    assert wait_until(lambda: get(b, "/health/ready")[0] == 200, 30), get(b, "/health/ready")
    code, cap = get(b, "/capacity")
    assert (cap["workers"], cap["running"], cap["queued"], cap["free"]) == (2, 0, 0, 2), cap
    assert cap["ready_workers"]["python3"] >= 1 and cap["draining"] is False and cap["ready"] is True
    assert set(cap["sessions"]) == {"open", "limit", "busy"} and cap["sandboxd"]
    assert cap["agent"] == "up ready 100%" and agent(b) == "up ready 100%\n"
    answers: list[Any] = []

    def sleeper() -> None:
        with dify_client(b.url) as c:
            answers.append(run(c, "import time\ntime.sleep(3)\nprint('slept')"))

    t = in_background(sleeper)
    assert wait_until(lambda: get(b, "/capacity")[1]["running"] == 1, 10)
    assert agent(b) == "up ready 50%\n"  # one of two workers free
    t.join()
    assert data_of(answers[0])["stdout"] == "slept\n"
    assert wait_until(lambda: agent(b) == "up ready 100%\n", 10)


def test_sandboxctl_drain_refuses_new_work_keeps_what_runs_and_survives_a_restart(
        make_daemon: Any, bridges: Callable[..., BridgeProcess]) -> None:
    d: DaemonProcess = make_daemon()
    b = bridges(d.socket, config=AGENT)
    assert wait_until(lambda: get(b, "/health/ready")[0] == 200, 30)
    code, out = ctl(d, "drain", user="sbx-alice")
    assert code == 122 and out["error"]["code"] == "forbidden", out  # an admin operation
    results: list[Any] = []
    with d.client() as c:
        session = c.session()
        session.exec("x = 41")

        def long_run() -> None:
            with d.client() as c2:
                results.append(c2.run("import time\ntime.sleep(2)\nprint('finished')"))

        t = in_background(long_run)
        assert wait_until(lambda: c.jobs(), 10)
        code, out = ctl(d, "drain", "--wait", "60s")  # waits for the run in flight, which goes on
        assert code == 0 and out["draining"] is True and out["idle"] is True and out["running"] == 0, out
        t.join()
        assert results[0]["status"] == "ok" and results[0]["stdout"] == b"finished\n"
        st = c.status()
        assert st["draining"] is True and st["ready"] is False and st["draining_since"]
        assert any("draining" in why for why in st["not_ready"]), st["not_ready"]
        with pytest.raises(SandboxdError) as e:
            c.run("print(1)")
        assert e.value.code == "unavailable" and e.value.details.get("draining") is True
        with pytest.raises(SandboxdError) as e:
            c.session()
        assert e.value.code == "unavailable" and e.value.details.get("draining") is True
        assert session.exec("x + 1").value == "42"  # an open session goes on
        code, out = ctl(d, "drain", "--wait", "1s", "--sessions")  # its session is still open
        assert code == 1 and out["idle"] is False and out["sessions"] == 1, out
    code, body = get(b, "/health/ready")
    assert code == 503 and any("draining" in why for why in body["reasons"]), body
    assert agent(b) == "drain\n" and get(b, "/capacity")[1]["draining"] is True
    with dify_client(b.url) as client:
        r = run(client, "print(1)")
    assert "draining" in refused(r, 503) and r.headers["Retry-After"] == "1"  # retryable: nothing started
    assert d.stop() == 0
    d.start()  # an upgrade restarts the daemon: it comes back drained
    assert "draining (since the state directory says so)" in d.log()
    with d.client() as c:
        assert c.status()["draining"] is True
    assert wait_until(lambda: agent(b) == "drain\n", 10)
    code, out = ctl(d, "undrain")
    assert code == 0 and out["draining"] is False, out
    assert wait_until(lambda: get(b, "/health/ready")[0] == 200, 10)
    assert agent(b).startswith("up ready ")
    with dify_client(b.url) as client:
        assert data_of(run(client, "print('back')"))["stdout"] == "back\n"


def test_sigterm_drains_the_bridge_then_it_exits(daemon: DaemonProcess,
                                                 bridges: Callable[..., BridgeProcess]) -> None:
    b = bridges(daemon.socket, {"MAX_WORKERS": "1"}, config={**AGENT, "drain_grace": "60s"})
    answers: dict[str, Any] = {}

    def ask(name: str, code: str) -> Callable[[], None]:
        def go() -> None:
            with dify_client(b.url) as c:
                answers[name] = run(c, code)
        return go

    running = in_background(ask("running", "import time\ntime.sleep(6)\nprint('done')"))
    assert wait_until(lambda: metric(b, "sandboxd_http_in_flight") == 1, 10)
    waiting = in_background(ask("waiting", "print('never')"))  # waits for the one worker (MAX_WORKERS)
    assert wait_until(lambda: metric(b, "sandboxd_http_in_flight") == 2, 10)
    assert b.proc is not None
    b.proc.send_signal(signal.SIGTERM)
    waiting.join(30)
    assert "draining" in refused(answers["waiting"], 503)  # never sent to the daemon: retry elsewhere
    code, body = get(b, "/health/ready")
    assert code == 503 and "draining (SIGTERM" in body["reasons"][0], body
    assert get(b, "/health/live") == (200, {"status": "live", "draining": True})
    assert agent(b) == "drain\n"
    with dify_client(b.url) as c:
        r = run(c, "print(1)")
    assert "draining" in refused(r, 503)
    assert r.headers["Retry-After"] == "1" and r.headers["Connection"] == "close"
    assert "running" not in answers  # all of the above while the run was still in flight
    running.join(30)
    assert data_of(answers["running"])["stdout"] == "done\n"  # it finished within the grace
    assert b.proc.wait(30) == 0  # and then the bridge exited
    assert "sandboxd-http stopped" in b.log()


def test_a_run_past_the_drain_grace_is_cut_off_with_502(daemon: DaemonProcess,
                                                        bridges: Callable[..., BridgeProcess]) -> None:
    b = bridges(daemon.socket, config={"drain_grace": "1s"})
    answers: list[Any] = []

    def sleeper() -> None:
        with dify_client(b.url) as c:
            answers.append(run(c, "import time\ntime.sleep(12)"))

    t = in_background(sleeper)
    with daemon.client() as c:
        assert wait_until(lambda: any(j["caller_uid"] != 0 for j in c.jobs()), 10)
        assert b.proc is not None
        b.proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert "drain grace of 1 s ran out" in refused(answers[0], 502)
        assert b.proc.wait(30) == 0
        # its connection closed: the daemon killed the run
        assert wait_until(lambda: not any(j["caller_uid"] != 0 for j in c.jobs()), 10)


def test_a_run_that_died_with_its_daemon_is_502_not_503(make_daemon: Any,
                                                        bridges: Callable[..., BridgeProcess]) -> None:
    d: DaemonProcess = make_daemon()
    b = bridges(d.socket)
    answers: list[Any] = []

    def sleeper() -> None:
        with dify_client(b.url) as c:
            answers.append(run(c, "import time\ntime.sleep(10)"))

    t = in_background(sleeper)
    with d.client() as c:
        assert wait_until(lambda: c.jobs(), 10)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    t.join(30)
    message = refused(answers[0], 502)  # it may have run: not to be retried
    assert "closed the connection during run" in message, message
    with dify_client(b.url) as c:  # the next one never reaches a daemon: 503, retryable
        assert "nothing was started" in refused(run(c, "print(1)"), 503)
    assert wait_until(lambda: not d.run_uid_processes(), 10)  # nothing of the run survives
    d.start()  # (its successor cleans up the cgroups the killed one left)
