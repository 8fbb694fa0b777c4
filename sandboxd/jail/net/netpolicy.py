"""Where runs with network may go: the default deny, the operator's allow and deny lists,
and the nftables ruleset that enforces them -- as data, no I/O (``firewall`` applies it).

Runs reach the outside through their own interface (a veth pair, one end in the run's
network namespace), routed and masqueraded by the host.  The ruleset, one ``inet`` table
per daemon, says:

    forward, from a run's interface:
        to another run's interface            reject
        to an allowed destination             accept
        to a denied destination               reject (admin-prohibited: the run fails fast)
        anything else                         accept (and masqueraded on the way out)
    forward, to a run's interface             only replies (conntrack established/related)
    input, from a run's interface             reject -- the host's own addresses, all of
                                              them, unless allowed
    postrouting                               masquerade what leaves from the runs' pool

IPv6: runs get none (their interface has IPv6 disabled); the IPv6 deny list is in the
table all the same, so allowing IPv6 later cannot open the equivalents by mistake.
"""

from __future__ import annotations

import functools
import ipaddress
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What no run reaches unless the operator allows it.  Documentation ranges (192.0.2.0/24,
# 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) are not in it: they are public as far
# as a run can tell, and tests use them as the "internet".
DEFAULT_DENY = {
    "0.0.0.0/8": "this network",
    "10.0.0.0/8": "RFC 1918 private",
    "100.64.0.0/10": "CGNAT (RFC 6598)",
    "127.0.0.0/8": "loopback",
    "169.254.0.0/16": "link-local (cloud metadata)",
    "172.16.0.0/12": "RFC 1918 private",
    "192.0.0.0/24": "IETF protocol assignments",
    "192.168.0.0/16": "RFC 1918 private",
    "198.18.0.0/15": "benchmarking",
    "224.0.0.0/4": "multicast",
    "240.0.0.0/4": "reserved and broadcast",
    "::/127": "unspecified and loopback",
    "::ffff:0:0/96": "IPv4-mapped",
    "64:ff9b::/96": "NAT64",
    "100::/64": "discard",
    "fc00::/7": "unique local (ULA)",
    "fe80::/10": "link-local",
    "ff00::/8": "multicast",
}


def network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=False)


