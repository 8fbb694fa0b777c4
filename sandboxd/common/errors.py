"""Stable error codes of the protocol, and the exception that carries one.

The codes are a contract (docs/protocol.md); ``sandboxctl`` maps them to exit codes.
"""

from __future__ import annotations

from typing import Any

BAD_FRAME = "bad_frame"
FRAME_TOO_LARGE = "frame_too_large"
BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
FORBIDDEN = "forbidden"
QUOTA_EXCEEDED = "quota_exceeded"
BUSY = "busy"
UNAVAILABLE = "unavailable"
NOT_FOUND = "not_found"
TOO_LARGE = "too_large"
BAD_CONFIG = "bad_config"
BUILD_FAILED = "build_failed"
INTERNAL = "internal"

CODES = (BAD_FRAME, FRAME_TOO_LARGE, BAD_REQUEST, UNKNOWN_OP, FORBIDDEN, QUOTA_EXCEEDED, BUSY, UNAVAILABLE,
         NOT_FOUND, TOO_LARGE, BAD_CONFIG, BUILD_FAILED, INTERNAL)


class RequestError(Exception):
    """A request failed with a stable code, a human message and details."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


def bad_request(field: str, message: str, **details: Any) -> RequestError:
    return RequestError(BAD_REQUEST, f"{field}: {message}", field=field, **details)


def forbidden(message: str, **details: Any) -> RequestError:
    return RequestError(FORBIDDEN, message, **details)
