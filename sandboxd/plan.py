"""A request, validated against the caller's quota, becomes an immutable plan: ``run`` a
RunPlan, ``session_open`` a SessionPlan, ``session_exec`` a CellPlan.

Every field is checked for type and range; a problem names the field
(``bad_request``).  Asking for more than the caller's quota allows is ``forbidden``
with the limit in the details -- never silently capped.  Unknown fields are refused
by name, so a typo (``timeout`` for ``timeout_ms``) does not silently do nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .common import sizes
from .common.errors import RequestError, bad_request, forbidden
from .common.hints import check_unknown
from .config import ALIASES, LANGUAGES, Config, QuotaLimits
from .jail.net.netpolicy import policy_of, unreachable_proxies
from .jail.spec.plans import CellPlan, RunPlan, SessionPlan
from .jail.spec.settings import DEFAULT_ENVIRONMENT
from .quota import allows_environment

RUN_FIELDS = ("op", "id", "code", "language", "stdin", "timeout_ms", "cpu_ms", "memory_mb", "network", "files",
              "env", "max_output", "stream", "display", "environment")
SESSION_FIELDS = ("op", "id", "language", "memory_mb", "cpu_ms", "idle_timeout_ms", "max_lifetime_ms", "network",
                  "files", "env", "display", "environment")
EXEC_FIELDS = ("op", "id", "session_id", "code", "stdin", "timeout_ms", "files", "stream", "display", "max_output")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ENV = 256
MAX_FILES = 1000
MIN_MEMORY_MB = 16


def _int(req: Mapping[str, Any], name: str, default: int, lo: int) -> int:
    value = req.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(name, f"expected an integer, got {type(value).__name__}")
    if value < lo:
        raise bad_request(name, f"expected at least {lo}, got {value}")
    return int(value)


def build(req: Mapping[str, Any], limits: QuotaLimits, cfg: Config, run_id: str) -> RunPlan:
    check_unknown(req, RUN_FIELDS)
    code = _code(req)
    language = _language(req, cfg)
    stdin = _stdin(req)
    max_timeout_ms = int(limits.max_timeout * 1000)
    timeout_ms = _timeout(req, max_timeout_ms, cfg)
    cpu_ms = _int(req, "cpu_ms", timeout_ms, 1)
    if cpu_ms > max_timeout_ms:
        raise above("cpu_ms", cpu_ms, max_timeout_ms, "ms", "max_timeout")
    memory_mb = _memory(req, min(cfg.limits.memory, limits.max_memory), limits.max_memory, "max_memory")
    max_output = _max_output(req, limits, cfg)
    network = _network(req, limits)
    files = _files(req.get("files"), limits, cfg)
    env = _env(req.get("env"))
    if network:
        env = {**proxy_env(cfg), **env}
        check_proxies(env, cfg)
    return RunPlan(
        run_id=run_id,
        code=code,
        language=language,
        stdin=stdin,
        files=files,
        env=env,
        timeout_ms=timeout_ms,
        cpu_ms=cpu_ms,
        memory_bytes=memory_mb << 20,
        pids=cfg.limits.pids,
        output_bytes=max_output,
        file_size_bytes=cfg.limits.file_size,
        out_files_bytes=min(cfg.limits.out_files_size, limits.max_files_size),
        out_files_count=cfg.limits.out_files,
        nofile=cfg.limits.nofile,
        network=network,
        display=_flag(req, "display"),
        environment=environment(req, limits, cfg, language),
    )


def build_session(req: Mapping[str, Any], limits: QuotaLimits, cfg: Config, session_id: str) -> SessionPlan:
    """A ``session_open`` request: the session's limits for its whole life."""
    check_unknown(req, SESSION_FIELDS)
    language = _language(req, cfg)
    memory_mb = _memory(req, min(cfg.limits.memory, limits.max_session_memory), limits.max_session_memory,
                        "max_session_memory")
    cpu_ms = _int(req, "cpu_ms", 0, 1) if req.get("cpu_ms") is not None else 0
    idle_ms = _within(req, "idle_timeout_ms", int(limits.max_session_idle * 1000), "max_session_idle")
    lifetime_ms = _within(req, "max_lifetime_ms", int(limits.max_session_lifetime * 1000), "max_session_lifetime")
    network = _network(req, limits)
    files = _files(req.get("files"), limits, cfg)
    env = _env(req.get("env"))
    if network:
        env = {**proxy_env(cfg), **env}
        check_proxies(env, cfg)
    display = _flag(req, "display")
    if display and language != "python3":
        raise bad_request("display", f"figures come from matplotlib: python3 sessions only, not {language}")
    return SessionPlan(session_id=session_id, language=language, files=files, env=env, memory_bytes=memory_mb << 20,
                       cpu_ms=cpu_ms, idle_timeout_ms=idle_ms, max_lifetime_ms=lifetime_ms, pids=cfg.limits.pids,
                       file_size_bytes=cfg.limits.file_size,
                       out_files_bytes=min(cfg.limits.out_files_size, limits.max_files_size),
                       out_files_count=cfg.limits.out_files, nofile=cfg.limits.nofile, network=network,
                       display=display, environment=environment(req, limits, cfg, language),
                       cpus=cfg.jail.cpus, idle_cpus=cfg.jail.session_idle_cpus,
                       output_bytes=min(cfg.limits.output, limits.max_output))


