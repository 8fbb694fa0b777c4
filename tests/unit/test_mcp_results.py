"""sandboxd-mcp without the SDK or a daemon: what an agent reads of a record, and the settings."""

from __future__ import annotations

import os
from typing import Any

import pytest

from sandboxd.mcp.results import cell_reply, jsonable, verdict
from sandboxd.mcp.settings import SettingsError, http_address, load, token_list

TOKEN = "a-token-of-sixteen-or-more"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 20


def record(**fields: Any) -> dict[str, Any]:
    return {"status": "ok", "stdout": b"", "stderr": b"", "value": None, "exception": None, "exec": 1,
            "session_id": "s1", "wall_ms": 1.0, **fields}


def test_only_what_there_is_is_shown() -> None:
    assert cell_reply(record(value="42"), language="python3", timeout_s=30, network=False).text == "[value]\n42"
    assert cell_reply(record(), language="python3", timeout_s=30, network=False).text == "(no output)"
    both = cell_reply(record(stdout=b"hi\n", stderr=b"careful\n"), language="python3", timeout_s=30, network=False)
    assert both.text == "[stdout]\nhi\n[stderr]\ncareful"
    assert not both.is_error


def test_the_verdict_is_in_words() -> None:
    assert verdict(record(status="timeout"), 10, False).startswith("timed out after 10 s: the cell was interrupted")
    ended = verdict(record(status="timeout", session_ended=True), 2.5, False)
    assert "timed out after 2.5 s" in ended and "the session has ended" in ended
    blocked = verdict(record(status="blocked_syscall", blocked_syscall="socket"), 10, False)
    assert blocked == "blocked system call socket: no network (this sandbox has no network access)"
    assert "does not allow it" in verdict(record(status="blocked_syscall", blocked_syscall="socket"), 10, True)
    exc = record(status="exception", exception={"type": "ZeroDivisionError", "message": "division by zero",
                                                 "traceback": "Traceback ...\nZeroDivisionError: division by zero\n"})
    reply = cell_reply(exc, language="python3", timeout_s=10, network=False)
    assert reply.is_error and "[error]\nZeroDivisionError: division by zero" in reply.text
    assert "[traceback]\nTraceback ..." in reply.text  # not on stderr: shown once
    exc["stderr"] = exc["exception"]["traceback"].encode()
    assert "[traceback]" not in cell_reply(exc, language="python3", timeout_s=10, network=False).text
    assert verdict(record(status="ok"), 10, False) == ""


def test_hostile_output_cannot_reach_a_terminal_raw() -> None:
    reply = cell_reply(record(stdout=b"\x1b]0;owned\x07ok\n", value="'\x1b[2J'"), language="python3",
                       timeout_s=1, network=False)
    assert "\x1b" not in reply.text and "\x07" not in reply.text and "\\x1b]0;owned" in reply.text


def test_figures_and_files_and_the_structured_record() -> None:
    rec = record(display=[{"mime": "image/png", "data": PNG}], files={"plot.csv": b"1,2\n"}, stdout=b"\xff\xfe")
    reply = cell_reply(rec, language="python3", timeout_s=30, network=False, notes=["a new session"])
    assert reply.images == [("image/png", PNG)]
    assert "[files]\nout/plot.csv (4 B)" in reply.text and "[note]\na new session" in reply.text
    s = reply.structured
    assert s is not None
    assert s["figures"] == 1 and s["files"] == {"plot.csv": 4} and "display" not in s
    assert s["stdout"] == {"base64": "//4=", "bytes": 2} and s["language"] == "python3" and s["timeout_s"] == 30
    assert jsonable({"a": [b"text"]}) == {"a": ["text"]}


def test_addresses_and_tokens() -> None:
    assert http_address("8195") == ("127.0.0.1", 8195)
    assert http_address("[::1]:9") == ("::1", 9)
    assert http_address("") is None
    with pytest.raises(ValueError, match="HOST:PORT"):
        http_address("somewhere")
    assert token_list(f"{TOKEN}, {TOKEN}x") == (TOKEN, TOKEN + "x")
    with pytest.raises(ValueError, match="at least 16"):
        token_list("short")


def test_http_needs_tokens_and_a_tokens_file_only_its_owner_reads(tmp_path: Any) -> None:
    with pytest.raises(SettingsError, match="--http needs bearer tokens"):
        load(env={}, overrides={"http": "127.0.0.1:0"})
    assert load(env={"SANDBOXD_MCP_TOKENS": TOKEN}, overrides={"http": "0"}).tokens == (TOKEN,)
    path = tmp_path / "tokens"
    path.write_text(f"# agents\n{TOKEN}  # the first\n\n")
    os.chmod(path, 0o644)
    with pytest.raises(SettingsError, match="other users may read or write it: chmod 600"):
        load(env={"SANDBOXD_MCP_TOKENS_FILE": str(path)})
    os.chmod(path, 0o600)
    assert load(env={"SANDBOXD_MCP_TOKENS_FILE": str(path)}).tokens == (TOKEN,)
    config = tmp_path / "mcp.yaml"
    config.write_text("mcp:\n  timeout: 5s\n  max_sesions: 3\n")
    with pytest.raises(SettingsError, match="mcp.max_sesions: unknown setting.*max_sessions"):
        load(str(config), env={})
