"""sandboxd-mcp end to end: a real daemon, the real server as the unprivileged test user
sbx-mcp, and the official MCP SDK's own client (``mcp.ClientSession`` over ``stdio_client``
and over ``streamable_http_client``), every HTTP request to 127.0.0.1.

Runs under .venv-mcp (make system does; the plain .venv has no SDK and skips collecting this
file, see conftest.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx2
import pytest
import yaml
from conftest import require
from harness import REPO, DaemonProcess, daemon_dir, merge, wait_until
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp_servers import (
    TOKEN,
    USER,
    McpHttpProcess,
    as_user_command,
    http_client,
    http_session,
    images_of,
    server_env,
    stdio_params,
    stdio_session,
    text_of,
)

TOOLS = {"run_python_code", "run_js_code", "write_file", "read_file", "list_files", "reset"}
Session = Callable[[], contextlib.AbstractAsyncContextManager[ClientSession]]


def matplotlib_config() -> dict[str, Any]:
    with open(os.path.join(REPO, "docs", "examples", "matplotlib.yaml"), encoding="utf-8") as f:
        config: dict[str, Any] = yaml.safe_load(f)
    return config


@pytest.fixture(scope="module")
def mcp_daemon(test_users: Any) -> Iterator[DaemonProcess]:
    """A daemon that has matplotlib in its root, and gives sbx-mcp sessions but no network."""
    require(shutil.which("node") is not None, "node is not installed (the JavaScript tool's runtime)")
    overrides = merge(matplotlib_config(), {"quotas": {"users": {USER: {"network": False, "sessions": 16,
                                                                        "concurrent": 16}}}})
    d = DaemonProcess(daemon_dir(), overrides).start()
    yield d
    d.close()


@pytest.fixture(scope="module")
def mcp_http(mcp_daemon: DaemonProcess) -> Iterator[McpHttpProcess]:
    with McpHttpProcess(mcp_daemon.socket, env={"SANDBOXD_MCP_LOG_LEVEL": "debug"}) as server:
        yield server


@pytest.fixture(params=["stdio", "http"])
def transport(request: Any, mcp_daemon: DaemonProcess) -> Session:
    """A way to open an MCP session, over each transport."""
    if request.param == "stdio":
        return lambda: stdio_session(mcp_daemon.socket)
    server: McpHttpProcess = request.getfixturevalue("mcp_http")
    return lambda: http_session(server.endpoint)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 300))  # type: ignore[arg-type]


async def call(session: ClientSession, tool: str, **args: Any) -> Any:
    return await session.call_tool(tool, args)


def owned_sessions(daemon: DaemonProcess) -> list[dict[str, Any]]:
    with daemon.client() as c:
        return [s for s in c.sessions() if s.get("owner") == USER]


def test_tools_are_listed_with_their_schemas(transport: Session) -> None:
    async def scenario() -> None:
        async with transport() as s:
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert set(tools) == TOOLS
            py = tools["run_python_code"]
            assert py.input_schema["required"] == ["code"]
            assert set(py.input_schema["properties"]) == {"code", "timeout_s"}
            assert py.input_schema["properties"]["timeout_s"]["maximum"] == 30
            described = py.description or ""
            assert f"Python {sys.version.split()[0]}" in described, described
            assert "matplotlib" in described and "numpy" in described
            assert "no network access" in described
            assert "Node.js v" in (tools["run_js_code"].description or "")
            assert set(tools["write_file"].input_schema["properties"]) == {"path", "content", "base64"}
            assert tools["write_file"].input_schema["required"] == ["path", "content"]
            assert tools["read_file"].input_schema["required"] == ["path"]
            assert tools["list_files"].input_schema["required"] == []
            assert tools["reset"].input_schema["properties"] == {}
            assert tools["read_file"].annotations is not None and tools["read_file"].annotations.read_only_hint
    run(scenario())


def test_state_persists_across_calls_in_python_and_node(transport: Session) -> None:
    async def scenario() -> None:
        async with transport() as s:
            first = await call(s, "run_python_code", code="x = 41\nprint('set')")
            assert not first.is_error and text_of(first) == "[stdout]\nset", text_of(first)
            second = await call(s, "run_python_code", code="import math\nx + 1")
            assert not second.is_error
            assert text_of(second) == "[value]\n42"
            assert second.structured_content["value"] == "42"
            assert second.structured_content["status"] == "ok" and second.structured_content["exec"] == 2
            js = await call(s, "run_js_code", code="var y = 41; 'defined'")
            assert not js.is_error, text_of(js)
            js = await call(s, "run_js_code", code="y + 1")
            assert text_of(js) == "[value]\n42", text_of(js)
            py = await call(s, "run_python_code", code="math.sqrt(x + 40)")  # imports persist too
            assert text_of(py) == "[value]\n9.0"
    run(scenario())


def test_a_matplotlib_figure_comes_back_as_image_content(transport: Session) -> None:
    async def scenario() -> None:
        async with transport() as s:
            result = await call(s, "run_python_code", code="import matplotlib.pyplot as plt\n"
                                "plt.plot([1, 2, 3], [1, 4, 9])\nplt.show()")
            assert not result.is_error, text_of(result)
            images = images_of(result)
            assert len(images) == 1 and images[0][0] == "image/png"
            assert images[0][1].startswith(b"\x89PNG\r\n\x1a\n") and len(images[0][1]) > 1000
            assert result.structured_content["figures"] == 1
    run(scenario())


def test_a_timeout_and_a_blocked_call_are_tool_errors_with_the_verdict(transport: Session) -> None:
    async def scenario() -> None:
        async with transport() as s:
            await call(s, "run_python_code", code="kept = 'still here'")
            slow = await call(s, "run_python_code", code="while True:\n    pass", timeout_s=1)
            assert slow.is_error
            assert "[error]\ntimed out after 1 s" in text_of(slow), text_of(slow)
            assert slow.structured_content["status"] == "timeout"
            after = await call(s, "run_python_code", code="kept")
            assert text_of(after) == "[value]\n'still here'"  # the session lived on
            blocked = await call(s, "run_python_code", code="import socket\nsocket.socket()")
            assert blocked.is_error
            assert "blocked system call socket: no network" in text_of(blocked), text_of(blocked)
            assert blocked.structured_content["blocked_syscall"] == "socket"
            failed = await call(s, "run_python_code", code="1 / 0")
            assert failed.is_error and "ZeroDivisionError: division by zero" in text_of(failed)
            assert "Traceback" in text_of(failed)
            js = await call(s, "run_js_code", code="throw new Error('boom')")
            assert js.is_error and "boom" in text_of(js), text_of(js)
    run(scenario())


def cells_running(daemon: DaemonProcess) -> list[dict[str, Any]]:
    with daemon.client() as c:
        return [j for j in c.jobs() if j.get("session_id")]


def test_a_cancelled_call_interrupts_its_cell_and_the_session_lives_on(transport: Session,
                                                                       mcp_daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        async with transport() as s:
            await call(s, "run_python_code", code="kept = 'here'")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call(s, "run_python_code", code="import time\nwhile True: time.sleep(0.01)",
                                            timeout_s=30), 2)
            # interrupted (by the cancellation), long before its own 30 s are up; waited for in a thread, as
            # the client's loop must go on to send the cancellation
            gone = await asyncio.to_thread(wait_until, lambda: cells_running(mcp_daemon) == [], 15)
            assert gone, cells_running(mcp_daemon)
            after = await call(s, "run_python_code", code="kept")
            # (what the interrupted cell wrote after its call was given up, its KeyboardInterrupt, comes first)
            assert text_of(after).endswith("[value]\n'here'"), text_of(after)
    run(scenario())


def test_bad_arguments_are_tool_errors(transport: Session) -> None:
    async def scenario() -> None:
        async with transport() as s:
            cases: list[tuple[dict[str, Any], str]] = [({}, "code is required"), ({"code": 1}, "code must be a str"),
                                ({"code": "1", "timeout_s": 0}, "more than 0"),
                                ({"code": "1", "timeout_s": 31}, "at most 30"),
                                ({"code": "1", "timeout": 1}, "unknown argument(s) timeout")]
            for args, words in cases:
                result = await s.call_tool("run_python_code", args)
                assert result.is_error and words in text_of(result), (args, text_of(result))
    run(scenario())


def test_a_binary_file_is_written_read_back_and_listed(transport: Session) -> None:
    data = bytes(range(256)) * 4

    async def scenario() -> None:
        async with transport() as s:
            wrote = await call(s, "write_file", path="in/data.bin", content=base64.b64encode(data).decode(),
                               base64=True)
            assert not wrote.is_error, text_of(wrote)
            seen = await call(s, "run_python_code", code="open('in/data.bin', 'rb').read() == bytes(range(256)) * 4")
            assert text_of(seen) == "[value]\nTrue"
            back = await call(s, "read_file", path="in/data.bin")
            assert not back.is_error and back.structured_content["base64"] is True
            assert base64.b64decode(back.structured_content["content"]) == data
            listed = await call(s, "list_files", path="in")
            entries = listed.structured_content["entries"]
            assert [(e["path"], e["type"], e["size"]) for e in entries] == [("in/data.bin", "file", 1024)], entries
            js = await call(s, "run_js_code", code="require('fs').readFileSync('in/data.bin').length")
            assert text_of(js) == "[value]\n1024", text_of(js)  # the JavaScript session opened with it
            text = await call(s, "write_file", path="notes.txt", content="héllo\n")
            assert not text.is_error
            read = await call(s, "read_file", path="notes.txt")  # the session that ran last: JavaScript's
            assert read.structured_content == {"path": "notes.txt", "size": 7, "language": "nodejs",
                                               "base64": False, "content": "héllo\n"}
    run(scenario())


def test_paths_outside_work_and_a_planted_symlink_are_refused(transport: Session) -> None:
    async def scenario() -> None:
        async with transport() as s:
            for path in ("../escape.txt", "/etc/passwd", "a/../../b"):
                wrote = await call(s, "write_file", path=path, content="x")
                assert wrote.is_error, (path, text_of(wrote))
            for path in ("../etc/passwd", "/etc/passwd"):
                read = await call(s, "read_file", path=path)
                assert read.is_error, (path, text_of(read))
            planted = await call(s, "run_python_code", code="import os\nos.symlink('/etc', 'etc')")
            assert not planted.is_error, text_of(planted)
            probes: list[tuple[str, dict[str, Any]]] = [("read_file", {"path": "etc/passwd"}),
                                                        ("write_file", {"path": "etc/x", "content": "x"}),
                                                        ("list_files", {"path": "etc"})]
            for tool, args in probes:
                result = await s.call_tool(tool, args)
                assert result.is_error, (tool, text_of(result))
                assert "root:" not in text_of(result)
    run(scenario())


def test_two_mcp_sessions_do_not_see_each_others_variables_or_files(transport: Session) -> None:
    async def scenario() -> None:
        async with transport() as a, transport() as b:
            await call(a, "run_python_code", code="secret = 'a'")
            await call(a, "write_file", path="secret.txt", content="a's")
            other = await call(b, "run_python_code", code="secret")
            assert other.is_error and "NameError" in text_of(other)
            missing = await call(b, "read_file", path="secret.txt")
            assert missing.is_error, text_of(missing)
            listed = await call(b, "list_files")
            assert "secret.txt" not in json.dumps(listed.structured_content)
            mine = await call(a, "read_file", path="secret.txt")
            assert mine.structured_content["content"] == "a's"
    run(scenario())


def test_reset_and_the_end_of_the_mcp_session_close_the_sandboxd_sessions(transport: Session,
                                                                            mcp_daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        async with transport() as s:
            await call(s, "run_python_code", code="x = 1")
            await call(s, "run_js_code", code="1")
            assert len(owned_sessions(mcp_daemon)) == 2
            reset = await call(s, "reset")
            assert "closed the Python session and the JavaScript session" in text_of(reset), text_of(reset)
            assert owned_sessions(mcp_daemon) == []
            fresh = await call(s, "run_python_code", code="x")
            assert fresh.is_error and "NameError" in text_of(fresh)
            await call(s, "run_js_code", code="1")
            assert len(owned_sessions(mcp_daemon)) == 2
        # the client has gone (stdio closed; HTTP: DELETE of the Mcp-Session-Id)
        assert wait_until(lambda: owned_sessions(mcp_daemon) == [], 30), owned_sessions(mcp_daemon)
    run(scenario())


def test_an_http_session_ends_its_sandboxd_sessions_at_its_idle_timeout(mcp_daemon: DaemonProcess) -> None:
    async def scenario(server: McpHttpProcess) -> None:
        async with http_client() as hc, streamable_http_client(server.endpoint, http_client=hc,
                                                               terminate_on_close=False) as (r, w), \
                ClientSession(r, w) as s:
            await s.initialize()
            await call(s, "run_python_code", code="x = 1")
            assert len(owned_sessions(mcp_daemon)) == 1
        # no DELETE: the server's session_idle_timeout (1 s here) ends it
        assert wait_until(lambda: owned_sessions(mcp_daemon) == [], 30), owned_sessions(mcp_daemon)

    with McpHttpProcess(mcp_daemon.socket, args=("--config", idle_config())) as server:
        run(scenario(server))


def idle_config() -> str:
    path = os.path.join(daemon_dir(), "mcp.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({"mcp": {"session_idle_timeout": "1s", "header_timeout": "1s"}}, f)
    os.chmod(path, 0o644)
    return path


def test_a_client_of_the_2026_era_falls_back_to_the_handshake_and_keeps_state(mcp_daemon: DaemonProcess,
                                                                                mcp_http: McpHttpProcess) -> None:
    """mcp.Client's default mode ("auto") probes server/discover first."""
    async def scenario() -> None:
        async with http_client() as hc, Client(streamable_http_client(mcp_http.endpoint, http_client=hc)) as c:
            assert c.protocol_version == "2025-11-25"
            await c.call_tool("run_python_code", {"code": "z = 6"})
            result = await c.call_tool("run_python_code", {"code": "z * 7"})
            assert text_of(result) == "[value]\n42"
        async with Client(stdio_params(mcp_daemon.socket)) as c:  # stdio too
            assert c.protocol_version == "2025-11-25"
            await c.call_tool("run_python_code", {"code": "z = 6"})
            assert text_of(await c.call_tool("run_python_code", {"code": "z * 7"})) == "[value]\n42"
    run(scenario())


