"""sandboxd-http end to end: a real daemon, and the real bridge running as the unprivileged
test user sbx-http (a member of the socket's group), driven the way Dify drives dify-sandbox.

Every request goes to 127.0.0.1.  The wrappers below are written from the description of
what Dify puts around user code (inputs as base64 JSON, the result between <<RESULT>>
markers), and the client is configured as Dify's is.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bridge import KEY, USER, BridgeProcess
from conftest import require
from harness import REPO, DaemonProcess, as_user, shipped_config, wait_until

from sandboxd.client import SandboxdError

httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

RESULT = re.compile(r"<<RESULT>>(.*)<<RESULT>>", re.DOTALL)  # Dify's own extraction
SLOW = {"header_timeout": "1s", "body_timeout": "1s", "max_body": "256K"}


def dify_client(base_url: str, key: str | None = KEY) -> Any:
    """An httpx client set up as Dify's code executor's is."""
    # trust_env=False: a proxy set in the environment must never carry a test's request off loopback
    return httpx.Client(base_url=base_url, headers={"X-Api-Key": key} if key else {}, trust_env=False,
                        timeout=httpx.Timeout(connect=10.0, read=60.0, write=10.0, pool=None),
                        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0))


def run(client: Any, code: str, language: str = "python3", preload: str = "", network: bool = False,
        **extra: Any) -> Any:
    return client.post("/v1/sandbox/run", json={"language": language, "code": code, "preload": preload,
                                                "enable_network": network, **extra})


def data_of(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, (response.status_code, response.text)
    body = response.json()
    assert body["code"] == 0 and body["message"] == "success", body
    assert set(body["data"]) == {"stdout", "stderr", "error", "exit_code"}, body
    out: dict[str, Any] = body["data"]
    return out


def refused(response: Any, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["code"] == -status and body["data"] is None, body
    message: str = body["message"]
    return message


def b64json(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def python3_program(user_code: str, inputs: dict[str, Any]) -> str:
    return (f"{user_code}\n\nimport json\nfrom base64 import b64decode\n\n"
            f"inputs_obj = json.loads(b64decode('{b64json(inputs)}').decode('utf-8'))\n"
            "output_obj = main(**inputs_obj)\n"
            "output_json = json.dumps(output_obj, indent=4)\n"
            "print(f'<<RESULT>>{output_json}<<RESULT>>')\n")


JINJA2_PRELOAD = """
import jinja2
from base64 import b64decode

def _jinja2_preload_():
    # render a trivial template before the real one, as Dify's template node does
    jinja2.Template('{{s}}').render(s='a')

if __name__ == '__main__':
    _jinja2_preload_()
