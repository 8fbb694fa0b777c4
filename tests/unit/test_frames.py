"""FrameDecoder, read_frame and decode_body's limits, without sockets."""

from __future__ import annotations

import io
from typing import Any

import msgpack
import pytest

from sandboxd.common.errors import BAD_FRAME, FRAME_TOO_LARGE
from sandboxd.common.protocol import HEADER, FrameDecoder, ProtocolError, decode_body, encode, read_frame

MAX = 1 << 16

FRAMES: list[Any] = [
    {"op": "run", "code": "print(1)", "data": b"\x00\xff" * 10},
    {},
    {"id": 7, "nested": {"a": [1, 2, [3, {"b": None}]]}, "text": "héllo"},
]


def header(n: int) -> bytes:
    return HEADER.pack(n)


def drain(decoder: FrameDecoder) -> list[Any]:
    out = []
    while (obj := decoder.next_frame()) is not None:
        out.append(obj)
    return out


# --- FrameDecoder -------------------------------------------------------------------------


def test_frames_fed_one_byte_at_a_time() -> None:
    d = FrameDecoder(MAX)
    stream = b"".join(encode(f) for f in FRAMES)
    got: list[Any] = []
    for i in range(len(stream)):
        d.feed(stream[i:i + 1])
        got.extend(drain(d))
    assert got == FRAMES
    assert d.buffered == 0 and d.wanted() == HEADER.size


def test_several_frames_in_one_feed() -> None:
    d = FrameDecoder(MAX)
    d.feed(b"".join(encode(f) for f in FRAMES) + encode({"partial": True})[:5])
    assert drain(d) == FRAMES
    assert d.buffered == 5
    assert d.next_body() is None


def test_pieces_of_any_size() -> None:
    stream = b"".join(encode(f) for f in FRAMES * 3)
    for size in (2, 3, 7, 64, 1000):
        d = FrameDecoder(MAX)
        got: list[Any] = []
        for i in range(0, len(stream), size):
            d.feed(stream[i:i + size])
            got.extend(drain(d))
        assert got == FRAMES * 3, size


def test_wanted_before_and_after_the_header() -> None:
    frame = encode({"x": "y" * 100})
    body_len = len(frame) - HEADER.size
    d = FrameDecoder(MAX)
    assert d.wanted() == 4
    d.feed(frame[:1])
    assert d.wanted() == 3
    d.feed(frame[1:4])
    assert d.wanted() == body_len
    d.feed(frame[4:10])
    assert d.wanted() == body_len - 6
    d.feed(frame[10:])
    assert d.wanted() == 0
    assert d.next_frame() == {"x": "y" * 100}
    assert d.wanted() == 4


def test_wanted_never_asks_past_the_current_frame() -> None:
    first, second = encode({"a": 1}), encode({"b": "x" * 50})
    d = FrameDecoder(MAX)
    d.feed(first + second[:2])
    assert d.wanted() == 0  # the first frame is whole: nothing more for it, however little of the next is in
    assert d.next_frame() == {"a": 1}
    assert d.wanted() == 2  # the rest of the second header
    d.feed(second[2:4])
    assert d.wanted() == len(second) - HEADER.size


def test_an_empty_body_is_a_complete_frame() -> None:
    d = FrameDecoder(MAX)
    d.feed(header(0))
    assert d.wanted() == 0
    assert d.next_body() == b""


def test_frame_too_large_as_soon_as_the_header_is_in() -> None:
    d = FrameDecoder(MAX)
    d.feed(header(MAX + 1)[:3])
    assert d.wanted() == 1  # not yet known
    assert d.next_body() is None
    d.feed(header(MAX + 1)[3:])
    with pytest.raises(ProtocolError) as info:
        d.wanted()
    assert info.value.code == FRAME_TOO_LARGE
    assert info.value.details == {"length": MAX + 1, "max_frame": MAX}
    with pytest.raises(ProtocolError) as again:
        d.next_body()
    assert again.value.code == FRAME_TOO_LARGE


def test_frame_too_large_from_next_frame_without_any_body() -> None:
    d = FrameDecoder(100)
    d.feed(header(2**32 - 1))
    with pytest.raises(ProtocolError) as info:
        d.next_frame()
    assert info.value.code == FRAME_TOO_LARGE


def test_a_frame_of_exactly_the_maximum_is_accepted() -> None:
    body = msgpack.packb(b"x" * 50, use_bin_type=True)
    d = FrameDecoder(len(body))
    d.feed(header(len(body)) + body)
    assert d.next_frame() == b"x" * 50


def test_a_bad_body_is_a_bad_frame_and_is_consumed() -> None:
    d = FrameDecoder(MAX)
    d.feed(header(1) + b"\xc1" + encode({"next": 1}))  # 0xc1 is never valid msgpack
    with pytest.raises(ProtocolError) as info:
        d.next_frame()
    assert info.value.code == BAD_FRAME
    assert d.next_frame() == {"next": 1}


def test_next_frame_refuses_trailing_bytes_in_a_body() -> None:
    body = msgpack.packb({"a": 1}) + b"\x01"
    d = FrameDecoder(MAX)
    d.feed(header(len(body)) + body)
    with pytest.raises(ProtocolError) as info:
        d.next_frame()
    assert info.value.code == BAD_FRAME


