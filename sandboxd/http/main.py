"""sandboxd-http: the dify-sandbox HTTP API in front of sandboxd (see sandboxd-http(8)).

    sandboxd-http [--socket PATH] [--listen HOST:PORT] [--config FILE] [--no-auth] [--check-config]

It holds no privileges and refuses to run as root: it talks to the daemon as its own
uid, whose quota (``quotas.users.sandboxd-http``) is what every Dify request shares.
Start-up: settings (file, environment, command line), bind, serve, the agent-check port
(``agent_listen``); READY=1 (sd_notify) once listening.  SIGTERM/SIGINT drain: /health/ready
turns 503 and the agent says ``drain`` at once, new requests are answered 503, those in
flight get ``drain_grace`` to finish (then are cut off, 502), and only then does the server
stop accepting and exit.  A second signal stops at once.  The handler only enqueues.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

import uvicorn
import uvloop

from .. import __version__, logs
from ..common import tcp
from ..common.process import raise_nofile
from ..fleet.agent import Agent
from ..fleet.node import Drain, Node
from ..systemd import Notifier
from . import bounds
from .app import build
from .gate import Gate
from .guard import protocol_class
from .keys import Keys
from .metrics import Metrics
from .service import Bridge
from .settings import Settings, SettingsError, listen_address, load
from .upstream import Upstream

log = logging.getLogger("sandboxd.http")
EX_CONFIG = 78
EX_NOPERM = 77
STARTUP_HELLO = 10.0  # at start, how long the daemon may take to answer hello before the bridge serves without it
HELLO_RETRY = 2.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sandboxd-http", description="The dify-sandbox HTTP API in front of sandboxd "
                                "(see sandboxd-http(8)). Settings also come from dify-sandbox's environment "
                                "variables: API_KEY, SANDBOX_PORT, WORKER_TIMEOUT, MAX_WORKERS, MAX_REQUESTS, "
                                "ENABLE_NETWORK, ENABLE_PRELOAD, HTTP_PROXY, HTTPS_PROXY, GIN_MODE, DEBUG.")
    p.add_argument("--socket", help="the daemon's socket (default /run/sandboxd/sandboxd.sock)")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:8194)")
    p.add_argument("--config", metavar="FILE", help="a YAML file of settings (sandboxd-http(8))")
    p.add_argument("--no-auth", action="store_true", help="serve without an API key")
    p.add_argument("--check-config", action="store_true", help="validate the settings and exit")
    p.add_argument("--version", action="version", version=f"sandboxd-http {__version__}")
    return p


class Server(uvicorn.Server):  # type: ignore[misc]
    """uvicorn's server, whose SIGTERM and SIGINT are ours (they queue a drain)."""

    signals: asyncio.Queue[str]

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig.name)


async def drain_on_signal(server: Server, bridge: Bridge, notifier: Notifier) -> None:
    """The first signal drains, then stops the server; a second stops it at once."""
    first = await server.signals.get()
    grace = bridge.settings.drain_grace
    bridge.begin_drain(f"{first}; {bridge.drain.in_flight} requests in flight get {grace:g} s")
    notifier.notify(stopping=1, status="draining")
    settle = asyncio.create_task(bridge.drain.settle(grace))
    again = asyncio.create_task(server.signals.get())
    await asyncio.wait((settle, again), return_when=asyncio.FIRST_COMPLETED)
    if again.done():
        log.info("%s again: stopping now", again.result())
        server.force_exit = True
    again.cancel()
    settle.cancel()
    server.should_exit = True


