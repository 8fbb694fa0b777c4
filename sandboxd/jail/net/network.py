"""Runs' network on the daemon's side: the firewall, the namespace helper, the addresses.

Started only when some quota lets runs ask for network.  Each network worker takes a
*lease* before it is spawned: a block of four addresses of ``network.pool``, an
interface name, and a ready namespace from the helper (``netns``).  The lease is given
back after the worker is gone: its fd closed (so the kernel destroys the namespace and
the interface pair), its addresses free for reuse.  Counters of a run are read from
the host's end of its pair while the lease still holds the namespace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from ..spec.sections import NetworkSettings
from . import netpolicy
from .firewall import Firewall
from .netns import NetnsClient

log = logging.getLogger(__name__)
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@dataclass
class Lease:
    fd: int  # the namespace; closed when the worker is done
    ifname: str  # the host's end of the veth pair
    block: int
    host: str
    run: str


class Network:
    def __init__(self, settings: NetworkSettings, python: str) -> None:
        self.settings = settings
        self.python = python
        self.policy = netpolicy.Policy(settings.allow, settings.deny)
        self.firewall = Firewall(settings.pool, self.policy, settings.max_connections_per_run)
        self.forgetting: set[asyncio.Task[None]] = set()  # conntrack clean-ups of released addresses
        self.blocks = netpolicy.Blocks(settings.pool)
        self.helper = NetnsClient(python, ENV)
        self.seq = 0
        self.live = 0

    async def start(self) -> None:
        self.firewall.start()
        try:
            reply = await self.helper.start({"op": "init", "prefix": self.firewall.iface_prefix})
        except BaseException:
            self.firewall.stop()
            raise
        if reply.get("stale_removed"):
            log.warning("removed %d run interfaces left by an earlier daemon", reply["stale_removed"])
        log.info("network for runs: table inet %s, interfaces %s*, pool %s%s", self.firewall.table,
                 self.firewall.iface_prefix, self.settings.pool,
                 ", forwarding guarded" if self.firewall.guard else "")

    def reconfigure(self, settings: NetworkSettings) -> list[str]:
        """A new policy applies at once (the table is replaced in one transaction); a new
        pool needs a restart."""
        changes = []
        if settings.pool != self.settings.pool:
            changes.append("network.pool: applied at the next restart")
        if (settings.allow, settings.deny, settings.max_connections_per_run) != \
                (self.settings.allow, self.settings.deny, self.settings.max_connections_per_run):
            self.policy = netpolicy.Policy(settings.allow, settings.deny)
            self.firewall.policy = self.policy
            self.firewall.max_connections = settings.max_connections_per_run
            self.firewall.start()
            changes.append("network policy replaced")
        self.settings = dataclasses.replace(settings, pool=self.settings.pool)
        return changes

    async def lease(self) -> Lease:
        block = self.blocks.take()
        host, run = self.blocks.addresses(block)
        self.seq = (self.seq + 1) % netpolicy.SEQUENCE  # far more than ever live at once (one per run uid)
        ifname = f"{self.firewall.iface_prefix}{self.seq:x}"
        try:
            fd = await self.helper.make(ifname, host, run)
        except BaseException:
            self.blocks.give(block)
            raise
        self.live += 1
        return Lease(fd, ifname, block, host, run)

    def release(self, lease: Lease) -> None:
        """The worker is gone: its namespace goes now; its addresses come back once the host's
        conntrack entries of the run's address are deleted (a run's connections outlive it by
        minutes, and the next run of that address would inherit their count)."""
        if lease.fd >= 0:
            os.close(lease.fd)
            lease.fd = -1
            self.live -= 1
            task = asyncio.get_running_loop().create_task(self._forget(lease))
            self.forgetting.add(task)
            task.add_done_callback(self.forgetting.discard)

    async def _forget(self, lease: Lease) -> None:
        try:
            removed = await self.helper.forget(lease.run)
            if removed:
                log.debug("deleted %d conntrack entries of %s", removed, lease.run)
        except Exception as e:  # noqa: BLE001 - the address comes back all the same
            log.warning("%s", e)
        finally:
            self.blocks.give(lease.block)

    def counters(self, lease: Lease) -> dict[str, int]:
        """Bytes and packets the run sent and received (the host's end sees them the other way)."""
        base = f"/sys/class/net/{lease.ifname}/statistics/"
        out: dict[str, int] = {}
        for key, name in (("bytes_out", "rx_bytes"), ("packets_out", "rx_packets"), ("bytes_in", "tx_bytes"),
                          ("packets_in", "tx_packets")):
            try:
                with open(base + name, encoding="ascii") as f:
                    out[key] = int(f.read())
            except (OSError, ValueError):
                out[key] = 0
        return out

    async def close(self) -> None:
        if self.forgetting:
            await asyncio.wait(set(self.forgetting), timeout=5.0)
        await self.helper.stop()
        self.firewall.stop()

    def describe(self) -> dict[str, Any]:
        return {**self.firewall.describe(), "workers": self.live,
                "dns": list(self.settings.dns), "proxy": self.settings.proxy or None}