def post(url: str, headers: dict[str, str], token: str | None = TOKEN) -> httpx2.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "test", "version": "1"}}}
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx2.Client(trust_env=False, timeout=30) as c:
        return c.post(url, json=body, headers={"Accept": "application/json, text/event-stream", **auth, **headers})


def test_no_token_is_401_and_a_foreign_origin_403(mcp_http: McpHttpProcess) -> None:
    url = mcp_http.endpoint
    assert post(url, {}, token=None).status_code == 401
    refused = post(url, {}, token="not-the-token-0123456789")
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    foreign = post(url, {"Origin": "http://evil.example"})
    assert foreign.status_code == 403, foreign.text
    assert post(url, {"Origin": "http://evil.example"}, token=None).status_code == 403  # before the token
    assert post(url, {"Origin": "http://localhost:6274"}).status_code == 200  # a local browser tool's
    assert post(url, {"Host": "evil.example"}).status_code == 421  # DNS rebinding onto loopback
    assert post(url, {}).status_code == 200


def test_the_balancer_routes_need_no_token_but_pass_the_origin_check(mcp_http: McpHttpProcess) -> None:
    with httpx2.Client(base_url=mcp_http.url, trust_env=False, timeout=30) as c:
        assert c.get("/health/live").json()["status"] == "live"
        ready = c.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        capacity = c.get("/capacity").json()
        assert capacity["ready"] is True and capacity["workers"] > 0, capacity
        assert c.get("/capacity", headers={"Origin": "http://evil.example"}).status_code == 403


