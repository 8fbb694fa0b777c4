"""The MCP server: six tools over the daemon's sessions (the official SDK's low-level server).

    run_python_code {code, timeout_s?}    run_js_code {code, timeout_s?}
    write_file {path, content, base64?}   read_file {path}   list_files {path?}   reset {}

Each MCP session (the stdio connection, or one ``Mcp-Session-Id`` over HTTP) has its own
``Workspace``, made at its first tool call and kept in the SDK's per-connection state; the
connection's teardown (stdin closed, an HTTP DELETE, the session's idle timeout, shutdown)
closes its sandboxd sessions.  The SDK (2.3) hands a low-level handler that connection only
inside its ``ServerSession``: ``connection_of`` is the one place that reaches it.

The server speaks the protocol's handshake era (2024-11-05 to 2025-11-25), whose sessions are
what keeps state between calls; the 2026-07-28 era has no sessions.  Its ``server/discover``
probe is answered "method not found" (stdio) or -32022 naming the handshake versions (HTTP,
``web``), on which clients fall back to ``initialize``, as the SDK's ``mode="auto"`` does.

A call's failure is a tool result with ``isError`` (the agent reads it and can fix its call):
bad arguments, a refusal of the daemon, a daemon that does not answer.  Only a bug is a
JSON-RPC error.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import mcp_types as types
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server

from .. import __version__
from ..client import SandboxdError
from ..render import safe_text, size
from .facts import Facts
from .results import LANGUAGE_NAMES, Reply, cell_reply, refusal
from .settings import Settings
from .workspace import Gone, Workspace

log = logging.getLogger("sandboxd.mcp")
STATE_KEY = "sandboxd.workspace"
RUN_TOOLS = {"run_python_code": "python3", "run_js_code": "nodejs"}
HINTS = {
    "quota_exceeded": "the quota of this server's user at sandboxd is used up: wait and retry, or reset to free "
                      "this conversation's sessions",
    "busy": "sandboxd is busy: retry in a moment",
    "unavailable": "sandboxd is not ready or is shutting down: retry in a moment",
    "forbidden": "the request is over a limit of this server's quota at sandboxd",
}
IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}
ANNOTATIONS = {
    "run_python_code": types.ToolAnnotations(title="Run Python", destructive_hint=False, open_world_hint=False),
    "run_js_code": types.ToolAnnotations(title="Run JavaScript", destructive_hint=False, open_world_hint=False),
    "write_file": types.ToolAnnotations(title="Write a file", destructive_hint=True, idempotent_hint=True,
                                        open_world_hint=False),
    "read_file": types.ToolAnnotations(title="Read a file", read_only_hint=True, open_world_hint=False),
    "list_files": types.ToolAnnotations(title="List files", read_only_hint=True, open_world_hint=False),
    "reset": types.ToolAnnotations(title="Reset the sandbox", destructive_hint=True, idempotent_hint=True,
                                   open_world_hint=False),
}


def connection_of(ctx: ServerRequestContext[Any, Any]) -> Connection:
    """The MCP connection (= session) a request came on."""
    given = getattr(ctx, "connection", None)  # SDKs that hand the connection to handlers directly
    if isinstance(given, Connection):
        return given
    conn = getattr(ctx.session, "_connection", None)  # mcp 2.3: only the ServerSession holds it
    if not isinstance(conn, Connection):
        raise RuntimeError("this version of the MCP SDK does not give handlers their connection")
    return conn


class BadArguments(ValueError):
    pass


def _arg(args: dict[str, Any], name: str, kind: type, required: bool = True) -> Any:
    value = args.get(name)
    if value is None:
        if required:
            raise BadArguments(f"{name} is required")
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadArguments(f"{name} must be a {kind.__name__ if kind is not float else 'number'}")
    return value


class Tools:
    """The tools' handlers; one per server process, a ``Workspace`` per MCP session."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.facts = Facts(settings)
        self.workspaces: set[Workspace] = set()  # the open ones (bench and tests read it; /capacity may)

    def workspace(self, ctx: ServerRequestContext[Any, Any]) -> Workspace:
        conn = connection_of(ctx)
        ws = conn.state.get(STATE_KEY)
        if ws is None:  # no await between the look-up and the store: one workspace per connection
            ws = conn.state[STATE_KEY] = Workspace(self.facts, conn.session_id or "stdio")
            self.workspaces.add(ws)

            async def close() -> None:
                self.workspaces.discard(ws)
                await ws.close()

            conn.exit_stack.push_async_callback(close)
        assert isinstance(ws, Workspace)
        return ws

    async def list_tools(self, ctx: ServerRequestContext[Any, Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        if self.facts.stale():
            await self.facts.gather()
        return types.ListToolsResult(tools=[
            types.Tool(name=t["name"], description=t["description"], input_schema=t["inputSchema"],
                       annotations=ANNOTATIONS[t["name"]]) for t in self.facts.tools()])

    async def call_tool(self, ctx: ServerRequestContext[Any, Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        args = params.arguments or {}
        try:
            reply = await self.dispatch(ctx, params.name, args)
        except BadArguments as e:
            reply = refusal(f"bad arguments to {params.name}", "bad_arguments", str(e))
        except SandboxdError as e:
            reply = refusal("sandboxd refused", e.code, e.message, HINTS.get(e.code, ""))
        except Gone as e:
            reply = refusal("refused", "gone", str(e))
        except (ConnectionError, OSError) as e:
            reply = refusal("sandboxd is not reachable", "unreachable", f"{self.settings.socket}: {e}",
                            "the daemon may be stopped or restarting; retry later")
        return as_result(reply)

    async def dispatch(self, ctx: ServerRequestContext[Any, Any], name: str, args: dict[str, Any]) -> Reply:
        known = {t: ANNOTATIONS[t] for t in ANNOTATIONS}
        if name not in known:
            raise BadArguments(f"no tool {name!r}: the tools are {', '.join(known)}")
        accepted = {"run_python_code": {"code", "timeout_s"}, "run_js_code": {"code", "timeout_s"},
                    "write_file": {"path", "content", "base64"}, "read_file": {"path"}, "list_files": {"path"},
                    "reset": set()}[name]
        unknown = set(args) - accepted
        if unknown:
            raise BadArguments(f"unknown argument(s) {', '.join(sorted(unknown))}; {name} takes "
                               f"{', '.join(sorted(accepted)) or 'none'}")
        if self.facts.stale():
            await self.facts.gather()
        ws = self.workspace(ctx)
        if name in RUN_TOOLS:
            return await self.run(ws, RUN_TOOLS[name], args)
        if name == "write_file":
            return await self.write_file(ws, args)
        if name == "read_file":
            return await self.read_file(ws, _arg(args, "path", str))
        if name == "list_files":
            return await self.list_files(ws, _arg(args, "path", str, required=False) or ".")
        closed = await ws.reset()
        return Reply("reset: " + (f"closed {' and '.join(closed)}" if closed else "nothing was open")
                     + "; the next call starts afresh", structured={"closed": len(closed)})

    async def run(self, ws: Workspace, language: str, args: dict[str, Any]) -> Reply:
        code = _arg(args, "code", str)
        timeout = _arg(args, "timeout_s", int | float, required=False)  # type: ignore[arg-type]
        if timeout is not None and timeout <= 0:
            raise BadArguments("timeout_s must be more than 0")
        if timeout is not None and self.facts.max_timeout_s and timeout > self.facts.max_timeout_s:
            raise BadArguments(f"timeout_s may be at most {self.facts.max_timeout_s:g}")
        timeout_s = float(timeout) if timeout is not None else self.facts.default_timeout()
        if language == "nodejs" and self.facts.node_missing:
            return refusal("no JavaScript here", "unavailable",
                           f"this sandbox has no Node.js ({self.facts.node_missing})")
        record, notes = await ws.run(language, code, timeout_s)
        return cell_reply(record, language=language, timeout_s=timeout_s, network=self.facts.network, notes=notes)

    async def write_file(self, ws: Workspace, args: dict[str, Any]) -> Reply:
        path, content = _arg(args, "path", str), _arg(args, "content", str)
        if _arg(args, "base64", bool, required=False):
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise BadArguments("content is not valid base64 (base64: true)") from None
        else:
            data = content.encode("utf-8", "surrogatepass")
        went = await ws.write_file(path, data)
        return Reply(f"wrote {safe_text(path)} ({size(len(data))}) into {' and '.join(went)}",
                     structured={"path": path, "size": len(data)})

    async def read_file(self, ws: Workspace, path: str) -> Reply:
        language, data = await ws.read_file(path)
        where = f"{safe_text(path)} ({size(len(data))}, from the {LANGUAGE_NAMES[language]} session)"
        structured: dict[str, Any] = {"path": path, "size": len(data), "language": language}
        mime = next((m for magic, m in IMAGE_MAGIC.items() if data.startswith(magic)), None)
        try:
            text = data.decode("utf-8")
            if "\0" in text:
                raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL")
        except UnicodeDecodeError:
            encoded = base64.b64encode(data).decode()
            structured.update(base64=True, content=encoded)
            reply = Reply(f"[file]\n{where}: not text; base64:\n{encoded}", structured=structured)
            if mime:
                reply.images.append((mime, data))
            return reply
        structured.update(base64=False, content=text)
        return Reply(f"[file]\n{where}\n[content]\n{safe_text(text)}", structured=structured)

    async def list_files(self, ws: Workspace, path: str) -> Reply:
        language, listing = await ws.list_files(path)
        entries = listing.get("entries") or []
        rows = [f"{e.get('type', '?'):<8} {size(e.get('size') or 0) if e.get('type') == 'file' else '':>9}  "
                f"{safe_text(str(e.get('path')))}" for e in entries]
        shown = safe_text(str(listing.get("path") or path)).removeprefix(".").lstrip("/")
        head = f"/work/{shown} in the {LANGUAGE_NAMES[language]} session"
        text = head + (":\n" + "\n".join(rows) if rows else ": empty")
        if listing.get("truncated"):
            text += "\n(the listing is cut short)"
        return Reply(text, structured={"path": listing.get("path"), "language": language, "entries": entries,
                                       "truncated": bool(listing.get("truncated"))})


def as_result(reply: Reply) -> types.CallToolResult:
    content: list[types.ContentBlock] = [types.TextContent(text=reply.text)]
    for mime, data in reply.images:
        content.append(types.ImageContent(data=base64.b64encode(data).decode(), mime_type=mime))
    return types.CallToolResult(content=content, structured_content=reply.structured, is_error=reply.is_error)


def build(settings: Settings) -> tuple[Server[Any], Tools]:
    tools = Tools(settings)
    server: Server[Any] = Server(
        "sandboxd-mcp", version=__version__, title="sandboxd",
        instructions="Run Python and JavaScript in sandboxd's confined sessions, which keep their state across "
                     "calls; move files in and out of their /work with write_file, read_file and list_files; "
                     "reset starts afresh.",
        on_list_tools=tools.list_tools, on_call_tool=tools.call_tool)
    # The SDK wraps every message in an OpenTelemetry span by default, a cost on each call even with no
    # exporter installed; sandboxd's own logs say what a call did.
    server.middleware = [m for m in server.middleware if type(m).__name__ != "OpenTelemetryMiddleware"]
    return server, tools