async def serve(settings: Settings) -> int:
    metrics = Metrics()
    upstream = Upstream(settings.socket, max_idle=settings.max_workers + 2)
    drain = Drain()
    bridge = Bridge(settings, upstream, metrics, drain)
    # Settings the daemon would refuse on every run keep the bridge from starting, when the daemon
    # answers in time; one that answers later is asked again until it does (_greet).
    hello = await bridge.hello(STARTUP_HELLO)
    if hello is not None and not _bounds_hold(bridge):
        await upstream.close()
        return EX_CONFIG
    keys = Keys(settings)
    node = Node(bridge.status, bridge.checks, drain)
    app = build(settings, bridge, metrics, keys, node)
    gate = Gate(settings.max_connections, settings.reserved_connections, settings.max_pending_per_client,
                count=metrics.shed)
    metrics.watch(gate)
    gate.start(asyncio.get_running_loop())
    try:
        sock, where = tcp.listen(*settings.listen)
    except OSError as e:
        log.error("cannot listen on %s: %s", settings.listen_text, e.strerror or e)
        return EX_CONFIG
    # log_level: uvicorn's loggers at NOTSET would wrap the app in its per-message trace logger;
    # proxy_headers off: nothing in front of the bridge is trusted to say who the client is;
    # no limit_concurrency: it counts every open connection, a slow head as much as one with the key -- the
    # gate (guard's protocol) does the counting instead.
    config = uvicorn.Config(app, http=protocol_class(settings.header_timeout, settings.write_timeout, gate, keys),
                            lifespan="off", access_log=False, log_config=None, server_header=False,
                            log_level=max(logging.WARNING, logging.getLevelName(settings.log_level.upper())),
                            proxy_headers=False,
                            timeout_keep_alive=settings.keepalive_timeout,  # type: ignore[arg-type]
                            backlog=2048)
    server = Server(config)
    server.signals = asyncio.Queue()
    notifier = Notifier()
    agent, agent_where = None, ""
    if settings.agent_listen:
        agent = Agent(node, *listen_address(settings.agent_listen))
        try:
            agent_where = await agent.start()
        except OSError as e:
            log.error("cannot listen for the agent-check on %s: %s", settings.agent_listen, e.strerror or e)
            sock.close()
            return EX_CONFIG
        log.info("agent-check on %s", agent_where)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    draining = asyncio.create_task(drain_on_signal(server, bridge, notifier))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        use = bridge.bounds.values
        log.info("sandboxd-http %s listening on %s for sandboxd at %s as user %s (%d workers, %d requests; runs of "
                 "%g s, %s of memory, %s of output a stream, bodies up to %s; network %s, preload %s, auth %s)",
                 __version__, where, settings.socket, bridge.user, settings.max_workers, settings.max_requests,
                 use["timeout_ms"] / 1000, bounds.size(use["memory"]), bounds.size(use["max_output"]),
                 bounds.size(use["max_body"]), "on" if settings.enable_network else "off",
                 "on" if settings.enable_preload else "off", "off" if settings.no_auth else "key")
        notifier.notify(ready=1, status=f"listening on {where}" + (f", agent-check on {agent_where}" if agent else ""))
        greeting = asyncio.create_task(_greet(bridge, server, hello))
    try:
        await task
        if server.started:
            if greeting.done() and not greeting.cancelled() and greeting.exception() is None \
                    and greeting.result() is False:
                return EX_CONFIG
            greeting.cancel()
    finally:
        draining.cancel()
        if agent is not None:
            await agent.close()
        with contextlib.suppress(Exception):
            await upstream.close()
    log.info("sandboxd-http stopped")
    return 0


def _bounds_hold(bridge: Bridge) -> bool:
    """Log what the daemon's first answer says of the settings; False when runs would be refused."""
    found = bridge.bounds
    for error in found.errors:
        log.error("%s: not starting", error)
    for warning in found.warnings:
        log.warning("%s", warning)
    return not found.errors


async def _greet(bridge: Bridge, server: uvicorn.Server, hello: dict[str, Any] | None) -> bool:
    """Say what the daemon thinks of this uid (the runs' quota, network), asking until it answers;
    False (and the server told to stop: exit status 78) when that first answer refuses the settings."""
    if hello is None:
        log.warning("sandboxd does not answer yet at %s: /health says 503 until it does", bridge.settings.socket)
        while (hello := await bridge.hello()) is None:
            await asyncio.sleep(HELLO_RETRY)
        if not _bounds_hold(bridge):
            server.should_exit = True
            return False
    quota = hello.get("quota") or {}
    log.info("sandboxd %s: user %s may run %s at once, timeouts up to %g s, network %s", hello.get("version"),
             bridge.user, quota.get("concurrent"), (quota.get("max_timeout_ms") or 0) / 1000,
             "allowed" if quota.get("network") else "not allowed")
    if bridge.settings.enable_network and not quota.get("network"):
        log.warning("ENABLE_NETWORK is on but %s: runs go without network", bridge.network_refusal)
    elif bridge.settings.enable_network and bridge.proxy_env:
        status, _ = await bridge.status()
        problems = bridge.proxy_problems(status)
        for problem in problems:
            log.warning("%s: runs asking for network go without it until it is reachable", problem)
        if problems:
            bridge.refuse_network("; ".join(problems))
    return True


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides: dict[str, object] = {k: v for k, v in (("socket", args.socket), ("listen", args.listen)) if v}
    if args.no_auth:
        overrides["no_auth"] = True
    try:
        settings = load(args.config, overrides=overrides)
    except SettingsError as e:
        for line in e.errors:
            print(f"sandboxd-http: {line}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        print(f"sandboxd-http: settings are valid (listen {settings.listen_text}, socket {settings.socket})")
        return 0
    if os.geteuid() == 0:
        print("sandboxd-http: refusing to run as root: it needs no privileges, and as root every request would "
              "have root's rights at the daemon; run it as the user sandboxd-http", file=sys.stderr)
        return EX_NOPERM
    logs.setup(settings.log_level, foreground=True, ident="sandboxd-http")
    raise_nofile()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
