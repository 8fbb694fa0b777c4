"""What the sandbox has, asked of the daemon, and the tools as an agent sees them.

The tool descriptions tell an agent what it is writing code for: the Python and Node
versions and the packages Python can import (asked of a real run in the jail, so it is what
a cell sees, not what this host has), whether there is network, the longest time a call may
ask for.  ``Facts.gather`` asks once at start and again when the answers are older than
``REFRESH`` (an environment rebuilt, a quota changed); a daemon that does not answer gives
descriptions that say so, and the next listing asks again.

No SDK here: ``tools()`` returns plain JSON-schema dicts that ``server`` hands over as they are.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..client import AsyncClient, SandboxdError
from .settings import Settings

log = logging.getLogger("sandboxd.mcp")
REFRESH = 300.0
MAX_LISTED = 80  # package names in a description

PYTHON_PROBE = """\
import json, pkgutil, sys
std = sys.stdlib_module_names
names = sorted({m.name for m in pkgutil.iter_modules() if m.name not in std and not m.name.startswith('_')})
print(json.dumps({"python": sys.version.split()[0], "modules": names}))
"""
NODE_PROBE = "console.log(JSON.stringify({node: process.version}))"


@dataclass
class Facts:
    settings: Settings
    at: float = 0.0
    reachable: bool = False
    why_not: str = ""
    python: str = ""
    modules: list[str] = field(default_factory=list)
    node: str = ""
    node_missing: str = ""  # why the daemon has no nodejs runtime
    network: bool = False  # sessions get network: asked for, and the quota allows it
    network_refused: str = ""
    max_timeout_s: float = 0.0
    max_files_size: int = 0

    def stale(self) -> bool:
        return time.monotonic() - self.at > (REFRESH if self.reachable else 5.0)

    async def gather(self) -> None:
        """Ask the daemon (hello, status, two probe runs).  Never raises: an unreachable
        daemon is a fact too."""
        self.at = time.monotonic()
        try:
            async with AsyncClient(self.settings.socket) as c:
                hello = await c.hello()
                quota = hello.get("quota") or {}
                self.max_timeout_s = (quota.get("max_timeout_ms") or 0) / 1000
                self.max_files_size = int(quota.get("max_files_size") or 0)
                self.network = self.settings.network and bool(quota.get("network"))
                self.network_refused = ("" if not self.settings.network or self.network else
                                        f"the quota of user {hello.get('user')} does not allow network")
                runtimes = (await c.status()).get("runtimes") or {}
                node = runtimes.get("nodejs") or {}
                self.node_missing = "" if node.get("available", True) else str(node.get("why_not") or "not set up")
                probe = await c.run(PYTHON_PROBE, timeout=10, environment=self.settings.environment or None)
                if probe.ok:
                    found = json.loads(probe.text)
                    self.python, self.modules = str(found["python"]), [str(m) for m in found["modules"]]
                if not self.node_missing:
                    probe = await c.run(NODE_PROBE, language="nodejs", timeout=10)
                    if probe.ok:
                        self.node = str(json.loads(probe.text)["node"])
            self.reachable, self.why_not = True, ""
        except (OSError, ConnectionError, SandboxdError, ValueError, KeyError) as e:
            self.reachable, self.why_not = False, f"{type(e).__name__}: {e}"
            log.warning("sandboxd at %s does not answer (%s): tool descriptions say so until it does",
                        self.settings.socket, self.why_not)

    # -- what the agent reads -----------------------------------------------------------------
    def sandbox_words(self) -> str:
        if not self.reachable:
            return (f" The sandbox (sandboxd at {self.settings.socket}) did not answer when this was written "
                    f"({self.why_not}); calls say what is wrong.")
        net = ("It has network access (policed: no access to this host or private networks)." if self.network
               else "It has no network access.")
        return f" {net} Files are in /work (the working directory); what code leaves in /work/out/ is listed."

    def timeout_words(self) -> str:
        return (f"timeout_s: the call's time limit in seconds (default {self.default_timeout():g}"
                + (f", at most {self.max_timeout_s:g}" if self.max_timeout_s else "") + ").")

    def default_timeout(self) -> float:
        t = self.settings.timeout
        return min(t, self.max_timeout_s) if self.max_timeout_s else t

    def python_description(self) -> str:
        listed = ", ".join(self.modules[:MAX_LISTED]) + (" and more" if len(self.modules) > MAX_LISTED else "")
        pkgs = (f" Besides the standard library it can import: {listed}." if self.modules
                else " It has the standard library only." if self.reachable else "")
        return ("Run Python code in a sandbox session that keeps its state: variables, imports and functions "
                "persist across calls (until reset). The value of the last expression is returned, as in a "
                "notebook; matplotlib figures shown or left open come back as PNG images."
                + (f" Python {self.python}." if self.python else "") + pkgs + self.sandbox_words()
                + " " + self.timeout_words())

    def js_description(self) -> str:
        if self.reachable and self.node_missing:
            where = f" Not available on this sandbox: {self.node_missing}."
        else:
            where = f" Node.js {self.node}, its built-in modules." if self.node else ""
        return ("Run JavaScript (Node.js) code in a sandbox session that keeps its state across calls (until "
                "reset); the completion value of the code is returned (a promise is awaited). It is a session "
                "of its own, apart from Python's, with its own /work." + where + self.sandbox_words()
                + " " + self.timeout_words())

    def tools(self) -> list[dict[str, Any]]:
        """name, description, inputSchema of each tool (the interface: names and arguments)."""
        timeout: dict[str, Any] = {"type": "number", "exclusiveMinimum": 0,
                                   "description": f"time limit in seconds (default {self.default_timeout():g})"}
        if self.max_timeout_s:
            timeout["maximum"] = self.max_timeout_s

        def schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
            return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

        code = {"type": "string", "description": "the source code to run"}
        path = {"type": "string", "description": "a path relative to /work (the working directory)"}
        return [
            {"name": "run_python_code", "description": self.python_description(),
             "inputSchema": schema({"code": code, "timeout_s": timeout}, ["code"])},
            {"name": "run_js_code", "description": self.js_description(),
             "inputSchema": schema({"code": code, "timeout_s": timeout}, ["code"])},
            {"name": "write_file",
             "description": "Write a file into /work of the sandbox, for the code to read: into the Python and "
                            "the JavaScript session both (one opened later starts with it). Parent directories "
                            "are made. Paths are relative to /work; '..' and absolute paths are refused. With "
                            "base64: true, content is base64 (binary files)."
                            + (f" At most {self.max_files_size} bytes." if self.max_files_size else ""),
             "inputSchema": schema({"path": path, "content": {"type": "string"},
                                    "base64": {"type": "boolean", "default": False,
                                               "description": "content is base64-encoded bytes"}},
                                   ["path", "content"])},
            {"name": "read_file",
             "description": "Read a file from /work of the sandbox session you ran code in last (Python if none): "
                            "text as it is, other bytes as base64 (PNG and JPEG images also as images).",
             "inputSchema": schema({"path": path}, ["path"])},
            {"name": "list_files",
             "description": "List a directory of /work in the sandbox session you ran code in last (Python if "
                            "none): names, kinds and sizes.",
             "inputSchema": schema({"path": {**path, "default": "."}}, [])},
            {"name": "reset",
             "description": "Forget everything: end this conversation's sandbox sessions (Python and JavaScript; "
                            "their variables and files). The next call starts fresh ones.",
             "inputSchema": schema({}, [])},
        ]
