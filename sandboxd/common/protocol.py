"""The wire format: length-prefixed msgpack maps, and the response envelopes.

    +----------------------+------------------------------+
    | N: uint32 big-endian | N bytes: one msgpack map      |
    +----------------------+------------------------------+

The length is checked against the maximum before the body is read, so an oversized
frame costs nothing.  Text is msgpack ``str``, byte data msgpack ``bin``.

``ProtocolError`` means the peer sent something malformed (it carries a stable error
code); ``ConnectionError`` means the peer went away.  The same framing carries the
jail's internal pipes (worker status, run requests), and ``FrameDecoder`` is the one
reader of it: the server, the client, the daemon's pipe readers and the runner all
feed it the bytes they read and take whole frames out.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import BAD_FRAME, FRAME_TOO_LARGE

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent a malformed frame or request."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


def encode(obj: Any) -> bytes:
    """One frame holding ``obj``."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes, max_frame: int) -> int:
    """Validate a 4-byte header; raise ``ProtocolError`` when it announces too much."""
    n: int = HEADER.unpack(header)[0]
    if n > max_frame:
        raise ProtocolError(FRAME_TOO_LARGE, f"frame of {n} bytes exceeds the maximum of {max_frame} bytes",
                            length=n, max_frame=max_frame)
    return n


class _TooManyContainers(ValueError):
    pass


def decode_body(body: bytes, max_frame: int = DEFAULT_MAX_FRAME, max_items: int | None = None,
                max_containers: int | None = None) -> Any:
    """Decode one msgpack object, refusing trailing bytes and extension types.

    ``max_items`` bounds the length of every array and map and ``max_containers`` their
    number (defaults: what the frame's bytes alone allow), so a hostile frame cannot make
    millions of objects.  msgpack itself refuses nesting deeper than about a thousand
    levels (``StackError``).
    """
    items = max_frame if max_items is None else max_items
    hooks: dict[str, Any] = {}
    if max_containers is not None:
        left = [max_containers]

        def count(obj: Any) -> Any:
            left[0] -= 1
            if left[0] < 0:
                raise _TooManyContainers(f"more than {max_containers} arrays and maps")
            return obj

        hooks = {"list_hook": count, "object_hook": count}
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        max_buffer_size=max(len(body), 1),
        max_str_len=max_frame,
        max_bin_len=max_frame,
        max_array_len=items,
        max_map_len=items,
        max_ext_len=0,
        **hooks,
    )
    unpacker.feed(body)
    try:
        obj = unpacker.unpack()
    except msgpack.OutOfData:
        raise ProtocolError(BAD_FRAME, "frame body is truncated msgpack") from None
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(BAD_FRAME, f"frame body is not valid msgpack: {e}") from None
    except Exception as e:  # noqa: BLE001 - msgpack raises assorted types for hostile input
        raise ProtocolError(BAD_FRAME, f"frame body is not valid msgpack: {type(e).__name__}") from None
    if unpacker.tell() != len(body):
        raise ProtocolError(BAD_FRAME, "frame holds trailing bytes after the msgpack object")
    return obj


class FrameDecoder:
    """Frames out of a byte stream, whatever size the pieces arrive in (no I/O of its own).

    ``feed`` what was read; ``next_body`` returns the next complete body or None.  The
    header is checked as soon as its four bytes are in (``frame_too_large``), before any
    of the body is asked for: ``wanted`` says how many bytes would complete the current
    frame, so a reader never pulls in more than one frame ahead.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.buf = bytearray()
        self.length: int | None = None  # body length of the frame in progress, once its header is in

    def feed(self, data: bytes) -> None:
        self.buf += data

    @property
    def buffered(self) -> int:
        return len(self.buf)

    def wanted(self) -> int:
        """Bytes still missing from the frame in progress (its header first)."""
        self._header()
        if self.length is None:
            return HEADER.size - len(self.buf)
        return max(0, HEADER.size + self.length - len(self.buf))

    def _header(self) -> None:
        if self.length is None and len(self.buf) >= HEADER.size:
            self.length = frame_length(bytes(self.buf[:HEADER.size]), self.max_frame)

    def next_body(self) -> bytes | None:
        self._header()
        if self.length is None or len(self.buf) < HEADER.size + self.length:
            return None
        end = HEADER.size + self.length
        body = bytes(self.buf[HEADER.size:end])
        del self.buf[:end]
        self.length = None
        return body

    def next_frame(self) -> Any:
        """The next decoded frame, or None when no whole frame is buffered."""
        body = self.next_body()
        return None if body is None else decode_body(body, self.max_frame)


def read_frame(read: Callable[[int], bytes], decoder: FrameDecoder) -> Any:
    """Block until ``decoder`` has a whole frame, reading with ``read(n)``; EOFError at the end."""
    while (body := decoder.next_body()) is None:
        chunk = read(min(max(decoder.wanted(), 1), 1 << 20))
        if not chunk:
            raise EOFError("the stream ended" + (" inside a frame" if decoder.buffered else ""))
        decoder.feed(chunk)
    return decode_body(body, decoder.max_frame)


def ok(request_id: Any, **fields: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, **fields}


MAX_ECHO = 256  # longest string (or bytes) of a request an error repeats back
MAX_MESSAGE = 1024


def error(request_id: Any, code: str, message: str, **details: Any) -> dict[str, Any]:
    """The failure envelope.  What it repeats of the request is cut short: an error must
    never be larger than a few KiB, whatever the request held."""
    return {"id": request_id, "ok": False,
            "error": {"code": code, "message": _cut(message, MAX_MESSAGE),
                      **{k: _bounded(v) for k, v in details.items()}}}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _bounded(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _cut(value, MAX_ECHO)
    if isinstance(value, bytes):
        return value[:MAX_ECHO]
    if isinstance(value, (list, tuple)):
        return [_bounded(v, depth + 1) for v in value[:64]] if depth < 3 else []
    if isinstance(value, dict):
        if depth >= 3:
            return {}
        return {_cut(str(k), MAX_ECHO): _bounded(v, depth + 1) for k, v in list(value.items())[:64]}
    return value
