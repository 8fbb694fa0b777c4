"""sandboxctl: use and administer sandboxd over its socket (see sandboxctl(8)).

It never needs root itself: what it may do is what the daemon allows the caller's uid.
Every subcommand takes --json for scripts: one JSON object on stdout, {"ok": true, ...} or
{"ok": false, "error": {"code", "message", ...}}.  Exit statuses are stable (EXIT_*).
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import pwd
import re
import stat
import sys
from collections.abc import Callable, Mapping
from typing import Any

from . import __version__, render
from .client import Client, SandboxdError, default_socket
from .common import sizes
from .config import DEFAULT_CONFIG, ConfigError, load
from .repl import Repl

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


class Ctl:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.args.socket or default_socket())
        return self._client

    def out(self, data: Any, human: Callable[[], str]) -> None:
        print(render.to_json(envelope(data)) if self.args.json else self.shown(human(), sys.stdout))

    def shown(self, text: str, stream: Any) -> str:
        """Text from the daemon (which can carry a run's bytes) made safe for a terminal."""
        return text if getattr(self.args, "raw", False) or not stream.isatty() else render.safe_text(text)

    def write(self, stream: Any, data: bytes) -> None:
        """A run's own bytes: exact when piped or with --raw, escaped on a terminal."""
        if not getattr(self.args, "raw", False) and stream.isatty():
            data = render.for_terminal(data)
        stream.buffer.write(data)
        stream.flush()

    # -- health and jobs ----------------------------------------------------------------------
    def status(self) -> int:
        st = self.client.status()

        def human() -> str:
            root, cap, pool = st.get("root") or {}, st.get("capacity") or {}, st.get("pool") or {}
            you = st.get("you") or {}
            lines = [
                f"sandboxd {st['version']}, pid {st['pid']}, up {render.duration(st['uptime_s'])}"
                + ("  (STOPPING)" if st.get("stopping") else ""),
                f"root       {root.get('path')}",
                f"           build {root.get('build_id')}, {root.get('files')} files "
                f"({render.size(root.get('bytes'))}), {root.get('libraries')} libraries resolved"
                + (f", {len(root['missing_libraries'])} objects with missing libraries"
                   if root.get("missing_libraries") else ""),
                f"capacity   {cap.get('running')}/{cap.get('capacity')} running, {cap.get('queued')}/"
                f"{cap.get('queue_max')} queued, {st.get('connections')} connections",
                f"cgroup     {(st.get('cgroup') or {}).get('kind')}   usage db: {st.get('usage_db')}",
                "self-test  " + ("passed" if (st.get("self_test") or {}).get("passed") else
                                 "off" if not (st.get("self_test") or {}).get("enabled") else "FAILED"),
                f"pool       min {pool.get('minimum')}, max {pool.get('maximum')}, {pool.get('hits')} hits, "
                f"{pool.get('misses')} misses",
            ]
            rows = [(k, v.get("ready"), v.get("starting"), v.get("waiting"), v.get("target"))
                    for k, v in (pool.get("profiles") or {}).items()]
            lines.append(render.table(["profile", "ready", "starting", "waiting", "target"], rows))
            u = you.get("usage") or {}
            lines.append(f"you        {you.get('user')} (uid {you.get('uid')}){' admin' if you.get('admin') else ''}"
                         f": {u.get('runs_total')} runs, {u.get('runs_last_minute')} in the last minute")
            return "\n".join(lines)

        self.out(st, human)
        return EXIT_OK

    def jobs(self) -> int:
        reply = self.client.call("jobs")
        rows = [(j["run_id"], f"{j.get('caller') or '?'} ({j['caller_uid']})", j["run_uid"], j["worker_pid"],
                 render.duration(j["age_ms"] / 1000), f"{j['timeout_ms'] / 1000:g} s", f"{j['memory_mb']} MiB",
                 "yes" if j["network"] else "no", j.get("session_id") or "-") for j in reply["jobs"]]
        self.out(reply, lambda: render.table(["run", "caller", "run uid", "pid", "age", "timeout", "memory",
                                               "network", "session"], rows) + f"\n{reply['queued']} queued")
        return EXIT_OK

    def kill(self) -> int:
        target = self.args.run_id
        field = "session_id" if SESSION_ID.fullmatch(target) else "run_id"
        reply = self.client.call("kill", **{field: target})
        self.out(reply, lambda: f"killed {reply['killed']}")
        return EXIT_OK

    def usage(self) -> int:
        fields: dict[str, Any] = {}
        if self.args.user:
            fields["user"] = self.args.user
        if self.args.all:
            fields["all"] = True
        reply = self.client.call("usage", **fields)

        def human() -> str:
            rows = []
            for e in reply["users"]:
                u, q = e["usage"], e.get("quota") or {}
                rpm = q.get("runs_per_minute") or "-"
                cpu = q.get("cpu_seconds_per_hour") or "-"
                rows.append((e["user"], e["uid"], f"{e['running']}/{q.get('concurrent', '-')}",
                             f"{e['queued']}/{q.get('queued', '-')}", f"{u['runs_last_minute']}/{rpm}",
                             f"{u['cpu_ms_last_hour'] / 1000:.1f}/{cpu}", u["runs_total"], render.ago(u["last_run"])))
            return render.table(["user", "uid", "running", "queued", "runs/min", "cpu s/hour", "runs total",
                                 "last run"], rows)

        self.out(reply, human)
        return EXIT_OK

    def reload(self) -> int:
        reply = self.client.call("reload")
        self.out(reply, lambda: "reloaded: " + ("; ".join(reply["changes"]) or "no changes"))
        return EXIT_OK

    def check_config(self) -> int:
        path = self.args.file or DEFAULT_CONFIG
        try:
            cfg = load(path)
        except ConfigError as e:
            message = str(e)
            if self.args.json:
                print(render.to_json({**failure("bad_config", f"{len(e.errors)} errors in {e.path}",
                                                file=e.path, errors=e.located)}))
            else:
                print(message)
            return EXIT_FAILED
        self.out({"file": cfg.path, "warnings": list(cfg.warnings)},
                 lambda: "\n".join([f"{cfg.path}: ok", *(f"warning: {w}" for w in cfg.warnings)]))
        return EXIT_OK

    def rebuild_root(self) -> int:
        def progress(p: dict[str, Any]) -> None:
            if self.args.json:
                return
            stage = p.get("stage")
            if stage == "building" and p.get("total"):
                done, total = p.get("done", 0), p["total"]
                bar = "#" * int(30 * done / total)
                sys.stderr.write(f"\rbuilding  [{bar:30s}] {done}/{total} entries")
                if done == total:
                    sys.stderr.write("\n")
            elif stage == "collected":
                sys.stderr.write(f"collected {p.get('entries')} entries, {p.get('libraries')} libraries\n")
            else:
                sys.stderr.write(f"{stage}\n")
            sys.stderr.flush()

        reply = self.client.call("rebuild_root", progress=progress, force=not self.args.if_changed)
        r = reply["root"]

        def human() -> str:
            lines = [f"root {r['build_id']} {'reused' if r['reused'] else 'built'} in {render.duration(r['seconds'])}",
                     f"  {r['path']}",
                     f"  {r['files']} files, {render.size(r['bytes'])}: {r['linked']} hard-linked, "
                     f"{r['copied']} copied; {r['libraries']} libraries found through DT_NEEDED"]
            for obj, names in (r.get("missing_libraries") or {}).items():
                lines.append(f"  missing: {obj} needs {', '.join(names)}")
            lines += [f"  warning: {w}" for w in r.get("warnings") or []]
            return "\n".join(lines)

        self.out(reply, human)
        return EXIT_OK

    # -- running code -----------------------------------------------------------------------------
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

    def run(self) -> int:
        code, from_stdin = self._code()
        streamed = self.streaming()
        fields = self._run_fields(from_stdin)
        if getattr(self.args, "display", False):
            fields["display"] = True
        result = self.client.run(code, on_output=self.on_output if streamed else None, **fields)
        return self.show_result(result, streamed)

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
                print(self.shown(str(result["value"]), sys.stdout))
            sys.stderr.write(self.shown(render.verdict_line(result), sys.stderr) + "\n")
        if self.args.out and (result.get("files") or result.get("display")):
            save_files(self.args.out, {**result.get("files", {}),
                                       **{f"display-{i + 1}.png": d["data"]
                                          for i, d in enumerate(result.get("display") or [])}})
        return code

    # -- environments ---------------------------------------------------------------------------------
    def env_list(self) -> int:
        reply = self.client.call("environments")

        def human() -> str:
            rows = []
            for e in reply["environments"]:
                packages = ", ".join(f"{p['name']}=={p['version']}" for p in e["packages"]
                                     if p["name"] not in ("pip", "setuptools"))
                rows.append((e["name"], e["state"], packages or "-", render.size(e["size_bytes"] or 0),
                             render.ago(e["built_at"]) if e["built_at"] else "-",
                             render.duration(e["build_seconds"]) if e["build_seconds"] is not None else "-",
                             e["in_use"]))
            text = render.table(["environment", "state", "packages", "size", "built", "took", "in use"], rows)
            for e in reply["environments"]:
                if e.get("error"):
                    text += f"\n{e['name']}: last build failed: {e['error']['message']}"
            return text if reply["environments"] else "no environments are configured"

        self.out(reply, human)
        return EXIT_OK

    def env_build(self) -> int:
        last = [""]

        def progress(p: dict[str, Any]) -> None:
            if self.args.json:  # stdout holds the one result object: events go to stderr
                print(render.to_json({"event": "progress", **p}, compact=True), file=sys.stderr, flush=True)
                return
            stage = str(p.get("stage"))
            said = p.get("detail") or p.get("message")
            detail = f": {said}" if said else ""
            if stage != last[0] or detail:
                sys.stderr.write(self.shown(f"{stage}{detail}", sys.stderr)[:200] + "\n")
                sys.stderr.flush()
            last[0] = stage

        reply = self.client.call("build_environment", progress=progress, name=self.args.name,
                                 force=not self.args.if_changed)
        e = reply["environment"]
        self.out(reply, lambda: f"environment {e['name']}: {e['state']}, build {e['build']}, "
                                f"{len(e['packages'])} packages, {render.size(e['size_bytes'] or 0)}")
        return EXIT_OK if e["state"] == "ready" else EXIT_FAILED

    # -- sessions -----------------------------------------------------------------------------------
    def _session_fields(self) -> dict[str, Any]:
        a = self.args
        fields: dict[str, Any] = {}
        if a.language:
            fields["language"] = a.language
        if a.memory:
            fields["memory_mb"] = a.memory
        if a.network:
            fields["network"] = True
        if a.env:
            fields["env"] = dict(parse_env(a.env))
        if a.idle_timeout:
            fields["idle_timeout_ms"] = max(1, round(a.idle_timeout * 1000))
        if a.lifetime:
            fields["max_lifetime_ms"] = max(1, round(a.lifetime * 1000))
        if a.display:
            fields["display"] = True
        if a.environment:
            fields["environment"] = a.environment
        return fields

    def session_open(self) -> int:
        reply = self.client.call("session_open", **self._session_fields())
        info = reply["session"]
        self.out(reply, lambda: info["session_id"])
        return EXIT_OK

    def session_exec(self) -> int:
        code, from_stdin = self._code()
        fields = self._run_fields(from_stdin, session=True)
        streamed = self.streaming()
        reply = self.client.call("session_exec", on_output=self.on_output if streamed else None,
                                 session_id=self.args.session_id, code=code, **fields)
        return self.show_result(reply["result"], streamed)

    def session_close(self) -> int:
        reply = self.client.call("session_close", session_id=self.args.session_id)
        self.out(reply, lambda: f"closed {reply['session']['session_id']}")
        return EXIT_OK

    def session_interrupt(self) -> int:
        reply = self.client.call("session_interrupt", session_id=self.args.session_id)
        self.out(reply, lambda: "interrupted" if reply["interrupted"] else "nothing was running")
        return EXIT_OK

    def session_list(self) -> int:
        reply = self.client.call("sessions")
        rows = [(x["session_id"], x["owner"], x["language"], f"{x['memory_mb']} MiB",
                 render.duration(x["age_ms"] / 1000), "busy" if x["busy"] else render.duration(x["idle_ms"] / 1000),
                 x["execs"], f"{x['cpu_used_ms'] / 1000:.1f} s") for x in reply["sessions"]]
        self.out(reply, lambda: render.table(["session", "owner", "language", "memory", "age", "idle", "execs",
                                               "cpu"], rows))
        return EXIT_OK

    def repl(self) -> int:
        session = self.client.session(**self._session_fields())
        try:
            return Repl(self.client, session, self).loop()
        finally:
            with contextlib.suppress(SandboxdError, OSError):
                session.close()

    def syscalls(self) -> int:
        code, from_stdin = self._code()
        reply = self.client.call("syscalls", code=code, **self._run_fields(from_stdin))
        result = reply["result"]

        def human() -> str:
            lines = [f"ran in discovery mode: {result['status']}"
                     + (f" (exit {result['exit_code']})" if result.get("exit_code") is not None else "")]
            if reply["missing"]:
                lines.append(f"system calls the {reply['profile']} profile does not allow (let through this once):")
                lines.append(render.table(["syscall", "count"], [(m["name"], m["count"]) for m in reply["missing"]]))
                lines.append(f"\nadd to {reply.get('config') or DEFAULT_CONFIG} (the daemon's configuration), "
                             "then `sandboxctl reload`:\n")
                lines.append(reply["yaml"].rstrip())
            else:
                lines.append(f"the {reply['profile']} profile allows every system call this code made")
            if reply["refused"]:
                lines.append("\nrefused even in discovery mode (escapes and kernel attack surface, never allowed):")
                lines.append(render.table(["syscall", "count", "why"],
                                          [(r["name"], r["count"], r["why"]) for r in reply["refused"]]))
            if result.get("stderr"):
                lines.append("\nthe program's stderr (last lines):")
                lines += ["  " + ln for ln in result["stderr"].decode("utf-8", "replace").splitlines()[-5:]]
            return "\n".join(lines)

        self.out(reply, human)
        return EXIT_OK

    def root_why(self) -> int:
        fields = {"language": self.args.language} if self.args.language else {}
        if self.args.environment:
            fields["environment"] = self.args.environment
        reply = self.client.call("root_why", module=self.args.module, **fields)

        def human() -> str:
            m = reply["module"]
            lines = []
            if reply.get("language") == "nodejs":
                lines.append(f"{m}: resolves to {reply['found']}" if reply["found"] else f"{m}: not found in the root")
            elif reply["found"]:
                lines.append(f"{m}: in the root at {reply['found']}")
            else:
                lines.append(f"{m}: not in the root (searched {', '.join(reply['searched'])})")
                if reply.get("on_host"):
                    lines.append(f"  on this host: {reply['on_host']}")
            exts = reply["extensions"]
            if exts:
                libs = {lib for e in exts for lib in e["libraries"]}
                lines.append(f"  {len(exts)} extension modules; the {len(libs)} libraries they need are "
                             + ("in the root" if not reply["missing_libraries"] else "in the root, except:"))
            for obj, names in reply["missing_libraries"].items():
                lines.append(f"  MISSING: {obj} needs {', '.join(names)}")
            imp = reply["import"]
            lines.append(f"import in the jail: {imp['status']}"
                         + (f" ({imp['stdout'].strip()})" if imp["status"] == "ok" else f": {imp['error']}"))
            lines += [f"advice: {a}" for a in reply["advice"]]
            return "\n".join(lines)

        self.out(reply, human)
        return EXIT_OK if reply.get("importable") else EXIT_FAILED


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
            print(f"sandboxctl: skipping {name!r}: it would land outside {directory}", file=sys.stderr)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)


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
                       "(by default control characters are shown escaped there; piped output is always exact)")
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
            print(ctl.shown(f"sandboxctl: {message}", sys.stderr), file=sys.stderr)
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
            print(ctl.shown(f"sandboxctl: {text}", sys.stderr), file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
