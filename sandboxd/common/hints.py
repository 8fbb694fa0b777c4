"""Did-you-mean: the one place that suggests a known name for a mistyped one.

Used for request fields (``bad_request``) and for configuration keys and sections.
Suggestions are only computed for short names: matching a long string against the
known ones costs time quadratic in its length, and nobody mistypes 100 characters.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import bad_request

MAX_HINTED = 64  # longest name a suggestion is computed for


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` for a near miss, else an empty string."""
    if len(name) > MAX_HINTED:
        return ""
    hint = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {hint[0]}?)" if hint else ""


def check_unknown(req: Mapping[Any, Any], known: Sequence[str]) -> None:
    """Refuse a field the operation does not have, naming it (and the closest known one)."""
    for key in req:
        if not isinstance(key, str):
            raise bad_request(repr(key)[:MAX_HINTED], "field names are strings")
        if key not in known:
            raise bad_request(key, "unknown field" + did_you_mean(key, known), known=list(known))
