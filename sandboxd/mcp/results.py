"""A cell's record as an agent reads it: the text, the figures, the structured record, and
whether it is an error.  Pure functions of the record (docs/protocol.md, session_exec), no
SDK: ``server`` turns a ``Reply`` into the SDK's ``CallToolResult``.

The text has a section for each thing there is, in this order, and nothing else::

    [stdout]   what the code printed
    [stderr]   what it wrote to stderr (an uncaught exception's traceback is there)
    [value]    the last expression's value, as repr() (Python) or util.inspect (Node) shows it
    [files]    what the cell left under /work/out/ (read them with read_file)
    [error]    the verdict in words: "timed out after 10 s ...", "blocked system call socket: no network"
    [note]     what this server did that the agent should know (a session that had ended was replaced)

Output comes from hostile code: control characters and escapes are written visibly
(``render.safe_text``), as everywhere sandboxd shows output.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from ..render import safe_text, size

NETWORK_CALLS = frozenset({"socket", "socketpair", "connect", "bind", "sendto", "sendmsg", "listen", "accept",
                           "accept4"})
LANGUAGE_NAMES = {"python3": "Python", "nodejs": "JavaScript"}


@dataclass
class Reply:
    """One tool call's answer, before it becomes the SDK's types."""

    text: str
    is_error: bool = False
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (mime type, bytes)
    structured: dict[str, Any] | None = None


def text_of(data: Any) -> str:
    if isinstance(data, bytes | bytearray):
        data = bytes(data).decode("utf-8", "replace")
    return safe_text("" if data is None else str(data))


def jsonable(value: Any) -> Any:
    """The record with bytes as text (UTF-8) or, when they are not text, ``{"base64": ...}``."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode(), "bytes": len(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def verdict(record: dict[str, Any], timeout_s: float, network: bool) -> str:
    """The verdict in words, empty when the cell ran to its end ("ok")."""
    status = record.get("status")
    reason = str(record.get("reason") or "")
    ended = bool(record.get("session_ended"))
    if status == "ok":
        return ""
    if status == "timeout":
        words = f"timed out after {timeout_s:g} s"
        words += (": the cell did not stop when interrupted, so the session was killed" if ended
                  else ": the cell was interrupted; variables defined before it are kept")
    elif status == "exception":
        exc = record.get("exception") or {}
        words = f"{text_of(exc.get('type')) or 'exception'}: {text_of(exc.get('message'))}".rstrip(": ")
        if record.get("exit_code") is not None:
            words = f"SystemExit with status {record['exit_code']} (the session lives on)"
    elif status == "blocked_syscall":
        name = text_of(record.get("blocked_syscall") or "?")
        if name in NETWORK_CALLS and not network:
            words = f"blocked system call {name}: no network (this sandbox has no network access)"
        else:
            words = f"blocked system call {name}: the sandbox does not allow it"
    elif status == "memory_limit":
        words = f"memory limit reached: {reason}" if reason else "memory limit reached"
    elif status == "output_limit":
        stream = "stdout" if record.get("stdout_truncated") else "stderr"
        words = f"output limit: {stream} went past its size limit and the cell was stopped"
    elif status == "cpu_limit":
        words = "CPU time used up" + (f": {reason}" if reason else "")
    elif status == "interrupted":
        words = "interrupted"
    elif status == "sandbox_error":
        err = record.get("error") or {}
        words = f"the sandbox could not be set up ({text_of(err.get('step'))}: {text_of(err.get('message'))})"
    else:
        words = f"{status}: {reason}" if reason else str(status)
    if ended:
        words += "; the session has ended and its variables and files are gone (the next call starts a new one)"
    return safe_text(words)


def cell_reply(record: dict[str, Any], *, language: str, timeout_s: float, network: bool,
               notes: list[str] | None = None) -> Reply:
    """A run_python_code / run_js_code answer."""
    sections: list[tuple[str, str]] = []
    stdout, stderr = text_of(record.get("stdout")), text_of(record.get("stderr"))
    if stdout:
        sections.append(("stdout", stdout + (" ... (truncated)" if record.get("stdout_truncated") else "")))
    if stderr:
        sections.append(("stderr", stderr + (" ... (truncated)" if record.get("stderr_truncated") else "")))
    exc = record.get("exception") or {}
    traceback = text_of(exc.get("traceback"))
    if traceback and traceback.strip() not in stderr:
        sections.append(("traceback", traceback))
    if record.get("value") is not None:
        sections.append(("value", text_of(record["value"])))
    files = record.get("files") or {}
    if files:
        sections.append(("files", "\n".join(f"out/{text_of(p)} ({size(len(d))})" for p, d in sorted(files.items()))
                         + "\n(in /work/out/: read them with read_file)"))
    said = verdict(record, timeout_s, network)
    if said:
        sections.append(("error", said))
    sections += [("note", safe_text(n)) for n in notes or []]
    images = [("image/png", bytes(d["data"])) for d in record.get("display") or []
              if isinstance(d, dict) and d.get("mime") == "image/png" and isinstance(d.get("data"), bytes)]
    if images and not said:
        sections.append(("figures", f"{len(images)} figure(s), as PNG images below"))
    text = "\n".join(f"[{name}]\n{body.rstrip(chr(10))}" for name, body in sections) or "(no output)"
    structured = {k: jsonable(v) for k, v in record.items() if k not in ("display", "files")}
    structured.update(language=language, timeout_s=timeout_s, figures=len(images),
                      files={text_of(p): len(d) for p, d in files.items()})
    return Reply(text, is_error=record.get("status") != "ok", images=images, structured=structured)


def refusal(what: str, code: str, message: str, hint: str = "") -> Reply:
    """The daemon (or this server) said no: a tool error the agent can read."""
    text = f"[error]\n{safe_text(what)}: {safe_text(message)}" + (f"\n[hint]\n{safe_text(hint)}" if hint else "")
    return Reply(text, is_error=True, structured={"status": "refused", "code": code, "message": message})
