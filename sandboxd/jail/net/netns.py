"""Network namespaces for runs with network, made ready by a helper process of their own.

A network worker does not get an empty namespace: before it is spawned, the helper
(``python -m``-style exec of this module's ``main``, root, the host's namespace, single
threaded) makes one with

    lo        up (the run's own loopback: 127.0.0.1 and ::1 are the run's, not the host's)
    eth0      one end of a veth pair, ADDR.2/30, up, IPv6 off, default route via ADDR.1
    PREFIXnn  the other end, in the host's namespace, ADDR.1/30, up, IPv6 off

and hands its fd back; the daemon passes it to the fork server with the spawn and P
enters it (``setns``).  Nothing else holds it: when the run's processes are gone and
the daemon has read the interface's counters and closed its fd, the kernel destroys the
namespace and both ends of the pair with it.  The helper uses pyroute2 (Debian's
python3-pyroute2) for netlink; the daemon and the fork server never import it.

    {"op": "init"}                                        -> {"ok": true}
    {"op": "make", "ifname": s, "host": a, "run": a}      -> {"ok": true} + the netns fd
    {"op": "forget", "run": a}                            -> {"ok": true, "removed": n}

``forget`` deletes the host's conntrack entries a run's address left (its connections
and UDP flows outlive it by minutes in the table the host shares), before the address is
given to another run.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import msgpack

from ...common.launch import HelperClient, HelperError
from ..kernel import libc

PREFIXLEN = 30
MAX_MESSAGE = 1 << 16


class NetnsClient(HelperClient):
    name = "network namespace helper"
    module = "sandboxd.jail.net.netns"

    async def make(self, ifname: str, host: str, run: str) -> int:
        """A ready namespace for one worker: the run's end ``run``, the host's ``host``."""
        reply, fds = await self.call({"op": "make", "ifname": ifname, "host": host, "run": run})
        if not reply.get("ok") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise HelperError(f"network namespace for {ifname}: {reply.get('error', 'no fd came back')}")
        return fds[0]

    async def forget(self, run: str) -> int:
        """Delete the conntrack entries whose original source is ``run``; how many there were."""
        reply, fds = await self.call({"op": "forget", "run": run})
        for fd in fds:
            os.close(fd)
        if not reply.get("ok"):
            raise HelperError(f"conntrack entries of {run}: {reply.get('error')}")
        return int(reply.get("removed", 0))


# -- the helper process ------------------------------------------------------------------

def _no_ipv6(ifname: str) -> None:
    """IPv6 off on an interface of the network namespace the process is in now.

    Best effort: under systemd's ProtectKernelTunables /proc/sys is read-only.  Runs get
    no IPv6 route either way, and the daemon's table refuses every IPv6 packet from them.
    """
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w", encoding="ascii") as f:
            f.write("1")
    except OSError:
        pass


class Maker:
    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self.IPRoute = IPRoute
        self.host_ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.host = IPRoute()

    def make(self, ifname: str, host: str, run: str) -> int:
        libc.unshare(libc.CLONE_NEWNET)  # this process is in the new namespace until setns below
        ns = -1
        try:
            ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            with self.IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": ifname, "net_ns_fd": self.host_ns})
                _no_ipv6("eth0")
                eth0 = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=eth0, address=run, prefixlen=PREFIXLEN)
                ipr.link("set", index=eth0, state="up")
                ipr.route("add", dst="default", gateway=host)
        except BaseException:
            if ns >= 0:
                os.close(ns)  # the namespace, and whatever was made in it, goes with it
            raise
        finally:
            libc.setns(self.host_ns, libc.CLONE_NEWNET)
        try:
            _no_ipv6(ifname)
            index = self.host.link_lookup(ifname=ifname)[0]
            self.host.addr("add", index=index, address=host, prefixlen=PREFIXLEN)
            self.host.link("set", index=index, state="up")
        except BaseException:
            os.close(ns)
            raise
        return ns

    def forget(self, run: str) -> int:
        from pyroute2 import Conntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        removed = 0
        with Conntrack() as ct:
            for entry in list(ct.dump_entries(tuple_orig=NFCTAttrTuple(saddr=run))):
                try:
                    ct.delete(entry)
                    removed += 1
                except Exception:  # noqa: BLE001 - gone meanwhile (it timed out)
                    pass
        return removed

    def remove_stale(self, prefix: str) -> int:
        """Delete host interfaces with ``prefix`` left by a daemon of this pool that was killed."""
        removed = 0
        for link in self.host.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            if name.startswith(prefix):
                try:
                    self.host.link("del", index=link["index"])
                    removed += 1
                except Exception:  # noqa: BLE001 - already going away with its namespace
                    pass
        return removed


def _reply(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def main(argv: list[str]) -> None:
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)  # the daemon alone ends it (EOF on the socket)
    libc.set_name("sbx-netns")
    sock = socket.socket(fileno=int(argv[0]))
    sock.setblocking(True)
    maker: Maker | None = None
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
        for extra in fds:
            os.close(extra)
        if not data:
            return
        msg = msgpack.unpackb(data, raw=False)
        try:
            if msg.get("op") == "init":
                maker = Maker()
                _reply(sock, {"ok": True, "stale_removed": maker.remove_stale(str(msg.get("prefix") or "\0"))})
            elif msg.get("op") == "forget" and maker is not None:
                _reply(sock, {"ok": True, "removed": maker.forget(str(msg["run"]))})
            elif msg.get("op") == "make" and maker is not None:
                ns = maker.make(str(msg["ifname"]), str(msg["host"]), str(msg["run"]))
                try:
                    _reply(sock, {"ok": True}, [ns])
                finally:
                    os.close(ns)
            else:
                _reply(sock, {"ok": False, "error": f"unknown op {msg.get('op')!r}"})
        except Exception as e:  # noqa: BLE001 - the daemon gets the reason; the helper lives on
            _reply(sock, {"ok": False, "error": f"{type(e).__name__}: {e}"})