class Policy:
    """The effective allow and deny lists (each collapsed, per family)."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = [network(c) for c in allow]
        self.deny = [network(c) for c in (*DEFAULT_DENY, *deny)]
        self.extra_deny = [network(c) for c in deny]

    def refusal(self, address: str) -> str | None:
        """Why a run may not reach ``address`` (None when it may).  The host's own addresses
        are refused too, but they are only known on the host: ``firewall`` adds them."""
        ip = ipaddress.ip_address(address)
        if any(ip in n for n in self.allow):
            return None
        for n in self.deny:
            if ip in n:
                return DEFAULT_DENY.get(str(n), "network.deny")
        return None

    def sets(self) -> dict[str, list[IPNetwork]]:
        out: dict[str, list[IPNetwork]] = {}
        for name, nets in (("allow", self.allow), ("deny", self.deny)):
            for version in (4, 6):
                out[f"{name}{version}"] = list(ipaddress.collapse_addresses(  # type: ignore[type-var]
                    n for n in nets if n.version == version))
        return out


# The variables programs take a proxy from (both spellings: programs read either).
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@functools.lru_cache(maxsize=8)
def policy_of(allow: tuple[str, ...], deny: tuple[str, ...]) -> Policy:
    """The Policy of these lists, made once (a run's plan asks for it on every run with network)."""
    return Policy(allow, deny)


def proxy_refusal(policy: Policy, url: str) -> str | None:
    """Why runs may not reach the proxy at ``url``: ``"127.0.0.1 (loopback)"``; None when they
    may, or when its host is a name (resolved when a run uses it, by the run's resolver).

    The one check of a proxy runs are given, wherever it was set: ``network.proxy``
    (config.checks), a run's own variables (plan), sandboxd-http's HTTP_PROXY/HTTPS_PROXY."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        why = policy.refusal(host)
    except ValueError:
        return None
    return f"{host} ({why})" if why else None


def unreachable_proxies(policy: Policy, env: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(variable, value, why) of each proxy variable in ``env`` that runs may not reach."""
    return [(name, env[name], why) for name in PROXY_VARIABLES
            if env.get(name) and (why := proxy_refusal(policy, env[name]))]


# -- the ruleset, as libnftables JSON -----------------------------------------------------

def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _prefix(n: IPNetwork) -> dict[str, Any]:
    return {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}


IIF = {"meta": {"key": "iifname"}}
OIF = {"meta": {"key": "oifname"}}
CT_STATE = {"ct": {"key": "state"}}
REPLIES = _match(CT_STATE, {"set": ["established", "related"]}, "in")  # ct state { established, related }
REJECT = {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}
# Every sandboxd's run interfaces (the guard chain lets all of them pass, run-to-run is refused between
# any two): host interfaces named RUNS_PREFIX + 4 hex digits of the pool + up to 6 of a sequence (15
# characters, IFNAMSIZ less one).  "sbxd-" rather than the earlier "sbx", which an interface of the
# host's own (sbx0, say) could start with and be taken for a run's.
RUNS_PREFIX = "sbxd-"
ALL_RUNS = RUNS_PREFIX + "*"
SEQUENCE = 1 << 24  # interface names a daemon cycles through: 6 hex digits


def ruleset(table: str, iface_prefix: str, pool: str, policy: Policy, guard: bool,
            max_connections: int = 512) -> list[dict[str, Any]]:
    """Commands that (re)create the daemon's table in one transaction.

    ``max_connections``: conntrack entries one run's address may hold (``ct count`` over
    a dynamic set keyed by the source); a new connection past it is rejected.

    ``guard``: the host did not forward before sandboxd turned forwarding on; then every
    forwarded packet that neither comes from nor goes to a run interface is dropped, so
    the host routes nothing else.
    """
    fam = "inet"
    runs = iface_prefix + "*"
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": fam, "name": table}}},
        {"delete": {"table": {"family": fam, "name": table}}},
        {"add": {"table": {"family": fam, "name": table}}},
    ]
    for name, nets in policy.sets().items():
        kind = "ipv4_addr" if name.endswith("4") else "ipv6_addr"
        entry: dict[str, Any] = {"family": fam, "table": table, "name": name, "type": kind, "flags": ["interval"]}
        if nets:
            entry["elem"] = [_prefix(n) for n in nets]
        cmds.append({"add": {"set": entry}})

    def chain(name: str, **base: Any) -> None:
        cmds.append({"add": {"chain": {"family": fam, "table": table, "name": name, **base}}})

    def rule(chain_name: str, *expr: dict[str, Any]) -> None:
        cmds.append({"add": {"rule": {"family": fam, "table": table, "chain": chain_name, "expr": list(expr)}}})

    def daddr(proto: str, set_name: str) -> dict[str, Any]:
        return _match({"payload": {"protocol": proto, "field": "daddr"}}, "@" + set_name)

    cmds.append({"add": {"set": {"family": fam, "table": table, "name": "conns", "type": "ipv4_addr",
                                 "size": 65535}}})
    chain("forward", type="filter", hook="forward", prio=-10, policy="accept")
    chain("from_run")
    chain("input", type="filter", hook="input", prio=-10, policy="accept")
    chain("postrouting", type="nat", hook="postrouting", prio=100, policy="accept")
    rule("forward", _match(IIF, runs), {"jump": {"target": "from_run"}})
    rule("forward", _match(OIF, runs), REPLIES, {"accept": None})
    rule("forward", _match(OIF, runs), {"counter": None}, {"drop": None})  # nothing inbound
    rule("from_run", _match(CT_STATE, "new", "in"),
         {"set": {"op": "add", "elem": {"payload": {"protocol": "ip", "field": "saddr"}}, "set": "@conns",
                  "stmt": [{"ct count": {"val": max_connections, "inv": True}}]}},
         {"counter": None}, REJECT)  # too many connections of one run at once
    rule("from_run", _match(OIF, ALL_RUNS), {"counter": None}, REJECT)  # run to run
    rule("from_run", _match({"meta": {"key": "nfproto"}}, "ipv6"), {"counter": None}, REJECT)
    rule("from_run", daddr("ip", "allow4"), {"accept": None})
    rule("from_run", daddr("ip", "deny4"), {"counter": None}, REJECT)
    rule("input", _match(IIF, runs), daddr("ip", "allow4"), {"accept": None})
    rule("input", _match(IIF, runs), {"counter": None}, REJECT)  # the host itself
    rule("postrouting", _match({"payload": {"protocol": "ip", "field": "saddr"}}, _prefix(network(pool))),
         _match(OIF, runs, "!="), {"masquerade": None})
    if guard:
        chain("guard", type="filter", hook="forward", prio=-20, policy="accept")
        rule("guard", _match(IIF, ALL_RUNS), {"accept": None})
        rule("guard", _match(OIF, ALL_RUNS), {"accept": None})
        rule("guard", {"counter": None}, {"drop": None})
    return cmds


def delete(table: str) -> list[dict[str, Any]]:
    return [{"add": {"table": {"family": "inet", "name": table}}},
            {"delete": {"table": {"family": "inet", "name": table}}}]


class Blocks:
    """The pool, in blocks of four addresses: network, host side, run side, broadcast.

    Handed out round robin over the whole pool, so an address comes back only after
    every other block has been used once: the interface of the run that had it is long
    gone by then (the kernel destroys a network namespace asynchronously).
    """

    def __init__(self, pool: str) -> None:
        net = ipaddress.ip_network(pool)
        if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > 30:
            raise ValueError(f"{pool}: the pool must be an IPv4 network of at least 4 addresses")
        self.base = int(net.network_address)
        self.count = net.num_addresses // 4
        self.next = 0
        self.used: set[int] = set()

    def take(self) -> int:
        for _ in range(self.count):
            block = self.next
            self.next = (self.next + 1) % self.count
            if block not in self.used:
                self.used.add(block)
                return block
        raise RuntimeError("every address of network.pool is in use")

    def give(self, block: int) -> None:
        self.used.discard(block)

    def addresses(self, block: int) -> tuple[str, str]:
        """(host side, run side) of a block, as addresses without prefix."""
        first = self.base + 4 * block
        return str(ipaddress.IPv4Address(first + 1)), str(ipaddress.IPv4Address(first + 2))


def resolvers_from(resolv_conf: str) -> list[str]:
    """The nameserver addresses of a resolv.conf text."""
    out = []
    for line in resolv_conf.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(str(ipaddress.ip_address(parts[1])))
            except ValueError:
                continue
    return out


def resolv_conf(servers: Sequence[str]) -> bytes:
    lines = ["# written by sandboxd from network.dns"]
    lines += [f"nameserver {s}" for s in servers[:3]]
    if not servers:
        lines.append("# no resolver runs may reach is configured: names do not resolve")
    lines.append("options timeout:2 attempts:2")
    return ("\n".join(lines) + "\n").encode()
