"""R as a session: one ``__main__`` kept across cells, one cell at a time.

After its release steps a session's runner reads cells from the request pipe until
the daemon closes it.  Each cell: its input files (replacing what is there), its own
stdin, then the code in the same ``__main__`` -- a last expression's value is kept
as ``_`` and reported as text, an uncaught exception (``KeyboardInterrupt`` from
``session_interrupt``, ``SystemExit`` too) is printed as the interpreter would and
reported, and the session goes on.  SIGINT raises KeyboardInterrupt only while a
cell's code runs (or does what a cell's own handler says: later cells keep it);
between cells it is ignored, so an interrupt that comes late cannot hit the next
cell or this loop.  Output is flushed before the cell is
reported on the link (``LINK_CELL`` + a msgpack map), so everything the cell
printed is in the pipes by the time the daemon hears of it.
"""

from __future__ import annotations

import ast
import io
import linecache
import os
import signal
import sys
import time
from typing import Any, NoReturn

import msgpack

from ...common import protocol
from . import display, usercode
from .contract import LINK_CELL, LINK_SESSION, R_FD_LINK, R_FD_REQUEST, Handoff

MAX_CELL = 1 << 30  # the daemon bounds what it sends; this only guards the decoder
MAX_VALUE = 16 << 10  # bytes of a last expression's repr (the report fits MAX_LINK_MESSAGE)
MAX_TRACEBACK = 16 << 10  # bytes: its end


def serve(handoff: Handoff) -> NoReturn:
    """Serve cells until the daemon closes the request pipe (or kills the session)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler: Any = signal.default_int_handler  # the cells' own SIGINT handler, between cells
    main = usercode.new_main().__dict__
    decoder = protocol.FrameDecoder(MAX_CELL)
    handoff.write(Handoff.RUNNING, started_ns=time.monotonic_ns())
    os.write(R_FD_LINK, LINK_SESSION)
    seq = 0
    while True:
        try:
            cell = protocol.read_frame(lambda n: os.read(R_FD_REQUEST, n), decoder)
        except (EOFError, OSError, protocol.ProtocolError):
            break
        if not isinstance(cell, dict):
            break
        seq += 1
        report, handler = run_cell(cell, main, seq, handler)
        try:
            os.write(R_FD_LINK, LINK_CELL + msgpack.packb(report))
        except OSError:
            break
    os._exit(usercode.shutdown(0, main))


def run_cell(cell: dict[str, Any], main: dict[str, Any], seq: int, handler: Any) -> tuple[dict[str, Any], Any]:
    """Run one cell in ``main`` with ``handler`` for SIGINT (KeyboardInterrupt, unless a cell
    set its own); what the daemon reports of it, and the handler it leaves."""
    report: dict[str, Any] = {}
    cpu0 = usercode.cpu_ns()
    filename = f"<cell {seq}>"
    code = cell.get("code")
    code = code if isinstance(code, str) else ""
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    stdin = cell.get("stdin")
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin if isinstance(stdin, bytes) else b""), encoding="utf-8")
    try:
        usercode.write_files(cell.get("files") or {}, replace=True)
        body, last = _compile(code, filename)
        signal.signal(signal.SIGINT, handler)
        try:
            exec(body, main)
            value = eval(last, main) if last is not None else None
        finally:
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN) or signal.default_int_handler
        if value is not None:
            main["_"] = value
            report["value"] = _repr(value)
    except BaseException as e:  # noqa: BLE001 - reported, and the session goes on
        e = usercode.from_user_frame(e, main)
        usercode.print_exception(e)
        report["exception"] = type(e).__name__
        report["message"] = _str(e)
        report["traceback"] = _clip(usercode.format_exception(e), MAX_TRACEBACK, end=True)
        if isinstance(e, SystemExit):
            report["exit_code"] = usercode.exit_status(e)
        if isinstance(e, KeyboardInterrupt):
            report["interrupted"] = True
    if cell.get("display"):
        display.save_open_figures()
    report["figures"] = display.saved()
    report["cpu_ns"] = usercode.cpu_ns() - cpu0
    if not usercode.flush_stdio():
        report.setdefault("exception", "OSError")
        report.setdefault("message", "stdout could not be flushed")
    return report, handler


def _compile(code: str, filename: str) -> tuple[Any, Any]:
    """The cell as statements, and its last statement apart when it is an expression."""
    tree = ast.parse(code, filename)
    last = None
    tail = tree.body[-1] if tree.body else None
    if isinstance(tail, ast.Expr):
        tree.body.pop()
        last = compile(ast.Expression(tail.value), filename, "eval")
    return compile(tree, filename, "exec"), last


def _repr(value: Any) -> str:
    try:
        text = repr(value)
    except BaseException as e:  # noqa: BLE001
        text = f"<repr failed: {type(e).__name__}>"
    return _clip(text, MAX_VALUE)


def _str(e: BaseException) -> str:
    try:
        return _clip(str(e), 1000)
    except BaseException:  # noqa: BLE001
        return ""


def _clip(text: str, limit: int, end: bool = False) -> str:
    """At most ``limit`` bytes of ``text`` in UTF-8 (its end, with ``end``), marked when cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    if end:
        return "..." + data[-limit:].decode("utf-8", "ignore")
    return data[:limit].decode("utf-8", "ignore") + "..."