"""


def jinja2_program(template: str, inputs: dict[str, Any]) -> str:
    t = base64.b64encode(template.encode()).decode()
    return ("import jinja2\nimport json\nfrom base64 import b64decode\n\n"
            f"def main(**inputs):\n    template = b64decode('{t}').decode('utf-8')\n"
            "    return jinja2.Template(template).render(**inputs)\n\n"
            f"inputs_obj = json.loads(b64decode('{b64json(inputs)}').decode('utf-8'))\n"
            "output = main(**inputs_obj)\nprint('<<RESULT>>' + output + '<<RESULT>>')\n")


def javascript_program(user_code: str, inputs: dict[str, Any]) -> str:
    return (f"{user_code}\n\nconst inputs_obj = JSON.parse(Buffer.from('{b64json(inputs)}', 'base64')"
            ".toString('utf-8'));\nconst output_obj = main(inputs_obj);\n"
            "console.log(`<<RESULT>>${JSON.stringify(output_obj)}<<RESULT>>`);\n")


def result_of(data: dict[str, Any]) -> str:
    assert data["error"] == "", data
    m = RESULT.search(data["stdout"])
    assert m, data
    return m.group(1)


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bridge(daemon: DaemonProcess, bridges: Callable[..., BridgeProcess]) -> BridgeProcess:
    """The bridge Dify would talk to: preload on, room for 32 clients, 1 s slow-client limits."""
    return bridges(daemon.socket, {"ENABLE_PRELOAD": "true", "MAX_WORKERS": "16", "MAX_REQUESTS": "100"}, SLOW)


@pytest.fixture
def client(bridge: BridgeProcess) -> Iterator[Any]:
    with dify_client(bridge.url) as c:
        yield c


@pytest.fixture(scope="module")
def small(daemon: DaemonProcess, bridges: Callable[..., BridgeProcess]) -> BridgeProcess:
    """Two runs at a time, 1 s runs, no network, no preload."""
    return bridges(daemon.socket, {"WORKER_TIMEOUT": "1", "MAX_REQUESTS": "2", "MAX_WORKERS": "2",
                                   "ENABLE_NETWORK": "false"})


@pytest.fixture(scope="module")
def tight(test_users: Any, bridges: Callable[..., BridgeProcess]) -> Iterator[tuple[DaemonProcess, BridgeProcess]]:
    """A daemon with one worker and no queue, whose quota for sbx-http allows no network."""
    d = DaemonProcess(_workdir(), {"daemon": {"workers": 1, "queue": 0},
                                   "quotas": {"users": {"sbx-http": {"network": False}}}}).start()
    try:
        yield d, bridges(d.socket)
    finally:
        d.close()
        shutil.rmtree(d.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def shipped(test_users: Any, bridges: Callable[..., BridgeProcess]) -> Iterator[tuple[DaemonProcess, BridgeProcess]]:
    """The profile a Dify operator gets: a daemon on the shipped sandboxd.yaml (its sandboxd-http
    entry given to the tests' bridge user) and a bridge with nothing set but its key."""
    d = DaemonProcess(_workdir(), {"root": {"hard_links": True}}, base=shipped_config({"sandboxd-http": USER}))
    d.start()
    try:
        yield d, bridges(d.socket)
    finally:
        d.close()
        shutil.rmtree(d.dir, ignore_errors=True)


def _workdir() -> str:
    from harness import daemon_dir

    return daemon_dir()


def metric(b: BridgeProcess, name: str, **labels: str) -> float:
    text = httpx.get(b.url + "/metrics", trust_env=False).text
    total = 0.0
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# -- authentication ------------------------------------------------------------------------------
def test_the_api_key_is_required_and_checked(bridge: BridgeProcess) -> None:
    with dify_client(bridge.url, key=None) as anonymous:
        assert "X-Api-Key" in refused(run(anonymous, "print(1)"), 401)
        assert anonymous.get("/health").status_code == 200  # health and metrics need no key
    for wrong in ("x", KEY[:-1] + "X", KEY + "0"):
        with dify_client(bridge.url, key=wrong) as c:
            message = refused(run(c, "print(1)"), 401)
            assert wrong not in message and KEY not in message
    with dify_client(bridge.url) as c:
        assert data_of(run(c, "print(1)"))["stdout"] == "1\n"
        refused(c.get("/v1/sandbox/dependencies", headers={"X-Api-Key": ""}), 401)


def test_it_refuses_to_start_without_a_key_or_as_root(test_users: Any) -> None:
    # Never the host's own daemon or port 8194, should a check regress: a socket nobody serves, port 0.
    where = ["--socket", "/nonexistent/sandboxd-test.sock", "--listen", "127.0.0.1:0"]
    cmd = [sys.executable, "-m", "sandboxd.http", *where, "--check-config"]
    env = {"PATH": "/usr/bin:/bin"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=60, **as_user("sbx-http"))
    assert p.returncode == 78 and "no API key" in p.stderr and "--no-auth" in p.stderr, p.stderr
    p = subprocess.run([*cmd, "--no-auth"], capture_output=True, text=True, env=env, cwd="/", timeout=60,
                       **as_user("sbx-http"))
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "sandboxd.http", *where, "--no-auth"], capture_output=True, text=True,
                       env=env, cwd="/", timeout=60)
    assert p.returncode == 77 and "refusing to run as root" in p.stderr, p.stderr


# -- Dify's wrappers -------------------------------------------------------------------------------
def test_difys_python3_code_node(client: Any) -> None:
    user = "def main(arg1: str, arg2: int) -> dict:\n    return {'result': arg1 * arg2, 'n': [arg2, None, True]}\n"
    data = data_of(run(client, python3_program(user, {"arg1": "ab", "arg2": 3})))
    assert json.loads(result_of(data)) == {"result": "ababab", "n": [3, None, True]}
    assert data["exit_code"] == 0


def test_difys_jinja2_template_node_with_its_preload(client: Any) -> None:
    template = "Hello {{ name }}! {% for x in items %}[{{ x | upper }}]{% endfor %} {{ html }}"
    program = jinja2_program(template, {"name": "Dify", "items": ["a", "b"], "html": "<b>"})
    data = data_of(run(client, program, preload=JINJA2_PRELOAD))
    assert result_of(data) == "Hello Dify! [A][B] <b>"
    data = data_of(run(client, "import markupsafe; print(markupsafe.escape('<b>'))"))
    assert data["stdout"] == "&lt;b&gt;\n"


