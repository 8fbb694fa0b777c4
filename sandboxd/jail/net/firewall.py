"""The host side of the runs' network: the daemon's nftables table, and IPv4 forwarding.

Applied with Debian's libnftables binding (``python3-nftables``, JSON commands, one
transaction each): the table is made at start -- replacing one a killed daemon left --
and deleted at stop.  Forwarding is host-wide (``net.ipv4.ip_forward``): if it is off,
the first sandboxd turns it on, its tables drop every forwarded packet that does not
involve a run interface (so the host still routes nothing else), and the last one to
stop turns it off again.  Which daemons use it is kept in ``STATE`` (flock'ed), which
also holds one lock per address pool: two daemons never share a pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from ...common.process import try_lock
from . import netpolicy

log = logging.getLogger(__name__)
FORWARDING = "/proc/sys/net/ipv4/ip_forward"
STATE = "/run/sandboxd-network"  # host-wide: shared by every sandboxd on this host


class FirewallError(Exception):
    pass


def names(pool: str) -> tuple[str, str]:
    """(nftables table, interface prefix) of the daemon using ``pool``: distinct per pool, and every
    sandboxd's interface prefix starts with ``netpolicy.RUNS_PREFIX``."""
    tag = hashlib.sha256(pool.encode()).hexdigest()[:4]
    return f"sandboxd_{tag}", f"{netpolicy.RUNS_PREFIX}{tag}"


class Firewall:
    def __init__(self, pool: str, policy: netpolicy.Policy, max_connections: int = 512) -> None:
        self.pool = pool
        self.policy = policy
        self.max_connections = max_connections
        self.table, self.iface_prefix = names(pool)
        self.guard = False
        self._pool_lock = -1
        import nftables  # Debian's python3-nftables; only a daemon that gives runs network needs it

        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)

    def _run(self, cmds: list[dict[str, Any]]) -> None:
        rc, _out, err = self.nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise FirewallError(f"nftables refused the {self.table} table: {err.strip()}")

    def start(self) -> None:
        os.makedirs(os.path.join(STATE, "users"), mode=0o700, exist_ok=True)
        self._lock_pool()
        self._check_pool()
        with _state_lock():
            if _read(FORWARDING) != "1":
                try:
                    _write(FORWARDING, "1")
                except OSError as e:
                    raise FirewallError(f"cannot turn on {FORWARDING} ({e.strerror}): runs with network need the "
                                        "host to forward their packets (under systemd, ProtectKernelTunables makes "
                                        "/proc/sys read-only: the shipped unit opens this file with "
                                        "ReadWritePaths=)") from None
                _touch(os.path.join(STATE, "was_off"))
                log.warning("net.ipv4.ip_forward was 0: turned it on for runs with network; the %s table drops "
                            "every other forwarded packet, and it is turned off again when the last sandboxd stops",
                            self.table)
            _touch(os.path.join(STATE, "users", self.table))
            self.guard = os.path.exists(os.path.join(STATE, "was_off"))
        self._run(netpolicy.ruleset(self.table, self.iface_prefix, self.pool, self.policy, self.guard,
                                    self.max_connections))

    def stop(self) -> None:
        try:
            self._run(netpolicy.delete(self.table))
        except FirewallError as e:
            log.error("%s", e)
        with _state_lock():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(STATE, "users", self.table))
            was_off = os.path.join(STATE, "was_off")
            if not os.listdir(os.path.join(STATE, "users")) and os.path.exists(was_off):
                _write(FORWARDING, "0")
                os.unlink(was_off)
                log.info("net.ipv4.ip_forward back to 0")
        if self._pool_lock >= 0:
            os.close(self._pool_lock)
            self._pool_lock = -1

    def _lock_pool(self) -> None:
        fd = try_lock(os.path.join(STATE, f"{self.table}.lock"), create=True)
        if fd is None:
            raise FirewallError(f"another sandboxd uses the address pool {self.pool}; give each daemon its own "
                                "network.pool")
        self._pool_lock = fd

    def _check_pool(self) -> None:
        """The pool must not overlap a network the host already has (its routes would clash)."""
        pool = ipaddress.ip_network(self.pool)
        for iface, dest in host_routes():
            if iface.startswith(self.iface_prefix):
                continue  # ours, left by a daemon of this pool that was killed (going away)
            if dest.version == 4 and dest.prefixlen > 0 and dest.overlaps(pool):  # type: ignore[arg-type]
                raise FirewallError(f"network.pool {self.pool} overlaps {dest}, a network of this host; choose "
                                    "another pool")

    def describe(self) -> dict[str, Any]:
        sets = self.policy.sets()
        return {"table": self.table, "interfaces": self.iface_prefix + "*", "pool": self.pool,
                "forwarding_guard": self.guard, "max_connections_per_run": self.max_connections,
                "allow": [str(n) for n in sets["allow4"] + sets["allow6"]],
                "deny": [str(n) for n in self.policy.extra_deny],
                "default_deny": dict(netpolicy.DEFAULT_DENY)}


def host_routes() -> list[tuple[str, netpolicy.IPNetwork]]:
    """(interface, destination) of the host's IPv4 routes (main table), from /proc/net/route."""
    out: list[tuple[str, netpolicy.IPNetwork]] = []
    try:
        with open("/proc/net/route", encoding="ascii") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) >= 8:
                    dest = ipaddress.IPv4Address(int(parts[1], 16).to_bytes(4, "little"))
                    mask = ipaddress.IPv4Address(int(parts[7], 16).to_bytes(4, "little"))
                    out.append((parts[0], ipaddress.ip_network(f"{dest}/{mask}", strict=False)))
    except OSError:
        pass
    return out


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    fd = os.open(STATE, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _touch(path: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(json.dumps({"pid": os.getpid()}))
