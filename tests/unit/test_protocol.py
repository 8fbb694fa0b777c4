"""Frames and envelopes."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxd.common import protocol


def test_roundtrip_keeps_text_and_bytes_apart() -> None:
    frame = protocol.encode({"code": "print(1)", "stdin": b"\x00\xff", "id": 7})
    n = protocol.frame_length(frame[:4], 1 << 20)
    assert n == len(frame) - 4
    assert protocol.decode_body(frame[4:]) == {"code": "print(1)", "stdin": b"\x00\xff", "id": 7}


def test_oversized_length_is_refused_before_reading() -> None:
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.frame_length((1 << 30).to_bytes(4, "big"), 16 << 20)
    assert e.value.code == "frame_too_large" and e.value.details == {"length": 1 << 30, "max_frame": 16 << 20}


@pytest.mark.parametrize("body", [b"", b"\x81", b"\xc1", msgpack.packb({"a": 1}) + b"\x00",
                                  msgpack.packb(msgpack.ExtType(1, b"x")), b"\x91" * 2000 + b"\xc0"])
def test_bad_bodies_are_bad_frames(body: bytes) -> None:
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.decode_body(body)
    assert e.value.code == "bad_frame"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_decoder_never_raises_anything_else(body: bytes) -> None:
    try:
        protocol.decode_body(body)
    except protocol.ProtocolError as e:
        assert e.code == "bad_frame"


def test_envelopes() -> None:
    assert protocol.ok(1, a=2) == {"id": 1, "ok": True, "a": 2}
    assert protocol.error("x", "busy", "full", retry_after_ms=5) == {
        "id": "x", "ok": False, "error": {"code": "busy", "message": "full", "retry_after_ms": 5}}