def test_difys_javascript_code_node(client: Any) -> None:
    require(shutil.which("node") is not None, "node is not installed")
    user = "function main({arg1, arg2}) {\n  return {result: arg1 + arg2, list: [arg2, null]};\n}\n"
    data = data_of(run(client, javascript_program(user, {"arg1": "x", "arg2": 2}), language="nodejs"))
    assert json.loads(result_of(data)) == {"result": "x2", "list": [2, None]}
    data = data_of(run(client, "console.log(typeof P, P)", language="nodejs", preload="globalThis.P = 41 + 1"))
    assert data["stdout"] == "number 42\n"


def test_whitespace_only_code_runs_and_prints_nothing_as_in_dify_sandbox(client: Any) -> None:
    """dify-sandbox runs code that is only blanks (its binding refuses only an empty string)."""
    languages = ["python3", *(["nodejs"] if shutil.which("node") else [])]
    for language in languages:
        assert data_of(run(client, " \n\t \n", language=language)) == \
            {"stdout": "", "stderr": "", "error": "", "exit_code": 0}, language
    assert "code" in refused(run(client, ""), 400)


# -- the shipped profile: what Dify itself allows -----------------------------------------------------------
def test_the_shipped_profile_takes_what_dify_allows(shipped: tuple[DaemonProcess, BridgeProcess]) -> None:
    """Through Dify's Python wrapper, against the shipped sandboxd.yaml and the bridge's defaults:
    an output Dify accepts (one string within CODE_MAX_STRING_LENGTH, 400,000 characters, that the
    wrapper's json.dumps escapes to 2.1 MB), a 7 MB input (9.3 MB of body once base64-encoded), a
    400 MB allocation (pandas on a real file), and requests and httpx (Debian's, in the root)."""
    import importlib.metadata

    _, b = shipped
    with dify_client(b.url) as c:
        big = "\u4e2d" * 350000
        data = data_of(run(c, python3_program("def main() -> dict:\n    return {'big': '\u4e2d' * 350000}\n", {})))
        assert len(data["stdout"]) > 2 << 20 and json.loads(result_of(data)) == {"big": big}
        text = "x" * 6_999_997 + "end"
        user = "def main(text: str) -> dict:\n    return {'n': len(text), 'tail': text[-3:]}\n"
        assert json.loads(result_of(data_of(run(c, python3_program(user, {"text": text}))))) == \
            {"n": 7_000_000, "tail": "end"}
        user = "def main() -> dict:\n    block = b'x' * (400 * 10**6)\n    return {'n': len(block)}\n"
        assert json.loads(result_of(data_of(run(c, python3_program(user, {}))))) == {"n": 400 * 10**6}
        user = ("import httpx, requests\n\ndef main() -> dict:\n"
                "    with requests.Session() as s, httpx.Client() as h:\n"
                "        return {'requests': requests.__version__, 'httpx': httpx.__version__}\n")
        data = data_of(run(c, python3_program(user, {})))
        assert json.loads(result_of(data)) == \
            {"requests": importlib.metadata.version("requests"), "httpx": importlib.metadata.version("httpx")}
        assert data["stderr"] == ""  # not even requests' warning about the versions of what it imports
        # what it does not take says which bound: the output past max_output, the body past max_body
        data = data_of(run(c, "import sys\nsys.stdout.write('x' * (9 << 20))\n"))
        assert data["error"].startswith("error: output limit exceeded: stdout"), data["error"][:200]
        assert "max_body" in refused(run(c, "x" * ((24 << 20) + 1000)), 413)


def start_refused(d: DaemonProcess, env: dict[str, str]) -> tuple[int, str]:
    """Start a bridge for ``d`` with ``env`` and wait for it to end: its status and what it said."""
    cmd = [sys.executable, "-m", "sandboxd.http", "--socket", d.socket, "--listen", "127.0.0.1:0"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd="/", timeout=60, **as_user(USER),
                       env={"PATH": "/usr/bin:/bin", "API_KEY": KEY, "LANG": "C.UTF-8", **env})
    return p.returncode, p.stdout + p.stderr


