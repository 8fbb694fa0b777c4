"""Quota resolution and admission."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sandboxd.common.errors import RequestError
from sandboxd.config import QuotaLimits, parse
from sandboxd.peer import Identity
from sandboxd.quota import Admission, effective_limits
from sandboxd.usage import UsageStore

POLICY = parse({"quotas": {
    "default": {"concurrent": 2, "network": False, "max_memory": "256M"},
    "groups": {"judges": {"concurrent": 8, "max_memory": "1G"}, "web": {"concurrent": 4, "network": True},
               "1234": {"runs_per_minute": 5}},
    "users": {"alice": {"concurrent": 1}, "2000": {"max_memory": "64M"}},
}}).quotas


def who(name: str, uid: int, groups: tuple[str, ...] = (), gids: tuple[int, ...] = ()) -> Identity:
    return Identity(uid, uid, 1, name, gids or (uid,), groups)


def limits_of(identity: Identity) -> QuotaLimits:
    limits = effective_limits(POLICY, identity)
    assert limits is not None
    return limits


def test_default_groups_and_users() -> None:
    assert limits_of(who("nobody", 3000)).concurrent == 2
    both = limits_of(who("bob", 3001, ("judges", "web")))
    assert (both.concurrent, both.max_memory, both.network) == (8, 1 << 30, True)  # most generous per limit
    assert limits_of(who("alice", 3002, ("judges",))).concurrent == 1  # the user entry wins
    assert limits_of(who("x", 2000)).max_memory == 64 << 20  # by uid
    assert limits_of(who("y", 3003, (), (1234,))).runs_per_minute == 5  # group by gid


def test_deny_unlisted() -> None:
    policy = parse({"quotas": {"deny_unlisted": True, "users": {"alice": {}}, "groups": {"judges": {}}}}).quotas
    assert effective_limits(policy, who("carol", 4000)) is None
    assert effective_limits(policy, who("alice", 4001)) is not None
    assert effective_limits(policy, who("dave", 4002, ("judges",))) is not None


def test_admission_concurrency_queue_and_busy() -> None:
    limits = effective_limits(POLICY, who("nobody", 5000))
    assert limits is not None

    async def go() -> None:
        adm = Admission(capacity=3, queue_max=1, queue_timeout=5.0, usage=UsageStore(None))
        await adm.admit(1, limits)
        await adm.admit(1, limits)
        waiting = asyncio.ensure_future(adm.admit(1, limits))  # uid 1 is at its concurrency: queued
        await asyncio.sleep(0)
        assert adm.queued_by_uid[1] == 1 and not waiting.done()
        with pytest.raises(RequestError) as e:
            await adm.admit(1, limits.__class__(**{**limits.__dict__, "queued": 1}))
        assert e.value.code == "quota_exceeded"
        await adm.admit(2, limits)  # another uid takes the last worker
        with pytest.raises(RequestError) as e:
            await adm.admit(3, limits)  # capacity full and the queue holds uid 1's run
        assert e.value.code == "busy"
        adm.release(1)
        await asyncio.wait_for(waiting, 1)
        assert adm.running == 3 and adm.running_by_uid[1] == 2

    asyncio.run(go())


def test_one_caller_leaves_the_reserved_workers_to_others() -> None:
    many = QuotaLimits(concurrent=8, queued=8)

    async def go() -> None:
        adm = Admission(capacity=8, queue_max=16, queue_timeout=5.0, usage=UsageStore(None), reserved=2)
        for _ in range(6):
            await adm.admit(1, many)
        seventh = asyncio.ensure_future(adm.admit(1, many))  # alone, uid 1's share is 8 / 2 = 4: not the last 2
        await asyncio.sleep(0)
        assert adm.running_by_uid[1] == 6 and not seventh.done()
        await asyncio.wait_for(adm.admit(2, many), 1)  # a newcomer starts at once
        await asyncio.wait_for(adm.admit(3, many), 1)  # and another (share 8 / 4 = 2)
        assert adm.running == 8 and not seventh.done()
        adm.release(2)  # the freed worker is a reserved one: uid 1 (6 held, share 8 / 3) still waits
        await asyncio.sleep(0)
        assert not seventh.done()
        await asyncio.wait_for(adm.admit(4, many), 1)  # while a newcomer gets it at once
        adm.release(3)
        adm.release(4)  # uid 1 alone again: it may hold workers - reserved = 6, which it does
        await asyncio.sleep(0)
        assert not seventh.done()
        adm.release(1)  # one of its own ends: its waiting run takes the place
        await asyncio.wait_for(seventh, 1)
        assert adm.running_by_uid[1] == 6 and adm.running == 6

    asyncio.run(go())


def test_the_queue_serves_the_caller_with_fewest_runs_first() -> None:
    four = QuotaLimits(concurrent=4, queued=8)

    async def go() -> None:
        adm = Admission(capacity=2, queue_max=16, queue_timeout=5.0, usage=UsageStore(None))
        await adm.admit(1, four)
        await adm.admit(1, four)
        first = asyncio.ensure_future(adm.admit(1, four))  # queued first
        await asyncio.sleep(0)
        second = asyncio.ensure_future(adm.admit(2, four))  # queued after it
        await asyncio.sleep(0)
        adm.release(1)
        await asyncio.wait_for(second, 1)  # uid 2 runs nothing: it goes first
        assert not first.done()
        adm.release(1)
        await asyncio.wait_for(first, 1)
        assert dict(adm.running_by_uid) == {1: 1, 2: 1}

    asyncio.run(go())


def test_weights_share_contended_workers() -> None:
    async def go() -> None:
        adm = Admission(capacity=6, queue_max=16, queue_timeout=5.0, usage=UsageStore(None), reserved=5)
        heavy, light = QuotaLimits(concurrent=6, weight=4.0), QuotaLimits(concurrent=6)
        assert adm.share(1, 4.0) == 6 * 4 / 5  # alone, with room for one to come
        await adm.admit(1, heavy)
        await adm.admit(2, light)
        assert adm.share(1, 4.0) == 6 * 4 / 6 and adm.share(2, 1.0) == 6 / 6
        for _ in range(3):
            await asyncio.wait_for(adm.admit(1, heavy), 1)  # below 4 of 6
        assert adm.running_by_uid[1] == 4
        waiting = asyncio.ensure_future(adm.admit(1, heavy))
        await asyncio.sleep(0)
        assert not waiting.done()  # at its share, and only reserved workers are left
        waiting.cancel()

    asyncio.run(go())


def test_rate_limit_gives_retry_after() -> None:
    limits = effective_limits(POLICY, who("y", 3003, (), (1234,)))
    assert limits is not None
    usage = UsageStore(None)
    now = time.time()
    for i in range(5):
        usage.started(f"r{i}", 9, now - 30 + i)
    adm = Admission(4, 4, 1.0, usage)
    with pytest.raises(RequestError) as e:
        adm.check_budget(9, limits)
    assert e.value.code == "quota_exceeded" and e.value.details["limit"] == "runs_per_minute"
    assert 24_000 < e.value.details["retry_after_ms"] <= 30_000  # 1 s buckets


def test_cpu_budget_gives_retry_after() -> None:
    limits = parse({"quotas": {"default": {"cpu_seconds_per_hour": 2}}}).quotas.default
    usage = UsageStore(None)
    now = time.time()
    usage.finished("a", 9, 1500.0, "ok", now - 600)
    usage.finished("b", 9, 1500.0, "ok", now - 60)
    with pytest.raises(RequestError) as e:
        Admission(4, 4, 1.0, usage).check_budget(9, limits)
    assert e.value.details["limit"] == "cpu_seconds_per_hour"
    # when the first 1.5 s leave the hour (1-minute buckets)
    assert 2_935_000 < e.value.details["retry_after_ms"] <= 3_000_000


def test_usage_memory_is_bounded_under_load() -> None:
    usage = UsageStore(None)
    now = time.time()
    for i in range(100_000):  # ~8 minutes at 200 runs/s
        t = now - 500 + i * 0.005
        usage.started(f"r{i}", 9, t)
        usage.finished(f"r{i}", 9, 1.0, "ok", t)
    u = usage.uids[9]
    assert len(u.starts.buckets) <= 61 and len(u.cpu.buckets) <= 61
    assert usage.snapshot(9, now)["cpu_ms_last_hour"] == 100_000.0


def test_usage_survives_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "usage.sqlite")
    u = UsageStore(path)
    now = time.time()
    u.started("r1", 7, now)
    u.finished("r1", 7, 250.0, "ok", now)
    u.started("r2", 7, now)  # in flight when the daemon dies
    u.close()
    again = UsageStore(path)
    snap = again.snapshot(7, time.time())
    assert snap["runs_total"] == 2 and snap["cpu_ms_total"] == 250.0 and snap["runs_last_minute"] == 2
    assert again.lost_at_start == 1


def test_unwritable_database_keeps_counting_in_memory(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    u = UsageStore(str(blocked / "usage.sqlite"))  # parent is a file: cannot be created
    assert u.error is not None
    u.started("r", 1, time.time())
    assert u.snapshot(1, time.time())["runs_total"] == 1
