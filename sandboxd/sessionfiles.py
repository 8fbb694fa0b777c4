"""Files in sessions: a request becomes a ``FilePlan``; what the kernel said becomes the answer.

    session_write_file {session_id, path, content, base64?, mode?, parents?}
    session_read_file  {session_id, path}
    session_list_files {session_id, path?, recursive?}

A path is relative to the session's /work: its components are checked here (no leading
``/``, no ``..``, no NUL, at most MAX_PARTS of at most 255 bytes each; empty and ``.``
components drop out) -- but that is only for a clear answer: what keeps an operation
inside /work is the kernel's resolution beneath it, link by link refused, done by a child
with the session's uid (``jail.child.files``).  Sizes are bounded by the caller's quota
(``max_files_size``, for a read and for a write) and, for a write, by what the session
has left: its scratch space and its memory, which the written file's pages become part of.
The child reports an errno and which component it concerns; ``answer`` words it with a
stable code naming the path:

    not_found   no such file or directory (``path``)
    bad_request a component is a symbolic link (``reason: symlink``), or not a directory; the
                target is a directory, or not a regular file (``kind``: fifo, socket...)
    forbidden   the session's own uid may not do it (the file's permissions)
    too_large   over max_files_size (``limit: max_files_size``), over the free scratch space
                (``limit: jail.scratch_size``), over the session's memory (``limit: memory_mb``)
    busy        the session has MAX_FILE_OPS in progress
    unavailable the session ended during it, or it could not be done in time
"""

from __future__ import annotations

import base64
import binascii
import errno
from collections.abc import Mapping
from typing import Any

from .common import errors, sizes
from .common.errors import RequestError, bad_request
from .common.hints import check_unknown
from .config import QuotaLimits
from .jail.spec.plans import FilePlan

ACTIONS = {"session_write_file": "write", "session_read_file": "read", "session_list_files": "list"}
FIELDS = {"write": ("path", "content", "base64", "mode", "parents"), "read": ("path",),
          "list": ("path", "recursive")}
MAX_PARTS = 32
MAX_PATH = 4096
VERBS = {"write": "write", "read": "read", "list": "list"}


def parts_of(path: Any, *, whole_work: bool) -> tuple[str, ...]:
    """The components of ``path`` below /work (``whole_work``: "" and "." may name /work itself)."""
    if path is None and whole_work:
        return ()
    if not isinstance(path, str):
        raise bad_request("path", "required, a path relative to the session's /work, like data/input.csv"
                          if path is None else f"expected a string, got {type(path).__name__}")
    if "\0" in path or len(path.encode("utf-8", "surrogatepass")) > MAX_PATH:
        raise bad_request("path", f"a path of at most {MAX_PATH} bytes without NUL")
    if path.startswith("/"):
        hint = path[len("/work/"):] if path.startswith("/work/") else ""
        raise bad_request("path", f"{path[:256]!r} is absolute: paths are relative to the session's /work"
                          + (f" (write {hint[:256]!r} for {path[:256]!r})" if hint else ""), reason="absolute")
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise bad_request("path", f"{path[:256]!r}: '..' is not allowed, paths stay beneath /work", reason="dotdot")
    if len(parts) > MAX_PARTS or any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts):
        raise bad_request("path", f"at most {MAX_PARTS} components of at most 255 bytes each")
    if not parts and not whole_work:
        raise bad_request("path", "names /work itself, not a file")
    return parts


def build(op: str, req: Mapping[str, Any], limits: QuotaLimits) -> FilePlan:
    """The plan of one file operation (``op`` is the protocol's name)."""
    action = ACTIONS[op]
    check_unknown(req, ("op", "id", "session_id", *FIELDS[action]))
    parts = parts_of(req.get("path"), whole_work=action == "list")
    cap = limits.max_files_size
    if action == "read":
        return FilePlan("read", parts, max_bytes=cap)
    if action == "list":
        return FilePlan("list", parts, recursive=_flag(req, "recursive"), max_bytes=cap)
    content = _content(req)
    if len(content) > cap:
        raise RequestError(errors.TOO_LARGE, f"content: {sizes.human_size(len(content))} ({len(content)} bytes) is "
                           f"above your limit of {sizes.human_size(cap)} (your quota's max_files_size)",
                           field="content", size=len(content), limit="max_files_size", max=cap)
    mode = req.get("mode", 0o644)
    if mode is None:
        mode = 0o644
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise bad_request("mode", f"permission bits from 0 to 0o777 (511), like 420 for 0o644; got {mode!r:.64}")
    parents = req.get("parents", True)
    if not isinstance(parents, bool):
        raise bad_request("parents", f"expected true or false, got {type(parents).__name__}")
    return FilePlan("write", parts, content=content, mode=mode, parents=parents, max_bytes=cap)


def _flag(req: Mapping[str, Any], name: str) -> bool:
    value = req.get(name, False)
    if value is not None and not isinstance(value, bool):
        raise bad_request(name, f"expected true or false, got {type(value).__name__}")
    return bool(value)