def test_a_session_answers_only_the_token_that_opened_it(mcp_daemon: DaemonProcess) -> None:
    other = "sbx-mcp-other-token-9876543210"
    with McpHttpProcess(mcp_daemon.socket, env={"SANDBOXD_MCP_TOKENS": f"{TOKEN},{other}"}) as server:
        opened = post(server.endpoint, {})
        sid = opened.headers["mcp-session-id"]
        assert post(server.endpoint, {"Mcp-Session-Id": sid}, token=other).status_code == 404


def test_bodies_and_slow_heads_are_bounded(mcp_daemon: DaemonProcess) -> None:
    with McpHttpProcess(mcp_daemon.socket, args=("--config", idle_config())) as server:
        with httpx2.Client(trust_env=False, timeout=30) as c:
            big = c.post(server.endpoint, content=b"x" * (17 << 20), headers={
                "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream"})
            assert big.status_code == 413
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        try:
            s.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
            started = time.monotonic()
            assert s.recv(100) == b""  # closed by the server (header_timeout 1 s), not by our timeout
            assert time.monotonic() - started < 30
        finally:
            s.close()


def test_it_refuses_root_and_http_without_tokens(mcp_daemon: DaemonProcess) -> None:
    command = [sys.executable, "-m", "sandboxd.mcp", "--socket", mcp_daemon.socket]
    as_root = subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert as_root.returncode == 77 and "refusing to run as root" in as_root.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_MCP")}
    no_tokens = subprocess.run([*command, "--http"], capture_output=True, text=True, timeout=60, env=env)
    assert no_tokens.returncode == 78 and "--http needs bearer tokens" in no_tokens.stderr


