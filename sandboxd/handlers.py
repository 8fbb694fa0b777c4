"""The protocol's operations.  Each declares who may call it, checked before it runs.

    hello          anyone      server, version, protocol, your uid and quota
    run            anyone      run code (quota applies)
    status         anyone      health, root, capacity, your usage (admins: everyone's)
    usage          anyone      usage against quota; another user's needs admin
    kill           owner/admin kill a run by id
    root_why       anyone      can MODULE be imported in the root, and if not why
    jobs           admin       runs in flight and queued
    reload         admin       re-read the config file
    rebuild_root   admin       rebuild the root from the config's paths (progress frames)
    syscalls       admin       run code in discovery mode: which syscalls the profile lacks
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import __version__, errors, plan, protocol, quota, rootwhy
from .errors import RequestError
from .jail.profiles import NEVER_ALLOW
from .peer import Identity

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("sandboxd.run")


@dataclass
class Call:
    """One request being handled: who asked, what, and a way to send interim progress frames."""

    who: Identity
    req: dict[str, Any]
    progress: Callable[[dict[str, Any]], None]

    @property
    def id(self) -> Any:
        return self.req.get("id")


Handler = Callable[["Daemon", Call], Awaitable[dict[str, Any]]]


async def op_hello(app: Daemon, call: Call) -> dict[str, Any]:
    who = call.who
    limits = app.limits_for(who)
    return protocol.ok(call.id, server="sandboxd", version=__version__, protocol=protocol.PROTOCOL_VERSION,
                       uid=who.uid, user=who.name, admin=app.is_admin(who), quota=quota.limits_dict(limits))


async def op_run(app: Daemon, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, result=await execute(app, call.who, call.req))


async def execute(app: Daemon, who: Identity, req: dict[str, Any], discover: bool = False) -> dict[str, Any]:
    """Admit and run one request; the result record plus run_id (dispatch has checked that
    the daemon is not stopping)."""
    limits = app.limits_for(who)
    run_id = app.jail.new_run_id()
    run_plan = plan.build(req, limits, app.config, run_id)
    if discover:
        run_plan = replace(run_plan, discover=True)
    await app.admission.admit(who.uid, limits)
    started = time.time()
    app.usage.started(run_id, who.uid, started)
    status, cpu_ms = "internal", 0.0
    try:
        result = await app.jail.run(run_plan, caller_uid=who.uid)
        status, cpu_ms = result.status, result.cpu_ms
    except BaseException:
        status = "cancelled"
        raise
    finally:
        app.admission.release(who.uid)
        app.usage.finished(run_id, who.uid, cpu_ms, status, time.time())
        log.info("run %s uid=%d status=%s wall=%.1fms cpu=%.1fms", run_id, who.uid, status,
                 (time.time() - started) * 1000, cpu_ms)
    record = result.to_dict()
    record["run_id"] = run_id
    if result.status == "sandbox_error":
        log.error("run %s uid=%d sandbox error: %s", run_id, who.uid, result.error)
    return record


async def op_status(app: Daemon, call: Call) -> dict[str, Any]:
    return protocol.ok(call.id, **app.status(call.who))


async def op_usage(app: Daemon, call: Call) -> dict[str, Any]:
    who, req = call.who, call.req
    target = req.get("uid", req.get("user"))
    now = time.time()
    if req.get("all"):
        if not app.is_admin(who):
            raise errors.forbidden("the usage of all users is for admins")
        uids = app.usage.known_uids()
    elif target is None:
        uids = [who.uid]
    else:
        uid = app.resolve_uid(target)
        if uid != who.uid and not app.is_admin(who):
            raise errors.forbidden("the usage of other users is for admins")
        uids = [uid]
    entries = []
    for uid in uids:
        ident = app.identity_of(uid)
        limits = quota.effective_limits(app.config.quotas, ident)
        entries.append({
            "uid": uid, "user": ident.name, "usage": app.usage.snapshot(uid, now),
            "running": app.admission.running_by_uid.get(uid, 0), "queued": app.admission.queued_by_uid.get(uid, 0),
            "quota": quota.limits_dict(limits) if limits else None,
        })
    return protocol.ok(call.id, users=entries)


async def op_jobs(app: Daemon, call: Call) -> dict[str, Any]:
    now = time.monotonic()
    jobs = []
    for run_id, worker in list(app.jail.running.items()):
        p = worker.plan
        jobs.append({
            "run_id": run_id, "caller_uid": worker.caller_uid, "worker_pid": worker.pid,
            "run_uid": worker.slot.uid, "age_ms": round((now - (worker.started or now)) * 1000, 1),
            "timeout_ms": p.timeout_ms if p else None, "memory_mb": (p.memory_bytes >> 20) if p else None,
            "network": p.network if p else None, "language": p.language if p else None,
        })
    return protocol.ok(call.id, jobs=jobs, queued=len(app.admission.queue))


async def op_kill(app: Daemon, call: Call) -> dict[str, Any]:
    run_id = call.req.get("run_id")
    if not isinstance(run_id, str):
        raise errors.bad_request("run_id", "required, a string")
    worker = app.jail.running.get(run_id)
    if worker is None:
        raise RequestError(errors.NOT_FOUND, f"no run {run_id} is in flight", run_id=run_id)
    if worker.caller_uid != call.who.uid and not app.is_admin(call.who):
        raise errors.forbidden("only the run's owner or an admin may kill it")
    app.jail.kill_run(run_id)
    log.warning("run %s killed by uid %d", run_id, call.who.uid)
    return protocol.ok(call.id, killed=run_id)


async def op_reload(app: Daemon, call: Call) -> dict[str, Any]:
    changes = await app.reload()
    return protocol.ok(call.id, reloaded=True, changes=changes)


async def op_rebuild_root(app: Daemon, call: Call) -> dict[str, Any]:
    """Rebuild from the configured paths; with ``progress: true`` interim frames report the stages."""
    want = bool(call.req.get("progress"))

    def progress(stage: str, info: dict[str, Any]) -> None:
        if want:
            call.progress({"stage": stage, **{k: v for k, v in info.items() if k != "stage"}})

    info = await app.jail.rebuild_root(force=bool(call.req.get("force", True)), progress=progress)
    log.warning("root rebuilt by uid %d: %s", call.who.uid, info.build_id)
    return protocol.ok(call.id, root=info.summary())


async def op_syscalls(app: Daemon, call: Call) -> dict[str, Any]:
    """Run the code once with calls outside the profile recorded and let through (except the
    never-allowed ones, refused as always), inside the same confinement otherwise."""
    result = await execute(app, call.who, call.req, discover=True)
    profile = str(call.req.get("language", "python3"))
    seen = result.get("discovery") or {}
    missing = sorted(seen.get("allowed", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    refused = sorted(seen.get("refused", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    names = [name for name, _ in missing]
    yaml_snippet = "" if not names else (
        f"profiles:\n  {profile}:\n    allow: [{', '.join(sorted(names))}]\n")
    return protocol.ok(call.id, result=result, profile=profile,
                       missing=[{"name": n, "count": c} for n, c in missing],
                       refused=[{"name": n, "count": c, "why": "never allowed" if n in NEVER_ALLOW else
                                 "not a native system call"} for n, c in refused],
                       yaml=yaml_snippet)


async def op_root_why(app: Daemon, call: Call) -> dict[str, Any]:
    module = call.req.get("module")
    if not isinstance(module, str) or not module or not all(p.isidentifier() for p in module.split(".")):
        raise errors.bad_request("module", "required, a dotted module name like numpy.linalg")
    root = app.jail.root
    run_path = list(app.jail.forkserver_info.get("run_path") or [])
    if root is None:
        raise RequestError(errors.UNAVAILABLE, "the root is not built yet")
    report = rootwhy.explain(module, root.path, run_path, private_ok=app.is_admin(call.who))
    probe = {"code": f"import importlib\nm = importlib.import_module({module!r})\nprint(getattr(m, '__file__', m))",
             "timeout_ms": min(10000, int(app.limits_for(call.who).max_timeout * 1000))}
    result = await execute(app, call.who, probe)
    report["import"] = {"status": result["status"], "stdout": result["stdout"].decode("utf-8", "replace"),
                        "error": _last_line(result["stderr"]), "run_id": result["run_id"]}
    if result["status"] == "ok":
        report["importable"] = True
    else:
        report["importable"] = False
        if result.get("blocked_syscall"):
            report["advice"].append(f"importing it needs the system call {result['blocked_syscall']}: "
                                    "sandboxctl syscalls shows what to add to the profile")
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
TYPE_NAMES = {INT: "an integer", STR: "a string", BOOL: "true or false", (str, int): "a name or a uid"}


@dataclass(frozen=True)
class Op:
    access: str
    handler: Handler
    # The fields it takes, with their types; None where plan.py checks them (run, syscalls).
    fields: dict[str, tuple[type, ...]] | None = None
    while_stopping: bool = False  # answered during shutdown (status says it is stopping)


HANDLERS: dict[str, Op] = {
    "hello": Op(QUOTA, op_hello, {}),
    "run": Op(QUOTA, op_run),
    "status": Op(LISTED, op_status, {}, while_stopping=True),
    "usage": Op(LISTED, op_usage, {"uid": INT, "user": (str, int), "all": BOOL}),
    "kill": Op(LISTED, op_kill, {"run_id": STR}),
    "root_why": Op(QUOTA, op_root_why, {"module": STR}),
    "jobs": Op(ADMIN, op_jobs, {}),
    "reload": Op(ADMIN, op_reload, {}),
    "rebuild_root": Op(ADMIN, op_rebuild_root, {"progress": BOOL, "force": BOOL}),
    "syscalls": Op(ADMIN, op_syscalls),
}


def check_fields(op: Op, req: dict[Any, Any]) -> None:
    """Refuse fields the operation does not have, and values of the wrong type."""
    if op.fields is None:
        return
    plan.check_unknown(req, ("op", "id", *op.fields))
    for name, types in op.fields.items():
        value = req.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise errors.bad_request(name, f"expected {TYPE_NAMES[types]}, got {type(value).__name__}")


async def dispatch(app: Daemon, call: Call) -> dict[str, Any]:
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
