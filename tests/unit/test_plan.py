"""Request validation: fields named, quota overreach forbidden, never silently capped."""

from __future__ import annotations

from typing import Any

import pytest

from sandboxd import plan
from sandboxd.common.errors import RequestError
from sandboxd.config import QuotaLimits, parse

CFG = parse({})
LIMITS = QuotaLimits(max_timeout=10.0, max_memory=512 << 20, max_output=4 << 20, max_files_size=1 << 20)


def build(**req: Any) -> Any:
    return plan.build({"op": "run", "code": "print(1)", **req}, LIMITS, CFG, "r1")


def fails(error_code: str, field: str, **req: Any) -> RequestError:
    with pytest.raises(RequestError) as e:
        build(**req)
    assert e.value.code == error_code, e.value.message
    assert e.value.details.get("field") == field, e.value.details
    return e.value


def test_defaults() -> None:
    p = build()
    assert (p.timeout_ms, p.cpu_ms, p.memory_bytes, p.network, p.output_bytes) == (5000, 5000, 256 << 20, False,
                                                                                     1 << 20)


def test_field_types_are_named() -> None:
    with pytest.raises(RequestError) as e:
        plan.build({"op": "run"}, LIMITS, CFG, "r")
    assert e.value.details["field"] == "code"
    fails("bad_request", "code", code=b"print(1)")
    fails("bad_request", "timeout_ms", timeout_ms="5")
    fails("bad_request", "timeout_ms", timeout_ms=0)
    fails("bad_request", "memory_mb", memory_mb=True)
    fails("bad_request", "network", network="yes")
    fails("bad_request", "stdin", stdin=5)
    fails("bad_request", "env", env={"1BAD": "x"})
    fails("bad_request", "env", env={"OK": "nul\0"})
    fails("bad_request", "files", files={"../up": b""})
    fails("bad_request", "files", files={"a": b"", "a/b": b""})
    fails("bad_request", "language", language="ruby")


def test_unknown_fields_are_named_with_a_suggestion() -> None:
    e = fails("bad_request", "timeout", timeout=5)
    assert "did you mean timeout_ms" in e.message


def test_over_quota_is_forbidden_never_capped() -> None:
    e = fails("forbidden", "timeout_ms", timeout_ms=10_001)
    assert e.details["limit"] == 10_000
    fails("forbidden", "memory_mb", memory_mb=513)
    fails("forbidden", "max_output", max_output=(4 << 20) + 1)
    fails("forbidden", "network", network=True)
    fails("forbidden", "files", files={"big": b"x" * ((1 << 20) + 1)})
    assert build(timeout_ms=10_000, memory_mb=512).memory_bytes == 512 << 20


def test_text_stdin_and_files_are_utf8() -> None:
    p = build(stdin="héllo", files={"a.txt": "ü"})
    assert p.stdin == "héllo".encode() and p.files == {"a.txt": "ü".encode()}


def test_a_proxy_runs_may_not_reach_is_refused_by_the_check_network_proxy_has() -> None:
    """Hardening item 10: a run's own proxy variables pass the same check as network.proxy."""
    import dataclasses

    from sandboxd.config import ConfigError

    with_network = dataclasses.replace(LIMITS, network=True)
    req = {"op": "run", "code": "print(1)", "network": True, "env": {"https_proxy": "http://127.0.0.1:3128"}}
    with pytest.raises(RequestError) as e:
        plan.build(req, with_network, CFG, "r")
    assert (e.value.code, e.value.details["field"], e.value.details["variable"]) == ("forbidden", "env", "https_proxy")
    assert "127.0.0.1 (loopback)" in e.value.message and "network.allow" in e.value.message
    assert plan.build({**req, "network": False}, with_network, CFG, "r").env == req["env"]  # no network: its own
    opened = parse({"network": {"allow": ["127.0.0.1/32"]}})
    assert plan.build(req, with_network, opened, "r").env["https_proxy"] == "http://127.0.0.1:3128"
    named = {**req, "env": {"HTTP_PROXY": "http://proxy.example:3128"}}  # a name: runs resolve it
    assert plan.build(named, with_network, CFG, "r").env["HTTP_PROXY"] == "http://proxy.example:3128"
    with pytest.raises(ConfigError) as c:
        parse({"network": {"proxy": "http://10.0.0.9:3128"}})
    assert any("network.proxy: runs may not reach 10.0.0.9 (RFC 1918 private)" in m for m in c.value.errors)