def _content(req: Mapping[str, Any]) -> bytes:
    """bytes (msgpack bin) as they are, a string as UTF-8, or with ``base64`` a string decoded."""
    content = req.get("content")
    if _flag(req, "base64"):
        if not isinstance(content, str):
            raise bad_request("content", "with base64: true, a string of base64")
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("content", "not valid base64 (RFC 4648, with padding)") from None
    if isinstance(content, str):
        return content.encode("utf-8", "surrogatepass")
    if not isinstance(content, bytes):
        raise bad_request("content", "required, bytes (msgpack bin) or a string" if content is None else
                          f"expected bytes (msgpack bin) or a string, got {type(content).__name__}")
    return content


def answer(plan: FilePlan, report: Mapping[str, Any], session_id: str) -> dict[str, Any]:
    """The answer's fields for the child's report; a RequestError when it refused."""
    if report.get("ok") is not True:
        raise refusal(plan, report, session_id)
    if plan.action == "write":
        return {"path": plan.path, "size": int(report["size"]), "mode": int(report["mode"])}
    if plan.action == "read":
        return {"path": plan.path, "content": bytes(report["content"]), "size": int(report["size"]),
                "mode": int(report["mode"]), "mtime": float(report["mtime"])}
    return {"path": plan.path, "entries": list(report["entries"]), "truncated": bool(report["truncated"])}


def refusal(plan: FilePlan, report: Mapping[str, Any], session_id: str) -> RequestError:
    err = report.get("errno")
    at = report.get("at")
    at = at if isinstance(at, int) and -1 <= at < len(plan.parts) else -1
    here = "/".join(plan.parts[:at + 1]) if at >= 0 else "."
    last = at == len(plan.parts) - 1
    path = plan.path
    details: dict[str, Any] = {"path": path, "session_id": session_id}
    if at >= 0:
        details["at"] = here
    if err == errno.ENOENT:
        what = f"no {path}" if last or plan.action == "list" else f"no directory {here}"
        return RequestError(errors.NOT_FOUND, f"{what} in the session's /work", **details)
    if err == errno.ELOOP:
        return bad_request("path", f"{here} is a symbolic link: file operations neither follow nor replace links",
                           reason="symlink", **details)
    if err == errno.ENOTDIR:
        return bad_request("path", f"{here} is not a directory", reason="not_a_directory", **details)
    if err == errno.EISDIR:
        return bad_request("path", f"{here} is a directory", reason="directory", **details)
    if err == errno.EINVAL and isinstance(report.get("kind"), str):
        kind = str(report["kind"])
        return bad_request("path", f"{here} is a {kind.replace('_', ' ')}, not a regular file", reason="not_a_file",
                           kind=kind, **details)
    if err == errno.EXDEV:
        return bad_request("path", f"{path} leads out of the session's /work", reason="outside", **details)
    if err == errno.ENAMETOOLONG:
        return bad_request("path", f"{here}: a name too long", **details)
    if err in (errno.EACCES, errno.EPERM) and at >= 0:
        return errors.forbidden(f"the session's own uid may not {VERBS[plan.action]} {here} (its permissions; "
                                "a cell can chmod it)", **details)
    if err == errno.EFBIG:
        size = report.get("size")
        return RequestError(errors.TOO_LARGE, f"{path} is {sizes.human_size(int(size or 0))} ({size} bytes), above "
                            f"your limit of {sizes.human_size(plan.max_bytes)} (your quota's max_files_size)",
                            size=size, limit="max_files_size", max=plan.max_bytes, **details)
    if err in (errno.ENOSPC, errno.EDQUOT):
        free = report.get("free")
        left = f" ({sizes.human_size(int(free))} free)" if isinstance(free, int) else ""
        return RequestError(errors.TOO_LARGE, f"{path}: {len(plan.content)} bytes do not fit in the session's "
                            f"/work{left}; its space is jail.scratch_size, shared with /tmp", size=len(plan.content),
                            limit="jail.scratch_size", free=free, **details)
    if err == errno.ENOMEM:
        free = int(report.get("free") or 0)
        return RequestError(errors.TOO_LARGE, f"{path}: {len(plan.content)} bytes would become the session's memory, "
                            f"which has {sizes.human_size(free)} left (a file in /work is memory): free some, or "
                            "open the session with a larger memory_mb", size=len(plan.content), limit="memory_mb",
                            free=free, **details)
    if err == errno.EBUSY:
        return RequestError(errors.BUSY, "the session has as many file operations in progress as it may; retry",
                            retry_after_ms=100, **details)
    if err == errno.ECANCELED:
        return RequestError(errors.UNAVAILABLE, "the session ended during the file operation", **details)
    if err == errno.ETIMEDOUT:
        return RequestError(errors.UNAVAILABLE, "the file operation did not finish in time; the session may be "
                            "stopped or out of memory", **details)
    if err == errno.EAGAIN:
        return RequestError(errors.UNAVAILABLE, "the file operation could not be started; retry",
                            retry_after_ms=1000, **details)
    name = errno.errorcode.get(err, str(err)) if isinstance(err, int) else "?"
    why = f" ({str(report['setup'])[:256]})" if report.get("setup") else ""
    return RequestError(errors.INTERNAL, f"{plan.action} {path}: {name}{why}", errno=name, **details)
