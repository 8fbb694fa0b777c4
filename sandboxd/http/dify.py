"""The Dify wire format, in one place: what Dify sends, what it reads back, and the words.

Dify posts ``{"language", "code", "preload", "enable_network"}`` (unknown fields, such as
old clients' ``dependencies``, are ignored) and reads::

    {"code": 0, "message": "success", "data": {"stdout": str, "stderr": str, "error": str, "exit_code": int}}

It fails the node when ``data.error`` is non-empty and otherwise takes ``data.stdout``.
So ``error`` is empty exactly when the run exited 0 -- stderr alone (logging, warnings)
never fails a node -- and otherwise starts with a headline users already grep for
(``error: timeout``, ``error: operation not permitted: <syscall>``, the limit that was
hit, the exit status), followed by the failed run's stderr.  A request the bridge
refuses is ``{"code": -<HTTP status>, "message": ..., "data": null}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .. import config

LANGUAGES = {**{lang: lang for lang in config.LANGUAGES}, **config.ALIASES}  # as Dify names them -> ours
SOCKET_CALLS = ("socket", "socketpair", "connect", "bind", "sendto", "sendmsg")

# The daemon's error codes -> the HTTP status the bridge answers with.  Dify retries 502, 503 and 504.
DAEMON_ERRORS = {
    "busy": 503,            # every worker busy and the daemon's queue full
    "quota_exceeded": 503,  # a rate, budget or count of the bridge's uid is used up
    "unavailable": 503,     # the daemon is shutting down
    "unknown_op": 501,      # an older daemon without the operation
    "forbidden": 403,       # the bridge's uid may not do this (its quota, or not an admin)
    "bad_request": 400,
    "not_found": 404,
    "frame_too_large": 413,  # a request past the daemon's daemon.max_frame
}
DEFAULT_ENVIRONMENT = "default"  # the daemon's environment a python3 run that names none gets


class Refusal(Exception):
    """A request answered with an HTTP error and a Dify error body."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return failure(self.status, self.message)


def success(data: Any) -> dict[str, Any]:
    return {"code": 0, "message": "success", "data": data}


def failure(status: int, message: str) -> dict[str, Any]:
    return {"code": -status, "message": message, "data": None}


def bad_request(message: str) -> Refusal:
    return Refusal(400, message)


@dataclass(frozen=True)
class RunAsk:
    """A validated ``/v1/sandbox/run`` body."""

    language: str  # the daemon's name: python3 or nodejs
    code: str
    preload: str
    enable_network: bool


def parse_run(body: bytes) -> RunAsk:
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise bad_request("the body must be a JSON object with language and code")
    language = req.get("language")
    if not isinstance(language, str) or language not in LANGUAGES:
        shown = language if isinstance(language, str) and len(language) <= 64 else type(language).__name__
        raise bad_request(f"unsupported language {shown!r}: expected python3 or nodejs")
    code = req.get("code")
    if not isinstance(code, str) or not code:  # only blanks run, and print nothing, as in dify-sandbox
        raise bad_request("code: required, a string" if not isinstance(code, str) else "code: empty")
    preload = req.get("preload")
    if preload is None:
        preload = ""
    if not isinstance(preload, str):
        raise bad_request("preload: expected a string")
    network = req.get("enable_network")
    if network is None:
        network = False
    if not isinstance(network, bool):
        raise bad_request("enable_network: expected true or false")
    return RunAsk(LANGUAGES[language], code, preload, network)


def with_preload(language: str, code: str, preload: str) -> str:
    """The code the run executes: ``preload`` first, in the same program, inside the jail.

    Python: both are compiled apart, so the code keeps its own line numbers and may start
    with ``from __future__``; both run in ``__main__``.  Node.js: the preload is evaluated
    at the start of line 1, in the module's scope, so line numbers stay the code's own.
    """
    if not preload:
        return code
    if language == "nodejs":
        return f"eval({json.dumps(preload)});{code}"
    return (f"exec(compile({preload!r}, '<preload>', 'exec'))\n"
            f"exec(compile({code!r}, '<code>', 'exec'))\n")


@dataclass(frozen=True)
class Context:
    """What the bridge knows about a run that the result does not say."""

    timeout_s: float
    network: bool  # the run had network
    network_refused: str = ""  # why a run asked for network and did not get it