def test_a_setting_its_quota_does_not_allow_keeps_the_bridge_from_starting(
        shipped: tuple[DaemonProcess, BridgeProcess], bridges: Callable[..., BridgeProcess]) -> None:
    """Not a 403 on every run and a 503 /health: the bridge stops at start, naming its value, what
    the daemon allows and the key to change."""
    d, _ = shipped
    cases = {
        ("WORKER_TIMEOUT", "90"): ["WORKER_TIMEOUT", "90 s", "max_timeout 60 s", f"quotas.users.{USER}.max_timeout"],
        ("SANDBOXD_HTTP_MEMORY", "2G"): ["memory", "2 GiB", "max_memory 1 GiB", f"quotas.users.{USER}.max_memory"],
        ("SANDBOXD_HTTP_MAX_OUTPUT", "16M"): ["max_output", "16 MiB", "max_output 8 MiB",
                                             f"quotas.users.{USER}.max_output"],
        ("SANDBOXD_HTTP_MAX_BODY", "64M"): ["max_body", "64 MiB", "max_frame 32 MiB", "daemon.max_frame"],
        ("MAX_WORKERS", "100"): ["MAX_WORKERS", "100", "concurrent 6", "queued 64", f"quotas.users.{USER}.queued"],
    }
    for (name, value), words in cases.items():
        status, said = start_refused(d, {name: value})
        assert status == 78 and "listening" not in said, (name, status, said)
        for word in words:
            assert word in said, (name, word, said)
    at_the_bounds = bridges(d.socket, {"WORKER_TIMEOUT": "60", "SANDBOXD_HTTP_MEMORY": "1G", "MAX_WORKERS": "70",
                                       "SANDBOXD_HTTP_MAX_OUTPUT": "8M"})
    assert httpx.get(at_the_bounds.url + "/health", trust_env=False).status_code == 200
    assert "runs beyond 6 at once wait in the daemon's queue" in at_the_bounds.log()


# -- verdicts in Dify's words ------------------------------------------------------------------------
def test_an_exception_fails_the_node_with_its_traceback(client: Any) -> None:
    data = data_of(run(client, "def main():\n    return 1 / 0\nmain()\n"))
    assert data["exit_code"] == 1
    assert data["error"].startswith("error: exit status 1\nTraceback"), data
    assert "ZeroDivisionError: division by zero" in data["error"] and data["stderr"] in data["error"]


def test_stderr_alone_does_not_fail_the_node(client: Any) -> None:
    code = "import logging, sys, warnings\nwarnings.warn('old')\nlogging.warning('note')\nprint('out')\n"
    data = data_of(run(client, code))
    assert (data["error"], data["stdout"], data["exit_code"]) == ("", "out\n", 0)
    assert "UserWarning: old" in data["stderr"] and "WARNING:root:note" in data["stderr"]


def test_a_blocked_system_call_is_named(client: Any) -> None:
    data = data_of(run(client, "import os\nos.chroot('/')\n"))
    assert data["error"].startswith("error: operation not permitted: chroot"), data
    assert "PermissionError" in data["error"]


def test_the_memory_limit_is_named(client: Any) -> None:
    data = data_of(run(client, "x = bytearray(3 << 30)\nprint(len(x))\n"))
    assert data["error"].startswith("error: memory limit exceeded"), data
    assert data["stdout"] == ""


def test_the_output_and_process_limits_are_named(client: Any) -> None:
    data = data_of(run(client, "import sys\nwhile True: sys.stdout.write('x' * 65536)\n"))
    assert data["error"].startswith("error: output limit exceeded: stdout"), data["error"][:200]
    code = "import os, time\nfor _ in range(200):\n    os.fork() or time.sleep(3)\n"
    data = data_of(run(client, code))
    assert data["error"].startswith("error: process limit reached"), data["error"][:200]


def test_preload_runs_in_the_jail_before_the_code_and_keeps_its_line_numbers(client: Any,
                                                                             small: BridgeProcess) -> None:
    preload = "import builtins, os\nbuiltins.PRELOAD_UID = os.getuid()\n"
    code = "import builtins, os\nprint(builtins.PRELOAD_UID == os.getuid() != 0)\n"
    assert data_of(run(client, code, preload=preload))["stdout"] == "True\n"
    code = "from __future__ import annotations\nx: undefined = 1\n\n1 / 0\n"
    data = data_of(run(client, code, preload=preload))
    assert 'File "<code>", line 4' in data["stderr"], data["stderr"]
    with dify_client(small.url) as c:  # ENABLE_PRELOAD off: ignored, as dify-sandbox does
        data = data_of(run(c, "import builtins\nprint(hasattr(builtins, 'PRELOAD_UID'))\n", preload=preload))
        assert data["stdout"] == "False\n"


# -- network ------------------------------------------------------------------------------------------
SOCKET = "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM).close()\nprint('socket ok')\n"


def test_enable_network_gives_the_policed_network_when_the_quota_allows(client: Any) -> None:
    assert data_of(run(client, SOCKET, network=True))["stdout"] == "socket ok\n"
    data = data_of(run(client, SOCKET, network=False))
    assert data["error"].startswith("error: operation not permitted: socket"), data
    assert "this run had no network" in data["error"]


def test_network_refused_says_why_and_runs_go_on_without_it(small: BridgeProcess,
                                                           tight: tuple[DaemonProcess, BridgeProcess]) -> None:
    with dify_client(small.url) as c:
        error = data_of(run(c, SOCKET, network=True))["error"]
        assert "operation not permitted: socket" in error and "ENABLE_NETWORK is off" in error, error
    _, b = tight
    with dify_client(b.url) as c:
        assert data_of(run(c, "print(6 * 7)", network=True))["stdout"] == "42\n"
        error = data_of(run(c, SOCKET, network=True))["error"]
        assert "does not allow network (quotas.users.sbx-http.network" in error, error


