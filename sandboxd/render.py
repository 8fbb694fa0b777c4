"""Human output for sandboxctl: tables, sizes, durations, JSON with bytes."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from typing import Any

from .common.sizes import human_duration as duration
from .common.sizes import human_size as size

__all__ = ["duration", "size"]


def to_json(obj: Any, compact: bool = False) -> str:
    """JSON for --json output (``compact``: one line, for a stream of events).  Bytes (a run's
    stdout and stderr, its files, figures) are always base64 strings, whatever they hold."""

    def default(o: Any) -> Any:
        if isinstance(o, bytes):
            return base64.b64encode(o).decode()
        raise TypeError(type(o).__name__)

    if compact:
        return json.dumps(obj, default=default, sort_keys=True, separators=(",", ":"))
    return json.dumps(obj, default=default, indent=2, sort_keys=True)


def for_terminal(data: bytes) -> bytes:
    """Bytes made safe to show on a terminal: control characters (escape sequences, bells,
    carriage returns, ...) and undecodable bytes written as visible escapes; newlines and
    tabs kept.  Run output, names and messages can come from hostile code: shown raw they
    could set the window title, write the clipboard (OSC 52) or clear the screen."""
    text = data.decode("utf-8", "backslashreplace")
    return safe_text(text).encode("utf-8")


def safe_text(text: str) -> str:
    """``text`` with every control and format character (C0, C1, bidi overrides...) but
    newlines and tabs written as a visible escape: ``\x1b]0;x\x07`` shows as those
    characters, and sets no title.  Idempotent: what it returns it returns unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, each cell escaped first (so escapes cannot skew
    the columns, or slip through a caller that prints the table as it is)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else safe_text(str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ago(ts: float | None) -> str:
    return "never" if not ts else duration(time.time() - ts) + " ago"


LIMITS = frozenset({"timeout", "cpu_limit", "memory_limit", "output_limit", "pids_limit"})


def verdict_line(result: dict[str, Any]) -> str:
    """One line on stderr after a run: what happened, and what it cost."""
    status = result.get("status")
    parts = [f"sandboxd: {status}"]
    if result.get("exit_code") is not None:
        parts.append(f"exit {result['exit_code']}")
    killer = result.get("killed_by")
    if killer:
        parts[0] = "sandboxd: killed"
        parts.append(f"by {killer.get('user')} (uid {killer.get('uid')}) with kill")
    elif result.get("signal_name"):
        parts.append(str(result["signal_name"]))
    if result.get("blocked_syscall"):
        advice = result.get("advice") or "sandboxctl syscalls FILE shows what the profile lacks"
        parts.append(f"blocked syscall {result['blocked_syscall']}: {advice}")
    denied = result.get("denied_syscalls") or {}
    if denied:
        parts.append("refused and survived: " + ", ".join(f"{n} x{c}" for n, c in sorted(denied.items())))
    if status == "sandbox_error" and result.get("error"):
        e = result["error"]
        parts.append(f"step {e.get('step')} errno {e.get('errno')}: {e.get('message')}")
    elif result.get("reason") and status not in ("ok", "exit_nonzero"):
        parts.append(str(result["reason"]))
    for stream in ("stdout", "stderr"):
        if result.get(f"{stream}_truncated"):
            parts.append(f"{stream} truncated")
    if status in LIMITS and not result.get("files"):
        parts.append("no out/ files came back (a run stopped at a limit returns only what was collected "
                     "before it was killed, often nothing)")
    if result.get("session_ended"):
        parts.append(f"session {result.get('session_id')} has ended")
    parts.append(f"{result.get('wall_ms', 0):.1f} ms wall, {result.get('cpu_ms', 0):.1f} ms cpu, "
                 f"{size((result.get('memory_peak_kb') or 0) * 1024)} peak")
    parts.append(f"run {result.get('run_id')}")
    return " | ".join(parts)
