"""sandboxd-mcp: sandboxd's sessions as MCP tools for agents (docs/mcp.md, sandboxd-mcp(1)).

    sandboxd-mcp [--socket PATH] [--http [HOST:]PORT] [--config FILE] [--check-config]

Over stdio (what a desktop agent launches) by default; with ``--http``, Streamable HTTP
(127.0.0.1:8195 when no address is given) for agents elsewhere, with bearer tokens.  It holds
no privileges and refuses to run as root: it talks to the daemon as its own uid, whose quota
every agent of this server shares.  Logs go to standard error (standard output is the
protocol's, over stdio).  READY=1 (sd_notify) once serving; SIGTERM and SIGINT end it, and
its sandboxd sessions with it.
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

from .. import __version__, logs
from ..common import tcp
from ..systemd import Notifier
from .settings import DEFAULT_PORT, Settings, SettingsError, load

log = logging.getLogger("sandboxd.mcp")
EX_UNAVAILABLE = 69
EX_NOPERM = 77
EX_CONFIG = 78


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sandboxd-mcp", description="sandboxd as a Model Context Protocol server: "
                                "run_python_code, run_js_code, write_file, read_file, list_files, reset (see "
                                "sandboxd-mcp(1)). Bearer tokens for --http come from SANDBOXD_MCP_TOKENS or a "
                                "tokens_file, never from the command line.")
    p.add_argument("--socket", help="the daemon's socket (default $SANDBOXD_SOCKET or /run/sandboxd/sandboxd.sock)")
    p.add_argument("--http", metavar="[HOST:]PORT", nargs="?", const=f"127.0.0.1:{DEFAULT_PORT}",
                   help=f"serve Streamable HTTP instead of stdio (default 127.0.0.1:{DEFAULT_PORT})")
    p.add_argument("--config", metavar="FILE", help="a YAML file of settings (sandboxd-mcp(1))")
    p.add_argument("--check-config", action="store_true", help="validate the settings and exit")
    p.add_argument("--version", action="version", version=f"sandboxd-mcp {__version__}")
    return p


async def serve_stdio(settings: Settings) -> int:
    from mcp.server.runner import serve_loop
    from mcp.server.stdio import stdio_server

    from . import pipes
    from .server import build

    server, tools = build(settings)
    await tools.facts.gather()
    streams = await pipes.open_stdio(settings.max_body + 4096)  # a line holds a request: as over HTTP
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    log.info("sandboxd-mcp %s on stdio for sandboxd at %s", __version__, settings.socket)
    Notifier().notify(ready=1, status="serving on stdio")
    with contextlib.suppress(asyncio.CancelledError):
        async with stdio_server(*streams or ()) as (read, write), server.lifespan(server) as state:
            # the handshake era only (sessions keep state): no 2026-07-28 serving loop
            await serve_loop(server, read, write, lifespan_state=state,
                             init_options=server.create_initialization_options())
    return 0


async def serve_http(settings: Settings) -> int:
    import uvicorn

    from ..fleet import routes
    from ..fleet.node import Node
    from . import web
    from .server import build

    assert settings.http is not None
    server, tools = build(settings)
    await tools.facts.gather()
    app = web.build(settings, server, routes=routes.routes(Node(web.DaemonStatus(settings.socket))))
    try:
        sock, where = tcp.listen(*settings.http, backlog=512)
    except OSError as e:
        log.error("cannot listen on %s: %s", settings.http_text, e.strerror or e)
        return EX_CONFIG
    config = uvicorn.Config(app, http=web.protocol_class(settings.header_timeout), lifespan="on",
                            access_log=False, log_config=None, server_header=False, proxy_headers=False,
                            limit_concurrency=settings.max_connections, h11_max_incomplete_event_size=web.MAX_HEAD,
                            timeout_keep_alive=settings.header_timeout,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=5,
                            log_level=max(logging.WARNING, logging.getLevelName(settings.log_level.upper())))
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    while not uv.started and not task.done():
        await asyncio.sleep(0.01)
    if uv.started:
        log.info("sandboxd-mcp %s listening on %s for sandboxd at %s (%d token(s), %d sessions at most)",
                 __version__, where, settings.socket, len(settings.tokens), settings.max_sessions)
        Notifier().notify(ready=1, status=f"listening on {where}")
    await task
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in (("socket", args.socket), ("http", args.http)) if v}
    try:
        settings = load(args.config, overrides=overrides)
    except SettingsError as e:
        for line in e.errors:
            print(f"sandboxd-mcp: {line}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        print(f"sandboxd-mcp: settings are valid ({settings.http_text}, socket {settings.socket})", file=sys.stderr)
        return 0
    if os.geteuid() == 0:
        print("sandboxd-mcp: refusing to run as root: it needs no privileges, and as root every agent would have "
              "root's rights at the daemon; run it as a user of its own (a member of the socket's group)",
              file=sys.stderr)
        return EX_NOPERM
    try:
        import mcp  # noqa: F401
    except ImportError:
        print("sandboxd-mcp: the MCP Python SDK is not installed: pip install 'sandboxd[mcp]' (or pipx install "
              "'sandboxd[mcp]'; in a checkout, make dev puts it in .venv-mcp)", file=sys.stderr)
        return EX_UNAVAILABLE
    logs.setup(settings.log_level, foreground=True, ident="sandboxd-mcp")
    return asyncio.run(serve_http(settings) if settings.http is not None else serve_stdio(settings))


if __name__ == "__main__":
    sys.exit(main())