PROXY = "http://127.0.0.1:3128"  # loopback, which no run may reach (and where nothing listens)
PROXY_ENV = "import os\nprint(os.environ.get('HTTP_PROXY'), os.environ.get('https_proxy'))\n"


def test_a_proxy_runs_may_not_reach_is_named_at_start_and_never_given_to_a_run(
        daemon: DaemonProcess, bridges: Callable[..., BridgeProcess]) -> None:
    b = bridges(daemon.socket, {"HTTP_PROXY": PROXY, "HTTPS_PROXY": "http://203.0.113.9:3128"})
    assert wait_until(lambda: PROXY in b.log(), 30), b.log()
    line = next(line for line in b.log().splitlines() if PROXY in line)
    assert "WARNING" in line and "HTTP_PROXY" in line and "loopback" in line and "network.allow" in line, line
    with dify_client(b.url) as c:
        data = data_of(run(c, PROXY_ENV + SOCKET, network=True))
    assert data["stdout"].startswith("None None\n"), data  # neither proxy: the run had no network
    assert "this run had no network" in data["error"] and f"HTTP_PROXY {PROXY}" in data["error"], data
    # The daemon refuses such a variable whoever sends it, with the same check as network.proxy.
    with daemon.client() as admin, pytest.raises(SandboxdError) as e:
        admin.run("print(1)", network=True, env={"HTTPS_PROXY": PROXY})
    assert (e.value.code, e.value.details.get("field")) == ("forbidden", "env"), e.value
    assert "HTTPS_PROXY" in e.value.message and "127.0.0.1 (loopback)" in e.value.message, e.value.message
    with daemon.client() as admin:
        # without network a run's variables are its own business: it has nothing to use them with
        without = admin.run("import os\nprint(os.environ['HTTPS_PROXY'])\n", network=False,
                            env={"HTTPS_PROXY": PROXY})
    assert without.stdout == f"{PROXY}\n".encode(), without


def test_a_proxy_runs_may_reach_is_given_to_runs_with_network(daemon: DaemonProcess,
                                                              bridges: Callable[..., BridgeProcess]) -> None:
    allowed = "http://203.0.113.9:3128"  # a documentation address: public as far as the policy can tell
    b = bridges(daemon.socket, {"HTTP_PROXY": allowed, "HTTPS_PROXY": allowed})
    with dify_client(b.url) as c:
        assert data_of(run(c, PROXY_ENV, network=True))["stdout"] == f"{allowed} {allowed}\n"
        assert data_of(run(c, PROXY_ENV, network=False))["stdout"] == "None None\n"
    assert allowed not in b.log()  # nothing to warn about


# -- bad requests ----------------------------------------------------------------------------------------
def test_bad_requests_get_400_with_code_minus_400(client: Any) -> None:
    post = client.post
    assert "not JSON" in refused(post("/v1/sandbox/run", content=b"{nope"), 400)
    assert "JSON object" in refused(post("/v1/sandbox/run", json=["print(1)"]), 400)
    assert "empty" in refused(run(client, ""), 400)
    assert "unsupported language 'ruby'" in refused(run(client, "puts 1", language="ruby"), 400)
    assert "code" in refused(post("/v1/sandbox/run", json={"language": "python3"}), 400)
    assert "code" in refused(post("/v1/sandbox/run", json={"language": "python3", "code": 7}), 400)
    assert "enable_network" in refused(run(client, "print(1)", network="yes"), 400)  # type: ignore[arg-type]
    assert "preload" in refused(run(client, "print(1)", preload=["x"]), 400)  # type: ignore[arg-type]
    # old clients send dependencies: unknown fields are ignored
    assert data_of(run(client, "print(1)", dependencies=[{"name": "numpy"}]))["stdout"] == "1\n"
    assert "no such route" in refused(client.get("/v1/sandbox/nothing"), 404)
    assert "method not allowed" in refused(client.get("/v1/sandbox/run"), 405)


def test_bodies_are_capped_whether_announced_or_streamed(client: Any) -> None:
    big = "x = 1\n" * 50000  # 300 KB, over the 256K of this bridge
    assert "larger than" in refused(run(client, big), 413)

    def chunks() -> Iterator[bytes]:
        body = json.dumps({"language": "python3", "code": big}).encode()
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]

    assert "larger than" in refused(client.post("/v1/sandbox/run", content=chunks()), 413)


