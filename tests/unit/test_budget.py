"""The byte budget: per uid and global, the first-piece and small exemptions, waiting for room."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from sandboxd.budget import SMALL, Budget


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 5))


async def settle(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# --- fits, take, give ---------------------------------------------------------------------


def test_a_fresh_budget() -> None:
    b = Budget(total=1000, per_uid=100)
    assert (b.used, b.held(1)) == (0, 0)
    assert b.describe() == {"used": 0, "limit": 1000, "per_uid_limit": 100, "uids": 0}
    assert not b.crowded(1)


def test_per_uid_limit() -> None:
    b = Budget(total=1000, per_uid=100)
    assert b.fits(1, 60)
    b.take(1, 60)
    assert b.fits(1, 40)
    assert not b.fits(1, 41)
    assert b.fits(2, 100)  # another uid has its own share
    b.take(1, 40)
    assert not b.fits(1, 1)
    assert b.held(1) == 100 and b.used == 100


def test_global_limit() -> None:
    b = Budget(total=100, per_uid=80)
    b.take(1, 80)
    assert b.fits(2, 20)
    assert not b.fits(2, 21)
    b.take(2, 20)
    assert not b.fits(3, 1)
    assert b.used == 100 and b.describe()["uids"] == 2


def test_a_uid_holding_nothing_may_take_one_piece_over_its_share() -> None:
    b = Budget(total=1000, per_uid=10)
    assert b.fits(1, 500)  # over its share, but it holds nothing
    b.take(1, 500)
    assert not b.fits(1, 1)  # the second piece counts
    assert b.fits(2, 500)  # another empty-handed uid, and the total still has room
    assert not b.fits(2, 501)  # ...but not past the total


def test_an_empty_budget_takes_one_piece_however_large() -> None:
    b = Budget(total=100, per_uid=10)
    assert b.fits(1, 10**9)
    b.take(1, 10**9)
    assert b.crowded(1)
    assert not b.fits(2, 1)  # now the total is over for everyone else


def test_small_bypasses_the_global_limit_but_not_the_per_uid_one() -> None:
    b = Budget(total=100, per_uid=100)
    b.take(1, 100)
    assert not b.fits(2, 10)
    assert b.fits(2, 10, small=True)
    assert b.fits(2, SMALL, small=True)
    b.take(2, 10)
    assert b.fits(2, 90, small=True)
    assert not b.fits(2, 91, small=True)  # per uid still counts
    assert not b.fits(1, 1, small=True)


def test_give_returns_bytes() -> None:
    b = Budget(total=100, per_uid=100)
    b.take(1, 70)
    b.take(2, 20)
    b.give(1, 30)
    assert (b.used, b.held(1), b.held(2)) == (60, 40, 20)
    b.give(1, 40)
    assert b.held(1) == 0 and b.describe()["uids"] == 1  # a uid holding nothing is forgotten
    assert 1 not in b.by_uid
    b.give(2, 0)
    b.give(2, -5)  # nothing to give: no change
    assert (b.used, b.held(2)) == (20, 20)


def test_take_does_not_check() -> None:
    b = Budget(total=10, per_uid=5)
    b.take(1, 50)  # take is bookkeeping; fits/reserve decide
    assert b.used == 50 and b.held(1) == 50


def test_configure_changes_the_limits() -> None:
    b = Budget(total=100, per_uid=50)
    b.take(1, 50)
    assert not b.fits(1, 10)
    b.configure(total=200, per_uid=60)
    assert b.fits(1, 10)
    assert b.describe() == {"used": 50, "limit": 200, "per_uid_limit": 60, "uids": 1}


# --- crowded ------------------------------------------------------------------------------


def test_crowded_over_its_share() -> None:
    b = Budget(total=1000, per_uid=100)
    b.take(1, 100)
    assert not b.crowded(1)  # at its share is not over it
    b.take(1, 1)
    assert b.crowded(1)
    assert not b.crowded(2)


def test_crowded_when_holding_some_while_the_total_is_over() -> None:
    b = Budget(total=100, per_uid=100)
    b.take(1, 90)
    b.take(2, 10)
    assert not b.crowded(1) and not b.crowded(2)  # exactly at the total
    b.take(2, 5)
    assert b.crowded(1) and b.crowded(2)
    assert not b.crowded(3)  # a uid holding nothing is never crowded


# --- reserve ------------------------------------------------------------------------------


def test_reserve_takes_at_once_when_it_fits() -> None:
    async def body() -> None:
        b = Budget(total=100, per_uid=100)
        await b.reserve(1, 40)
        assert b.held(1) == 40 and b.used == 40

    run(body)


def test_reserve_waits_until_another_uid_gives_bytes_back() -> None:
    async def body() -> None:
        b = Budget(total=100, per_uid=100)
        b.take(1, 100)
        task = asyncio.ensure_future(b.reserve(2, 50))
        await settle()
        assert not task.done() and b.held(2) == 0
        b.give(1, 30)  # wakes it, but 70 + 50 is still over
        await settle()
        assert not task.done()
        b.give(1, 20)
        await settle()
        assert task.done()
        await task
        assert b.held(2) == 50 and b.used == 100

    run(body)


def test_reserve_waits_for_its_own_share() -> None:
    async def body() -> None:
        b = Budget(total=1000, per_uid=100)
        b.take(1, 80)
        task = asyncio.ensure_future(b.reserve(1, 30))
        await settle()
        assert not task.done()
        b.take(2, 500)
        b.give(2, 500)  # someone else's bytes do not help
        await settle()
        assert not task.done()
        b.give(1, 10)
        await asyncio.wait_for(task, 1)
        assert b.held(1) == 100

    run(body)


def test_reserve_small_does_not_wait_for_the_total() -> None:
    async def body() -> None:
        b = Budget(total=100, per_uid=100)
        b.take(1, 100)
        await asyncio.wait_for(b.reserve(2, 10, small=True), 1)
        assert b.held(2) == 10 and b.used == 110

    run(body)


def test_reserve_is_woken_by_configure() -> None:
    async def body() -> None:
        b = Budget(total=100, per_uid=100)
        b.take(1, 100)
        task = asyncio.ensure_future(b.reserve(2, 50))
        await settle()
        assert not task.done()
        b.configure(total=200, per_uid=100)
        await asyncio.wait_for(task, 1)
        assert b.held(2) == 50

    run(body)


def test_every_waiter_is_woken() -> None:
    async def body() -> None:
        b = Budget(total=100, per_uid=100)
        b.take(1, 100)
        tasks = [asyncio.ensure_future(b.reserve(uid, 10)) for uid in (2, 3, 4)]
        await settle()
        assert not any(t.done() for t in tasks)
        b.give(1, 100)
        await asyncio.wait_for(asyncio.gather(*tasks), 1)
        assert b.used == 30 and b.describe()["uids"] == 3

    run(body)


def test_a_cancelled_reserve_takes_nothing() -> None:
    async def body() -> None:
        b = Budget(total=100, per_uid=100)
        b.take(1, 100)
        task = asyncio.ensure_future(b.reserve(2, 50))
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        b.give(1, 100)
        await settle()
        assert b.used == 0 and b.held(2) == 0
        assert not b._waiters  # its waiter is not left behind

    run(body)


# --- wait_room ----------------------------------------------------------------------------


def test_wait_room_returns_at_once_for_a_uid_holding_nothing() -> None:
    async def body() -> None:
        b = Budget(total=100, per_uid=10)
        b.take(1, 500)
        await asyncio.wait_for(b.wait_room(2), 0.5)

    run(body)


def test_wait_room_returns_at_once_when_not_crowded() -> None:
    async def body() -> None:
        b = Budget(total=100, per_uid=50)
        b.take(1, 50)
        await asyncio.wait_for(b.wait_room(1), 0.5)

    run(body)


def test_wait_room_waits_until_the_uid_is_under_its_share() -> None:
    async def body() -> None:
        b = Budget(total=1000, per_uid=100)
        b.take(1, 150)
        task = asyncio.ensure_future(b.wait_room(1))
        await settle()
        assert not task.done()
        b.give(1, 40)  # 110: still over
        await settle()
        assert not task.done()
        b.give(1, 10)  # 100: at its share
        await asyncio.wait_for(task, 1)
        assert b.held(1) == 100  # wait_room takes nothing

    run(body)


def test_wait_room_waits_until_the_total_is_back_under() -> None:
    async def body() -> None:
        b = Budget(total=100, per_uid=100)
        b.take(1, 60)
        b.take(2, 60)
        task = asyncio.ensure_future(b.wait_room(1))
        await settle()
        assert not task.done()
        b.give(2, 20)
        await asyncio.wait_for(task, 1)

    run(body)


def test_wait_room_is_woken_by_configure() -> None:
    async def body() -> None:
        b = Budget(total=100, per_uid=50)
        b.take(1, 80)
        task = asyncio.ensure_future(b.wait_room(1))
        await settle()
        assert not task.done()
        b.configure(total=100, per_uid=100)
        await asyncio.wait_for(task, 1)

    run(body)
