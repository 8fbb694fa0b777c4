"""The protocol's operations.  Each declares who may call it, checked before it runs.

    hello          anyone      server, version, protocol, your uid and quota
    run            anyone      run code (quota applies)
    status         anyone      health, root, capacity, your usage (admins: everyone's)
    usage          anyone      usage against quota; another user's needs admin
    root_why       anyone      can MODULE be imported in the root, and if not why
    jobs           admin       runs in flight and queued
    kill           admin      kill a run by id (its owner may too)
    reload         admin       re-read the config file
    rebuild_root   admin       rebuild the root from the config's paths
    syscalls       admin       run code in discovery mode: which syscalls the profile lacks
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import __version__, errors, plan, protocol, quota
from .errors import RequestError
from .peer import Identity

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("sandboxd.run")
OPEN, ADMIN = "open", "admin"
Handler = Callable[["Daemon", Identity, dict[str, Any]], Awaitable[dict[str, Any]]]


async def op_hello(app: Daemon, who: Identity, req: dict[str, Any]) -> dict[str, Any]:
    limits = app.limits_for(who)
    return protocol.ok(req.get("id"), server="sandboxd", version=__version__, protocol=protocol.PROTOCOL_VERSION,
                       uid=who.uid, user=who.name, admin=app.is_admin(who), quota=quota.limits_dict(limits))


async def op_run(app: Daemon, who: Identity, req: dict[str, Any]) -> dict[str, Any]:
    result = await execute(app, who, req, discover=False)
    return protocol.ok(req.get("id"), result=result)


async def execute(app: Daemon, who: Identity, req: dict[str, Any], discover: bool) -> dict[str, Any]:
    """Admit and run one request; the result record plus run_id."""
    app.check_available()
    limits = app.limits_for(who)
    run_id = app.jail.new_run_id()
    run_plan = plan.build(req, limits, app.config, run_id)
    if discover:
        import dataclasses

        run_plan = dataclasses.replace(run_plan, discover=True)
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


async def op_status(app: Daemon, who: Identity, req: dict[str, Any]) -> dict[str, Any]:
    return protocol.ok(req.get("id"), **app.status(who))


async def op_usage(app: Daemon, who: Identity, req: dict[str, Any]) -> dict[str, Any]:
    target = req.get("uid", req.get("user"))
    now = time.time()
    if target is None:
        uids = [who.uid] if not (req.get("all") and app.is_admin(who)) else app.usage.known_uids()
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
    return protocol.ok(req.get("id"), users=entries)


async def op_jobs(app: Daemon, who: Identity, req: dict[str, Any]) -> dict[str, Any]:
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
    return protocol.ok(req.get("id"), jobs=jobs, queued=len(app.admission.queue))


async def op_kill(app: Daemon, who: Identity, req: dict[str, Any]) -> dict[str, Any]:
    run_id = req.get("run_id")
    if not isinstance(run_id, str):
        raise errors.bad_request("run_id", "required, a string")
    worker = app.jail.running.get(run_id)
    if worker is None:
        raise RequestError(errors.NOT_FOUND, f"no run {run_id} is in flight", run_id=run_id)
    if worker.caller_uid != who.uid and not app.is_admin(who):
        raise errors.forbidden("only the run's owner or an admin may kill it")
    app.jail.kill_run(run_id)
    log.warning("run %s killed by uid %d", run_id, who.uid)
    return protocol.ok(req.get("id"), killed=run_id)


async def op_reload(app: Daemon, who: Identity, req: dict[str, Any]) -> dict[str, Any]:
    changes = await app.reload()
    return protocol.ok(req.get("id"), reloaded=True, changes=changes)


async def op_rebuild_root(app: Daemon, who: Identity, req: dict[str, Any]) -> dict[str, Any]:
    info = await app.jail.rebuild_root(force=bool(req.get("force", True)))
    return protocol.ok(req.get("id"), root=info.summary())


HANDLERS: dict[str, tuple[str, Handler]] = {
    "hello": (OPEN, op_hello),
    "run": (OPEN, op_run),
    "status": (OPEN, op_status),
    "usage": (OPEN, op_usage),
    "jobs": (ADMIN, op_jobs),
    "kill": (OPEN, op_kill),
    "reload": (ADMIN, op_reload),
    "rebuild_root": (ADMIN, op_rebuild_root),
}


async def dispatch(app: Daemon, who: Identity, req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if not isinstance(op, str):
        raise errors.bad_request("op", "required, a string naming the operation", known=sorted(HANDLERS))
    entry = HANDLERS.get(op)
    if entry is None:
        raise RequestError(errors.UNKNOWN_OP, f"unknown operation {op!r}", known=sorted(HANDLERS))
    access, handler = entry
    if access == ADMIN and not app.is_admin(who):
        raise errors.forbidden(f"{op} is for root and members of the admin group")
    return await handler(app, who, req)