def raw(b: BridgeProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", b.port), timeout=10)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_slow_and_oversized_clients_are_cut_off(bridge: BridgeProcess) -> None:
    with raw(bridge) as idle:  # connects, sends nothing
        assert read_all(idle).startswith(b"HTTP/1.1 408 ")
    with raw(bridge) as slow:  # slowloris: the head never ends
        slow.sendall(b"POST /v1/sandbox/run HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.5)
        slow.sendall(b"X-Slow: 1\r\n")
        assert read_all(slow).startswith(b"HTTP/1.1 408 ")
    with raw(bridge) as body:  # the head arrives, the body does not
        body.sendall(b"POST /v1/sandbox/run HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + KEY.encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"lang")
        answer = read_all(body)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":-408' in answer, answer
    with raw(bridge) as huge:  # 80 KiB of headers
        huge.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 8000 + b"\r\n" * 1)
        for _ in range(9):
            huge.sendall(b"X-Pad: " + b"a" * 8000 + b"\r\n")
        assert read_all(huge).startswith(b"HTTP/1.1 431 ")
    with dify_client(bridge.url) as c:  # and it goes on serving
        assert c.get("/health").status_code == 200


# -- capacity -----------------------------------------------------------------------------------------------
def test_fifty_requests_over_one_kept_alive_connection(bridge: BridgeProcess) -> None:
    ports = set()
    with dify_client(bridge.url) as c:
        for i in range(50):
            r = run(c, f"print({i} * 2)")
            assert data_of(r)["stdout"] == f"{i * 2}\n"
            ports.add(r.extensions["network_stream"].get_extra_info("socket").getsockname()[1])
    assert len(ports) == 1


def test_thirty_two_concurrent_clients_each_get_their_own_answer(bridge: BridgeProcess) -> None:
    def one(i: int) -> tuple[int, str]:
        with dify_client(bridge.url) as c:
            code = f"import time\ntime.sleep(0.05)\nprint('client', {i})\n"
            return i, data_of(run(c, code))["stdout"]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    assert answers == [(i, f"client {i}\n") for i in range(32)]


def test_a_hundred_open_connections_are_served(bridge: BridgeProcess) -> None:
    conns = [http.client.HTTPConnection("127.0.0.1", bridge.port, timeout=30) for _ in range(100)]
    try:
        for c in conns:
            c.connect()
        statuses = []
        for c in conns:  # every connection open at once, each used in turn
            c.request("GET", "/health")
            r = c.getresponse()
            r.read()
            statuses.append(r.status)
        assert statuses == [200] * 100
    finally:
        for c in conns:
            c.close()


def slow_heads(port: int, n: int) -> list[socket.socket]:
    """``n`` connections from 127.0.0.1 that start a request head and never finish it (slowloris)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/sandbox/run HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    return socks


def still_open(s: socket.socket) -> bool:
    """The bridge has neither answered nor closed this connection."""
    s.setblocking(False)
    try:
        s.recv(1 << 16)  # its answer (408) or the end of the stream
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_slow_clients_without_a_key_do_not_lock_out_the_ones_with_it(daemon: DaemonProcess,
                                                                     bridges: Callable[..., BridgeProcess]) -> None:
    """The red team's lock-out, scaled down: more slow heads than max_connections, all from the
    address the authenticated client uses too, held open for the whole test (header_timeout 60 s)."""
    b = bridges(daemon.socket, {"MAX_REQUESTS": "100"}, {"max_connections": 256, "header_timeout": "60s"})
    flood = slow_heads(b.port, 300)
    try:
        statuses = []
        for i in range(30):  # each on a new connection, as a client does whose kept-alive ones expired
            with dify_client(b.url) as c:
                r = run(c, f"print({i})")
                statuses.append(r.status_code if r.status_code != 200 else data_of(r)["stdout"] == f"{i}\n")
        assert statuses == [True] * 30, f"{statuses.count(True)}/30 answered: {statuses}"
        held = sum(still_open(s) for s in flood)
        assert held <= 128, f"{held} slow heads of one address still held (max_pending_per_client 128)"
    finally:
        for s in flood:
            s.close()


def test_503_at_once_over_max_requests(small: BridgeProcess) -> None:
    answers: list[Any] = []

    def sleeper() -> None:
        with dify_client(small.url) as c:
            answers.append(run(c, "import time\ntime.sleep(5)\n"))

    threads = [threading.Thread(target=sleeper) for _ in range(2)]
    for t in threads:
        t.start()
    assert wait_until(lambda: metric(small, "sandboxd_http_in_flight") == 2, 10)
    with dify_client(small.url) as c:
        r = run(c, "print(1)")
    assert not answers  # refused while both runs were still in flight
    assert "MAX_REQUESTS" in refused(r, 503) and r.headers["Retry-After"] == "1"
    for t in threads:
        t.join()
    for a in answers:  # both ran into the 1 s WORKER_TIMEOUT
        assert data_of(a)["error"].startswith("error: timeout: the run reached its wall-clock limit of 1 s"), a.text


def test_503_when_the_daemon_is_busy(tight: tuple[DaemonProcess, BridgeProcess]) -> None:
    d, b = tight
    first: list[Any] = []

    def sleeper() -> None:
        with dify_client(b.url) as c:
            first.append(run(c, "import time\ntime.sleep(1.5)\nprint('done')\n"))

    t = threading.Thread(target=sleeper)
    t.start()
    with d.client() as admin:
        assert wait_until(lambda: admin.status()["capacity"]["running"] == 1, 10)
    with dify_client(b.url) as c:
        message = refused(run(c, "print(1)"), 503)
    assert "busy" in message and not first
    t.join()
    assert data_of(first[0])["stdout"] == "done\n"


# -- health -------------------------------------------------------------------------------------------------
def test_health_follows_the_daemon(make_daemon: Any, bridges: Callable[..., BridgeProcess]) -> None:
    d: DaemonProcess = make_daemon(start=False)
    b = bridges(d.socket)

    def health() -> tuple[int, str]:
        r = httpx.get(b.url + "/health", trust_env=False)
        return r.status_code, r.json().get("reason", "")

    code, reason = health()
    assert code == 503 and "not reachable" in reason and d.socket not in reason
    with dify_client(b.url) as c:  # refused before it started: retryable anywhere, so 503
        r = run(c, "print(1)")
        assert "not reachable" in refused(r, 503) and "nothing was started" in r.json()["message"]
        assert r.headers["Retry-After"] == "1"
    # a socket that accepts and never answers: a daemon still starting behind socket activation
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fake.bind(d.socket)
    os.chmod(d.socket, 0o666)
    fake.listen(16)
    try:
        assert wait_until(lambda: health() == (503, "sandboxd is starting (no answer to status yet)"), 10)
    finally:
        fake.close()
        os.unlink(d.socket)
    d.start()
    assert wait_until(lambda: health()[0] == 200, 15), health()
    with dify_client(b.url) as c:
        assert data_of(run(c, "print('up')"))["stdout"] == "up\n"
    d.stop()
    assert wait_until(lambda: health()[0] == 503, 15)
    with dify_client(b.url) as c:
        assert "nothing was started" in refused(run(c, "print(1)"), 503)


# -- metrics --------------------------------------------------------------------------------------------------
def test_metrics_parse_and_move(bridge: BridgeProcess) -> None:
    text = httpx.get(bridge.url + "/metrics", trust_env=False).text
    names = {f.name for f in parser.text_string_to_metric_families(text)}
    assert {"sandboxd_http_requests", "sandboxd_http_request_duration_seconds", "sandboxd_http_runs",
            "sandboxd_http_in_flight", "sandboxd_daemon_up", "sandboxd_daemon_capacity", "sandboxd_daemon_running",
            "sandboxd_daemon_queued", "sandboxd_daemon_pool_ready", "sandboxd_daemon_pool_hits"} <= names, names
    route = {"route": "/v1/sandbox/run"}
    before = (metric(bridge, "sandboxd_http_requests_total", status="200", **route),
              metric(bridge, "sandboxd_http_runs_total", language="python3", verdict="exit_nonzero"),
              metric(bridge, "sandboxd_http_request_duration_seconds_count", **route),
              metric(bridge, "sandboxd_http_requests_total", status="400", **route))
    with dify_client(bridge.url) as c:
        data_of(run(c, "raise SystemExit(3)"))
        refused(run(c, ""), 400)
    after = (metric(bridge, "sandboxd_http_requests_total", status="200", **route),
             metric(bridge, "sandboxd_http_runs_total", language="python3", verdict="exit_nonzero"),
             metric(bridge, "sandboxd_http_request_duration_seconds_count", **route),
             metric(bridge, "sandboxd_http_requests_total", status="400", **route))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 2, 1]
    assert metric(bridge, "sandboxd_daemon_up") == 1 and metric(bridge, "sandboxd_daemon_capacity") >= 1


# -- dependencies ------------------------------------------------------------------------------------------------
def test_dependency_routes_without_environments(client: Any) -> None:
    """A daemon without environments: runs get the root's packages, so there is nothing to list
    or rebuild (tests/test_environments.py has the routes against a real environment)."""
    for language in ("python3", "nodejs"):
        assert data_of_any(client.get("/v1/sandbox/dependencies", params={"language": language})) == \
            {"dependencies": []}
    assert data_of_any(client.post("/v1/sandbox/dependencies/update", json={"language": "python3"})) == {}
    assert data_of_any(client.get("/v1/sandbox/dependencies/refresh", params={"language": "python3"})) == \
        {"dependencies": []}
    assert "language" in refused(client.get("/v1/sandbox/dependencies", params={"language": "ruby"}), 400)


def data_of_any(response: Any) -> Any:
    """A Dify success envelope's data, whatever its shape."""
    assert response.status_code == 200, (response.status_code, response.text)
    body = response.json()
    assert body["code"] == 0 and body["message"] == "success", body
    return body["data"]


# -- settings and docs (no daemon) ------------------------------------------------------------------------------
def test_settings_come_from_file_environment_and_command_line(tmp_path: Any) -> None:
    from sandboxd.http.settings import SettingsError, load

    path = tmp_path / "http.yaml"
    path.write_text("http:\n  worker_timeout: 20s\n  max_workers: 3\n  api_key: from-file\n")
    s = load(str(path), env={"MAX_WORKERS": "5", "SANDBOX_PORT": "9000", "ENABLE_NETWORK": "false",
                             "GIN_MODE": "release"}, overrides={"listen": "0.0.0.0:8000"})
    assert (s.worker_timeout, s.max_workers, s.api_key, s.enable_network, s.listen, s.log_level) == (
        20.0, 5, "from-file", False, ("0.0.0.0", 8000), "info")
    s = load(None, env={"API_KEY": "k", "WORKER_TIMEOUT": "2.5", "SANDBOX_PORT": "9000", "DEBUG": "true"})
    assert (s.worker_timeout, s.listen, s.log_level) == (2.5, ("127.0.0.1", 9000), "debug")
    path.write_text("listen: 0.0.0.0:8194\n")  # SANDBOX_PORT changes the port, not the host
    assert load(str(path), env={"API_KEY": "k", "SANDBOX_PORT": "9001"}).listen == ("0.0.0.0", 9001)
    s = load(None, env={"API_KEY": "k", "SANDBOXD_HTTP_LISTEN": "[::1]:8000"})
    assert (s.listen, s.listen_text) == (("::1", 8000), "[::1]:8000")
    path.write_text("worker_timout: 5\nmax_workers: many\n")
    with pytest.raises(SettingsError) as e:
        load(str(path), env={"API_KEY": "k", "MAX_REQUESTS": "-1"})
    assert e.value.errors == [
        f"{path}: worker_timout: unknown setting (did you mean worker_timeout?)",
        f"{path}: max_workers: expected an integer from 1 to 1024, got 'many'",
        "environment: MAX_REQUESTS: expected an integer from 1 to 100000, got -1"]


def test_the_man_page_names_every_setting_and_variable() -> None:
    from sandboxd.http.settings import declared

    with open(os.path.join(REPO, "man", "sandboxd-http.8"), encoding="utf-8") as f:
        page = f.read().replace("\\-", "-").replace("\\fB", "").replace("\\fR", "")
    for f_ in declared():
        assert f_.name in page, f_.name
        for env in f_.metadata["env"]:
            assert env in page, env
    for env in ("SANDBOX_PORT", "GIN_MODE", "DEBUG"):
        assert env in page, env


def test_the_words_of_each_verdict() -> None:
    from sandboxd.http import dify

    ctx = dify.Context(timeout_s=15, network=False, network_refused="ENABLE_NETWORK is off in sandboxd-http")
    cases = {
        "timeout": "error: timeout: the run reached its wall-clock limit of 15 s",
        "cpu_limit": "error: timeout: the run used up its CPU time",
        "memory_limit": "error: memory limit exceeded",
        "pids_limit": "error: process limit reached",
        "output_limit": "error: output limit exceeded: stderr",
        "sandbox_error": "error: sandbox error",
    }
    for status, head in cases.items():
        assert dify.headline({"status": status}, ctx).startswith(head), status
    r = {"status": "blocked_syscall", "blocked_syscall": "connect", "stderr": b"PermissionError\n"}
    assert dify.run_data(r, ctx)["error"] == (
        "error: operation not permitted: connect (a system call the sandbox does not allow); this run had no "
        "network: ENABLE_NETWORK is off in sandboxd-http\nPermissionError\n")
    assert dify.run_data({"status": "signaled", "signal": 9, "signal_name": "SIGKILL"}, ctx)["exit_code"] == 137
    assert dify.run_data({"status": "ok", "exit_code": 0, "stderr": b"noise"}, ctx)["error"] == ""
    busy = dify.daemon_refusal("quota_exceeded", "runs_per_minute", {"limit": "runs_per_minute",
                                                                      "retry_after_ms": 2500})
    assert (busy.status, busy.retry_after) == (503, 2.5) and "runs_per_minute" in busy.message
    assert dify.daemon_refusal("busy", "", {}).status == 503
