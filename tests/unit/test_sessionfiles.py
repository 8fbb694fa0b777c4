"""sessionfiles: file requests checked into plans, and the kernel's answers worded (no daemon)."""

from __future__ import annotations

import base64
import errno
from typing import Any

import pytest

from sandboxd.common.errors import RequestError
from sandboxd.config import QuotaLimits
from sandboxd.jail.spec.plans import FilePlan
from sandboxd.sessionfiles import answer, build, parts_of

LIMITS = QuotaLimits(max_files_size=1 << 20)


def err(fn: Any, *args: Any, **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("path, parts", [("a", ("a",)), ("a/b/c.txt", ("a", "b", "c.txt")), ("./a//b/", ("a", "b")),
                                         ("..a/b..", ("..a", "b..")), ("é/\u202e", ("é", "\u202e"))])
def test_plain_relative_paths_become_components(path: str, parts: tuple[str, ...]) -> None:
    assert parts_of(path, whole_work=False) == parts


@pytest.mark.parametrize("path, reason", [("/etc/passwd", "absolute"), ("/work/x", "absolute"), ("../x", "dotdot"),
                                          ("a/../../x", "dotdot"), ("a/..", "dotdot")])
def test_paths_out_of_work_are_refused_by_name(path: str, reason: str) -> None:
    e = err(parts_of, path, whole_work=True)
    assert (e.code, e.details["field"], e.details["reason"]) == ("bad_request", "path", reason)


def test_an_absolute_path_under_work_says_what_to_write() -> None:
    assert "'data.csv'" in err(parts_of, "/work/data.csv", whole_work=False).message


@pytest.mark.parametrize("path", ["", ".", "./", None, 3, "a\0b", "x" * 256, "/".join("d" * 33), "é" * 2049])
def test_what_is_not_a_file_path_is_refused(path: Any) -> None:
    assert err(parts_of, path, whole_work=False).details["field"] == "path"


def test_a_listing_may_name_work_itself() -> None:
    assert parts_of(None, whole_work=True) == parts_of(".", whole_work=True) == ()


def test_a_write_plan_takes_bytes_text_and_base64() -> None:
    req = {"op": "session_write_file", "session_id": "s", "path": "a/b"}
    assert build("session_write_file", {**req, "content": b"\0\1"}, LIMITS).content == b"\0\1"
    assert build("session_write_file", {**req, "content": "é"}, LIMITS).content == "é".encode()
    plan = build("session_write_file", {**req, "content": base64.b64encode(b"\xff").decode(), "base64": True,
                                        "mode": 0o600, "parents": False}, LIMITS)
    assert (plan.content, plan.mode, plan.parents, plan.parts) == (b"\xff", 0o600, False, ("a", "b"))
    assert build("session_write_file", {**req, "content": b""}, LIMITS).mode == 0o644


@pytest.mark.parametrize("extra, field", [({"content": None}, "content"), ({"content": 5}, "content"),
                                          ({"content": b"x", "base64": True}, "content"),
                                          ({"content": "!!", "base64": True}, "content"),
                                          ({"content": b"", "mode": 0o1777}, "mode"),
                                          ({"content": b"", "mode": "644"}, "mode"),
                                          ({"content": b"", "mode": True}, "mode"),
                                          ({"content": b"", "parents": 1}, "parents"),
                                          ({"content": b"", "overwrite": True}, "overwrite")])
def test_a_bad_write_names_its_field(extra: dict[str, Any], field: str) -> None:
    e = err(build, "session_write_file", {"path": "x", **extra}, LIMITS)
    assert (e.code, e.details["field"]) == ("bad_request", field)


def test_content_past_max_files_size_is_too_large() -> None:
    e = err(build, "session_write_file", {"path": "x", "content": b"x" * ((1 << 20) + 1)}, LIMITS)
    assert (e.code, e.details["limit"], e.details["max"]) == ("too_large", "max_files_size", 1 << 20)


def test_read_and_list_plans() -> None:
    assert build("session_read_file", {"path": "a"}, LIMITS) == FilePlan("read", ("a",), max_bytes=1 << 20)
    assert build("session_list_files", {}, LIMITS).parts == ()
    assert build("session_list_files", {"path": "d", "recursive": True}, LIMITS).recursive
    assert err(build, "session_read_file", {"path": "a", "recursive": True}, LIMITS).details["field"] == "recursive"


PLAN = FilePlan("write", ("dir", "sub", "f.txt"), content=b"x" * 10)


@pytest.mark.parametrize("report, code, reason", [
    ({"errno": errno.ENOENT, "at": 2}, "not_found", None),
    ({"errno": errno.ENOENT, "at": 0}, "not_found", None),
    ({"errno": errno.ELOOP, "at": 1}, "bad_request", "symlink"),
    ({"errno": errno.ENOTDIR, "at": 0}, "bad_request", "not_a_directory"),
    ({"errno": errno.EISDIR, "at": 2}, "bad_request", "directory"),
    ({"errno": errno.EINVAL, "at": 2, "kind": "fifo"}, "bad_request", "not_a_file"),
    ({"errno": errno.EXDEV, "at": 1}, "bad_request", "outside"),
    ({"errno": errno.EACCES, "at": 1}, "forbidden", None),
    ({"errno": errno.EFBIG, "at": 2, "size": 5 << 20}, "too_large", None),
    ({"errno": errno.ENOSPC, "at": 2, "free": 3}, "too_large", None),
    ({"errno": errno.ENOMEM, "at": 2, "free": 3}, "too_large", None),
    ({"errno": errno.EBUSY, "at": -1}, "busy", None),
    ({"errno": errno.ECANCELED, "at": -1}, "unavailable", None),
    ({"errno": errno.ETIMEDOUT, "at": -1}, "unavailable", None),
    ({"errno": errno.EIO, "at": 7}, "internal", None),  # (an ``at`` out of range names no component)
    ({"errno": errno.EACCES, "at": -1, "setup": "x"}, "internal", None),
])
def test_what_the_kernel_said_has_a_stable_code(report: dict[str, Any], code: str, reason: str | None) -> None:
    e = err(answer, PLAN, {"ok": False, **report}, "sid")
    assert (e.code, e.details.get("reason"), e.details["path"], e.details["session_id"]) == \
        (code, reason, "dir/sub/f.txt", "sid")


def test_refusals_name_the_component_they_concern() -> None:
    e = err(answer, PLAN, {"ok": False, "errno": errno.ELOOP, "at": 1}, "sid")
    assert e.details["at"] == "dir/sub" and e.message.startswith("path: dir/sub is a symbolic link")
    assert "no directory dir " in err(answer, PLAN, {"ok": False, "errno": errno.ENOENT, "at": 0}, "s").message
    limits = {"EFBIG": "max_files_size", "ENOSPC": "jail.scratch_size", "ENOMEM": "memory_mb"}
    for name, limit in limits.items():
        assert err(answer, PLAN, {"ok": False, "errno": getattr(errno, name), "at": 2}, "s").details["limit"] == limit


def test_answers_of_each_action() -> None:
    assert answer(PLAN, {"ok": True, "size": 10, "mode": 0o644}, "s") == {"path": "dir/sub/f.txt", "size": 10,
                                                                          "mode": 0o644}
    read = FilePlan("read", ("f",))
    got = answer(read, {"ok": True, "content": b"ab", "size": 2, "mode": 0o600, "mtime": 1.5}, "s")
    assert got == {"path": "f", "content": b"ab", "size": 2, "mode": 0o600, "mtime": 1.5}
    listing = answer(FilePlan("list", ()), {"ok": True, "entries": [], "truncated": False}, "s")
    assert listing == {"path": ".", "entries": [], "truncated": False}
