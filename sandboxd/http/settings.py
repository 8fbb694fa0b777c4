"""sandboxd-http's settings, declared once: key, environment name, converter, default, doc.

Where a value comes from, later wins: the default, the ``--config`` file (a small YAML
mapping of these keys, optionally under an ``http:`` section), the environment
(dify-sandbox's own names, with the same meaning), the command line.  Errors name
where the bad value came from and what was expected::

    /etc/sandboxd/http.yaml: worker_timeout: expected a duration like 500ms, 5s or 2m, got 'soon'
    environment: MAX_WORKERS: expected an integer from 1 to 1024, got 'many'

The man page sandboxd-http(8) lists the same keys (a test keeps it in step).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .. import sizes
from ..client import DEFAULT_SOCKET
from ..hints import did_you_mean

DEFAULT_LISTEN = "127.0.0.1:8194"
PORT = "SANDBOX_PORT"  # dify-sandbox's port alone; the host stays what the listen setting says
GO_TRUE = ("1", "t", "T", "true", "TRUE", "True", "yes", "on")  # strconv.ParseBool's, and two more
GO_FALSE = ("0", "f", "F", "false", "FALSE", "False", "no", "off")


def setting(default: Any, convert: Callable[[Any], Any], doc: str, env: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"convert": convert, "doc": doc, "env": env})


def listen_address(value: Any) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8194`` for IPv6) -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", str(value))
    if not m or isinstance(value, bool):
        raise ValueError("HOST:PORT like 127.0.0.1:8194")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 <= int(port) <= 65535:
        raise ValueError("HOST:PORT with a port from 0 to 65535")
    return host, int(port)


def api_key(value: Any) -> str:
    if not isinstance(value, str) or "\n" in value or len(value) > 4096:
        raise ValueError("a string (one line)")
    return value


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, int] = setting(listen_address(DEFAULT_LISTEN), listen_address,
                                       "Address to listen on, HOST:PORT; SANDBOX_PORT sets the port alone.",
                                      ("SANDBOXD_HTTP_LISTEN",))
    socket: str = setting(DEFAULT_SOCKET, sizes.abs_path,
                           "The daemon's socket (connected to as this process's own uid).", ("SANDBOXD_SOCKET",))
    api_key: str = setting("", api_key, "Key clients send in X-Api-Key; required unless no_auth.", ("API_KEY",))
    no_auth: bool = setting(False, sizes.boolean, "Serve without a key (--no-auth): only behind something that "
                             "authenticates.")
    worker_timeout: float = setting(15.0, sizes.duration, "Wall-clock limit of each run, in seconds (Dify's "
                                     "compose file sets 15).", ("WORKER_TIMEOUT",))
    max_workers: int = setting(8, sizes.int_range(1, 1024), "Runs sent to the daemon at once; more requests "
                                "wait (queue_timeout) for one to finish.", ("MAX_WORKERS",))
    max_requests: int = setting(50, sizes.int_range(1, 100000), "Requests in flight, running and waiting; "
                                 "beyond it 503 at once.", ("MAX_REQUESTS",))
    queue_timeout: float = setting(30.0, sizes.duration, "Longest a request waits for one of max_workers "
                                    "before 503.")
    enable_network: bool = setting(True, sizes.boolean, "Honour enable_network in requests: such runs get "
                                    "the daemon's policed network if the quota of this uid allows it.",
                                    ("ENABLE_NETWORK",))
    enable_preload: bool = setting(False, sizes.boolean, "Run a request's preload (inside the jail, before "
                                    "its code); ignored otherwise, as dify-sandbox does.", ("ENABLE_PRELOAD",))
    http_proxy: str = setting("", sizes.url, "HTTP_PROXY (and http_proxy) of runs with network; the "
                               "daemon's network policy must let runs reach it.", ("HTTP_PROXY",))
    https_proxy: str = setting("", sizes.url, "HTTPS_PROXY (and https_proxy) of runs with network.",
                                ("HTTPS_PROXY",))
    max_body: int = setting(8 << 20, sizes.byte_size, "Largest request body; beyond it 413.")
    header_timeout: float = setting(10.0, sizes.duration, "A request's line and headers must arrive within "
                                     "this of the connection opening (or of its first byte on a kept-alive one).")
    body_timeout: float = setting(30.0, sizes.duration, "A request's body must arrive within this.")
    write_timeout: float = setting(30.0, sizes.duration, "A client must take a response within this.")
    keepalive_timeout: float = setting(75.0, sizes.duration, "An idle kept-alive connection is closed after "
                                        "this (longer than Dify's 5 s pool expiry, so the client closes first).")
    max_connections: int = setting(1024, sizes.int_range(1, 1000000), "Open connections; beyond it 503.")
    log_level: str = setting("info", sizes.choice("debug", "info", "warning", "error"),
                              "Log verbosity; GIN_MODE=debug or DEBUG=true mean debug.")

    @property
    def listen_text(self) -> str:
        host, port = self.listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SettingsError(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


def declared() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Settings))


def _convert(f: dataclasses.Field[Any], value: Any, where: str, errors: list[str]) -> Any:
    try:
        return f.metadata["convert"](value)
    except ValueError as e:
        errors.append(f"{where}: expected {e}, got {value!r}")
        return dataclasses.MISSING


def from_file(path: str, errors: list[str]) -> dict[str, Any]:
    """Values from a YAML file: ``{key: value}``, or the same under ``http:``."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except OSError as e:
        errors.append(f"{path}: cannot read: {e.strerror}")
        return {}
    except yaml.YAMLError as e:
        errors.append(f"{path}: not valid YAML: {e}")
        return {}
    if isinstance(data, dict) and set(data) == {"http"}:
        data, prefix = data["http"], "http."
    else:
        prefix = ""
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"{path}: {prefix or 'top level'}: expected a mapping of settings")
        return {}
    fields = {f.name: f for f in declared()}
    out: dict[str, Any] = {}
    for key, value in data.items():
        f = fields.get(str(key))
        if f is None:
            errors.append(f"{path}: {prefix}{key}: unknown setting" + did_you_mean(str(key), fields))
            continue
        converted = _convert(f, value, f"{path}: {prefix}{key}", errors)
        if converted is not dataclasses.MISSING:
            out[f.name] = converted
    return out


