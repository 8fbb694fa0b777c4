"""The node as a balancer sees it (sandboxd.fleet.node), and the bridge's slots: pure logic,
no daemon.  tests/test_http_fleet.py has the same against a real daemon and bridge."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sandboxd.fleet.node import Drain, Node, View, agent_line, capacity, weight
from sandboxd.http.settings import SettingsError, load
from sandboxd.http.slots import Refused, Slots

STATUS: dict[str, Any] = {
    "version": "0.1.0", "ready": True, "not_ready": [], "draining": False,
    "capacity": {"capacity": 8, "running": 3, "queued": 1, "queue_max": 64, "reserved": 1},
    "pool": {"profiles": {"python3": {"ready": 2}, "python3+net": {"ready": 1}, "nodejs": {"ready": 1},
                          "python3@default": {"ready": 4}}},
    "sessions": {"open": 2, "limit": 64, "busy": 1},
}


def test_capacity_counts_free_workers_and_ready_workers_per_runtime() -> None:
    cap = capacity(STATUS, draining=False)
    assert cap == {"workers": 8, "running": 3, "queued": 1, "queue_max": 64, "free": 4,
                   "ready_workers": {"python3": 7, "nodejs": 1}, "sessions": {"open": 2, "limit": 64, "busy": 1},
                   "draining": False}
    assert capacity(STATUS, draining=True)["draining"] is True
    assert capacity({**STATUS, "draining": True}, draining=False)["draining"] is True
    assert capacity(None, draining=False)["workers"] == 0


def test_the_weight_is_the_free_share_never_zero() -> None:
    assert weight(capacity(STATUS, False)) == 50
    full = capacity({**STATUS, "capacity": {"capacity": 8, "running": 8, "queued": 5}}, False)
    assert full["free"] == 0 and weight(full) == 1  # the last choice, not a drain
    assert weight(capacity({**STATUS, "capacity": {"capacity": 4, "running": 0, "queued": 0}}, False)) == 100
    assert weight(capacity(None, False)) == 1


def test_the_agent_says_up_ready_drain_or_down() -> None:
    cap = capacity(STATUS, False)
    assert agent_line(View(True, [], cap, reachable=True)) == "up ready 50%\n"  # "ready" ends a drain
    drained = capacity(STATUS, True)
    assert agent_line(View(False, ["draining"], drained, reachable=True)) == "drain\n"
    assert agent_line(View(False, ["no root yet"], cap, reachable=True)) == "down\n"
    assert agent_line(View(False, ["not reachable"], drained, reachable=False)) == "down\n"


def test_the_node_joins_the_daemons_readiness_its_own_checks_and_its_drain() -> None:
    async def scenario() -> list[Any]:
        answers: dict[str, Any] = {"status": dict(STATUS), "why": ""}

        async def status() -> tuple[dict[str, Any] | None, str]:
            return answers["status"], answers["why"]

        async def checks(st: dict[str, Any]) -> list[str]:
            return ["WORKER_TIMEOUT too long"] if st.get("version") == "old" else []

        node = Node(status, checks)
        seen = [await node.view()]
        answers["status"] = {**STATUS, "ready": False, "not_ready": ["no warm worker yet"]}
        seen.append(await node.view())
        answers["status"] = {**STATUS, "version": "old"}
        seen.append(await node.view())
        answers["status"], answers["why"] = None, "sandboxd is not reachable"
        seen.append(await node.view())
        answers["status"] = STATUS
        node.drain.begin("SIGTERM")
        seen.append(await node.view())
        return seen

    ready, warming, own, gone, draining = asyncio.run(scenario())
    assert ready.ready and ready.state == "ready" and ready.version == "0.1.0"
    assert warming.not_ready == ["no warm worker yet"] and warming.state == "down"
    assert own.not_ready == ["WORKER_TIMEOUT too long"] and own.state == "down"
    assert gone.not_ready == ["sandboxd is not reachable"] and not gone.reachable and gone.state == "down"
    assert draining.state == "drain" and draining.not_ready == ["draining (SIGTERM)"]


def test_drain_waits_for_requests_in_flight_then_cuts_the_rest() -> None:
    async def scenario() -> tuple[int, int, list[str]]:
        drain = Drain()
        done: list[str] = []

        async def request(name: str, seconds: float) -> None:
            with drain.track():
                try:
                    await asyncio.sleep(seconds)
                    done.append(name)
                except asyncio.CancelledError:
                    done.append(f"{name} cut")
                    raise

        quick = asyncio.create_task(request("quick", 0))
        await asyncio.sleep(0)
        drain.begin("test")
        assert drain.draining and drain.in_flight == 1
        first = await drain.settle(5)  # the quick one finishes
        slow = asyncio.create_task(request("slow", 60))
        await asyncio.sleep(0)
        second = await drain.settle(0.01)
        await asyncio.gather(quick, slow, return_exceptions=True)
        return first, second, done

    first, second, done = asyncio.run(scenario())
    assert (first, second) == (0, 1) and done == ["quick", "slow cut"]


def test_slots_go_in_order_and_a_drain_lets_every_waiter_go() -> None:
    async def scenario() -> list[str]:
        slots = Slots(1)
        order: list[str] = []

        async def worker(name: str) -> None:
            try:
                await slots.acquire()
            except Refused:
                order.append(f"{name} refused")
                return
            order.append(name)
            await asyncio.sleep(0)
            slots.release()

        await slots.acquire()  # the one slot is taken
        tasks = [asyncio.create_task(worker(n)) for n in ("a", "b")]
        await asyncio.sleep(0)
        slots.release()  # handed to a, then a hands it to b
        await asyncio.gather(*tasks)
        await slots.acquire()
        late = [asyncio.create_task(worker(n)) for n in ("c", "d")]
        await asyncio.sleep(0)
        assert slots.refuse_waiters() == 2
        await asyncio.gather(*late)
        slots.release()
        assert slots.free == 1
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c refused", "d refused"]


def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on() -> None:
    async def scenario() -> int:
        slots = Slots(1)
        await slots.acquire()
        first = asyncio.create_task(slots.acquire())
        second = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # handed to first ...
        first.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 5)  # so second has it
        slots.release()
        return slots.free

    assert asyncio.run(scenario()) == 1


def test_the_agent_needs_an_address_of_its_own() -> None:
    env = {"API_KEY": "k"}
    assert load(env=env).agent_listen == ""
    assert load(env={**env, "SANDBOXD_HTTP_AGENT_LISTEN": "0.0.0.0:8195"}).agent_listen == "0.0.0.0:8195"
    with pytest.raises(SettingsError) as e:
        load(env={**env, "SANDBOXD_HTTP_AGENT_LISTEN": "127.0.0.1:8194"})
    assert "agent_listen: expected another address than listen's" in str(e.value)
    with pytest.raises(SettingsError) as e:
        load(env={**env, "SANDBOXD_HTTP_AGENT_LISTEN": "nowhere"})
    assert "SANDBOXD_HTTP_AGENT_LISTEN" in str(e.value)
