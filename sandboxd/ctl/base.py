"""What every sandboxctl command shares: exit statuses, the config's sizes and durations on
the command line, the daemon's answer as JSON or as text safe for a terminal, and how a
run's verdict becomes an exit status or an isolate-style meta file."""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
import stat
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .. import render
from ..client import Client, default_socket
from ..common import sizes

# Exit statuses (sandboxctl(8), EXIT STATUS).  `run` mirrors the program's own status (0-255;
# 128+N when a signal ended it); sandboxctl's own outcomes are 120-127, like docker run's
# 125-127: a program that exits with one of them is still told apart by --json and --meta.
EXIT_OK = 0
EXIT_FAILED = 1  # answered, but not a success: a cell that raised, a failed build, an invalid config
EXIT_LIMIT = 120  # the daemon stopped the run at a limit (time, CPU, memory, output, processes)
EXIT_SANDBOX = 121  # the jail could not be set up: the code did not run
EXIT_FORBIDDEN = 122
EXIT_QUOTA = 123
EXIT_BUSY = 124  # busy or unavailable: retry later
EXIT_ERROR = 125  # any other refusal or error from the daemon (bad_request, not_found, internal...)
EXIT_CONNECT = 126  # the daemon cannot be reached or talked to
EXIT_USAGE = 127  # a bad command line, or a file named on it that cannot be read
SESSION_ID = re.compile(r"s[0-9a-f]{6}-[0-9]+-[0-9a-f]{12}")
ERROR_EXITS = {"forbidden": EXIT_FORBIDDEN, "quota_exceeded": EXIT_QUOTA, "busy": EXIT_BUSY,
               "unavailable": EXIT_BUSY}
LIMIT_STATUSES = render.LIMITS


# -- what a person types: the config's sizes and durations ------------------------------------------
def mebibytes(text: str) -> int:
    """--memory: 512 (MiB), 512M, 1G."""
    try:
        n = int(text) << 20 if text.strip().isdigit() else sizes.byte_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512 (MiB), 512M or 1G, got {text!r}") from None
    if n < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is less than 1 MiB")
    return n >> 20


def byte_count(text: str) -> int:
    """--max-output: 65536 (bytes), 64K, 1M."""
    try:
        return sizes.byte_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 64K, 1M or a number of bytes, got {text!r}") from None


def seconds(text: str) -> float:
    """--timeout, --cpu, --idle-timeout, --lifetime: 2 (seconds), 500ms, 2s, 5m."""
    try:
        value = sizes.duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 2 (seconds), 500ms, 2s or 5m, "
                                         f"got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return float(value)


def envelope(reply: dict[str, Any]) -> dict[str, Any]:
    """A daemon reply as --json prints it: ``ok`` first, the protocol's ``id`` dropped."""
    return {"ok": True, **{k: v for k, v in reply.items() if k not in ("id", "ok")}}


def failure(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message, **details}}



