"""The daemon's logging: where lines go, and untrusted values never written raw.

Request ids, operation names, module names and the like come from callers; a newline
or an escape sequence in one must not forge a log line or reach a terminal.  Every
message is escaped as it is formatted (tracebacks, which are the daemon's own, are not).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys


def escape(text: str) -> str:
    """``text`` with control and other non-printable characters as Python escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class EscapingFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


def setup(level: str, foreground: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        handler = logging.handlers.SysLogHandler(address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        fmt = "sandboxd[%(process)d]: %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(EscapingFormatter(fmt))
    root.addHandler(handler)
    root.setLevel(level.upper())
