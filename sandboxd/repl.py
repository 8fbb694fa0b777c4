"""``sandboxctl repl``: an interactive interpreter in a session, for poking at the jail.

A prompt (``>>>``, ``...`` while a Python statement is incomplete), readline history
in ``~/.sandboxctl_history``, output streamed as it comes, a cell's value printed as
the interpreter would.  Ctrl-C while a cell runs interrupts it (KeyboardInterrupt in
the session, which lives on); at the prompt it drops the line.  Ctrl-D, ``exit()``
typed alone or a session that ends closes the REPL.
"""

from __future__ import annotations

import codeop
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

from .client import Client, SandboxdError, Session

HISTORY = os.path.expanduser("~/.sandboxctl_history")


class Output(Protocol):
    def write(self, stream: Any, data: bytes) -> None: ...  # a run's output: escaped on a terminal unless --raw
    def shown(self, text: str) -> str: ...  # sandboxctl's own text (it quotes runs): always escaped


def complete(source: str, language: str) -> bool:
    """Is ``source`` a whole cell (True), or does the user have more lines to type?"""
    if language != "python3":
        return not source.endswith("\\") and _balanced(source)
    try:
        return codeop.compile_command(source, "<repl>", "exec") is not None
    except (SyntaxError, ValueError, OverflowError):
        return True  # let the session report it


def _balanced(source: str) -> bool:
    depth = 0
    for ch in source:
        depth += ch in "([{"
        depth -= ch in ")]}"
    return depth <= 0


class Repl:
    def __init__(self, client: Client, session: Session, out: Output, read: Callable[[str], str] = input) -> None:
        self.client = client
        self.session = session
        self.out = out
        self.read = read
        self.language = str(session.info.get("language", "python3"))

    def loop(self) -> int:
        readline = _readline()
        print(self.out.shown(f"sandboxd session {self.session.id} ({self.language}); Ctrl-C interrupts, Ctrl-D leaves"),
              file=sys.stderr)
        try:
            while True:
                source = self._read_cell()
                if source is None:
                    return 0
                if source.strip() in ("exit()", "quit()", ".exit"):
                    return 0
                if source.strip() and not self.exec(source):
                    return 1
        finally:
            if readline is not None:
                with contextlib.suppress(OSError):
                    readline.write_history_file(HISTORY)

    def _read_cell(self) -> str | None:
        lines: list[str] = []
        while True:
            try:
                line = self.read("... " if lines else ">>> ")
            except EOFError:
                print(file=sys.stderr)
                return None
            except KeyboardInterrupt:
                print("\nKeyboardInterrupt", file=sys.stderr)
                lines = []
                continue
            lines.append(line)
            source = "\n".join(lines)
            if not line.strip() and len(lines) > 1:
                return source  # a blank line ends a block
            if complete(source, self.language):
                return source

    def exec(self, source: str) -> bool:
        """Run one cell, streaming its output; False once the session is gone."""
        request = {"op": "session_exec", "id": "repl", "session_id": self.session.id, "code": source,
                   "stream": True}
        self.client.send(request)
        interrupted = False
        while True:
            try:
                frame = self.client.receive()
            except KeyboardInterrupt:
                if not interrupted:
                    interrupted = True
                    with contextlib.suppress(SandboxdError, OSError):
                        self.session.interrupt()
                continue
            if not isinstance(frame, dict):
                continue
            if frame.get("event") == "output":
                stream = sys.stdout if frame.get("stream") == "stdout" else sys.stderr
                self.out.write(stream, bytes(frame.get("data") or b""))
                continue
            if not frame.get("ok"):
                err = frame.get("error") or {}
                print(self.out.shown(f"error: {err.get('code')}: {err.get('message')}"), file=sys.stderr)
                return err.get("code") != "not_found"
            return self._shown(frame["result"])

    def _shown(self, result: dict[str, Any]) -> bool:
        if result.get("value") is not None:
            self.out.write(sys.stdout, (str(result["value"]) + "\n").encode("utf-8", "backslashreplace"))
        status = result.get("status")
        if status not in ("ok", "exception", "interrupted"):
            print(self.out.shown(f"[{status}: {result.get('reason')}]"), file=sys.stderr)
        if result.get("session_ended"):
            print("the session has ended", file=sys.stderr)
            return False
        return True


def _readline() -> Any:
    try:
        import readline
    except ImportError:
        return None
    with contextlib.suppress(OSError):
        readline.read_history_file(HISTORY)
    readline.set_history_length(1000)
    return readline
