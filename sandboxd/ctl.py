"""sandboxctl: talk to sandboxd over its socket (see sandboxctl(8))."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .client import Client, SandboxdError, default_socket

# Exit codes (documented in sandboxctl(8)).
EXIT_OK = 0
EXIT_RUN_FAILED = 1  # the run did not finish with status 0 (run mirrors the run's own exit status)
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_FORBIDDEN = 4
EXIT_QUOTA = 5
EXIT_BUSY = 6
EXIT_ERROR = 7  # any other error answer from the daemon
EXIT_SANDBOX = 8  # the run failed because the jail could not be set up

ERROR_EXITS = {"forbidden": EXIT_FORBIDDEN, "quota_exceeded": EXIT_QUOTA, "busy": EXIT_BUSY,
               "unavailable": EXIT_BUSY}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": __import__("base64").b64encode(obj).decode()}
    raise TypeError(type(obj).__name__)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=_json_default, indent=2, sort_keys=True))


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    if args.code is not None:
        code = args.code
    elif args.file and args.file != "-":
        with open(args.file, encoding="utf-8") as f:
            code = f.read()
    else:
        code = sys.stdin.read()
    stdin = b""
    code_from_stdin = args.code is None and (not args.file or args.file == "-")
    if args.stdin_file:
        with open(args.stdin_file, "rb") as f:
            stdin = f.read()
    elif not code_from_stdin and not sys.stdin.isatty():
        stdin = sys.stdin.buffer.read()  # the code came from elsewhere: our stdin is the run's
    files = {}
    for spec in args.file_input or []:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"sandboxctl: --file expects NAME=PATH, got {spec!r}")
        with open(path, "rb") as f:
            files[name] = f.read()
    options: dict[str, Any] = {"stdin": stdin, "files": files or None, "network": args.network or None,
                               "timeout_ms": int(args.timeout * 1000) if args.timeout else None,
                               "memory_mb": args.memory}
    result = client.run(code, **options)
    if args.json:
        _print_json(result)
    else:
        sys.stdout.buffer.write(result.get("stdout") or b"")
        sys.stdout.flush()
        sys.stderr.buffer.write(result.get("stderr") or b"")
        sys.stderr.write(verdict_line(result) + "\n")
    if args.out and result.get("files"):
        save_files(args.out, result["files"])
    status = result.get("status")
    if status == "ok":
        return EXIT_OK
    if status == "sandbox_error":
        return EXIT_SANDBOX
    code_ = result.get("exit_code")
    if status == "exit_nonzero" and isinstance(code_, int):
        return code_
    if result.get("signal"):
        return 128 + int(result["signal"])
    return EXIT_RUN_FAILED


def verdict_line(result: dict[str, Any]) -> str:
    status = result.get("status")
    parts = [f"sandboxd: {status}"]
    if result.get("exit_code") is not None:
        parts.append(f"exit {result['exit_code']}")
    if result.get("signal_name"):
        parts.append(str(result["signal_name"]))
    if result.get("blocked_syscall"):
        parts.append(f"blocked syscall {result['blocked_syscall']}")
    if status == "sandbox_error" and result.get("error"):
        e = result["error"]
        parts.append(f"step {e.get('step')} errno {e.get('errno')}: {e.get('message')}")
    if result.get("stdout_truncated"):
        parts.append("stdout truncated")
    if result.get("stderr_truncated"):
        parts.append("stderr truncated")
    parts.append(f"{result.get('wall_ms', 0):.1f} ms wall, {result.get('cpu_ms', 0):.1f} ms cpu, "
                 f"{result.get('memory_peak_kb') or 0} KiB peak")
    parts.append(f"run {result.get('run_id')}")
    return " | ".join(parts)


def save_files(directory: str, files: dict[str, bytes]) -> None:
    base = os.path.realpath(directory)
    for name, data in files.items():
        target = os.path.realpath(os.path.join(base, name))
        if not target.startswith(base + os.sep):
            print(f"sandboxctl: skipping {name!r}: outside {directory}", file=sys.stderr)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    status = client.status()
    if args.json:
        _print_json(status)
        return EXIT_OK
    root = status.get("root") or {}
    cap = status.get("capacity") or {}
    print(f"sandboxd {status['version']}  pid {status['pid']}  up {status['uptime_s']:.0f}s"
          f"{'  STOPPING' if status.get('stopping') else ''}")
    print(f"root      {root.get('path')}  ({root.get('files')} files, {root.get('libraries')} libraries, "
          f"build {root.get('build_id')})")
    print(f"capacity  {cap.get('running')}/{cap.get('capacity')} running, {cap.get('queued')} queued")
    print(f"cgroup    {(status.get('cgroup') or {}).get('kind')}")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sandboxctl", description="Administer and use sandboxd.")
    p.add_argument("--socket", default=None, help="daemon socket (default $SANDBOXD_SOCKET or "
                   "/run/sandboxd/sandboxd.sock)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run code from a file, -c CODE or stdin")
    r.add_argument("file", nargs="?", help="file with the code ('-' or nothing: standard input)")
    r.add_argument("-c", dest="code", help="the code itself")
    r.add_argument("--stdin-file", help="give this file to the run as its standard input")
    r.add_argument("--file", dest="file_input", action="append", metavar="NAME=PATH",
                   help="place PATH in the run's working directory as NAME (repeatable)")
    r.add_argument("--out", help="save the run's out/ files into this directory")
    r.add_argument("--timeout", type=float, help="wall-clock limit in seconds")
    r.add_argument("--memory", type=int, help="memory limit in MiB")
    r.add_argument("--network", action="store_true", help="allow network access (if your quota does)")
    r.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="daemon health, root, capacity")
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    s.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    path = args.socket or default_socket()
    try:
        client = Client(path)
    except OSError as e:
        print(f"sandboxctl: cannot connect to {path}: {e.strerror or e}", file=sys.stderr)
        return EXIT_CONNECT
    try:
        with client:
            return int(args.func(client, args))
    except SandboxdError as e:
        print(f"sandboxctl: {e.code}: {e.message}", file=sys.stderr)
        return ERROR_EXITS.get(e.code, EXIT_ERROR)
    except (ConnectionError, OSError) as e:
        print(f"sandboxctl: connection to {path} failed: {e}", file=sys.stderr)
        return EXIT_CONNECT


if __name__ == "__main__":
    sys.exit(main())
