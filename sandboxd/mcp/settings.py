"""sandboxd-mcp's settings, declared once (``common.declare``, as sandboxd.yaml's and
sandboxd-http's): key, environment names, converter, default, doc.

Later wins: the default, the ``--config`` file (these keys, optionally under ``mcp:``), the
environment (``SANDBOXD_MCP_*``), the command line.  Nothing here imports the MCP SDK: the
settings are checked, and their man page rendered, where the SDK is not installed.

Bearer tokens never come from the command line (every user on the host could read them in
``ps``): from ``SANDBOXD_MCP_TOKENS`` or from ``tokens_file``, a file that only its owner may
read.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..client import DEFAULT_SOCKET
from ..common import declare, sizes
from ..common.declare import setting

DEFAULT_PORT = 8195
MIN_TOKEN = 16
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def http_address(value: Any) -> tuple[str, int] | None:
    """``HOST:PORT``, a bare ``PORT`` (on 127.0.0.1), or empty for stdio."""
    if value in (None, ""):
        return None
    if (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit()):
        value = f"127.0.0.1:{value}"
    try:
        return sizes.listen_address(value)
    except ValueError:
        raise ValueError("HOST:PORT like 127.0.0.1:8195, a port alone, or empty for stdio") from None


def token_list(value: Any) -> tuple[str, ...]:
    """Tokens separated by commas or white space (a YAML list works too)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(t, str) for t in items):
        raise ValueError("tokens separated by commas")
    for token in items:
        if len(token) < MIN_TOKEN or not re.fullmatch(r"[\x21-\x7e]+", token):
            raise ValueError(f"tokens of at least {MIN_TOKEN} printable characters without spaces")
    return tuple(items)


def origin_list(value: Any) -> tuple[str, ...]:
    """``scheme://host[:port]`` origins; a port of ``*`` stands for any port."""
    if not isinstance(value, list) or not all(
            isinstance(v, str) and re.fullmatch(r"https?://[^\s/:]+(:(\d{1,5}|\*))?", v) for v in value):
        raise ValueError("a list of origins like [https://agent.example.org, http://localhost:*]")
    return tuple(value)


def host_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and re.fullmatch(r"[^\s/]+", v) for v in value):
        raise ValueError("a list of Host header values like [mcp.example.org, mcp.example.org:8195]")
    return tuple(value)


def optional_path(value: Any) -> str:
    return "" if value in (None, "") else sizes.abs_path(value)


@dataclass(frozen=True)
class Settings:
    socket: str = setting(DEFAULT_SOCKET, sizes.abs_path, "The daemon's socket, connected to as this process's "
                          "own uid: its quota is what every agent of this server shares.", ("SANDBOXD_SOCKET",))
    http: tuple[str, int] | None = setting(None, http_address, "Serve Streamable HTTP on HOST:PORT (--http; a port "
                                           "alone listens on 127.0.0.1) instead of stdio.", ("SANDBOXD_MCP_HTTP",))
    tokens: tuple[str, ...] = setting((), token_list, "Bearer tokens HTTP clients may send (Authorization: Bearer "
                                      "...), separated by commas; each at least 16 characters. A request without "
                                      "one of them is answered 401.", ("SANDBOXD_MCP_TOKENS",))
    tokens_file: str = setting("", optional_path, "A file of bearer tokens, one a line (# starts a comment), read "
                               "at start; it must not be readable by other users.", ("SANDBOXD_MCP_TOKENS_FILE",))
    allowed_origins: tuple[str, ...] = setting((), origin_list, "Origins a browser may call from, besides "
                                               "loopback's (http://127.0.0.1, http://localhost, http://[::1], any "
                                               "port). A request with another Origin header is answered 403; one "
                                               "without is not a browser's and passes.")
    allowed_hosts: tuple[str, ...] = setting((), host_list, "Host header values accepted, besides the loopback "
                                             "names; checked only when this list is not empty or the server listens "
                                             "on a loopback address (what stops DNS rebinding). Otherwise 421.")
    max_body: int = setting(16 << 20, sizes.byte_size, "Largest HTTP request body (a write_file's content is in "
                            "it, base64 makes it a third larger); beyond it 413.")
    max_connections: int = setting(64, sizes.int_range(1, 100000), "HTTP connections and requests at once; "
                                   "beyond it 503.")
    max_sessions: int = setting(32, sizes.int_range(1, 100000), "MCP sessions over HTTP at once; beyond it a new "
                                "one is answered 503. Each holds up to two sandboxd sessions (Python, JavaScript), "
                                "which count against the sessions quota of this server's uid.")
    session_idle_timeout: float = setting(600.0, sizes.duration, "An MCP session over HTTP without a request for "
                                          "this long is closed, and its sandboxd sessions with it.")
    header_timeout: float = setting(10.0, sizes.duration, "An HTTP connection must send its request line and "
                                    "headers within this of opening (or of its previous answer); else it is "
                                    "closed.")
    timeout: float = setting(30.0, sizes.duration, "Time limit of a run_python_code or run_js_code call that "
                             "names none (timeout_s); at most the quota's max_timeout.")
    memory: int = setting(0, sizes.byte_size, "Memory of each sandboxd session (0: the daemon's limits.memory); "
                          "at most the quota's max_session_memory.")
    network: bool = setting(False, sizes.boolean, "Open sandboxd sessions with network (the daemon's policed "
                            "network; the quota of this uid must allow it). The tool descriptions say which.",
                            ("SANDBOXD_MCP_NETWORK",))
    environment: str = setting("", sizes.optional_text, "The Python environment of the Python sessions (empty: "
                               "the daemon's default).", ("SANDBOXD_MCP_ENVIRONMENT",))
    log_level: str = setting("info", sizes.choice("debug", "info", "warning", "error"),
                             "Log verbosity (on standard error).", ("SANDBOXD_MCP_LOG_LEVEL",))

    @property
    def http_text(self) -> str:
        if self.http is None:
            return "stdio"
        host, port = self.http
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SettingsError(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


def read_tokens(path: str, errors: list[str]) -> tuple[str, ...]:
    """The tokens of ``tokens_file``; refused when others may read it."""
    try:
        with open(path, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                errors.append(f"{path}: tokens_file: other users may read or write it: chmod 600 {path}")
                return ()
            lines = [line.split("#", 1)[0].strip() for line in f]
    except OSError as e:
        errors.append(f"{path}: tokens_file: cannot read: {e.strerror}")
        return ()
    except UnicodeDecodeError:
        errors.append(f"{path}: tokens_file: not UTF-8 text")
        return ()
    try:
        return token_list([line for line in lines if line])
    except ValueError as e:
        errors.append(f"{path}: tokens_file: expected {e}")
        return ()


def load(path: str | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from the file, the environment and the command line's raw ``overrides``."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    if path:
        values.update(declare.from_file(Settings, path, "mcp", errors))
    values.update(declare.from_environment(Settings, os.environ if env is None else env, errors))
    values.update(declare.from_command_line(Settings, overrides or {}, errors))
    settings = Settings(**values)
    if settings.tokens_file:
        settings = replace(settings, tokens=settings.tokens + read_tokens(settings.tokens_file, errors))
    if settings.http is not None and not settings.tokens and not errors:
        errors.append("--http needs bearer tokens: set SANDBOXD_MCP_TOKENS or tokens_file (SANDBOXD_MCP_TOKENS_FILE)")
    if errors:
        raise SettingsError(errors)
    return settings
