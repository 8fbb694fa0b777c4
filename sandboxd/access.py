"""Who a caller is to the daemon: an admin or not, and the quota that applies to them.

    access.limits(who)     the caller's effective limits (None: deny_unlisted refuses them)
    access.require(who)    the same, or ``forbidden``
    access.is_admin(who)   root, or a member of daemon.admin_group

Computed once per request (``handlers.serve``) and carried down in the ``Call``.
"""

from __future__ import annotations

import pwd
from typing import Any

from . import quota
from .common import errors
from .common.errors import RequestError
from .config import Config, QuotaLimits
from .peer import Identity, PeerCred, identify

MAX_UID = 2**32 - 1  # (uid_t)-1 means "no uid"
MAX_NAME = 256  # longest name a field may hold (names go to NSS: nss-systemd aborts on a 4 MiB one)


class Access:
    def __init__(self, config: Config) -> None:
        self.config = config

    def configure(self, config: Config) -> None:
        self.config = config

    def is_admin(self, who: Identity) -> bool:
        return who.uid == 0 or who.in_group(self.config.daemon.admin_group)

    def limits(self, who: Identity) -> QuotaLimits | None:
        return quota.effective_limits(self.config.quotas, who)

    def require(self, who: Identity, limits: QuotaLimits | None) -> QuotaLimits:
        if limits is None:
            raise errors.forbidden(f"user {who.name} (uid {who.uid}) is not allowed to use sandboxd here")
        return limits

    def rate_limits(self, limits: QuotaLimits | None) -> QuotaLimits:
        """The limits refusals are counted against (an unlisted caller's: the default's)."""
        return limits or self.config.quotas.default

    def identity_of(self, uid: int) -> Identity:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
        return identify(PeerCred(0, uid, gid))

    def resolve_uid(self, target: Any) -> int:
        """A uid from a field that holds a uid or a user name."""
        uid: int | None = None
        if isinstance(target, int) and not isinstance(target, bool):
            uid = target
        elif isinstance(target, str) and target.isascii() and target.isdigit():
            uid = int(target)
        if uid is not None:
            if not 0 <= uid < MAX_UID:
                raise errors.bad_request("uid", f"a uid is between 0 and {MAX_UID - 1}")
            return uid
        if isinstance(target, str) and len(target) <= MAX_NAME:
            try:
                return pwd.getpwnam(target).pw_uid
            except KeyError:
                raise RequestError(errors.NOT_FOUND, f"no user {target!r}", user=target) from None
        raise errors.bad_request("uid", "expected a uid or a user name")