INSPECTOR = "@modelcontextprotocol/inspector@0.15.0"
INSPECTOR_DIR = os.path.join(REPO, ".cache", "mcp-inspector")


def inspector_cli() -> str:
    """The MCP Inspector's CLI from the npm registry, installed once under .cache/ (skipped when npm
    cannot install it: a registry out of reach says nothing of sandboxd-mcp)."""
    binary = os.path.join(INSPECTOR_DIR, "node_modules", ".bin", "mcp-inspector")
    if not os.path.exists(binary):
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: the MCP Inspector comes from the npm registry")
        try:
            subprocess.run(["npm", "install", "--prefix", INSPECTOR_DIR, "--no-audit", "--no-fund", INSPECTOR],
                           capture_output=True, timeout=300, check=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"npm could not install {INSPECTOR}: {e}")
    return binary


def test_the_mcp_inspector_cli_lists_and_calls_the_tools(mcp_daemon: DaemonProcess) -> None:
    binary = inspector_cli()
    wrapper = os.path.join(daemon_dir(), "sandboxd-mcp.sh")
    server = [*as_user_command(), sys.executable, "-m", "sandboxd.mcp", "--socket", mcp_daemon.socket]
    with open(wrapper, "w", encoding="utf-8") as f:
        f.write("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in server) + "\n")
    os.chmod(wrapper, 0o755)

    def inspect(*args: str) -> Any:
        done = subprocess.run([binary, "--cli", wrapper, *args], capture_output=True, text=True, timeout=120,
                              env=server_env(HOME=INSPECTOR_DIR))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    listed = inspect("--method", "tools/list")
    assert {t["name"] for t in listed["tools"]} == TOOLS
    called = inspect("--method", "tools/call", "--tool-name", "run_python_code", "--tool-arg", "code=6*7")
    assert called["content"][0] == {"type": "text", "text": "[value]\n42"}, called
    assert called["structuredContent"]["status"] == "ok" and not called.get("isError")
    refused = inspect("--method", "tools/call", "--tool-name", "run_python_code",
                      "--tool-arg", "code=import socket; socket.socket()")
    assert refused["isError"] and "blocked system call socket: no network" in refused["content"][0]["text"]