def build_cell(req: Mapping[str, Any], limits: QuotaLimits, cfg: Config, run_id: str, language: str) -> CellPlan:
    """A ``session_exec`` request (``session_id`` is the caller's to check)."""
    check_unknown(req, EXEC_FIELDS)
    display = _flag(req, "display")
    if display and language != "python3":
        raise bad_request("display", f"figures come from matplotlib: python3 sessions only, not {language}")
    stdin = _stdin(req)
    if stdin and language != "python3":
        raise bad_request("stdin", f"{language} sessions have no stdin of their own per exec: pass data in files")
    return CellPlan(run_id=run_id, code=_code(req), stdin=stdin, files=_files(req.get("files"), limits, cfg),
                    timeout_ms=_timeout(req, int(limits.max_timeout * 1000), cfg),
                    output_bytes=_max_output(req, limits, cfg), display=display)


def environment(req: Mapping[str, Any], limits: QuotaLimits, cfg: Config, language: str) -> str:
    """The environment a python3 run or session gets: the one it names, else ``default`` when
    there is one (and the caller may use it), else none ("": the base root)."""
    name = req.get("environment")
    if name is None:
        implicit = language == "python3" and DEFAULT_ENVIRONMENT in cfg.environments
        return DEFAULT_ENVIRONMENT if implicit and allows_environment(limits, DEFAULT_ENVIRONMENT) else ""
    if not isinstance(name, str):
        raise bad_request("environment", f"expected a name, got {type(name).__name__}")
    if language != "python3":
        raise bad_request("environment", f"environments are Python's; {language} runs have none")
    if name not in cfg.environments:
        raise bad_request("environment", f"no environment {name[:64]!r} here", known=sorted(cfg.environments))
    if not allows_environment(limits, name):
        raise forbidden(f"the environment {name} is not allowed for you", field="environment",
                        allowed=list(limits.environments))
    return name


def wants_stream(req: Mapping[str, Any]) -> bool:
    """``stream: true``: output comes as events while the code runs (run, session_exec)."""
    return _flag(req, "stream")


def _code(req: Mapping[str, Any]) -> str:
    code = req.get("code")
    if not isinstance(code, str):
        raise bad_request("code", "required, a string" if code is None else
                          f"expected a string, got {type(code).__name__}")
    return code


def _language(req: Mapping[str, Any], cfg: Config) -> str:
    language = req.get("language", "python3")
    if not isinstance(language, str) or ALIASES.get(language, language) not in LANGUAGES:
        raise bad_request("language", f"unknown language {language!r}", known=[*LANGUAGES, *ALIASES])
    language = ALIASES.get(language, language)
    if cfg.runtime(language) is None:
        raise bad_request("language", f"{language} is not available here: {cfg.runtimes[language].why_not}",
                          known=[lang for lang in LANGUAGES if cfg.runtime(lang)])
    return language


def _stdin(req: Mapping[str, Any]) -> bytes:
    stdin = req.get("stdin", b"")
    if stdin is None:
        return b""
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    if not isinstance(stdin, bytes):
        raise bad_request("stdin", f"expected bytes (msgpack bin), got {type(stdin).__name__}")
    return stdin


def _timeout(req: Mapping[str, Any], max_timeout_ms: int, cfg: Config) -> int:
    timeout_ms = _int(req, "timeout_ms", min(int(cfg.limits.timeout * 1000), max_timeout_ms), 1)
    if timeout_ms > max_timeout_ms:
        raise above("timeout_ms", timeout_ms, max_timeout_ms, "ms", "max_timeout")
    return timeout_ms


def above(name: str, value: int, limit: int, unit: str, quota: str) -> RequestError:
    """``forbidden``, said in the units people use as well as the protocol's."""
    def human(n: int) -> str:
        return (sizes.human_duration(n / 1000) if unit == "ms" else
                sizes.human_size(n << 20) if unit == "MiB" else sizes.human_size(n))
    return forbidden(f"{name} {value} ({human(value)}) is above your limit of {limit} ({human(limit)}, "
                     f"your quota's {quota})", field=name, limit=limit)


