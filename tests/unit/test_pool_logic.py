"""The warm pool's logic with fake workers: no fork server, no cgroups, no root.

Every test runs its own event loop (``asyncio.run``) and stays well under a second:
make() is a fake coroutine, time is injected through ``clock`` where it matters.
"""

from __future__ import annotations

import asyncio
import collections
import errno
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from sandboxd.jail.child.contract import SetupError
from sandboxd.jail.workers import pool as pool_module
from sandboxd.jail.workers.pool import DECAY_SECONDS, FAILURES_BEFORE_GIVING_UP, REFILL_DELAY, Pool


class FakeWorker:
    def __init__(self, key: str, number: int, generation: int) -> None:
        self.key = key
        self.number = number
        self.state = "ready"
        self.generation = generation
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"FakeWorker({self.key}#{self.number} gen {self.generation} {self.state})"


class Factory:
    """make() and retire() for a pool, recording what the pool asked for.

    ``auto_ready`` False leaves each worker's ``ready`` future for the test to resolve;
    ``fail`` is how many of the next make() calls raise OSError (negative: all of them);
    ``error`` replaces that OSError.
    """

    def __init__(self, *, auto_ready: bool = True, fail: int = 0, error: BaseException | None = None) -> None:
        self.pool: Pool[FakeWorker] | None = None
        self.auto_ready = auto_ready
        self.fail = fail
        self.error = error
        self.calls: list[tuple[str, bool]] = []
        self.made: list[FakeWorker] = []
        self.retired: list[FakeWorker] = []

    async def make(self, key: str, urgent: bool) -> FakeWorker:
        assert self.pool is not None
        self.calls.append((key, urgent))
        if self.fail:
            self.fail -= 1
            raise self.error or OSError(errno.EAGAIN, "Resource temporarily unavailable")
        worker = FakeWorker(key, len(self.made), self.pool.generation)
        if self.auto_ready:
            worker.ready.set_result(None)
        self.made.append(worker)
        return worker

    def retire(self, worker: FakeWorker) -> None:
        worker.state = "retired"
        self.retired.append(worker)


def new_pool(factory: Factory, keys: tuple[str, ...] = ("a",), minimum: int = 1, maximum: int = 4,
             clock: Callable[[], float] | None = None) -> Pool[FakeWorker]:
    sizes = {k: (minimum, maximum) for k in keys}
    if clock is None:
        p: Pool[FakeWorker] = Pool(factory.make, factory.retire, sizes)
    else:
        p = Pool(factory.make, factory.retire, sizes, clock=clock)
    factory.pool = p
    return p


