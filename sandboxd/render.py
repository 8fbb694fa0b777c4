"""Human output for sandboxctl: tables, sizes, durations, JSON with bytes."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from typing import Any


def to_json(obj: Any, compact: bool = False) -> str:
    """JSON for --json output (``compact``: one line, for a stream of events)."""

    def default(o: Any) -> Any:
        if isinstance(o, bytes):
            try:
                return o.decode("utf-8")
            except UnicodeDecodeError:
                return {"base64": base64.b64encode(o).decode()}
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
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def size(n: float | None) -> str:
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def ago(ts: float | None) -> str:
    return "never" if not ts else duration(time.time() - ts) + " ago"


def verdict_line(result: dict[str, Any]) -> str:
    """One line on stderr after a run: what happened, and what it cost."""
    status = result.get("status")
    parts = [f"sandboxd: {status}"]
    if result.get("exit_code") is not None:
        parts.append(f"exit {result['exit_code']}")
    if result.get("signal_name"):
        parts.append(str(result["signal_name"]))
    if result.get("blocked_syscall"):
        parts.append(f"blocked syscall {result['blocked_syscall']} (sandboxctl syscalls shows what to allow)")
    if status == "sandbox_error" and result.get("error"):
        e = result["error"]
        parts.append(f"step {e.get('step')} errno {e.get('errno')}: {e.get('message')}")
    elif result.get("reason") and status not in ("ok", "exit_nonzero"):
        parts.append(str(result["reason"]))
    for stream in ("stdout", "stderr"):
        if result.get(f"{stream}_truncated"):
            parts.append(f"{stream} truncated")
    if result.get("session_ended"):
        parts.append(f"session {result.get('session_id')} has ended")
    parts.append(f"{result.get('wall_ms', 0):.1f} ms wall, {result.get('cpu_ms', 0):.1f} ms cpu, "
                 f"{size((result.get('memory_peak_kb') or 0) * 1024)} peak")
    parts.append(f"run {result.get('run_id')}")
    return " | ".join(parts)