# --- read_frame ---------------------------------------------------------------------------


class Reader:
    """A blocking read(n) over bytes, recording what was asked, at most ``chunk`` bytes a call."""

    def __init__(self, data: bytes, chunk: int = 1 << 30) -> None:
        self.stream = io.BytesIO(data)
        self.chunk = chunk
        self.asked: list[int] = []

    def read(self, n: int) -> bytes:
        self.asked.append(n)
        return self.stream.read(min(n, self.chunk))


def test_read_frame_reads_exactly_one_frame() -> None:
    first, second = encode(FRAMES[0]), encode(FRAMES[2])
    r = Reader(first + second)
    d = FrameDecoder(MAX)
    assert read_frame(r.read, d) == FRAMES[0]
    assert r.stream.tell() == len(first)  # nothing of the next frame was pulled in
    assert r.asked == [4, len(first) - 4]
    assert read_frame(r.read, d) == FRAMES[2]
    assert r.stream.tell() == len(first) + len(second)


def test_read_frame_with_short_reads() -> None:
    stream = b"".join(encode(f) for f in FRAMES)
    r = Reader(stream, chunk=3)
    d = FrameDecoder(MAX)
    assert [read_frame(r.read, d) for _ in FRAMES] == FRAMES
    assert all(n >= 1 for n in r.asked)


def test_read_frame_uses_what_is_buffered_first() -> None:
    d = FrameDecoder(MAX)
    d.feed(encode({"buffered": 1}))
    r = Reader(b"")
    assert read_frame(r.read, d) == {"buffered": 1}
    assert r.asked == []


def test_read_frame_asks_at_most_a_mebibyte_at_a_time() -> None:
    body = msgpack.packb(b"z" * (3 << 20), use_bin_type=True)
    r = Reader(header(len(body)) + body)
    assert read_frame(r.read, FrameDecoder(8 << 20)) == b"z" * (3 << 20)
    assert max(r.asked) == 1 << 20


def test_read_frame_eof_at_a_clean_end() -> None:
    r = Reader(encode({"a": 1}))
    d = FrameDecoder(MAX)
    assert read_frame(r.read, d) == {"a": 1}
    with pytest.raises(EOFError) as info:
        read_frame(r.read, d)
    assert str(info.value) == "the stream ended"


@pytest.mark.parametrize("cut", [1, 3, 4, 6])
def test_read_frame_eof_inside_a_frame(cut: int) -> None:
    frame = encode({"a": "bcdef"})
    assert cut < len(frame)
    with pytest.raises(EOFError) as info:
        read_frame(Reader(frame[:cut]).read, FrameDecoder(MAX))
    assert str(info.value) == "the stream ended inside a frame"


def test_read_frame_refuses_a_large_frame_before_reading_its_body() -> None:
    r = Reader(header(MAX + 1) + b"\x00" * 64)
    with pytest.raises(ProtocolError) as info:
        read_frame(r.read, FrameDecoder(MAX))
    assert info.value.code == FRAME_TOO_LARGE
    assert r.stream.tell() == HEADER.size


# --- decode_body limits -------------------------------------------------------------------


def packed(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def bad(body: bytes, **limits: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_body(body, **limits)
    assert info.value.code == BAD_FRAME
    return info.value


def test_max_items_bounds_maps() -> None:
    m = {str(i): i for i in range(5)}
    assert decode_body(packed(m), max_items=5) == m
    bad(packed(m), max_items=4)


def test_max_items_bounds_arrays_and_nested_ones() -> None:
    assert decode_body(packed([1, 2, 3]), max_items=3) == [1, 2, 3]
    bad(packed([1, 2, 3]), max_items=2)
    bad(packed({"a": [0] * 10}), max_items=9)
    assert decode_body(packed({"a": [0] * 10}), max_items=10) == {"a": [0] * 10}


def test_max_containers_bounds_nested_arrays() -> None:
    nested: Any = [[[[]]]]  # four arrays
    assert decode_body(packed(nested), max_containers=4) == nested
    err = bad(packed(nested), max_containers=3)
    assert "3" in err.message


def test_max_containers_counts_maps_and_arrays_together() -> None:
    obj = {"a": {"b": [1]}, "c": [{}]}  # maps: outer, a, the empty one; arrays: two
    assert decode_body(packed(obj), max_containers=5) == obj
    bad(packed(obj), max_containers=4)


def test_max_containers_counts_siblings_too() -> None:
    obj: list[list[int]] = [[] for _ in range(10)]  # eleven arrays, none nested deeper than one
    assert decode_body(packed(obj), max_containers=11) == obj
    bad(packed(obj), max_containers=10)


def test_scalars_need_no_containers() -> None:
    assert decode_body(packed("text"), max_containers=0) == "text"
    bad(packed({}), max_containers=0)


def test_without_limits_big_frames_decode() -> None:
    obj = {"k": [[i] for i in range(1000)]}
    assert decode_body(packed(obj)) == obj


def test_decode_body_refuses_extension_types_and_truncation() -> None:
    bad(msgpack.packb(msgpack.ExtType(1, b"xx")))
    bad(packed({"a": "bcdef"})[:-2])
    bad(b"")