async def settle(rounds: int = 20) -> None:
    """Let every runnable task run until the loop is idle (no timers involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 5))


async def eventually(condition: Callable[[], bool], within: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# --- start, hits, refills -----------------------------------------------------------------


def test_start_fills_every_key_up_to_the_minimum() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, keys=("a", "b"), minimum=2)
        p.start()
        await settle()
        assert [len(p.ready[k]) for k in ("a", "b")] == [2, 2]
        assert sorted(f.calls) == [("a", False), ("a", False), ("b", False), ("b", False)]
        assert p.starting == {"a": 0, "b": 0}
        assert all(w.key == k for k in ("a", "b") for w in p.ready[k])
        assert p.describe()["profiles"] == {k: {"ready": 2, "starting": 0, "target": 2, "waiting": 0,
                                                "minimum": 2, "maximum": 4} for k in ("a", "b")}
        await p.close()

    run(body)


def test_start_with_minimum_zero_makes_nothing() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=0)
        p.start()
        await settle()
        assert f.calls == [] and not p.ready["a"]
        await p.close()

    run(body)


def test_acquire_of_a_ready_worker_is_a_hit_and_refills_when_the_queue_empties() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=1)
        p.start()
        await settle()
        pooled = p.ready["a"][0]
        got = await p.acquire("a")
        assert got is pooled
        assert (p.hits, p.misses) == (1, 0)
        assert p.target["a"] == 1
        await settle()
        assert len(f.made) == 2 and list(p.ready["a"]) == [f.made[1]]
        assert f.calls[-1] == ("a", False)  # nobody waits for the refill: low priority
        await p.close()

    run(body)


def test_a_hit_leaving_workers_in_the_queue_does_not_refill() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=2)
        p.start()
        await settle()
        first, second = p.ready["a"]
        assert await p.acquire("a") is first  # oldest first
        await settle()
        assert len(f.made) == 2 and list(p.ready["a"]) == [second]
        await p.close()

    run(body)


def test_done_tops_the_pool_up_after_the_refill_delay() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=2)
        p.start()
        await settle()
        await p.acquire("a")
        p.done("a")
        await settle()
        assert len(p.ready["a"]) == 1  # not before REFILL_DELAY
        await asyncio.sleep(REFILL_DELAY * 5)
        await settle()
        assert len(p.ready["a"]) == 2 and len(f.made) == 3
        await p.close()

    run(body)


# --- misses ---------------------------------------------------------------------------------


def test_acquire_on_an_empty_pool_is_a_miss_and_raises_the_target() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=0, maximum=3)
        got = await p.acquire("a")
        assert (p.hits, p.misses) == (0, 1)
        assert p.target["a"] == 1
        assert got is f.made[0]
        assert f.calls[0] == ("a", True)  # a request waits for it: urgent
        await settle()
        assert list(p.ready["a"]) == [f.made[1]]  # and the raised target is kept in the pool
        assert p.starting["a"] == 0
        await p.close()

    run(body)


def test_the_target_rises_by_one_per_miss_up_to_the_maximum() -> None:
    async def body() -> None:
        f = Factory(auto_ready=False)
        p = new_pool(f, minimum=0, maximum=2)
        tasks = [asyncio.ensure_future(p.acquire("a")) for _ in range(4)]
        await settle()
        assert p.misses == 4
        assert p.target["a"] == 2
        for w in f.made:
            w.ready.set_result(None)
        got = await asyncio.gather(*tasks)
        assert len({id(w) for w in got}) == 4  # each request its own worker
        assert all(w.state == "ready" for w in got)
        await p.close()

    run(body)


def test_the_waiting_request_gets_the_first_worker_to_become_ready() -> None:
    async def body() -> None:
        f = Factory(auto_ready=False)
        p = new_pool(f, minimum=0, maximum=2)
        task = asyncio.ensure_future(p.acquire("a"))
        await settle()
        assert len(f.made) == 2 and not task.done()
        f.made[1].ready.set_result(None)
        assert await task is f.made[1]
        f.made[0].ready.set_result(None)
        await settle()
        assert list(p.ready["a"]) == [f.made[0]]
        await p.close()

    run(body)


def test_waiting_requests_are_served_first_come_first_served() -> None:
    async def body() -> None:
        f = Factory(auto_ready=False)
        p = new_pool(f, minimum=0, maximum=1)
        first = asyncio.ensure_future(p.acquire("a"))
        await settle()
        second = asyncio.ensure_future(p.acquire("a"))
        await settle()
        f.made[-1].ready.set_result(None)
        await settle()
        assert first.done() and not second.done()
        for w in f.made:
            if not w.ready.done():
                w.ready.set_result(None)
        await second
        await p.close()

    run(body)


# --- workers that must not be handed out ----------------------------------------------------


def test_a_pooled_worker_that_is_not_ready_is_retired() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=2)
        p.start()
        await settle()
        dead, good = p.ready["a"]
        dead.state = "dead"
        assert await p.acquire("a") is good
        assert f.retired == [dead]
        assert p.hits == 1
        await p.close()

    run(body)


def test_a_pooled_worker_of_an_old_generation_is_retired() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=1)
        p.start()
        await settle()
        stale = p.ready["a"][0]
        stale.generation = p.generation - 1
        got = await p.acquire("a")
        assert got is not stale and got.generation == p.generation
        assert stale in f.retired
        assert p.misses == 1  # nothing usable was pooled
        await p.close()

    run(body)


def test_renew_retires_pooled_workers_and_refills_with_the_new_generation() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=2)
        p.start()
        await settle()
        old = list(p.ready["a"])
        p.renew()
        assert f.retired == old
        await settle()
        assert len(p.ready["a"]) == 2 and all(w.generation == 1 for w in p.ready["a"])
        got = await p.acquire("a")
        assert got.generation == 1 and got not in old
        await p.close()

    run(body)


def test_a_worker_being_made_during_renew_is_retired_when_ready() -> None:
    async def body() -> None:
        f = Factory(auto_ready=False)
        p = new_pool(f, minimum=1)
        p.start()
        await settle()
        in_flight = f.made[0]
        p.renew()
        in_flight.ready.set_result(None)
        await settle()
        assert in_flight in f.retired and in_flight not in p.ready["a"]
        fresh = f.made[-1]
        assert fresh.generation == 1
        task = asyncio.ensure_future(p.acquire("a"))
        await settle()
        for w in f.made:
            if not w.ready.done():
                w.ready.set_result(None)
        got = await task
        assert got.generation == 1
        await p.close()

    run(body)


def test_a_stale_worker_is_not_handed_to_a_waiting_request() -> None:
    async def body() -> None:
        f = Factory(auto_ready=False)
        p = new_pool(f, minimum=0, maximum=1)
        task = asyncio.ensure_future(p.acquire("a"))
        await settle()
        old = list(f.made)
        p.renew()
        for w in old:
            w.ready.set_result(None)
        await settle()
        assert not task.done()
        for w in f.made:
            if not w.ready.done():
                w.ready.set_result(None)
        got = await task
        assert got not in old and got.generation == 1
        assert set(map(id, old)) <= set(map(id, f.retired))
        await p.close()

    run(body)


# --- decay ----------------------------------------------------------------------------------


def test_decay_lowers_the_target_after_decay_seconds_without_a_miss() -> None:
    async def body() -> None:
        now = [1000.0]
        f = Factory()
        p = new_pool(f, minimum=0, maximum=4, clock=lambda: now[0])
        got = await asyncio.gather(*(p.acquire("a") for _ in range(3)))
        await settle()
        assert p.target["a"] == 3 and p.last_miss["a"] == 1000.0
        assert len(p.ready["a"]) == 3
        pooled = list(p.ready["a"])

        p.decay(1000.0 + DECAY_SECONDS)  # not yet: strictly more than DECAY_SECONDS
        assert p.target["a"] == 3 and not f.retired

        p.decay(1000.0 + DECAY_SECONDS + 1)
        assert p.target["a"] == 2
        assert f.retired == [pooled[-1]] and list(p.ready["a"]) == pooled[:2]  # the newest goes

        p.decay(1000.0 + DECAY_SECONDS + 2)
        p.decay(1000.0 + DECAY_SECONDS + 3)
        assert p.target["a"] == 0 and not p.ready["a"]
        p.decay(1000.0 + DECAY_SECONDS + 4)
        assert p.target["a"] == 0  # never below the minimum
        assert all(w not in f.retired for w in got)  # workers handed out are not the pool's to retire
        await p.close()

    run(body)


def test_decay_keeps_the_target_at_the_minimum() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=2, clock=lambda: 0.0)
        p.start()
        await settle()
        p.decay(10 * DECAY_SECONDS)
        assert p.target["a"] == 2 and len(p.ready["a"]) == 2 and not f.retired
        await p.close()

    run(body)


def test_a_recent_miss_holds_the_target_up() -> None:
    async def body() -> None:
        now = [0.0]
        f = Factory()
        p = new_pool(f, minimum=0, maximum=4, clock=lambda: now[0])
        await p.acquire("a")
        now[0] = 100.0
        await asyncio.gather(p.acquire("a"), p.acquire("a"))  # one hit, one miss at t=100
        assert p.last_miss["a"] == 100.0
        target = p.target["a"]
        p.decay(100.0 + DECAY_SECONDS / 2)
        assert p.target["a"] == target
        p.decay(100.0 + DECAY_SECONDS + 0.5)
        assert p.target["a"] == target - 1
        await p.close()

    run(body)


def test_decay_does_not_retire_when_the_pool_is_below_its_new_target() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=0, maximum=4, clock=lambda: 0.0)
        await asyncio.gather(*(p.acquire("a") for _ in range(3)))
        await settle()
        assert p.target["a"] == 3 and len(p.ready["a"]) == 3
        await p.acquire("a")
        await p.acquire("a")  # two hits: one worker left, no refill yet
        assert len(p.ready["a"]) == 1
        p.decay(DECAY_SECONDS + 1)
        assert p.target["a"] == 2 and len(p.ready["a"]) == 1 and not f.retired
        await p.close()

    run(body)


def test_the_decay_loop_uses_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "DECAY_SECONDS", 0.03)  # the loop wakes every 10 ms

    async def body() -> None:
        now = [0.0]
        f = Factory()
        p = new_pool(f, minimum=0, maximum=4, clock=lambda: now[0])
        p.start()
        await p.acquire("a")
        await settle()
        assert p.target["a"] == 1 and len(p.ready["a"]) == 1
        await asyncio.sleep(0.05)
        assert p.target["a"] == 1  # the clock has not moved: no decay
        now[0] = 1.0
        await eventually(lambda: p.target["a"] == 0)
        assert not p.ready["a"] and len(f.retired) == 1
        await p.close()

    run(body)


# --- failures -------------------------------------------------------------------------------


def test_repeated_make_failures_fail_the_waiting_requests() -> None:
    async def body() -> None:
        f = Factory(fail=-1)
        p = new_pool(f, minimum=0, maximum=2)
        with pytest.raises(SetupError) as info:
            await p.acquire("a", timeout=3)
        assert info.value.step == "spawn"
        assert info.value.errno == errno.EAGAIN
        assert p.failures >= FAILURES_BEFORE_GIVING_UP
        assert not [w for w in p.waiters["a"] if not w.done()]
        await p.close()

    run(body)


def test_all_waiting_requests_get_the_error() -> None:
    async def body() -> None:
        f = Factory(fail=-1)
        p = new_pool(f, minimum=0, maximum=2)
        results = await asyncio.gather(*(p.acquire("a", timeout=3) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, SetupError) and r.step == "spawn" for r in results)
        await p.close()

    run(body)


def test_a_setup_error_from_make_reaches_the_request_unchanged() -> None:
    async def body() -> None:
        f = Factory(fail=-1, error=SetupError("cgroup", errno.EACCES, "cannot create the cgroup"))
        p = new_pool(f, minimum=0, maximum=1)
        with pytest.raises(SetupError) as info:
            await p.acquire("a", timeout=3)
        assert info.value.to_dict() == {"step": "cgroup", "errno": errno.EACCES,
                                        "message": "cannot create the cgroup"}
        await p.close()

    run(body)


def test_a_worker_whose_setup_fails_is_retired_and_counts_as_a_failure() -> None:
    async def body() -> None:
        f = Factory(auto_ready=False)
        p = new_pool(f, minimum=0, maximum=1)
        task = asyncio.ensure_future(p.acquire("a", timeout=3))
        for _ in range(50):
            await settle()
            for w in f.made:
                if not w.ready.done():
                    w.ready.set_exception(SetupError("mounts", errno.EPERM, "mount: Operation not permitted"))
            if task.done():
                break
            await asyncio.sleep(0.02)
        with pytest.raises(SetupError) as info:
            await task
        assert info.value.step == "mounts"
        assert f.made and all(w in f.retired for w in f.made)
        await p.close()

    run(body)


def test_fewer_failures_than_the_limit_are_retried() -> None:
    async def body() -> None:
        f = Factory(fail=FAILURES_BEFORE_GIVING_UP - 1)
        p = new_pool(f, minimum=0, maximum=1)
        got = await p.acquire("a", timeout=3)
        assert got in f.made
        assert p.failures == 0  # a success resets the count
        await p.close()

    run(body)


# --- cancellation, timeouts, close ----------------------------------------------------------


def test_a_cancelled_acquire_passes_on_a_worker_delivered_at_the_same_time() -> None:
    async def body() -> None:
        f = Factory(auto_ready=False)
        p = new_pool(f, minimum=0, maximum=1)
        first = asyncio.ensure_future(p.acquire("a"))
        await settle()
        second = asyncio.ensure_future(p.acquire("a"))
        await settle()
        worker = f.made[0]
        worker.ready.set_result(None)  # its _grow delivers it to the first request on the next step...
        first.cancel()  # ...while that request is being cancelled
        await settle()
        assert first.done()
        if first.cancelled():
            assert await second is worker  # passed on to the next request, not lost
        else:
            assert first.result() is worker  # (or the cancel lost the race: the first request has it)
            for w in f.made:
                if not w.ready.done():
                    w.ready.set_result(None)
            await second
        assert worker not in f.retired
        await p.close()

    run(body)


def test_a_cancelled_acquire_returns_a_worker_delivered_at_the_same_time_to_the_pool() -> None:
    async def body() -> None:
        f = Factory(auto_ready=False)
        p = new_pool(f, minimum=0, maximum=1)
        task = asyncio.ensure_future(p.acquire("a"))
        await settle()
        worker = f.made[0]
        worker.ready.set_result(None)
        task.cancel()
        await settle()
        assert task.done()
        if task.cancelled():
            assert worker in p.ready["a"]
        else:
            assert task.result() is worker
        assert worker not in f.retired
        await p.close()

    run(body)


def test_a_timed_out_acquire_leaves_the_late_worker_in_the_pool() -> None:
    async def body() -> None:
        f = Factory(auto_ready=False)
        p = new_pool(f, minimum=0, maximum=1)
        with pytest.raises(TimeoutError):
            await p.acquire("a", timeout=0.02)
        for w in f.made:
            w.ready.set_result(None)
        await settle()
        assert len(p.ready["a"]) == len(f.made) and not f.retired
        assert await p.acquire("a") in f.made
        await p.close()

    run(body)


def test_close_cancels_waiting_requests_and_retires_pooled_workers() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, keys=("a", "b"), minimum=1)
        p.start()
        await settle()
        pooled = list(p.ready["a"])
        f.auto_ready = False
        hit = await p.acquire("a")
        waiting = asyncio.ensure_future(p.acquire("a"))
        await settle()
        assert not waiting.done()
        in_flight = list(f.made[2:])
        pooled_b = list(p.ready["b"])
        assert in_flight and pooled_b
        await p.close()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await settle()
        assert p.ready == {"a": collections.deque(), "b": collections.deque()}
        assert hit in pooled and hit not in f.retired
        assert all(w in f.retired for w in pooled_b)
        assert all(w in f.retired for w in in_flight)  # made, never ready: retired when cancelled
        sizes = {"minimum": 1, "maximum": 4}
        assert p.describe()["profiles"] == {"a": {"ready": 0, "starting": 0, "target": 2, "waiting": 0, **sizes},
                                            "b": {"ready": 0, "starting": 0, "target": 1, "waiting": 0, **sizes}}
        p.done("a")
        await asyncio.sleep(REFILL_DELAY * 3)
        assert len(f.calls) == 2 + len(in_flight)  # a closed pool makes nothing
        assert p.starting == {"a": 0, "b": 0}

    run(body)


def test_resize_clamps_the_target() -> None:
    async def body() -> None:
        f = Factory()
        p = new_pool(f, minimum=0, maximum=4)
        await asyncio.gather(*(p.acquire("a") for _ in range(3)))
        assert p.target["a"] == 3
        p.resize({k: (0, 2) for k in p.keys})
        assert p.target["a"] == 2
        p.resize({k: (5, 8) for k in p.keys})
        assert p.target["a"] == 5
        await p.close()

    run(body)

