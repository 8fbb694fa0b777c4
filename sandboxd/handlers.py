"""The protocol's operations.  Each declares who may call it, checked before it runs.

    hello          anyone      server, version, protocol, your uid and quota
    run            anyone      run code (quota applies; ``stream: true`` sends output as it comes)
    session_open   anyone      a session: a worker that keeps its state across execs
    session_exec   owner       run a cell in it
    session_write_file owner   write a file in its /work (session_read_file, session_list_files)
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
    drain          admin       take no new runs or sessions (what is in flight goes on)
    undrain        admin       take new work again
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import __version__, logs, plan, quota, rootwhy
from .access import MAX_NAME, Access
from .admin import Admin
from .common import errors, hints, protocol
from .common.errors import RequestError
from .config import QuotaLimits
from .environments import Environments
from .jail.policy.profiles import NEVER_ALLOW, REFUSED_WHY
from .jail.workers.stream import EventSink
from .peer import Identity, PeerCred, identify
from .quota import Admission
from .runs import Runs
from .sessions import Sessions

log = logging.getLogger("sandboxd.run")


@dataclass(frozen=True)
class Services:
    """What handlers call: the daemon wires these once at start (``daemon.Daemon``)."""

    access: Access
    admission: Admission
    runs: Runs
    sessions: Sessions
    environments: Environments
    admin: Admin


class Interim(EventSink, Protocol):
    """Frames of a request before its answer: progress reports and streamed events."""

    def progress(self, info: dict[str, Any]) -> None: ...


@dataclass
class Call:
    """One request being handled: who asked, their quota (looked up once, here), what they
    asked, and a way to send interim frames."""

    who: Identity
    limits: QuotaLimits | None  # None: deny_unlisted refuses this caller
    req: dict[str, Any]
    interim: Interim
    services: Services

    @property
    def quota(self) -> QuotaLimits:
        """The caller's limits; ``forbidden`` when the configuration lets them do nothing."""
        return self.services.access.require(self.who, self.limits)

    @property
    def admin(self) -> bool:
        return self.services.access.is_admin(self.who)

    @property
    def id(self) -> Any:
        return self.req.get("id")

    def progress(self, info: dict[str, Any]) -> None:
        self.interim.progress(info)

    def events(self) -> EventSink | None:
        """Where streamed output goes, when the request asks for it (``stream: true``)."""
        return self.interim if plan.wants_stream(self.req) else None


Handler = Callable[[Services, Call], Awaitable[dict[str, Any]]]


async def op_hello(s: Services, call: Call) -> dict[str, Any]:
    who = call.who
    return protocol.ok(call.id, server="sandboxd", version=__version__, protocol=protocol.PROTOCOL_VERSION,
                       uid=who.uid, user=who.name, admin=call.admin, quota=quota.limits_dict(call.quota))


async def op_run(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, result=await s.runs.execute(call.who, call.quota, call.req, events=call.events()))


async def op_session_open(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, session=await s.sessions.open(call.who, call.quota, call.req))


async def op_session_exec(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, result=await s.sessions.exec(call.who, call.quota, call.req, call.events()))


async def op_session_files(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, **await s.sessions.files(call.who, call.quota, call.req))


async def op_session_interrupt(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, interrupted=s.sessions.interrupt(call.who, call.req.get("session_id")))


async def op_session_close(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, session=await s.sessions.close(call.who, call.req.get("session_id"), "closed"))


async def op_sessions(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, sessions=s.sessions.listed(call.who, call.admin))


async def op_status(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, **s.admin.status(call.who, call.admin))


async def op_usage(s: Services, call: Call) -> dict[str, Any]:
    who, req = call.who, call.req
    target = req.get("uid", req.get("user"))
    if req.get("all"):
        if not call.admin:
            raise errors.forbidden("the usage of all users is for admins")
        uids = s.admin.known_uids()
    elif target is None:
        uids = [who.uid]
    else:
        uid = s.access.resolve_uid(target)
        if uid != who.uid and not call.admin:
            raise errors.forbidden("the usage of other users is for admins")
        uids = [uid]
    return protocol.ok(call.id, users=[s.admin.usage_of(uid) for uid in uids])


async def op_jobs(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, jobs=s.runs.jobs(), queued=len(s.admission.queue))


