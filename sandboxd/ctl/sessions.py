"""sandboxctl's commands about sessions: open, exec, close, interrupt, list, cp, ls, repl."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import time
from typing import Any

from .. import render
from ..client import SandboxdError
from ..repl import Repl
from .base import EXIT_OK, Base, UsageError, parse_env

# SESSION_ID:PATH, as ``session cp`` takes it (a session id is s<instance>-<n>-<hex>)
REMOTE = re.compile(r"(s[0-9a-f]+-[0-9]+-[0-9a-f]+):(.*)", re.DOTALL)


def remote(arg: str) -> tuple[str, str] | None:
    m = REMOTE.fullmatch(arg)
    return (m.group(1), m.group(2)) if m else None


class SessionCommands(Base):
    def _session_fields(self) -> dict[str, Any]:
        a = self.args
        fields: dict[str, Any] = {}
        if a.language:
            fields["language"] = a.language
        if a.memory:
            fields["memory_mb"] = a.memory
        if a.network:
            fields["network"] = True
        if a.env:
            fields["env"] = dict(parse_env(a.env))
        if a.idle_timeout:
            fields["idle_timeout_ms"] = max(1, round(a.idle_timeout * 1000))
        if a.lifetime:
            fields["max_lifetime_ms"] = max(1, round(a.lifetime * 1000))
        if a.display:
            fields["display"] = True
        if a.environment:
            fields["environment"] = a.environment
        return fields

    def session_open(self) -> int:
        reply = self.client.call("session_open", **self._session_fields())
        info = reply["session"]
        self.out(reply, lambda: info["session_id"])
        return EXIT_OK

    def session_exec(self) -> int:
        code, from_stdin = self._code()
        fields = self._run_fields(from_stdin, session=True)
        streamed = self.streaming()
        reply = self.client.call("session_exec", on_output=self.on_output if streamed else None,
                                 session_id=self.args.session_id, code=code, **fields)
        return self.show_result(reply["result"], streamed)

    def session_close(self) -> int:
        reply = self.client.call("session_close", session_id=self.args.session_id)
        self.out(reply, lambda: f"closed {reply['session']['session_id']}")
        return EXIT_OK

    def session_interrupt(self) -> int:
        reply = self.client.call("session_interrupt", session_id=self.args.session_id)
        self.out(reply, lambda: "interrupted" if reply["interrupted"] else "nothing was running")
        return EXIT_OK

    def session_list(self) -> int:
        reply = self.client.call("sessions")
        rows = [(x["session_id"], x["owner"], x["language"], f"{x['memory_mb']} MiB",
                 render.duration(x["age_ms"] / 1000), "busy" if x["busy"] else render.duration(x["idle_ms"] / 1000),
                 x["execs"], f"{x['cpu_used_ms'] / 1000:.1f} s") for x in reply["sessions"]]
        self.out(reply, lambda: render.table(["session", "owner", "language", "memory", "age", "idle", "execs",
                                               "cpu"], rows))
        return EXIT_OK

    def session_cp(self) -> int:
        """``cp LOCAL SID:PATH`` (a write) or ``cp SID:PATH LOCAL`` (a read); ``-`` is standard
        input or output.  A remote PATH that is empty or ends in / takes the local base name,
        and so does a local directory."""
        src, dst = self.args.source, self.args.destination
        up, down = remote(dst), remote(src)
        if (up is None) == (down is None):
            raise UsageError("session cp: exactly one of SOURCE and DESTINATION is SESSION_ID:PATH")
        if up is not None:
            return self._upload(src, *up)
        assert down is not None
        return self._download(*down, dst)

    def _upload(self, local: str, session_id: str, path: str) -> int:
        if local == "-":
            data, mode = sys.stdin.buffer.read(), None
        else:
            with open(local, "rb") as f:
                data, mode = f.read(), stat.S_IMODE(os.fstat(f.fileno()).st_mode) & 0o777
            if not path or path.endswith("/"):
                path += os.path.basename(local.rstrip("/"))
        fields: dict[str, Any] = {"session_id": session_id, "path": path, "content": data}
        if self.args.mode is not None:
            mode = self.args.mode
        if mode is not None:
            fields["mode"] = mode
        reply = self.client.call("session_write_file", **fields)
        self.out(reply, lambda: f"{render.size(reply['size'])} ({reply['size']} bytes) -> "
                                f"{session_id}:{reply['path']} (mode {reply['mode']:04o})")
        return EXIT_OK

    def _download(self, session_id: str, path: str, local: str) -> int:
        reply = self.client.call("session_read_file", session_id=session_id, path=path)
        data = bytes(reply.pop("content"))
        if local == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            if self.args.json:
                print(render.to_json({"ok": True, **{k: v for k, v in reply.items() if k != "id"}}),
                      file=sys.stderr)
            return EXIT_OK
        if os.path.isdir(local):
            local = os.path.join(local, os.path.basename(reply["path"]))
        with open(local, "wb") as f:
            f.write(data)
        reply["local"] = local
        self.out(reply, lambda: f"{session_id}:{reply['path']} -> {local} ({render.size(len(data))}, "
                                f"{len(data)} bytes)")
        return EXIT_OK

    def session_ls(self) -> int:
        a = self.args
        reply = self.client.call("session_list_files", session_id=a.session_id, path=a.path or ".",
                                 recursive=bool(a.recursive))
        rows = [(e["type"], f"{e['mode']:04o}", e["size"], time.strftime("%Y-%m-%d %H:%M", time.localtime(e["mtime"])),
                 e["path"] + ("/" if e["type"] == "dir" else "")) for e in reply["entries"]]

        def human() -> str:
            text = render.table(["type", "mode", "size", "modified", "path"], rows) if rows else "(empty)"
            return text + ("\n(truncated: more entries than a listing holds)" if reply["truncated"] else "")

        self.out(reply, human)
        return EXIT_OK

    def repl(self) -> int:
        session = self.client.session(**self._session_fields())
        try:
            return Repl(self.client, session, self).loop()
        finally:
            with contextlib.suppress(SandboxdError, OSError):
                session.close()

