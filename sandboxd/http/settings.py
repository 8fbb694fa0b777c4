"""sandboxd-http's settings, declared once (``common.declare``, as sandboxd.yaml's): key,
environment names, converter, default, doc.

Where a value comes from, later wins: the default, the ``--config`` file (a small YAML
mapping of these keys, optionally under an ``http:`` section), the environment
(dify-sandbox's own names, with the same meaning), the command line.  Errors name
where the bad value came from and what was expected::

    /etc/sandboxd/http.yaml: worker_timeout: expected a duration like 500ms, 5s or 2m, got 'soon'
    environment: MAX_WORKERS: expected an integer from 1 to 1024, got 'many'

The SETTINGS section of sandboxd-http(8) is rendered from these declarations
(``sandboxd.tools.settings_doc``; ``make man-lint`` fails when it drifts).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..client import DEFAULT_SOCKET
from ..common import declare, sizes
from ..common.declare import setting
from ..common.sizes import listen_address as listen_address  # (its home; imported from here too)

DEFAULT_LISTEN = "127.0.0.1:8194"
MIN_MEMORY = 16 << 20  # the daemon's smallest memory_mb
PORT = "SANDBOX_PORT"  # dify-sandbox's port alone; the host stays what the listen setting says


def optional_listen(value: Any) -> str:
    """HOST:PORT, or empty for none"""
    if value in ("", None):
        return ""
    host, port = listen_address(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def api_key(value: Any) -> str:
    if not isinstance(value, str) or "\n" in value or len(value) > 4096:
        raise ValueError("a string (one line)")
    return value


@dataclass(frozen=True)
class Settings:
    api_key: str = setting("", api_key, "The key clients send in X-Api-Key, compared in constant time. Required "
                           "unless no_auth.", ("API_KEY",))
    listen: tuple[str, int] = setting(listen_address(DEFAULT_LISTEN), listen_address,
                                      "Address to listen on, HOST:PORT; SANDBOX_PORT sets the port alone. "
                                      "dify-sandbox listens on every address: for Dify's containers, listen on "
                                      "the address of their network, e.g. the Docker bridge's.",
                                      ("SANDBOXD_HTTP_LISTEN",))
    socket: str = setting(DEFAULT_SOCKET, sizes.abs_path,
                          "The daemon's socket (connected to as this process's own uid).", ("SANDBOXD_SOCKET",))
    no_auth: bool = setting(False, sizes.boolean, "Serve without a key (--no-auth): only behind something that "
                            "authenticates.")
    worker_timeout: float = setting(15.0, sizes.duration, "Wall-clock limit of each run: what Dify's compose file "
                                    "sets, well within the 60 s Dify waits for an answer (its "
                                    "CODE_EXECUTION_READ_TIMEOUT). Above the quota's max_timeout the bridge does "
                                    "not start.", ("WORKER_TIMEOUT",))
    memory: int = setting(1 << 30, sizes.byte_size, "Memory limit of each run (dify-sandbox has none): room for "
                          "pandas on a file of Dify's upload limit (15 MB), and for the runner's copies of an input "
                          "of max_body. Runs at once times this is what Dify's runs may take of the host. Above the "
                          "quota's max_memory the bridge does not start.", ("SANDBOXD_HTTP_MEMORY",))
    max_output: int = setting(8 << 20, sizes.byte_size, "stdout and stderr cap of each run, each: one string at "
                              "Dify's CODE_MAX_STRING_LENGTH (400,000 characters) as its Python wrapper prints it "
                              "(json.dumps escapes a character to 6 bytes, 12 outside the BMP: 4.8 MB) with room "
                              "to spare. Above the quota's max_output the bridge does not start.",
                              ("SANDBOXD_HTTP_MAX_OUTPUT",))
    max_workers: int = setting(6, sizes.int_range(1, 1024), "Runs sent to the daemon at once; further requests "
                               "wait (queue_timeout) for one to finish. 6: what one caller alone gets of the "
                               "daemon's 8 workers (daemon.reserved_workers keeps 2 for others); more wait in the "
                               "daemon's queue. Above the quota's concurrent plus queued the bridge does not start.",
                               ("MAX_WORKERS",))
    max_requests: int = setting(50, sizes.int_range(1, 100000), "Requests in flight, running and waiting; "
                                "beyond it 503 at once.", ("MAX_REQUESTS",))
    queue_timeout: float = setting(30.0, sizes.duration, "Longest a request waits for one of max_workers "
                                   "before 503.")
    enable_network: bool = setting(True, sizes.boolean, "Honour a request's enable_network: such a run gets the "
                                   "daemon's policed network (its own namespace, default deny to the host and "
                                   "private networks; see SECURITY.md) when the quota of this uid has network: "
                                   "true. Dify asks for network on every request; when the quota refuses it the "
                                   "run goes ahead without network, and a failure at a socket call says why there "
                                   "was none.", ("ENABLE_NETWORK",))
    enable_preload: bool = setting(False, sizes.boolean, "Run a request's preload: inside the jail, unprivileged, "
                                   "in the same run, before the code (line numbers stay the code's own). "
                                   "Otherwise it is ignored, as dify-sandbox does.", ("ENABLE_PRELOAD",))
    http_proxy: str = setting("", sizes.url, "HTTP_PROXY (and http_proxy) of runs with network. Checked as the "
                              "daemon's network.proxy is: a proxy runs may not reach under its network policy "
                              "(loopback, private networks, unless network.allow opens them) is named in a warning "
                              "at start and refused by the daemon; runs then go without network, never without "
                              "the proxy. A host name is not checked (runs resolve it).", ("HTTP_PROXY",))
    https_proxy: str = setting("", sizes.url, "HTTPS_PROXY (and https_proxy) of runs with network; checked as "
                               "http_proxy is.", ("HTTPS_PROXY",))
    max_body: int = setting(24 << 20, sizes.byte_size, "Largest request body; beyond it 413. Dify puts a node's "
                            "inputs into the code, base64-encoded (4/3 as large): the text of a document at Dify's "
                            "upload limit (15 MB) is 20 MB of body. Beyond the daemon's max_frame (less 64 KiB) "
                            "the bridge does not start.", ("SANDBOXD_HTTP_MAX_BODY",))
    header_timeout: float = setting(10.0, sizes.duration, "The request line and headers must arrive within this "
                                    "of the connection opening (or of the first byte of the next request on a "
                                    "kept-alive connection): 408 otherwise. More than 64 KiB of them: 431.")
    body_timeout: float = setting(30.0, sizes.duration, "A request's body must arrive within this: 408 otherwise.")
    write_timeout: float = setting(30.0, sizes.duration, "A client that does not take its response for this long "
                                   "is cut off.")
    keepalive_timeout: float = setting(75.0, sizes.duration, "An idle kept-alive connection is closed after "
                                       "this (longer than Dify's 5 s pool expiry, so the client closes first).")
    max_connections: int = setting(1024, sizes.int_range(1, 1000000), "Connections that have sent a request "
                                   "head; a head beyond them is answered 503. Connections still sending their "
                                   "first head do not count here: as many again may be doing that, and beyond them "
                                   "the oldest are closed (408), never one opened within the last 0.1 s.")
    reserved_connections: int = setting(128, sizes.int_range(0, 999999), "Of max_connections, how many only "
                                        "requests that carry the API key may take: clients without it (a flood, a "
                                        "scanner) never take the last of them. A head without the key that finds "
                                        "no room is answered 503; one with the key first closes an idle kept-alive "
                                        "connection whose last request had none. Must be below max_connections.")
    max_pending_per_client: int = setting(128, sizes.int_range(1, 1000000), "Connections of one client address "
                                          "(an IPv4 address, an IPv6 /64) still sending their first request head; "
                                          "beyond it that address's oldest are closed (408) every 0.1 s, never one "
                                          "opened since the sweep before: a slow client shares its address with a "
                                          "fast one without shutting it out.")
    agent_listen: str = setting("", optional_listen, "Where HAProxy's agent-check is answered (HOST:PORT; none by "
                                "default): one line per connection, up ready N% (N the free share of the daemon's "
                                "workers), drain or down, from the numbers /capacity shows (docs/fleet.md). Bind it "
                                "where only the balancer reaches.", ("SANDBOXD_HTTP_AGENT_LISTEN",))
    drain_grace: float = setting(30.0, sizes.duration, "On SIGTERM (systemctl stop) /health/ready turns 503 and the "
                                 "agent says drain at once, new requests are answered 503 (retryable: nothing was "
                                 "started), and the runs in flight get this long to finish; those still running "
                                 "then are cut off (502) and the process exits.")
    log_level: str = setting("info", sizes.choice("debug", "info", "warning", "error"),
                             "Log verbosity; GIN_MODE=debug or DEBUG=true mean debug.")

    # The settings given in the file, the environment or on the command line (not defaults): a given
    # value the daemon refuses keeps the bridge from starting; a default just gets the daemon's limit.
    given: frozenset[str] = dataclasses.field(default=frozenset(), compare=False)

    @property
    def listen_text(self) -> str:
        host, port = self.listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SettingsError(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


def declared() -> list[dataclasses.Field[Any]]:
    return declare.declared(Settings)


def from_file(path: str, errors: list[str]) -> dict[str, Any]:
    """Values from a YAML file: ``{key: value}``, or the same under ``http:``."""
    return declare.from_file(Settings, path, "http", errors)


def from_environment(env: Mapping[str, str], errors: list[str]) -> dict[str, Any]:
    out = declare.from_environment(Settings, env, errors)
    port = env.get("SANDBOX_PORT", "")
    if port:
        if port.isdigit() and int(port) <= 65535:
            out[PORT] = int(port)  # applied to the listen address from wherever it came
        else:
            errors.append(f"environment: SANDBOX_PORT: expected a port number, got {port!r}")
    if env.get("DEBUG", "") in declare.TRUE_WORDS or env.get("GIN_MODE", "") == "debug":
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
    values.update(declare.from_command_line(Settings, overrides or {}, errors))
    port = values.pop(PORT, None)
    if port is not None and "listen" not in (overrides or {}):
        values["listen"] = (values.get("listen", Settings().listen)[0], port)
    settings = Settings(**values, given=frozenset(values))
    if not settings.api_key and not settings.no_auth:
        errors.append("no API key: set API_KEY (or api_key in the --config file), or pass --no-auth to serve "
                      "without one")
    if settings.api_key and settings.no_auth:
        errors.append("both an API key and --no-auth: choose one")
    if settings.agent_listen and listen_address(settings.agent_listen) == settings.listen and settings.listen[1]:
        errors.append(f"agent_listen: expected another address than listen's, got {settings.agent_listen}")
    if settings.memory < MIN_MEMORY:
        errors.append(f"memory: expected at least {MIN_MEMORY >> 20}M (the daemon's least), got {settings.memory}")
    if settings.reserved_connections >= settings.max_connections:
        errors.append(f"reserved_connections: expected fewer than max_connections ({settings.max_connections}), "
                      f"got {settings.reserved_connections}")
    if errors:
        raise SettingsError(errors)
    return settings