class Base:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.args.socket or default_socket())
        return self._client

    def out(self, data: Any, human: Callable[[], str]) -> None:
        print(render.to_json(envelope(data)) if self.args.json else self.shown(human()))

    def shown(self, text: str) -> str:
        """sandboxctl's own text -- tables, verdicts, reports, messages -- made safe for a
        terminal, always: it quotes what packages and runs said (a distribution's name, a
        run's stderr, an import's error), and a pipe does not mean no terminal (ssh host
        sandboxctl ..., a pager, watch).  --json is the exact form for scripts."""
        return render.safe_text(text)

    def write(self, stream: Any, data: bytes) -> None:
        """A run's own output (stdout, stderr, a cell's value): exact when piped (it is the
        program's answer: sandboxctl run prog.py > out.bin) or with --raw, escaped on a terminal."""
        if not getattr(self.args, "raw", False) and stream.isatty():
            data = render.for_terminal(data)
        stream.buffer.write(data)
        stream.flush()

    # -- health and jobs ----------------------------------------------------------------------
    def _code(self) -> tuple[str, bool]:
        """The code, and whether it came from standard input."""
        if self.args.code is not None:
            if self.args.file:
                raise UsageError(f"give the code with -c or as FILE, not both (-c and {self.args.file})")
            return self.args.code, False
        if self.args.file and self.args.file != "-":
            with open(self.args.file, encoding="utf-8") as f:
                return f.read(), False
        return sys.stdin.read(), True

    def _run_fields(self, code_from_stdin: bool, session: bool = False) -> dict[str, Any]:
        """The fields of a run (or, with ``session``, of an exec) from the command line."""
        a = self.args
        stdin = b""
        if a.stdin_file:
            with open(a.stdin_file, "rb") as f:
                stdin = f.read()
        elif not code_from_stdin and not sys.stdin.isatty():
            stdin = sys.stdin.buffer.read()  # the code came from elsewhere: our stdin is the run's
        files = {}
        for spec in a.file_input or []:
            name, sep, path = spec.partition("=")
            if not sep:  # --file PATH: placed under its own base name
                name, path = os.path.basename(spec.rstrip("/")), spec
            if not name:
                raise UsageError(f"--file expects PATH or NAME=PATH, got {spec!r}")
            with open(path, "rb") as f:
                files[name] = f.read()
        fields: dict[str, Any] = {"stdin": stdin} if stdin or not session else {}
        if files:
            fields["files"] = files
        if a.timeout:
            fields["timeout_ms"] = max(1, round(a.timeout * 1000))
        if session:
            return fields
        if getattr(a, "cpu", None):
            fields["cpu_ms"] = max(1, round(a.cpu * 1000))
        if getattr(a, "max_output", None):
            fields["max_output"] = a.max_output
        if a.env:
            fields["env"] = dict(parse_env(a.env))
        if a.memory:
            fields["memory_mb"] = a.memory
        if a.network:
            fields["network"] = True
        if a.language:
            fields["language"] = a.language
        if getattr(a, "environment", None):
            fields["environment"] = a.environment
        return fields

    def streaming(self) -> bool:
        """Stream output as it comes: by default when writing to a terminal (not with --json)."""
        choice = getattr(self.args, "stream", None)
        if choice is not None:
            return bool(choice) and not self.args.json
        return not self.args.json and sys.stdout.isatty()

    def on_output(self, stream: str, data: bytes) -> None:
        self.write(sys.stdout if stream == "stdout" else sys.stderr, data)

    def show_result(self, result: Mapping[str, Any], streamed: bool) -> int:
        """A run's or exec's output (unless it was streamed), its verdict, its out/ files."""
        result = dict(result)
        code = cell_exit(result) if result.get("exec") else run_exit(result)
        if getattr(self.args, "meta", None):
            write_meta(self.args.meta, result, code)
        if self.args.json:
            print(render.to_json({"ok": True, "result": result, "exit_status": code}))
        else:
            if not streamed:
                self.write(sys.stdout, result.get("stdout") or b"")
                self.write(sys.stderr, result.get("stderr") or b"")
            if result.get("value") is not None:
                self.write(sys.stdout, (str(result["value"]) + "\n").encode("utf-8", "backslashreplace"))
            sys.stderr.write(self.shown(render.verdict_line(result)) + "\n")
        if self.args.out and (result.get("files") or result.get("display")):
            save_files(self.args.out, {**result.get("files", {}),
                                       **{f"display-{i + 1}.png": d["data"]
                                          for i, d in enumerate(result.get("display") or [])}})
        return code

    # -- environments ---------------------------------------------------------------------------------

class UsageError(Exception):
    pass


