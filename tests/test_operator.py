"""What operators and client programs read: the daemon's JSON log lines with their fields,
the typed client Result and its units, out/ for every run.  Against the real daemon."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import call_as
from harness import DaemonProcess, wait_until

from sandboxd.client import Client, Result


def log_lines(d: DaemonProcess) -> list[dict[str, Any]]:
    out = []
    for line in d.log().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_json_log_lines_carry_the_fields_of_runs_refusals_and_admin_actions(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"daemon": {"log_format": "json"}})
    with d.client() as c:
        assert c.run("import os; os.chroot('/')").status == "blocked_syscall"
        ok = c.run("print(1)")
        c.call("reload")
    out = call_as("sbx-alice", d.socket, [{"op": "jobs", "id": 1}])
    assert out["responses"][0]["error"]["code"] == "forbidden"

    def found() -> list[dict[str, Any]] | None:
        lines = log_lines(d)
        wanted = [any(x.get("status") == "blocked_syscall" and x.get("syscall") == "chroot" for x in lines),
                  any(x.get("run_id") == ok.run_id and x.get("status") == "ok" for x in lines),
                  any(x.get("refusal") == "forbidden" and x.get("op") == "jobs" for x in lines),
                  any(x.get("action") == "reload" and x.get("caller_uid") == 0 for x in lines)]
        return lines if all(wanted) else None

    lines = wait_until(found, 10)
    assert lines, d.log()[-3000:]
    blocked = next(x for x in lines if x.get("syscall") == "chroot")
    assert blocked["level"] == "info" and blocked["caller"] == "root" and isinstance(blocked["cpu_ms"], float)
    refused = next(x for x in lines if x.get("refusal") == "forbidden")
    assert refused["caller_uid"] != 0 and "jobs" in refused["message"]
    # Every line is JSON: nothing else is written in this format.
    assert all(line.startswith("{") for line in d.log().splitlines() if line.strip()), d.log()[-2000:]


def test_the_client_returns_a_typed_result_and_takes_the_configs_units(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c:
        r = c.run("import sys; print('hi'); print('err', file=sys.stderr); sys.exit(3)", timeout="2s",
                  memory="128M", cpu=1.5)
        assert isinstance(r, Result) and r.status == "exit_nonzero" and not r.ok and r.exit_code == 3
        assert (r.stdout, r.text, r.stderr_text) == (b"hi\n", "hi\n", "err\n")
        assert r["status"] == r.status and dict(r)["exit_code"] == 3 and r.run_id and r.wall_ms > 0
        r = c.run("open('out/a.txt', 'w').write('A')")
        assert r.ok and r.files == {"a.txt": b"A"}
        # Each passes only with the unit applied: 1 s of sleep is inside the default timeout, and
        # 100 MiB inside the default memory limit.
        assert c.run("import time; time.sleep(1)", timeout=0.3).status == "timeout"
        assert c.run("x = bytearray(100 << 20); x[::4096] = b'x' * len(x[::4096])", memory="64M").status == \
            "memory_limit"
        with pytest.raises(TypeError):
            c.run("pass", nonsense=1)
        assert c.usage()[0]["uid"] == 0 and c.jobs() == []
        assert c.root_why("json")["importable"] is True
        with c.session(memory="256M", idle_timeout="1m") as s:
            s.exec("x = 41")
            cell = s.exec("x + 1")
            assert isinstance(cell, Result) and cell.value == "42"


@pytest.mark.parametrize("language,code", [
    ("python3", "import os; print(os.path.isdir('out'), os.listdir('out'))"),
    ("nodejs", "const fs = require('fs'); console.log(fs.statSync('out').isDirectory(), fs.readdirSync('out'))"),
])
def test_every_run_has_an_empty_out_directory(daemon: DaemonProcess, language: str, code: str) -> None:
    r = daemon.run(code, language=language)
    assert r.ok and r.text.split()[0] in ("True", "true"), r


def test_json_lines_go_to_syslog_when_the_daemon_runs_in_the_background() -> None:
    # Daemonized, stderr is /dev/null: JSON lines must go where text lines go (syslog), tagged.
    import logging
    import logging.handlers
    import os

    from sandboxd import logs

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        logs.setup("info", foreground=False, fmt_name="json", ident="sandboxd")
        (handler,) = root.handlers
        assert isinstance(handler, logging.handlers.SysLogHandler)
        assert handler.ident == f"sandboxd[{os.getpid()}]: "
        record = logging.LogRecord("sandboxd.run", logging.INFO, __file__, 1, "run %s", ("r1",), None)
        assert json.loads(handler.format(record))["message"] == "run r1"
        handler.close()
    finally:
        root.handlers[:], root.level = saved, level
