"""The daemon's logging: where lines go, and untrusted values never written raw.

Request ids, operation names, module names and the like come from callers; a newline
or an escape sequence in one must not forge a log line or reach a terminal.  Every
message is escaped as it is formatted (tracebacks, which are the daemon's own, are not).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from typing import Any


def escape(text: str) -> str:
    """``text`` with control and other non-printable characters as Python escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class EscapingFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


def fields(**values: object) -> dict[str, object]:
    """``log.info(..., extra=fields(run_id=..., status=...))``: structured fields of a line,
    sent as journal fields (RUN_ID=...) with journald, as keys with --log-format json."""
    return {"sbx_fields": {k: v for k, v in values.items() if v is not None}}


def _fields_of(record: logging.LogRecord) -> dict[str, object]:
    found: dict[str, object] = getattr(record, "sbx_fields", {})
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and the line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {"time": round(record.created, 3), "level": record.levelname.lower(),
                                  "logger": record.name, "message": record.getMessage(), "pid": record.process}
        out.update({k: v if isinstance(v, int | float | bool) else str(v) for k, v in _fields_of(record).items()})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, sort_keys=False)


class JournalHandler(logging.Handler):
    """Lines to journald through its native protocol (python3-systemd's ``journal.send``):
    the message plus PRIORITY and the line's fields in upper case, so that
    ``journalctl -u sandboxd STATUS=memory_limit`` finds them."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, send: Any, ident: str = "sandboxd") -> None:
        super().__init__()
        self.send, self.ident = send, ident

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            extra = {k.upper(): str(v) for k, v in _fields_of(record).items()}
            self.send(message, PRIORITY=str(self.PRIORITY.get(record.levelno, 6)), SYSLOG_IDENTIFIER=self.ident,
                      LOGGER=record.name, **extra)
        except Exception:  # noqa: BLE001 - logging must never raise (logging.Handler's own rule)
            self.handleError(record)


def _journal() -> Any:
    """python3-systemd's journal.send when stderr is the journal (systemd set JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
        if (st.st_dev, st.st_ino) != (dev, ino):
            return None
        from systemd import journal  # type: ignore[import-not-found,attr-defined,unused-ignore]
    except (ValueError, OSError, ImportError):
        return None
    return journal.send


def setup(level: str, foreground: bool, fmt_name: str = "text", ident: str = "sandboxd") -> None:
    """Where lines go: in the foreground, ``json`` lines on stderr, or with journald (under
    systemd, python3-systemd installed) the journal's native protocol with fields, else text on
    stderr; in the background (stderr is gone), syslog, as text or as JSON.  ``ident`` names
    the program in the journal and in syslog."""
    root = logging.getLogger()
    root.handlers.clear()
    json_lines = fmt_name == "json"
    send = _journal() if foreground and not json_lines else None
    handler: logging.Handler
    if not foreground:
        syslog = logging.handlers.SysLogHandler(address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        syslog.ident = f"{ident}[{os.getpid()}]: "
        syslog.setFormatter(JsonFormatter() if json_lines else EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
        handler = syslog
    elif json_lines:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif send is not None:
        handler = JournalHandler(send, ident)
        handler.setFormatter(EscapingFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(EscapingFormatter(fmt))
    root.addHandler(handler)
    root.setLevel(level.upper())
