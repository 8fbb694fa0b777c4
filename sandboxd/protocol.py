"""The wire format: length-prefixed msgpack maps, and the response envelopes.

    +----------------------+------------------------------+
    | N: uint32 big-endian | N bytes: one msgpack map      |
    +----------------------+------------------------------+

The length is checked against the maximum before the body is read, so an oversized
frame costs nothing.  Text is msgpack ``str``, byte data msgpack ``bin``.

``ProtocolError`` means the peer sent something malformed (it carries a stable error
code); ``ConnectionError`` means the peer went away.  The same framing carries the
jail's internal status pipe.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

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
        raise ProtocolError("frame_too_large", f"frame of {n} bytes exceeds the maximum of {max_frame} bytes",
                            length=n, max_frame=max_frame)
    return n


def decode_body(body: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> Any:
    """Decode one msgpack object, refusing trailing bytes and extension types.

    msgpack itself refuses nesting deeper than about a thousand levels (``StackError``).
    """
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        max_buffer_size=max(len(body), 1),
        max_str_len=max_frame,
        max_bin_len=max_frame,
        max_array_len=max_frame,
        max_map_len=max_frame,
        max_ext_len=0,
    )
    unpacker.feed(body)
    try:
        obj = unpacker.unpack()
    except msgpack.OutOfData:
        raise ProtocolError("bad_frame", "frame body is truncated msgpack") from None
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError("bad_frame", f"frame body is not valid msgpack: {e}") from None
    except Exception as e:  # noqa: BLE001 - msgpack raises assorted types for hostile input
        raise ProtocolError("bad_frame", f"frame body is not valid msgpack: {type(e).__name__}") from None
    if unpacker.tell() != len(body):
        raise ProtocolError("bad_frame", "frame holds trailing bytes after the msgpack object")
    return obj


def ok(request_id: Any, **fields: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, **fields}


def error(request_id: Any, code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message, **details}}
