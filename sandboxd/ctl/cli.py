"""sandboxctl: use and administer sandboxd over its socket (see sandboxctl(8)).

It never needs root itself: what it may do is what the daemon allows the caller's uid.
Every subcommand takes --json for scripts: one JSON object on stdout, {"ok": true, ...} or
{"ok": false, "error": {"code", "message", ...}}.  Exit statuses are stable (EXIT_*).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import __version__, render
from ..client import SandboxdError, default_socket
from ..config import DEFAULT_CONFIG
from .admin import AdminCommands
from .base import (
    ERROR_EXITS,
    EXIT_CONNECT,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    byte_count,
    failure,
    mebibytes,
    seconds,
    socket_hint,
)
from .runs import RunCommands
from .sessions import SessionCommands


class Ctl(RunCommands, SessionCommands, AdminCommands):
    """Every command: ``args.method`` names the one to call."""


def octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected octal permission bits like 0644, got {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"expected permission bits from 0000 to 0777, got {text}")
    return mode


def streaming(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--stream", action="store_true", default=None,
                    help="show output as it comes (the default on a terminal)")
    sp.add_argument("--no-stream", dest="stream", action="store_false", help="show output when the code is done")


def parser() -> argparse.ArgumentParser:
    # Global options go before or after the subcommand (SUPPRESS: a later parser's absent
    # option does not overwrite what an earlier one set).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="one JSON object on stdout: {\"ok\": true, ...} or {\"ok\": false, \"error\": ...}")
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help="daemon socket (default: $SANDBOXD_SOCKET, else /run/sandboxd/sandboxd.sock)")
    p = argparse.ArgumentParser(prog="sandboxctl", parents=[common],
                                description="Use and administer sandboxd (see sandboxctl(8)).")
    p.add_argument("--version", action="version", version=f"sandboxctl (sandboxd) {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, helptext: str, method: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=helptext, description=helptext)
        sp.set_defaults(method=method)
        return sp

    add("status", "health, version, uptime, root, pool, queue and capacity", "status")
    add("jobs", "runs in flight (admin)", "jobs")
    add("kill", "kill a run in flight, or a session (its owner or an admin)", "kill").add_argument(
        "run_id", metavar="RUN_OR_SESSION_ID")
    u = add("usage", "usage against quota (another user's: admin)", "usage")
    u.add_argument("user", nargs="?", help="user name or uid (default: you)")
    u.add_argument("--all", action="store_true", help="every user the daemon has seen (admin)")
    add("reload", "re-read the daemon's configuration (admin)", "reload")
    dr = add("drain", "take no new runs or sessions; what is in flight goes on (admin, docs/fleet.md)", "drain")
    dr.add_argument("--wait", type=seconds, metavar="DURATION",
                    help="then wait up to this long (5m, 300) for no run in flight or queued; exit 1 if some remain")
    dr.add_argument("--sessions", action="store_true", help="with --wait: wait for open sessions to end too")
    add("undrain", "take new work again after drain (admin)", "undrain")
    add("check-config", "validate a configuration file without touching the daemon", "check_config").add_argument(
        "file", nargs="?", help=f"default {DEFAULT_CONFIG}")
    add("rebuild-root", "rebuild the root from the configured paths (admin)", "rebuild_root").add_argument(
        "--if-changed", action="store_true", help="reuse the current root when its sources are unchanged")
    for name, method, helptext in (("run", "run", "run code from a file, -c CODE or standard input"),
                                   ("syscalls", "syscalls", "which system calls a program needs that the "
                                    "profile lacks, and the YAML to allow them (admin)")):
        r = add(name, helptext, method)
        r.add_argument("file", nargs="?", help="file with the code ('-' or nothing: standard input)")
        r.add_argument("-c", dest="code", help="the code itself")
        r.add_argument("--stdin-file", help="give this file to the run as its standard input")
        r.add_argument("--file", dest="file_input", action="append", metavar="[NAME=]PATH",
                       help="place PATH in the run's working directory as NAME (default: its base name; repeatable)")
        r.add_argument("--env", action="append", metavar="NAME=VALUE", help="set a variable (repeatable)")
        r.add_argument("--timeout", type=seconds, help="wall-clock limit: 2 (seconds), 500ms, 2s, 5m")
        r.add_argument("--cpu", type=seconds, help="CPU-time limit of all its processes together, as --timeout")
        r.add_argument("--memory", type=mebibytes, help="memory limit: 256 (MiB), 256M, 1G")
        r.add_argument("--max-output", type=byte_count, help="cap for stdout and for stderr each: 64K, 1M (bytes)")
        r.add_argument("--network", action="store_true", help="allow network access (if your quota does)")
        r.add_argument("--language", "-l", help="python3 (the default) or nodejs (javascript)")
        r.add_argument("--environment", "-E", help="the Python environment to run in (default: default, if any)")
        r.add_argument("--raw", action="store_true", help="write the run's output to a terminal as it is "
                       "(by default control characters are shown escaped there; piped output is always exact; "
                       "sandboxctl's own lines are always escaped)")
        if name == "run":
            r.add_argument("--meta", metavar="FILE", help="write the verdict to FILE as isolate's key:value lines")
            r.add_argument("--out", help="save the files the run left in out/ (and its figures) into this directory")
            streaming(r)
            r.add_argument("--display", action="store_true", help="return matplotlib figures as PNGs (with --out)")

    def session_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--language", "-l", help="python3 (the default) or nodejs (javascript)")
        sp.add_argument("--memory", type=mebibytes, help="memory limit of the whole session: 512 (MiB), 1G")
        sp.add_argument("--network", action="store_true", help="allow network access (if your quota does)")
        sp.add_argument("--env", action="append", metavar="NAME=VALUE", help="set a variable (repeatable)")
        sp.add_argument("--idle-timeout", type=seconds, help="close it after this long idle: 300 (seconds), 5m")
        sp.add_argument("--lifetime", type=seconds, help="close it this long after it opened: 3600, 1h")
        sp.add_argument("--display", action="store_true", help="return matplotlib figures as PNGs")
        sp.add_argument("--environment", "-E", help="the Python environment (default: default, if any)")

    env = sub.add_parser("env", parents=[common], help="Python environments: what runs may import")
    esub = env.add_subparsers(dest="env_command", required=True, metavar="ACTION")
    el = esub.add_parser("list", parents=[common], help="each environment, its packages, size, state and use")
    el.set_defaults(method="env_list")
    eb = esub.add_parser("build", parents=[common], help="(re)build an environment now, with progress (admin)")
    eb.add_argument("name")
    eb.add_argument("--if-changed", action="store_true", help="keep the current build when it is up to date")
    eb.set_defaults(method="env_build")

    session = sub.add_parser("session", parents=[common], help="sessions: workers that keep their state between execs")
    ssub = session.add_subparsers(dest="session_command", required=True, metavar="ACTION")

    def sadd(name: str, helptext: str, method: str) -> argparse.ArgumentParser:
        sp = ssub.add_parser(name, parents=[common], help=helptext, description=helptext)
        sp.set_defaults(method=method)
        return sp

    session_options(sadd("open", "open a session; prints its id", "session_open"))
    e = sadd("exec", "run code in a session (from a file, -c CODE or standard input)", "session_exec")
    e.add_argument("session_id")
    e.add_argument("file", nargs="?", help="file with the code ('-' or nothing: standard input)")
    e.add_argument("-c", dest="code", help="the code itself")
    e.add_argument("--stdin-file", help="give this file to the cell as its standard input")
    e.add_argument("--file", dest="file_input", action="append", metavar="[NAME=]PATH",
                   help="place PATH in the session's working directory as NAME (default: its base name)")
    e.add_argument("--timeout", type=seconds, help="wall-clock limit of this exec: 2 (seconds), 500ms, 5m")
    e.add_argument("--meta", metavar="FILE", help="write the verdict to FILE as isolate's key:value lines")
    e.add_argument("--out", help="save the files the exec left in out/ (and its figures) into this directory")
    e.add_argument("--raw", action="store_true", help="write the output to a terminal as it is")
    streaming(e)
    sadd("close", "close a session (its owner or an admin)", "session_close").add_argument("session_id")
    sadd("interrupt", "KeyboardInterrupt in a session's running exec", "session_interrupt").add_argument(
        "session_id")
    sadd("list", "your open sessions (admins: everyone's)", "session_list")
    cp = sadd("cp", "copy a file into a session's /work or out of it: cp LOCAL SESSION_ID:PATH, "
              "cp SESSION_ID:PATH LOCAL ('-': standard input or output)", "session_cp")
    cp.add_argument("source", metavar="SOURCE")
    cp.add_argument("destination", metavar="DESTINATION")
    cp.add_argument("--mode", type=octal_mode, help="permission bits of a file copied in, in octal (default: the "
                    "local file's; 0644 from standard input)")
    ls = sadd("ls", "list a directory of a session's /work", "session_ls")
    ls.add_argument("session_id")
    ls.add_argument("path", nargs="?", help="relative to /work (default: /work itself)")
    ls.add_argument("--recursive", "-R", action="store_true", help="the directories below too")
    rp = add("repl", "an interactive interpreter in a new session (Ctrl-C interrupts, Ctrl-D leaves)", "repl")
    session_options(rp)
    rp.add_argument("--raw", action="store_true", help="write the output to a terminal as it is")
    root = sub.add_parser("root", parents=[common], help="questions about the root")
    rsub = root.add_subparsers(dest="root_command", required=True, metavar="QUESTION")
    why = rsub.add_parser("why", parents=[common], help="can MODULE be imported in the jail, and if not why")
    why.add_argument("module")
    why.add_argument("--language", "-l", help="python3 (the default) or nodejs: require() it")
    why.add_argument("--environment", "-E", help="in this Python environment's root (default: default, if any)")
    why.set_defaults(method="root_why")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wants_json = "--json" in argv
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        if e.code and wants_json:
            print(render.to_json(failure("usage", "bad command line (see sandboxctl --help)")))
        return EXIT_USAGE if e.code else EXIT_OK
    for name in ("json", "socket"):
        if not hasattr(args, name):
            setattr(args, name, None if name == "socket" else False)
    ctl = Ctl(args)
    path = args.socket or default_socket()

    def fail(code: str, message: str, status: int, **details: Any) -> int:
        if args.json:
            print(render.to_json(failure(code, message, **details)))
        else:
            print(ctl.shown(f"sandboxctl: {message}"), file=sys.stderr)
        return status

    try:
        return int(getattr(ctl, args.method)())
    except UsageError as e:
        return fail("usage", str(e), EXIT_USAGE)
    except SandboxdError as e:
        text = f"{e.code}: {e.message}"
        retry = e.details.get("retry_after_ms")
        if isinstance(retry, int | float):
            text += f" (retry in {render.duration(retry / 1000)})"
        if args.json:
            print(render.to_json(failure(e.code, e.message, **e.details)))
        else:
            print(ctl.shown(f"sandboxctl: {text}"), file=sys.stderr)
        return ERROR_EXITS.get(e.code, EXIT_ERROR)
    except OSError as e:
        if e.filename:  # a file named on the command line (socket errors carry no file name)
            return fail("usage", f"{e.filename}: {e.strerror}", EXIT_USAGE, file=str(e.filename))
        if isinstance(e, FileNotFoundError):
            return fail("cannot_connect", f"cannot connect to {path}: {e.strerror} (is sandboxd running?)",
                        EXIT_CONNECT, socket=path)
        hint = socket_hint(path) if isinstance(e, PermissionError) else ""
        return fail("cannot_connect", f"cannot talk to {path}: {e}{hint}", EXIT_CONNECT, socket=path)
    finally:
        if ctl._client is not None:
            ctl._client.close()


