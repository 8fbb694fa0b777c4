"""systemd glue: socket activation and sd_notify.  Both are no-ops outside systemd."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

log = logging.getLogger(__name__)
SD_LISTEN_FDS_START = 3


def listen_fds(unset: bool = True) -> list[int]:
    """File descriptors passed by socket activation (LISTEN_PID must be us)."""
    fds: list[int] = []
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        try:
            count = int(os.environ.get("LISTEN_FDS", "0"))
        except ValueError:
            count = 0
        fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    return fds


def activated_unix_socket(fds: list[int]) -> socket.socket | None:
    for fd in fds:
        sock = socket.socket(fileno=fd)
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            for other in fds:
                if other != fd:
                    os.close(other)
            return sock
        sock.detach()
    return None


class Notifier:
    """sd_notify through the ``sdnotify`` package; silent when NOTIFY_SOCKET is unset."""

    def __init__(self) -> None:
        self._sd: Any = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._sd = sdnotify.SystemdNotifier()

    @property
    def enabled(self) -> bool:
        return self._sd is not None

    def notify(self, **fields: object) -> None:
        if self._sd is None:
            return
        self._sd.notify("\n".join(f"{k.upper()}={v}" for k, v in fields.items()))

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half the watchdog period when systemd asks for pings (WATCHDOG_USEC), else None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1e6 / 2
        except ValueError:
            return None
