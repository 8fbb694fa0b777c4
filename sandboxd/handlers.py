"""The protocol's operations.  Each declares who may call it, checked before it runs.

    hello          anyone      server, version, protocol, your uid and quota
    run            anyone      run code (quota applies; ``stream: true`` sends output as it comes)
    session_open   anyone      a session: a worker that keeps its state across execs
    session_exec   owner       run a cell in it
    session_interrupt owner/admin  KeyboardInterrupt in its running cell
    session_close  owner/admin end it
    sessions       anyone      your open sessions (admins: everyone's)
    status         anyone      health, root, capacity, your usage (admins: everyone's)
    usage          anyone      usage against quota; another user's needs admin
    kill           owner/admin kill a run by id, or a session
    root_why       anyone      can MODULE be imported in the root, and if not why
    jobs           admin       runs in flight and queued
    reload         admin       re-read the config file
    rebuild_root   admin       rebuild the root from the config's paths (progress frames)
    syscalls       admin       run code in discovery mode: which syscalls the profile lacks
    environments   anyone      the Python environments: packages, state, size, use
    build_environment admin    (re)build an environment (progress frames)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import __version__, logs, plan, quota, rootwhy
from .common import errors, hints, protocol
from .common.errors import RequestError
from .config import QuotaLimits
from .jail.policy.profiles import NEVER_ALLOW, REFUSED_WHY
from .jail.workers.stream import EventSink
from .peer import Identity

log = logging.getLogger("sandboxd.run")


class App(Protocol):
    """Everything a handler may ask of the daemon (``daemon.Daemon`` is the one implementation)."""

    def is_admin(self, who: Identity) -> bool: ...
    def limits_for(self, who: Identity) -> QuotaLimits: ...  # forbidden when deny_unlisted refuses them
    def check_available(self) -> None: ...  # unavailable while shutting down
    def status(self, who: Identity) -> dict[str, Any]: ...
    def resolve_uid(self, target: Any) -> int: ...
    def known_uids(self) -> list[int]: ...
    def usage_of(self, uid: int) -> dict[str, Any]: ...
    def config_path(self) -> str: ...  # the file the daemon read
    async def execute(self, who: Identity, req: dict[str, Any], discover: bool = False,
                      events: EventSink | None = None) -> dict[str, Any]: ...
    async def open_session(self, who: Identity, req: dict[str, Any]) -> dict[str, Any]: ...
    async def exec_session(self, who: Identity, req: dict[str, Any], events: EventSink | None) -> dict[str, Any]: ...
    def interrupt_session(self, who: Identity, session_id: Any) -> bool: ...
    async def close_session(self, who: Identity, session_id: Any, reason: str) -> dict[str, Any]: ...
    def list_sessions(self, who: Identity) -> list[dict[str, Any]]: ...
    def jobs(self) -> tuple[list[dict[str, Any]], int]: ...
    def run_owner(self, run_id: str) -> int | None: ...
    def kill_run(self, run_id: str, by: Identity) -> None: ...
    async def reload(self) -> list[str]: ...
    async def rebuild_root(self, force: bool, progress: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]: ...
    def root_layout(self, environment: str = "") -> tuple[str, list[str]] | None: ...  # (root, sys.path) once built
    def list_environments(self) -> list[dict[str, Any]]: ...
    async def build_environment(self, name: str, force: bool,
                                progress: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]: ...


class Interim(EventSink, Protocol):
    """Frames of a request before its answer: progress reports and streamed events."""

    def progress(self, info: dict[str, Any]) -> None: ...


@dataclass
class Call:
    """One request being handled: who asked, what, and a way to send interim frames."""

    who: Identity
    req: dict[str, Any]
    interim: Interim

    @property
    def id(self) -> Any:
        return self.req.get("id")

    def progress(self, info: dict[str, Any]) -> None:
        self.interim.progress(info)

    def events(self) -> EventSink | None:
        """Where streamed output goes, when the request asks for it (``stream: true``)."""
        return self.interim if plan.wants_stream(self.req) else None


Handler = Callable[[App, Call], Awaitable[dict[str, Any]]]


async def op_hello(app: App, call: Call) -> dict[str, Any]:
    who = call.who
    limits = app.limits_for(who)
    return protocol.ok(call.id, server="sandboxd", version=__version__, protocol=protocol.PROTOCOL_VERSION,
                       uid=who.uid, user=who.name, admin=app.is_admin(who), quota=quota.limits_dict(limits))


async def op_run(app: App, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, result=await app.execute(call.who, call.req, events=call.events()))


async def op_session_open(app: App, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, session=await app.open_session(call.who, call.req))


async def op_session_exec(app: App, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, result=await app.exec_session(call.who, call.req, call.events()))


async def op_session_interrupt(app: App, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, interrupted=app.interrupt_session(call.who, call.req.get("session_id")))


async def op_session_close(app: App, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, session=await app.close_session(call.who, call.req.get("session_id"), "closed"))


async def op_sessions(app: App, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, sessions=app.list_sessions(call.who))


async def op_status(app: App, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, **app.status(call.who))


async def op_usage(app: App, call: Call) -> dict[str, Any]:
    who, req = call.who, call.req
    target = req.get("uid", req.get("user"))
    if req.get("all"):
        if not app.is_admin(who):
            raise errors.forbidden("the usage of all users is for admins")
        uids = app.known_uids()
    elif target is None:
        uids = [who.uid]
    else:
        uid = app.resolve_uid(target)
        if uid != who.uid and not app.is_admin(who):
            raise errors.forbidden("the usage of other users is for admins")
        uids = [uid]
    return protocol.ok(call.id, users=[app.usage_of(uid) for uid in uids])


async def op_jobs(app: App, call: Call) -> dict[str, Any]:
    jobs, queued = app.jobs()
    return protocol.ok(call.id, jobs=jobs, queued=queued)


async def op_kill(app: App, call: Call) -> dict[str, Any]:
    """Kill a run, or a session (``session_id``: it ends; an exec's run_id ends its session too)."""
    run_id = call.req.get("run_id")
    if call.req.get("session_id") is not None and run_id is None:
        closed = await app.close_session(call.who, call.req["session_id"], "killed")
        log.info("session %s killed by uid %d (%s)", closed["session_id"], call.who.uid, call.who.name,
                 extra=logs.fields(session_id=closed["session_id"], caller_uid=call.who.uid, action="kill"))
        return protocol.ok(call.id, killed=closed["session_id"], session=closed)
    if not isinstance(run_id, str):
        raise errors.bad_request("run_id", "required, a string (or session_id)")
    owner = app.run_owner(run_id)
    # Another caller's run is as absent as one that does not exist: "forbidden" would tell
    # when others run (run ids are sequential).
    if owner is None or (owner != call.who.uid and not app.is_admin(call.who)):
        raise RequestError(errors.NOT_FOUND, f"no run {run_id} of yours is in flight", run_id=run_id)
    app.kill_run(run_id, call.who)
    log.info("run %s of uid %d killed by uid %d (%s)", run_id, owner, call.who.uid, call.who.name,
             extra=logs.fields(run_id=run_id, caller_uid=call.who.uid, owner_uid=owner, action="kill"))
    return protocol.ok(call.id, killed=run_id)


async def op_reload(app: App, call: Call) -> dict[str, Any]:
    log.info("reload asked by uid %d (%s)", call.who.uid, call.who.name,
             extra=logs.fields(caller_uid=call.who.uid, action="reload"))
    changes = await app.reload()
    return protocol.ok(call.id, reloaded=True, changes=changes)


async def op_rebuild_root(app: App, call: Call) -> dict[str, Any]:
    """Rebuild from the configured paths; with ``progress: true`` interim frames report the stages."""
    want = bool(call.req.get("progress"))

    def progress(stage: str, info: dict[str, Any]) -> None:
        if want:
            call.progress({"stage": stage, **{k: v for k, v in info.items() if k != "stage"}})

    root = await app.rebuild_root(bool(call.req.get("force", True)), progress)
    log.info("root %s by uid %d (%s): %s", "reused" if root.get("reused") else "rebuilt", call.who.uid,
             call.who.name, root["build_id"], extra=logs.fields(caller_uid=call.who.uid, action="rebuild_root"))
    return protocol.ok(call.id, root=root)


async def op_environments(app: App, call: Call) -> dict[str, Any]:
    """Every environment; a failed build's log (host paths, index URLs) only for admins."""
    envs = app.list_environments()
    if not app.is_admin(call.who):
        envs = [{**e, "error": {k: v for k, v in e["error"].items() if k != "log"}} if e.get("error") else e
                for e in envs]
    return protocol.ok(call.id, environments=envs)


async def op_build_environment(app: App, call: Call) -> dict[str, Any]:
    """Build (or rebuild with ``force``) an environment; with ``progress: true`` interim frames
    report the stages (venv, resolving, downloading, installing, checking, root, ready)."""
    name = call.req.get("name")
    if not isinstance(name, str) or not name:
        raise errors.bad_request("name", "required, the name of an environment")
    want = bool(call.req.get("progress"))

    def progress(stage: str, info: dict[str, Any]) -> None:
        if want:
            call.progress({"stage": stage, **{k: v for k, v in info.items() if k != "stage"}})

    env = await app.build_environment(name, bool(call.req.get("force", True)), progress)
    log.info("environment %s built by uid %d (%s): %s, %s", name, call.who.uid, call.who.name, env.get("build"),
             env.get("state"), extra=logs.fields(caller_uid=call.who.uid, action="build_environment", environment=name))
    return protocol.ok(call.id, environment=env)


async def op_syscalls(app: App, call: Call) -> dict[str, Any]:
    """Run the code once with calls outside the profile recorded and let through (except the
    never-allowed ones, refused as always), inside the same confinement otherwise."""
    result = await app.execute(call.who, call.req, discover=True)
    profile = str(call.req.get("language", "python3"))
    seen = result.get("discovery") or {}
    missing = sorted(seen.get("allowed", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    refused = sorted(seen.get("refused", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    names = [name for name, _ in missing]
    yaml_snippet = "" if not names else (
        f"profiles:\n  {profile}:\n    allow: [{', '.join(sorted(names))}]\n")
    return protocol.ok(call.id, result=result, profile=profile,
                       missing=[{"name": n, "count": c} for n, c in missing],
                       refused=[{"name": n, "count": c, "why": REFUSED_WHY.get(n) or (
                                 "never allowed" if n in NEVER_ALLOW else "not a native system call")}
                                for n, c in refused],
                       yaml=yaml_snippet, config=app.config_path())


NODE_MODULE = re.compile(r"(node:)?(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*(/[A-Za-z0-9._-]+)*")
NODE_PROBE = """try {
  const where = require.resolve(MODULE);
  require(MODULE);
  console.log(where);
} catch (e) {
  console.error(`${e.code || e.name}: ${e.message.split('\\n')[0]}`);
  process.exitCode = 1;
}
"""


async def op_root_why(app: App, call: Call) -> dict[str, Any]:
    module = call.req.get("module")
    if (call.req.get("language") or "python3") in ("nodejs", "javascript"):
        return await _root_why_node(app, call, module)
    if not isinstance(module, str) or not module or not all(p.isidentifier() for p in module.split(".")):
        raise errors.bad_request("module", "required, a dotted module name like numpy.linalg")
    environments = app.list_environments()
    names = [e["name"] for e in environments]
    environment = call.req.get("environment")
    if environment is None:
        environment = "default" if "default" in names else ""
    elif environment not in names:
        raise errors.bad_request("environment", f"no environment {environment!r} here", known=names)
    layout = app.root_layout(environment)
    if layout is None:
        raise RequestError(errors.UNAVAILABLE, f"the root{' of environment ' + environment if environment else ''} "
                           "is not built yet")
    root, run_path = layout
    report = rootwhy.explain(module, root, run_path, private_ok=app.is_admin(call.who))
    report["environment"] = environment or None
    probe = {"code": f"import importlib\nm = importlib.import_module({module!r})\nprint(getattr(m, '__file__', m))",
             "timeout_ms": min(10000, int(app.limits_for(call.who).max_timeout * 1000))}
    if environment:
        probe["environment"] = environment
    result = await app.execute(call.who, probe)
    report["import"] = {"status": result["status"], "stdout": result["stdout"].decode("utf-8", "replace"),
                        "error": _last_line(result["stderr"]), "run_id": result["run_id"]}
    if result["status"] == "ok":
        report["importable"] = True
    else:
        report["importable"] = False
        if result.get("blocked_syscall"):
            report["advice"].append(f"importing it needs the system call {result['blocked_syscall']}: "
                                    "sandboxctl syscalls shows what to add to the profile")
        if report["found"] is None:
            report["advice"][:0] = rootwhy.environment_advice(module, environment, environments)
    return protocol.ok(call.id, **report)


async def _root_why_node(app: App, call: Call, module: Any) -> dict[str, Any]:
    """Can ``require(module)`` succeed in the jail?  Node resolves inside the root: ask it."""
    if not isinstance(module, str) or not NODE_MODULE.fullmatch(module):
        raise errors.bad_request("module", "required, a Node module name like lodash, @scope/name or node:fs")
    probe = {"code": NODE_PROBE.replace("MODULE", json.dumps(module)), "language": "nodejs",
             "timeout_ms": min(10000, int(app.limits_for(call.who).max_timeout * 1000))}
    result = await app.execute(call.who, probe)
    found = result["stdout"].decode("utf-8", "replace").strip() if result["status"] == "ok" else None
    report: dict[str, Any] = {"module": module, "language": "nodejs", "importable": result["status"] == "ok",
                              "found": found, "searched": [], "extensions": [], "missing_libraries": {},
                              "advice": [], "import": {"status": result["status"], "stdout": found or "",
                                                       "error": _last_line(result["stderr"]),
                                                       "run_id": result["run_id"]}}
    if not report["importable"]:
        if "MODULE_NOT_FOUND" in report["import"]["error"]:
            report["advice"].append(f"{module} is not in the root: install it into a node_modules directory on "
                                    "the host and add that directory to runtimes.nodejs.paths (it is put on "
                                    "NODE_PATH), then reload")
        elif result.get("blocked_syscall"):
            report["advice"].append(f"loading it needs the system call {result['blocked_syscall']}: sandboxctl "
                                    "syscalls --language nodejs shows what to add to the profile")
    return protocol.ok(call.id, **report)


def _last_line(data: bytes) -> str:
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else ""


# Who may call an operation:
#   QUOTA   callers with a quota (the handler looks it up: a deny_unlisted refusal comes from there)
#   LISTED  callers with a quota, and admins
#   ADMIN   root and members of daemon.admin_group
QUOTA, LISTED, ADMIN = "quota", "listed", "admin"
INT, STR, BOOL = (int,), (str,), (bool,)
MAX_NAME = 256  # longest string any operation's field takes (run's code and stdin are plan.py's)
TYPE_NAMES = {INT: "an integer", STR: "a string", BOOL: "true or false", (str, int): "a name or a uid"}


@dataclass(frozen=True)
class Op:
    access: str
    handler: Handler
    # The fields it takes, with their types; None where plan.py checks them (run, syscalls, sessions).
    fields: dict[str, tuple[type, ...]] | None = None
    while_stopping: bool = False  # answered during shutdown (status says it is stopping)


HANDLERS: dict[str, Op] = {
    "hello": Op(QUOTA, op_hello, {}),
    "run": Op(QUOTA, op_run),
    "status": Op(LISTED, op_status, {}, while_stopping=True),
    "usage": Op(LISTED, op_usage, {"uid": INT, "user": (str, int), "all": BOOL}),
    "kill": Op(LISTED, op_kill, {"run_id": STR, "session_id": STR}),
    "session_open": Op(QUOTA, op_session_open),
    "session_exec": Op(QUOTA, op_session_exec),
    "session_interrupt": Op(LISTED, op_session_interrupt, {"session_id": STR}),
    "session_close": Op(LISTED, op_session_close, {"session_id": STR}),
    "sessions": Op(LISTED, op_sessions, {}),
    "root_why": Op(QUOTA, op_root_why, {"module": STR, "language": STR, "environment": STR}),
    "jobs": Op(ADMIN, op_jobs, {}),
    "reload": Op(ADMIN, op_reload, {}),
    "rebuild_root": Op(ADMIN, op_rebuild_root, {"progress": BOOL, "force": BOOL}),
    "syscalls": Op(ADMIN, op_syscalls),
    "environments": Op(LISTED, op_environments, {}),
    "build_environment": Op(ADMIN, op_build_environment, {"name": STR, "progress": BOOL, "force": BOOL}),
}


def check_fields(op: Op, req: dict[Any, Any]) -> None:
    """Refuse fields the operation does not have, and values of the wrong type."""
    if op.fields is None:
        return
    hints.check_unknown(req, ("op", "id", *op.fields))
    for name, types in op.fields.items():
        value = req.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise errors.bad_request(name, f"expected {TYPE_NAMES[types]}, got {type(value).__name__}")
        if isinstance(value, str) and len(value) > MAX_NAME:
            # names go to NSS, the file system and messages: nss-systemd aborts on a 4 MiB one
            raise errors.bad_request(name, f"at most {MAX_NAME} characters, got {len(value)}")


async def dispatch(app: App, call: Call) -> dict[str, Any]:
    name = call.req.get("op")
    if not isinstance(name, str):
        raise errors.bad_request("op", "required, a string naming the operation", known=sorted(HANDLERS))
    op = HANDLERS.get(name)
    if op is None:
        raise RequestError(errors.UNKNOWN_OP, f"unknown operation {name!r}", known=sorted(HANDLERS))
    check_fields(op, call.req)
    if not op.while_stopping:
        app.check_available()
    if op.access == ADMIN and not app.is_admin(call.who):
        raise errors.forbidden(f"{name} is for root and members of the admin group")
    if op.access == LISTED and not app.is_admin(call.who):
        app.limits_for(call.who)  # with deny_unlisted, an unlisted caller may do nothing
    return await op.handler(app, call)