def _within(req: Mapping[str, Any], name: str, limit: int, quota: str) -> int:
    """An optional duration in ms, at most ``limit`` (its default)."""
    value = _int(req, name, limit, 1)
    if value > limit:
        raise above(name, value, limit, "ms", quota)
    return value


def _memory(req: Mapping[str, Any], default: int, limit: int, quota: str) -> int:
    max_memory_mb = limit >> 20
    memory_mb = _int(req, "memory_mb", default >> 20, MIN_MEMORY_MB)
    if memory_mb > max_memory_mb:
        raise above("memory_mb", memory_mb, max_memory_mb, "MiB", quota)
    return memory_mb


def _max_output(req: Mapping[str, Any], limits: QuotaLimits, cfg: Config) -> int:
    max_output = _int(req, "max_output", min(cfg.limits.output, limits.max_output), 1)
    if max_output > limits.max_output:
        raise above("max_output", max_output, limits.max_output, "bytes", "max_output")
    return max_output


def _flag(req: Mapping[str, Any], name: str) -> bool:
    value = req.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(name, f"expected true or false, got {type(value).__name__}")
    return value


def _network(req: Mapping[str, Any], limits: QuotaLimits) -> bool:
    network = _flag(req, "network")
    if network and not limits.network:
        raise forbidden("network access is not allowed for you", field="network")
    return network


def _files(raw: Any, limits: QuotaLimits, cfg: Config) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad_request("files", "expected a map of relative path to bytes")
    if len(raw) > MAX_FILES:
        raise bad_request("files", f"at most {MAX_FILES} files")
    total = 0
    out: dict[str, bytes] = {}
    for name, data in raw.items():
        if not isinstance(name, str):
            raise bad_request("files", "file names must be strings")
        parts = name.split("/")
        if (not name or name.startswith("/") or "\0" in name or len(name) > 1024 or len(parts) > 16
                or any(p in ("", ".", "..") or len(p.encode()) > 255 for p in parts)):
            raise bad_request("files", f"{name!r} is not a plain relative path (no '..', no leading '/')",
                              file=name)
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, bytes):
            raise bad_request("files", f"{name!r}: expected bytes (msgpack bin)", file=name)
        total += len(data)
        out[name] = data
    directories = {name[:i] for name in out for i in range(len(name)) if name[i] == "/"}
    for name in out:
        if name in directories:
            raise bad_request("files", f"{name!r} is both a file and a directory", file=name)
    if total > limits.max_files_size:
        raise forbidden(f"input files total {sizes.human_size(total)} ({total} bytes), above your limit of "
                        f"{sizes.human_size(limits.max_files_size)} (your quota's max_files_size)",
                        field="files", limit=limits.max_files_size)
    if total > cfg.jail.scratch_size // 2:
        raise forbidden(f"input files total {total} bytes; the scratch space holds "
                           f"{cfg.jail.scratch_size} and keeps half for the run", field="files",
                           limit=cfg.jail.scratch_size // 2)
    return out


def proxy_env(cfg: Config) -> dict[str, str]:
    """The proxy variables of runs with network (both spellings: programs read either)."""
    net = cfg.network
    env: dict[str, str] = {}
    if net.proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[name] = net.proxy
    if net.no_proxy:
        env["NO_PROXY"] = env["no_proxy"] = net.no_proxy
    return env


def check_proxies(env: Mapping[str, str], cfg: Config) -> None:
    """A run with network is given no proxy it may not reach (``network.proxy`` is checked with
    the same function when the configuration is loaded; this is for the request's own ``env``,
    e.g. sandboxd-http's HTTP_PROXY): ``forbidden``, naming the variable, its value and why."""
    bad = unreachable_proxies(policy_of(cfg.network.allow, cfg.network.deny), env)
    if bad:
        name, value, why = bad[0]
        raise forbidden(f"env: {name} is {value}, a proxy runs may not reach: {why} under the daemon's network "
                        "policy; add it to network.allow in sandboxd.yaml, or run without network",
                        field="env", variable=name, value=value, reason=why)


def _env(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_ENV:
        raise bad_request("env", f"expected a map of at most {MAX_ENV} names to strings")
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):
            raise bad_request("env", f"{key!r} is not a valid variable name", variable=str(key))
        if not isinstance(value, str) or "\0" in value or len(value) > 65536:
            raise bad_request("env", f"{key}: expected a string without NUL, at most 64 KiB", variable=key)
        out[key] = value
    return out
