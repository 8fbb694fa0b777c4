"""sandboxd-http's connection gate as a ledger: who gives way when there is no room
(tests/test_http.py drives the same through the real bridge)."""

from __future__ import annotations

from sandboxd.http.gate import Gate, client_key


class Conn:
    def __init__(self, gate: Gate, address: str) -> None:
        self.shed_with: str | None | bool = False  # False: still open
        gate.opened(self, address)

    def shed(self, status: str | None) -> None:
        self.shed_with = status


def test_the_oldest_pending_heads_of_an_address_give_way_but_never_the_newest() -> None:
    g = Gate(max_connections=8, reserved=2, per_client=3)
    slow = [Conn(g, "127.0.0.1") for _ in range(3)]
    g.sweep()
    other = Conn(g, "127.0.0.2")
    fast = Conn(g, "127.0.0.1")  # over the bound, and a flood reconnecting right behind it:
    burst = [Conn(g, "127.0.0.1") for _ in range(5)]
    g.sweep()  # only those opened before the last sweep give way
    assert [c.shed_with for c in slow] == ["408 Request Timeout"] * 3 and other.shed_with is False
    assert fast.shed_with is False and all(c.shed_with is False for c in burst)
    assert g.head(fast, with_key=True)  # its head was read in the meantime
    g.sweep()
    assert sum(c.shed_with is False for c in burst) == 3 and len(g.pending) == 4 and len(g.admitted) == 1


def test_pending_heads_do_not_count_against_max_connections_and_are_bounded_by_it() -> None:
    g = Gate(max_connections=4, reserved=1, per_client=100)
    flood = [Conn(g, f"10.0.0.{i}") for i in range(10)]
    assert sum(c.shed_with is False for c in flood) == 8  # twice max_connections at once, at most
    g.sweep()
    g.sweep()
    assert sum(c.shed_with is False for c in flood) == 4  # the newest four
    keyed = [Conn(g, "10.1.0.1") for _ in range(4)]
    assert all(g.head(c, with_key=True) for c in keyed)


def test_the_reserve_is_for_requests_with_the_key() -> None:
    g = Gate(max_connections=4, reserved=2, per_client=100)
    anonymous = [Conn(g, "10.0.0.1") for _ in range(3)]
    assert [g.head(c, with_key=False) for c in anonymous] == [True, True, False]
    g.closed(anonymous[2])
    keyed = [Conn(g, "10.0.0.2") for _ in range(3)]
    assert [g.head(c, with_key=True) for c in keyed] == [True, True, False]
    g.closed(keyed[2])
    g.idle(anonymous[0])  # kept alive after its answer, its request had no key: it makes room
    late = Conn(g, "10.0.0.2")
    assert g.head(late, with_key=True) and anonymous[0].shed_with is None and anonymous[1].shed_with is False


def test_client_addresses() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