def run_data(result: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The daemon's run result as Dify's ``data``."""
    stdout = _text(result.get("stdout"))
    stderr = _text(result.get("stderr"))
    return {"stdout": stdout, "stderr": stderr, "error": error_text(result, ctx, stderr),
            "exit_code": exit_code(result)}


def exit_code(result: dict[str, Any]) -> int:
    if isinstance(result.get("exit_code"), int):
        return int(result["exit_code"])
    if isinstance(result.get("signal"), int):
        return 128 + int(result["signal"])  # the shell's way
    return -1  # it never exited by itself: the jail could not be set up


def error_text(result: dict[str, Any], ctx: Context, stderr: str) -> str:
    """Empty when the run exited 0; else a headline, then the run's stderr."""
    status = result.get("status")
    if status == "ok":
        return ""
    head = headline(result, ctx)
    return f"{head}\n{stderr}" if stderr.strip() else head


def headline(result: dict[str, Any], ctx: Context) -> str:
    status = result.get("status")
    reason = str(result.get("reason") or "")
    if status == "exit_nonzero":
        return f"error: exit status {result.get('exit_code')}"
    if status == "timeout":
        return f"error: timeout: the run reached its wall-clock limit of {ctx.timeout_s:g} s (WORKER_TIMEOUT)"
    if status == "cpu_limit":
        return "error: timeout: the run used up its CPU time"
    if status == "memory_limit":
        peak = result.get("memory_peak_kb")
        return f"error: memory limit exceeded: {reason}" + (f" (peak {peak // 1024} MiB)" if peak else "")
    if status == "output_limit":
        stream = "stdout" if result.get("stdout_truncated") else "stderr"
        return f"error: output limit exceeded: {stream} went past its size limit; the run was killed"
    if status == "pids_limit":
        return "error: process limit reached: a fork failed at the run's limit of processes and threads"
    if status == "blocked_syscall":
        name = result.get("blocked_syscall") or "unknown"
        text = f"error: operation not permitted: {name} (a system call the sandbox does not allow)"
        if name in SOCKET_CALLS and not ctx.network:
            text += "; this run had no network" + (f": {ctx.network_refused}" if ctx.network_refused else "")
        return text
    if status == "signaled":
        return f"error: killed by signal {result.get('signal_name') or result.get('signal')}" + (
            f": {reason}" if reason and "killed by" not in reason else "")
    if status == "sandbox_error":
        err = result.get("error") or {}
        return f"error: sandbox error: {reason or 'setup failed'}: {err.get('message', '')}; the code did not run"
    return f"error: {status}: {reason}"


def _text(data: Any) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return "" if data is None else str(data)


def daemon_refusal(code: str, message: str, details: dict[str, Any]) -> Refusal:
    """An error answer of the daemon as the bridge's HTTP answer."""
    status = DAEMON_ERRORS.get(code, 500)
    retry = details.get("retry_after_ms")
    words = {
        "busy": "sandboxd is busy (every worker running, its queue full); retry",
        "quota_exceeded": f"the quota of the bridge's user is used up ({details.get('limit', 'limit')}); retry",
        "unavailable": ("sandboxd is draining: nothing was started; retry on another node" if details.get("draining")
                        else "sandboxd is unavailable; retry"),
        "unknown_op": "this sandboxd does not have that operation (an older version)",
        "forbidden": "sandboxd refused the bridge's user",
        "frame_too_large": "the request is larger than sandboxd takes (its daemon.max_frame)",
    }.get(code, f"sandboxd answered {code}")
    if not isinstance(retry, (int, float)):
        retry = 1000 if status == 503 else None  # every 503 is retryable: it says when
    return Refusal(status, f"{words}: {message}" if message else words,
                   retry_after=retry / 1000 if retry is not None else None)


def environment_for(environments: list[dict[str, Any]], language: str) -> dict[str, Any] | None:
    """The daemon's environment that the bridge's runs of ``language`` get: ``default`` for
    python3 (what a run that names none gets); none for nodejs, whose packages are the root's."""
    if language != "python3":
        return None
    return next((env for env in environments if env.get("name") == DEFAULT_ENVIRONMENT), None)


def dependencies(env: dict[str, Any] | None) -> list[dict[str, str]]:
    """Dify's ``[{"name", "version"}]`` of an environment's packages."""
    return [{"name": str(p.get("name", "")), "version": str(p.get("version", ""))}
            for p in (env or {}).get("packages") or [] if isinstance(p, dict)]