async def op_kill(s: Services, call: Call) -> dict[str, Any]:
    """Kill a run, or a session (``session_id``: it ends; an exec's run_id ends its session too)."""
    run_id = call.req.get("run_id")
    if call.req.get("session_id") is not None and run_id is None:
        closed = await s.sessions.close(call.who, call.req["session_id"], "killed")
        log.info("session %s killed by uid %d (%s)", closed["session_id"], call.who.uid, call.who.name,
                 extra=logs.fields(session_id=closed["session_id"], caller_uid=call.who.uid, action="kill"))
        return protocol.ok(call.id, killed=closed["session_id"], session=closed)
    if not isinstance(run_id, str):
        raise errors.bad_request("run_id", "required, a string (or session_id)")
    owner = s.runs.owner(run_id)
    # Another caller's run is as absent as one that does not exist: "forbidden" would tell
    # when others run (run ids are sequential).
    if owner is None or (owner != call.who.uid and not call.admin):
        raise RequestError(errors.NOT_FOUND, f"no run {run_id} of yours is in flight", run_id=run_id)
    s.runs.kill(run_id, call.who)
    log.info("run %s of uid %d killed by uid %d (%s)", run_id, owner, call.who.uid, call.who.name,
             extra=logs.fields(run_id=run_id, caller_uid=call.who.uid, owner_uid=owner, action="kill"))
    return protocol.ok(call.id, killed=run_id)


async def op_reload(s: Services, call: Call) -> dict[str, Any]:
    log.info("reload asked by uid %d (%s)", call.who.uid, call.who.name,
             extra=logs.fields(caller_uid=call.who.uid, action="reload"))
    changes = await s.admin.reload()
    return protocol.ok(call.id, reloaded=True, changes=changes)


async def op_rebuild_root(s: Services, call: Call) -> dict[str, Any]:
    """Rebuild from the configured paths; with ``progress: true`` interim frames report the stages."""
    want = bool(call.req.get("progress"))

    def progress(stage: str, info: dict[str, Any]) -> None:
        if want:
            call.progress({"stage": stage, **{k: v for k, v in info.items() if k != "stage"}})

    root = await s.admin.rebuild_root(bool(call.req.get("force", True)), progress)
    log.info("root %s by uid %d (%s): %s", "reused" if root.get("reused") else "rebuilt", call.who.uid,
             call.who.name, root["build_id"], extra=logs.fields(caller_uid=call.who.uid, action="rebuild_root"))
    return protocol.ok(call.id, root=root)


async def op_environments(s: Services, call: Call) -> dict[str, Any]:
    """Every environment; a failed build's log (host paths, index URLs) only for admins."""
    envs = _environments(s)
    if not call.admin:
        envs = [{**e, "error": {k: v for k, v in e["error"].items() if k != "log"}} if e.get("error") else e
                for e in envs]
    return protocol.ok(call.id, environments=envs)


async def op_build_environment(s: Services, call: Call) -> dict[str, Any]:
    """Build (or rebuild with ``force``) an environment; with ``progress: true`` interim frames
    report the stages (venv, resolving, downloading, installing, checking, root, ready)."""
    name = call.req.get("name")
    if not isinstance(name, str) or not name:
        raise errors.bad_request("name", "required, the name of an environment")
    want = bool(call.req.get("progress"))

    def progress(stage: str, info: dict[str, Any]) -> None:
        if want:
            call.progress({"stage": stage, **{k: v for k, v in info.items() if k != "stage"}})

    env = await s.environments.build(name, bool(call.req.get("force", True)), progress)
    log.info("environment %s built by uid %d (%s): %s, %s", name, call.who.uid, call.who.name, env.get("build"),
             env.get("state"), extra=logs.fields(caller_uid=call.who.uid, action="build_environment", environment=name))
    return protocol.ok(call.id, environment=env)


async def op_drain(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, **s.admin.drain(call.who))


async def op_undrain(s: Services, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, **s.admin.undrain(call.who))


async def op_syscalls(s: Services, call: Call) -> dict[str, Any]:
    """Run the code once with calls outside the profile recorded and let through (except the
    never-allowed ones, refused as always), inside the same confinement otherwise."""
    result = await s.runs.execute(call.who, call.quota, call.req, discover=True)
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
                       yaml=yaml_snippet, config=s.admin.config_path())


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


async def op_root_why(s: Services, call: Call) -> dict[str, Any]:
    module = call.req.get("module")
    if (call.req.get("language") or "python3") in ("nodejs", "javascript"):
        return await _root_why_node(s, call, module)
    if not isinstance(module, str) or not module or not all(p.isidentifier() for p in module.split(".")):
        raise errors.bad_request("module", "required, a dotted module name like numpy.linalg")
    environments = _environments(s)
    names = [e["name"] for e in environments]
    environment = call.req.get("environment")
    if environment is None:
        environment = "default" if "default" in names else ""
    elif environment not in names:
        raise errors.bad_request("environment", f"no environment {environment!r} here", known=names)
    layout = s.admin.root_layout(environment)
    if layout is None:
        raise RequestError(errors.UNAVAILABLE, f"the root{' of environment ' + environment if environment else ''} "
                           "is not built yet")
    root, run_path = layout
    report = rootwhy.explain(module, root, run_path, private_ok=call.admin)
    report["environment"] = environment or None
    probe = {"code": f"import importlib\nm = importlib.import_module({module!r})\nprint(getattr(m, '__file__', m))",
             "timeout_ms": min(10000, int(call.quota.max_timeout * 1000))}
    if environment:
        probe["environment"] = environment
    result = await s.runs.execute(call.who, call.quota, probe)
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


