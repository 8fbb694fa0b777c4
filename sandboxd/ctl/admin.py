"""sandboxctl's commands about the daemon: status, usage, reload, drain, config, the root, environments."""

from __future__ import annotations

import sys
import time
from typing import Any

from .. import render
from ..config import DEFAULT_CONFIG, ConfigError, load
from .base import EXIT_FAILED, EXIT_OK, Base, failure


class AdminCommands(Base):
    def status(self) -> int:
        st = self.client.status()

        def human() -> str:
            root, cap, pool = st.get("root") or {}, st.get("capacity") or {}, st.get("pool") or {}
            you = st.get("you") or {}
            lines = [
                f"sandboxd {st['version']}, pid {st['pid']}, up {render.duration(st['uptime_s'])}"
                + ("  (STOPPING)" if st.get("stopping") else "  (DRAINING)" if st.get("draining") else ""),
                "ready      " + ("yes" if st.get("ready") else "no: " + "; ".join(st.get("not_ready") or ["?"])),
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

    def drain(self) -> int:
        """Drain; with --wait, until no run is in flight or queued (and, with --sessions, none is open)."""
        reply = self.client.drain()
        wait = self.args.wait
        deadline = time.monotonic() + (wait or 0)
        busy = self._busy(reply)
        while wait and busy and time.monotonic() < deadline:
            time.sleep(0.2)
            st = self.client.status()
            cap, sessions = st.get("capacity") or {}, st.get("sessions") or {}
            reply = {**reply, "draining": st.get("draining"), "running": cap.get("running"),
                     "queued": cap.get("queued"), "sessions": sessions.get("open")}
            busy = self._busy(reply)
        reply = {**reply, "idle": not busy}

        def human() -> str:
            head = "draining" if reply.get("draining") else "not draining (undrained meanwhile)"
            counts = (f"{reply.get('running')} runs running, {reply.get('queued')} queued, "
                      f"{reply.get('sessions')} sessions open")
            if wait and busy:
                return f"{head}: still {counts} after {render.duration(wait)}"
            return f"{head}: {counts}"

        self.out(reply, human)
        return EXIT_FAILED if wait and busy else EXIT_OK

    def _busy(self, counts: dict[str, Any]) -> bool:
        keys = ("running", "queued", "sessions") if self.args.sessions else ("running", "queued")
        return any(counts.get(k) for k in keys)

    def undrain(self) -> int:
        reply = self.client.undrain()
        self.out(reply, lambda: f"taking new work ({reply.get('running')} runs running, "
                 f"{reply.get('sessions')} sessions open)")
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
                print(self.shown(message))  # it quotes the file, which may be anyone's
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
                sys.stderr.write(self.shown(f"{stage}") + "\n")
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
                sys.stderr.write(self.shown(f"{stage}{detail}")[:200] + "\n")
                sys.stderr.flush()
            last[0] = stage

        reply = self.client.call("build_environment", progress=progress, name=self.args.name,
                                 force=not self.args.if_changed)
        e = reply["environment"]
        self.out(reply, lambda: f"environment {e['name']}: {e['state']}, build {e['build']}, "
                                f"{len(e['packages'])} packages, {render.size(e['size_bytes'] or 0)}")
        return EXIT_OK if e["state"] == "ready" else EXIT_FAILED

    # -- sessions -----------------------------------------------------------------------------------
