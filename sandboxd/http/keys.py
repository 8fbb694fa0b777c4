"""The API key, checked in one place: by the routes (``app``) and by the connection gate
(``guard``, which keeps room for requests that carry it).  Constant time
(``hmac.compare_digest``); with ``no_auth`` every request passes."""

from __future__ import annotations

import hmac

from .settings import Settings


class Keys:
    def __init__(self, settings: Settings) -> None:
        self._key = settings.api_key.encode()
        self._open = settings.no_auth

    def accepts(self, given: bytes | None) -> bool:
        """Is ``given`` (the X-Api-Key header's bytes, None when absent) the key?"""
        if self._open:
            return True
        return hmac.compare_digest(given or b"", self._key)
