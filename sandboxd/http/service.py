"""What each route does, apart from HTTP: admission, the run, health, drain, dependencies.

Every method returns an ``Answer`` (status, Dify body, headers): exactly one per request,
whatever happened.  Admission is two counters: ``max_requests`` in flight (beyond it 503
at once) and ``max_workers`` sent to the daemon at once (the rest wait at most
``queue_timeout``, then 503).

Which failures are retryable: 503 means nothing was started -- the bridge or the daemon
refused, is draining, or the daemon could not be reached or never got the request -- so a
balancer or Dify may send the request to any node again.  A run that went out and got no
answer (the daemon died with it) is 502, and no answer in time 504: either may have run.
While the bridge drains (SIGTERM) new requests and those waiting for a slot are 503 at
once; runs in flight finish within ``drain_grace`` or are cut off with 502.

``enable_network`` maps to the run's ``network`` when the
bridge's ``enable_network`` allows it and the daemon's quota for this uid does; when the
quota refuses it the run goes ahead without network (so Dify, which always asks, works
with any configuration) and a failure at a socket call says why there was none.

``HTTP_PROXY``/``HTTPS_PROXY`` become the variables of runs with network, checked as the
daemon's ``network.proxy`` is (``netpolicy.proxy_refusal``): at start against the policy the
daemon's ``status`` reports (a warning naming the variable and its value), and by the daemon
itself on every run, which refuses a proxy its runs may not reach (``forbidden``, field
``env``).  Either way runs then go without network rather than without the proxy: the
operator's proxy is never bypassed, and code that needs no network still works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import time
from dataclasses import dataclass, field
from typing import Any

from ..client import SandboxdError
from ..fleet.node import Drain
from ..jail.net.netpolicy import Policy, unreachable_proxies
from . import bounds, dify
from .dify import Refusal
from .metrics import Metrics
from .settings import Settings
from .slots import Refused, Slots
from .upstream import Unreachable, Upstream

log = logging.getLogger("sandboxd.http")
DAEMON_SLACK = 45.0  # beyond the run's own timeout: the daemon's queue_timeout (30 s) and some
HEALTH_DEADLINE = 2.0  # a daemon still starting (socket activation) holds the answer: not ready
STATUS_TTL = 0.5
HELLO_TTL = 30.0
NETWORK_REFUSAL_TTL = 30.0  # after the quota refused network, ask again this much later
BUILD_DEADLINE = 900.0
SERVING = ("ready", "outdated")  # with a daemon that does not list serving_environments: states that serve


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    verdict: str = ""  # the run's status, for the metrics
    language: str = ""


def refused(r: Refusal) -> Answer:
    headers = {"Retry-After": str(max(1, round(r.retry_after)))} if r.retry_after else {}
    return Answer(r.status, r.body(), headers)


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def draining() -> Refusal:
    return Refusal(503, "sandboxd-http is draining (stopping): nothing was started; retry on another node",
                   retry_after=1)


class Bridge:
    def __init__(self, settings: Settings, upstream: Upstream, metrics: Metrics, drain: Drain | None = None) -> None:
        self.settings = settings
        self.upstream = upstream
        self.metrics = metrics
        self.drain = drain or Drain()
        self.in_flight = 0
        self.slots = Slots(settings.max_workers)
        self.user = user_name()
        self.network_refused_at = -NETWORK_REFUSAL_TTL
        self.network_refused_why = ""
        self._status: tuple[float, dict[str, Any] | None, str] = (-STATUS_TTL, None, "")
        self._hello: tuple[float, dict[str, Any] | None] = (-HELLO_TTL, None)
        self.bounds = bounds.Bounds(bounds.values_of(settings))  # what runs get: settings, or the daemon's limits
        proxies = {"HTTP_PROXY": settings.http_proxy, "HTTPS_PROXY": settings.https_proxy}
        self.proxy_env = {k: v for name, value in proxies.items() if value
                          for k, v in ((name, value), (name.lower(), value))}

    def proxy_problems(self, status: dict[str, Any] | None) -> list[str]:
        """What is wrong with HTTP_PROXY/HTTPS_PROXY under the network policy ``status`` reports
        (none when the daemon gives runs no network at all: then no run gets them)."""
        net = (status or {}).get("network")
        if not self.proxy_env or not isinstance(net, dict):
            return []
        policy = Policy(net.get("allow") or (), net.get("deny") or ())
        return [self._proxy_words(name, value, why) for name, value, why in unreachable_proxies(policy, self.proxy_env)
                if name.isupper()]

    @staticmethod
    def _proxy_words(name: str, value: str, why: str) -> str:
        return (f"{name.upper()} {value} (sandboxd-http's {name.lower()}) is a proxy runs may not reach: {why} under "
                "sandboxd's network policy; add it to network.allow in sandboxd.yaml or unset it")

    def begin_drain(self, why: str) -> None:
        """No new work from now on: requests waiting for a slot are answered 503 at once."""
        self.drain.begin(why)
        waiting = self.slots.refuse_waiters()
        if waiting:
            log.info("draining: %d requests waiting for a worker answered 503 (nothing was started)", waiting)

    def refuse_network(self, why: str) -> None:
        """Runs go without network for NETWORK_REFUSAL_TTL, saying ``why``; then it is asked again."""
        self.network_refused_at = time.monotonic()
        self.network_refused_why = why

    # -- /v1/sandbox/run ----------------------------------------------------------------------
    async def run(self, body: bytes) -> Answer:
        try:
            ask = dify.parse_run(body)
        except Refusal as r:
            return refused(r)
        s = self.settings
        if self.drain.draining:
            return refused(draining())
        if self.in_flight >= s.max_requests:
            return refused(Refusal(503, f"too many requests: {self.in_flight} in flight (MAX_REQUESTS "
                                   f"{s.max_requests}); retry", retry_after=1))
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            try:
                async with asyncio.timeout(s.queue_timeout):  # (a timeout, unlike wait_for, makes no task)
                    await self.slots.acquire()
            except TimeoutError:
                return refused(Refusal(503, f"busy: all {s.max_workers} workers (MAX_WORKERS) stayed busy for "
                                       f"{s.queue_timeout:g} s; retry", retry_after=1))
            except Refused:
                return refused(draining())
            try:
                return await self._run(ask)
            finally:
                self.slots.release()
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    def _network(self, ask: dify.RunAsk) -> tuple[bool, str]:
        """(network for the run, why it asked and gets none)."""
        if not ask.enable_network:
            return False, ""
        if not self.settings.enable_network:
            return False, "ENABLE_NETWORK is off in sandboxd-http"
        if time.monotonic() - self.network_refused_at < NETWORK_REFUSAL_TTL:
            return False, self.network_refused_why
        return True, ""

    @property
    def network_refusal(self) -> str:
        return (f"the daemon's quota for user {self.user} does not allow network "
                f"(quotas.users.{self.user}.network in sandboxd.yaml)")

    async def _run(self, ask: dify.RunAsk) -> Answer:
        code = dify.with_preload(ask.language, ask.code, ask.preload if self.settings.enable_preload else "")
        network, why_not = self._network(ask)
        for _ in range(2):
            use = self.bounds.values
            fields: dict[str, Any] = {"code": code, "language": ask.language, "timeout_ms": int(use["timeout_ms"]),
                                      "memory_mb": int(use["memory"]) >> 20, "max_output": int(use["max_output"]),
                                      "network": network}
            if network and self.proxy_env:
                fields["env"] = self.proxy_env
            try:
                answer = await self.upstream.call("run", use["timeout_ms"] / 1000 + DAEMON_SLACK, **fields)
            except SandboxdError as e:
                if e.code == "forbidden" and e.details.get("field") == "network" and network:
                    log.warning("the daemon refuses network to user %s: runs go without it (%s)", self.user,
                                self.network_refusal)
                    self.refuse_network(self.network_refusal)
                    network, why_not = False, self.network_refusal
                    continue
                if e.code == "forbidden" and e.details.get("field") == "env" and network and self.proxy_env:
                    why = self._proxy_words(str(e.details.get("variable")), str(e.details.get("value")),
                                            str(e.details.get("reason")))
                    log.warning("%s: runs go without network", why)
                    self.refuse_network(why)
                    network, why_not = False, why
                    continue
                return self._daemon_error(e, "run")
            except Unreachable as e:
                return self._unreachable(e)
            result = answer["result"]
            data = dify.run_data(result, dify.Context(use["timeout_ms"] / 1000, network, why_not))
            log.debug("run %s %s %s exit %s", result.get("run_id"), ask.language, result.get("status"),
                      data["exit_code"])
            return Answer(200, dify.success(data), verdict=str(result.get("status")), language=ask.language)
        return refused(Refusal(500, "sandboxd refused the run twice"))

    def _daemon_error(self, e: SandboxdError, what: str) -> Answer:
        r = dify.daemon_refusal(e.code, e.message, e.details)
        (log.info if r.status == 503 else log.warning)("%s refused by sandboxd: %s: %s", what, e.code, e.message)
        return refused(r)

    def _unreachable(self, e: Unreachable) -> Answer:
        """503 when the request never reached the daemon (retry anywhere); else 504 or 502 (it may have run)."""
        if not e.sent:
            return refused(Refusal(503, f"{e.message}; nothing was started", retry_after=1))
        return refused(Refusal(504 if e.timed_out else 502, e.message, retry_after=1))

    # -- /health ------------------------------------------------------------------------------
    async def status(self) -> tuple[dict[str, Any] | None, str]:
        """The daemon's ``status`` answer (cached briefly), or None and why not."""
        at, st, why = self._status
        if time.monotonic() - at < STATUS_TTL:
            return st, why
        try:
            st, why = await self.upstream.call("status", HEALTH_DEADLINE), ""
        except Unreachable as e:
            st, why = None, ("sandboxd is starting (no answer to status yet)" if e.timed_out else e.message)
        except SandboxdError as e:
            st, why = None, f"sandboxd answered status with {e.code}: {e.message}"
        self._status = (time.monotonic(), st, why)
        return st, why

    async def hello(self, deadline: float = HEALTH_DEADLINE) -> dict[str, Any] | None:
        """The daemon's ``hello`` for this uid (its quota and limits, cached), or None without an answer."""
        at, hello = self._hello
        if hello is None or time.monotonic() - at >= HELLO_TTL:
            try:
                hello = await self.upstream.call("hello", deadline)
            except (Unreachable, SandboxdError):
                return None
            self._hello = (time.monotonic(), hello)
            self.bounds = bounds.check(self.settings, self.user, hello)
        return hello

    @property
    def max_body(self) -> int:
        """The largest body taken: max_body, or what the daemon's frame holds when the default is above it."""
        return int(self.bounds.values["max_body"])

    async def health(self) -> Answer:
        st, why = await self.status()
        if st is None:
            return Answer(503, {"status": "unavailable", "reason": why})
        problems = []
        if st.get("stopping"):
            problems.append("sandboxd is stopping")
        if (st.get("self_test") or {}).get("passed") is False:
            problems.append("sandboxd's self-test failed")
        if not st.get("root"):
            problems.append("sandboxd has no root yet")
        if not ((st.get("runtimes") or {}).get("python3") or {}).get("available", True):
            problems.append("python3 runs are not available")
        environments = st.get("environments") or {}
        serving = st.get("serving_environments", [n for n, state in environments.items() if state in SERVING])
        if dify.DEFAULT_ENVIRONMENT in environments and dify.DEFAULT_ENVIRONMENT not in serving:
            state = environments[dify.DEFAULT_ENVIRONMENT]
            problems.append(f"sandboxd's environment {dify.DEFAULT_ENVIRONMENT}, which python3 runs get, is {state} "
                            "and no build of it serves yet" + (" (sandboxctl env list says why)"
                                                               if state == "failed" else ""))
        problems += await self.checks(st)
        if problems:
            return Answer(503, {"status": "unavailable", "reason": "; ".join(problems)})
        capacity = st.get("capacity") or {}
        quota = (await self.hello() or {}).get("quota") or {}
        return Answer(200, {"status": "ok", "sandboxd": st.get("version"), "capacity": capacity,
                            "user": self.user, "network": bool(quota.get("network")) and self.settings.enable_network,
                            "preload": self.settings.enable_preload})

    async def checks(self, st: dict[str, Any]) -> list[str]:
        """What only the bridge knows is wrong (its uid's quota against its settings): for /health
        and readiness (``fleet.Node``)."""
        if await self.hello() is None:
            return [f"sandboxd does not answer hello for user {self.user}"]
        return list(self.bounds.errors)

    # -- /v1/sandbox/dependencies ---------------------------------------------------------------
    async def _environments(self) -> list[dict[str, Any]]:
        answer = await self.upstream.call("environments", HEALTH_DEADLINE * 5)
        envs = answer.get("environments")
        return [e for e in envs if isinstance(e, dict)] if isinstance(envs, list) else []

    async def dependencies(self, asked: str | None, rebuild: bool = False, listed: bool = True) -> Answer:
        """List (or, with ``rebuild``, rebuild and list) the packages of a language's environment."""
        language = dify.LANGUAGES.get(asked or "python3")
        if language is None:
            return refused(dify.bad_request("language: expected python3 or nodejs"))
        try:
            env = dify.environment_for(await self._environments(), language)
            if rebuild and env is not None:  # without one there is nothing to rebuild
                answer = await self.upstream.call("build_environment", BUILD_DEADLINE, name=env.get("name"))
                built = answer.get("environment")
                env = built if isinstance(built, dict) else env
        except SandboxdError as e:
            if e.code == "unknown_op":
                return refused(Refusal(501, "dependencies need a sandboxd with environments (the environments "
                                       "and build_environment operations); this sandboxd does not have them"))
            if e.code == "forbidden":
                return refused(Refusal(403, f"sandboxd refused user {self.user}: rebuilding environments is for "
                                       "sandboxd admins (daemon.admin_group)"))
            return self._daemon_error(e, "dependencies")
        except Unreachable as e:
            return self._unreachable(e)
        if not listed:
            return Answer(200, dify.success({}))
        return Answer(200, dify.success({"dependencies": dify.dependencies(env)}))
