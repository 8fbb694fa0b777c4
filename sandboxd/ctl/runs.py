"""sandboxctl's commands about runs: run, syscalls, root why, jobs, kill."""

from __future__ import annotations

from .. import render
from ..config import DEFAULT_CONFIG
from .base import EXIT_FAILED, EXIT_OK, SESSION_ID, Base


class RunCommands(Base):
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

    def run(self) -> int:
        code, from_stdin = self._code()
        streamed = self.streaming()
        fields = self._run_fields(from_stdin)
        if getattr(self.args, "display", False):
            fields["display"] = True
        result = self.client.run(code, on_output=self.on_output if streamed else None, **fields)
        return self.show_result(result, streamed)

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