def _env_value(f: dataclasses.Field[Any], text: str) -> Any:
    """An environment string as the YAML value the converter takes."""
    if f.type in ("bool", bool):
        return True if text in GO_TRUE else False if text in GO_FALSE else text
    if f.type in ("int", int) and re.fullmatch(r"\s*-?\d+\s*", text):
        return int(text)
    return text


def from_environment(env: Mapping[str, str], errors: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in declared():
        for name in f.metadata["env"]:
            if env.get(name, "") != "":
                converted = _convert(f, _env_value(f, env[name]), f"environment: {name}", errors)
                if converted is not dataclasses.MISSING:
                    out[f.name] = converted
    port = env.get("SANDBOX_PORT", "")
    if port:
        if port.isdigit() and int(port) <= 65535:
            out[PORT] = int(port)  # applied to the listen address from wherever it came
        else:
            errors.append(f"environment: SANDBOX_PORT: expected a port number, got {port!r}")
    debug = env.get("DEBUG", "") in GO_TRUE or env.get("GIN_MODE", "") == "debug"
    if debug:
        out["log_level"] = "debug"
    return out


def load(path: str | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from the file, the environment and the command line's ``overrides`` (raw values)."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    if path:
        values.update(from_file(path, errors))
    values.update(from_environment(os.environ if env is None else env, errors))
    fields = {f.name: f for f in declared()}
    for key, value in (overrides or {}).items():
        converted = _convert(fields[key], value, f"--{key.replace('_', '-')}", errors)
        if converted is not dataclasses.MISSING:
            values[key] = converted
    port = values.pop(PORT, None)
    if port is not None and "listen" not in (overrides or {}):
        values["listen"] = (values.get("listen", Settings().listen)[0], port)
    settings = Settings(**values)
    if not settings.api_key and not settings.no_auth:
        errors.append("no API key: set API_KEY (or api_key in the --config file), or pass --no-auth to serve "
                      "without one")
    if settings.api_key and settings.no_auth:
        errors.append("both an API key and --no-auth: choose one")
    if errors:
        raise SettingsError(errors)
    return settings
