"""sandboxctl's commands about sessions: open, exec, close, interrupt, list, repl."""

from __future__ import annotations

import contextlib
from typing import Any

from .. import render
from ..client import SandboxdError
from ..repl import Repl
from .base import EXIT_OK, Base, parse_env


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

    def repl(self) -> int:
        session = self.client.session(**self._session_fields())
        try:
            return Repl(self.client, session, self).loop()
        finally:
            with contextlib.suppress(SandboxdError, OSError):
                session.close()