async def _root_why_node(s: Services, call: Call, module: Any) -> dict[str, Any]:
    """Can ``require(module)`` succeed in the jail?  Node resolves inside the root: ask it."""
    if not isinstance(module, str) or not NODE_MODULE.fullmatch(module):
        raise errors.bad_request("module", "required, a Node module name like lodash, @scope/name or node:fs")
    probe = {"code": NODE_PROBE.replace("MODULE", json.dumps(module)), "language": "nodejs",
             "timeout_ms": min(10000, int(call.quota.max_timeout * 1000))}
    result = await s.runs.execute(call.who, call.quota, probe)
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


def _environments(s: Services) -> list[dict[str, Any]]:
    """Every environment, with how many runs and sessions use each now."""
    return s.environments.list(in_use=[*s.runs.environments_in_use(), *s.sessions.environments_in_use()])


def _last_line(data: bytes) -> str:
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else ""


# Who may call an operation:
#   QUOTA   callers with a quota (the handler looks it up: a deny_unlisted refusal comes from there)
#   LISTED  callers with a quota, and admins
#   ADMIN   root and members of daemon.admin_group
QUOTA, LISTED, ADMIN = "quota", "listed", "admin"
INT, STR, BOOL = (int,), (str,), (bool,)
# Answers that mean "that request should not have been sent": a flood of them is rate-limited.
REFUSALS = frozenset({errors.BAD_REQUEST, errors.UNKNOWN_OP, errors.FORBIDDEN, errors.NOT_FOUND})
TYPE_NAMES = {INT: "an integer", STR: "a string", BOOL: "true or false", (str, int): "a name or a uid"}


@dataclass(frozen=True)
class Op:
    access: str
    handler: Handler
    # The fields it takes, with their types; None where plan.py (or sessionfiles.py) checks them.
    fields: dict[str, tuple[type, ...]] | None = None
    while_stopping: bool = False  # answered during shutdown (status says it is stopping)
    new_work: bool = False  # starts a run or a session: refused while draining


HANDLERS: dict[str, Op] = {
    "hello": Op(QUOTA, op_hello, {}),
    "run": Op(QUOTA, op_run, new_work=True),
    "status": Op(LISTED, op_status, {}, while_stopping=True),
    "usage": Op(LISTED, op_usage, {"uid": INT, "user": (str, int), "all": BOOL}),
    "kill": Op(LISTED, op_kill, {"run_id": STR, "session_id": STR}),
    "session_open": Op(QUOTA, op_session_open, new_work=True),
    "session_exec": Op(QUOTA, op_session_exec),
    "session_write_file": Op(QUOTA, op_session_files),
    "session_read_file": Op(QUOTA, op_session_files),
    "session_list_files": Op(QUOTA, op_session_files),
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
    "drain": Op(ADMIN, op_drain, {}),
    "undrain": Op(ADMIN, op_undrain, {}),
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


async def dispatch(s: Services, call: Call) -> dict[str, Any]:
    name = call.req.get("op")
    if not isinstance(name, str):
        raise errors.bad_request("op", "required, a string naming the operation", known=sorted(HANDLERS))
    op = HANDLERS.get(name)
    if op is None:
        raise RequestError(errors.UNKNOWN_OP, f"unknown operation {name!r}", known=sorted(HANDLERS))
    check_fields(op, call.req)
    if not op.while_stopping:
        s.admin.check_available()
    if op.access == ADMIN and not call.admin:
        raise errors.forbidden(f"{name} is for root and members of the admin group")
    if op.access == LISTED and not call.admin:
        call.quota  # noqa: B018 - with deny_unlisted, an unlisted caller may do nothing
    if op.new_work:
        s.admin.check_accepting(name)
    return await op.handler(s, call)


class Handlers:
    """The server's front (``server.Front``): every request, with the services to call."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def serve(self, cred: PeerCred, req: dict[str, Any], interim: Interim) -> dict[str, Any]:
        """One request: the caller, its quota (looked up once), the refusal rate, the operation."""
        s = self.services
        who = identify(cred)
        limits = s.access.limits(who)
        s.admission.check_refusals(who.uid, s.access.rate_limits(limits))
        try:
            return await dispatch(s, Call(who, limits, req, interim, s))
        except RequestError as e:
            if e.code in REFUSALS:
                self.refused(who.uid)
            raise

    def refused(self, uid: int) -> None:
        self.services.admin.refused(uid)