def run_exit(result: dict[str, Any]) -> int:
    """The exit status of ``sandboxctl run``: the program's own where it has one (a refused
    call it survived long enough to exit on, too); EXIT_LIMIT when the daemon stopped it."""
    status = result.get("status")
    if status == "ok":
        return EXIT_OK
    if status == "sandbox_error":
        return EXIT_SANDBOX
    if status in ("exit_nonzero", "blocked_syscall") and isinstance(result.get("exit_code"), int):
        return int(result["exit_code"])
    if status == "signaled" and result.get("signal"):
        return 128 + int(result["signal"])
    return EXIT_LIMIT  # a limit, a timeout, SIGSYS: the daemon's SIGKILL is not the program's


def cell_exit(result: dict[str, Any]) -> int:
    """The exit status of ``sandboxctl session exec``: 0 when the cell finished without an exception."""
    if result.get("status") == "ok":
        return EXIT_OK
    if result.get("status") == "sandbox_error":
        return EXIT_SANDBOX
    return EXIT_FAILED


# isolate's --meta names, for judges that read them; status as isolate spells it.
ISOLATE_STATUS = {"exit_nonzero": "RE", "signaled": "SG", "timeout": "TO", "cpu_limit": "TO",
                  "sandbox_error": "XX", "memory_limit": "SG", "output_limit": "SG", "pids_limit": "RE",
                  "blocked_syscall": "RE"}


def write_meta(path: str, result: dict[str, Any], exit_status: int) -> None:
    """``--meta FILE``: the verdict as isolate's key:value lines (plus sandboxd's own keys)."""
    status = str(result.get("status"))
    lines = {"time": f"{(result.get('cpu_ms') or 0) / 1000:.3f}",
             "time-wall": f"{(result.get('wall_ms') or 0) / 1000:.3f}",
             "max-rss": str(result.get("memory_peak_kb") or 0), "cg-mem": str(result.get("memory_peak_kb") or 0)}
    if status in ISOLATE_STATUS:
        lines["status"] = ISOLATE_STATUS[status]
    if result.get("exit_code") is not None:
        lines["exitcode"] = str(result["exit_code"])
    if result.get("signal"):
        lines["exitsig"] = str(result["signal"])
    if status in LIMIT_STATUSES or result.get("killed_by"):
        lines["killed"] = "1"
    if status == "memory_limit":
        lines["cg-oom-killed"] = "1"
    message = {"timeout": "Time limit exceeded (wall clock)", "cpu_limit": "Time limit exceeded",
               "memory_limit": "Memory limit exceeded", "output_limit": "Output limit exceeded",
               "pids_limit": "Process limit exceeded", "sandbox_error": "Sandbox setup failed",
               "blocked_syscall": f"Forbidden syscall {result.get('blocked_syscall')}"}.get(status)
    if message:
        lines["message"] = message
    lines.update({"sandboxd-status": status, "sandboxd-run-id": str(result.get("run_id")),
                  "sandboxd-exit-status": str(exit_status)})
    if result.get("blocked_syscall"):
        lines["sandboxd-blocked-syscall"] = str(result["blocked_syscall"])
    text = "".join(f"{k}:{render.safe_text(v).replace(chr(10), ' ')}\n" for k, v in lines.items())
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def parse_env(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name:
            raise UsageError(f"--env expects NAME=VALUE, got {spec!r}")
        out.append((name, value))
    return out


def socket_hint(path: str) -> str:
    """Why a permission error on the socket: which group to join."""
    try:
        st = os.stat(path)
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        return " (are you in the socket's group?)"
    try:
        me = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (a container's, a deleted user's)
        me = str(os.getuid())
    return (f" (the socket is {stat.filemode(st.st_mode)} group {group}: join it, e.g. `usermod -aG {group} "
            f"{me}`, then log in again)")


def save_files(directory: str, files: dict[str, bytes]) -> None:
    base = os.path.realpath(directory)
    for name, data in files.items():
        target = os.path.realpath(os.path.join(base, name))
        if not target.startswith(base + os.sep):
            print(render.safe_text(f"sandboxctl: skipping {name!r}: it would land outside {directory}"),
                  file=sys.stderr)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)


