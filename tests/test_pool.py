"""Warm workers: preload, empty pools, single use."""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

from conftest import require
from harness import DaemonProcess

NUMPY_DIR = "/usr/lib/python3/dist-packages/numpy"


def test_preloaded_numpy_works_in_the_forked_worker(make_daemon: Any) -> None:
    require(os.path.isdir(NUMPY_DIR), "python3-numpy is not installed (make dev installs it)")
    d: DaemonProcess = make_daemon({"root": {"extra_paths": [NUMPY_DIR],
                                             "python_path": ["/usr/lib/python3/dist-packages"]},
                                    "jail": {"preload": ["numpy"]}})
    code = ("import sys\nalready = 'numpy' in sys.modules\nimport numpy as np\n"
            "a = np.random.default_rng(0).random((200, 200))\n"
            "print(already, round(float(np.linalg.det(np.eye(4) * 2)), 3),\n"
            "      np.allclose(a @ np.linalg.inv(a), np.eye(200)))")
    r = d.run(code)
    assert r["status"] == "ok", r["stderr"]
    assert r["stdout"] == b"True 16.0 True\n"
    with d.client() as c:
        st = c.status()
    assert st["fork_server"]["preloaded"] == ["numpy"] and st["fork_server"]["preload_errors"] == {}


def test_a_preload_that_fails_is_reported_not_fatal(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"jail": {"preload": ["no_such_module", "json"]}})
    with d.client() as c:
        st = c.status()
    assert st["fork_server"]["preloaded"] == ["json"]
    assert "No module named" in st["fork_server"]["preload_errors"]["no_such_module"]
    assert "preload no_such_module failed" in d.log()


def test_warmup_runs_once_in_the_fork_server_before_any_run(make_daemon: Any) -> None:
    # The warm-up's effect on a preloaded module reaches every run; its own names and its
    # output do not.
    warmup = ("import json, sys, time\njson.WARMED = json.dumps([1, 2])\njson.WARMED_AT = time.monotonic_ns()\n"
              "private = 'warm-up local'\nprint('warm-up noise')\nprint('warm-up noise', file=sys.stderr)\n")
    d: DaemonProcess = make_daemon({"jail": {"preload": ["json"], "warmup": warmup}})
    code = "import json\nprint(json.WARMED, 'private' in globals(), 'warm-up noise')"
    for _ in range(3):  # every worker, not only the first
        r = d.run(code)
        assert r["status"] == "ok", r["stderr"]
        assert r["stdout"] == b"[1, 2] False warm-up noise\n" and r["stderr"] == b""
    # once, in the fork server: every worker inherits the same moment, none runs it again
    stamps = {d.run("import json; print(json.WARMED_AT)")["stdout"] for _ in range(3)}
    assert len(stamps) == 1, stamps
    with d.client() as c:
        fs = c.status()["fork_server"]
    assert fs["warmed_up"] is True and fs["preload_errors"] == {}
    assert "warm-up noise" not in d.log().replace(code, "")


def test_a_warmup_that_fails_is_reported_and_runs_go_on(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"jail": {"warmup": "import json\nraise RuntimeError('cold as ice')"}})
    assert d.run("print(6 * 7)")["stdout"] == b"42\n"
    with d.client() as c:
        fs = c.status()["fork_server"]
    assert fs["warmed_up"] is False
    assert fs["preload_errors"] == {"(warmup)": "RuntimeError: cold as ice"}
    assert "preload (warmup) failed: RuntimeError: cold as ice" in d.log()


def test_an_empty_pool_never_fails_a_request(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon({"pool": {"min": 0, "max": 0}, "daemon": {"workers": 8}})

    def one(i: int) -> bytes:
        out: bytes = d.run(f"print({i})")["stdout"]
        return out

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(one, range(24)))
    assert outs == [f"{i}\n".encode() for i in range(24)]


def test_the_fork_servers_image_leaves_threading_and_random_to_the_run(daemon: DaemonProcess) -> None:
    # Not imported before user code (their after-fork hooks would write pages in every worker);
    # a run that imports them gets working fresh copies.
    r = daemon.run("import sys\nprint(sorted(m for m in ('threading', 'random', 'tempfile') if m in sys.modules))\n"
                   "import threading, random\nt = threading.Thread(target=print, args=(random.random() < 1,))\n"
                   "t.start(); t.join()")
    assert (r["status"], r["stdout"]) == ("ok", b"[]\nTrue\n"), r


def test_workers_are_single_use(daemon: DaemonProcess) -> None:
    # Each run checks for the mark the one before left in its interpreter, then leaves one:
    # a reused worker would see it.
    code = "import json\nprint(hasattr(json, 'SANDBOXD_MARK'))\njson.SANDBOXD_MARK = 1"
    assert [daemon.run(code)["stdout"] for _ in range(6)] == [b"False\n"] * 6
    daemon.run("import builtins, sys; builtins.LEFTOVER = 1; sys.modules['leak'] = 1")
    r = daemon.run("import builtins, sys; print(hasattr(builtins, 'LEFTOVER'), 'leak' in sys.modules)")
    assert r["stdout"] == b"False False\n"


def test_a_run_gets_more_memory_than_a_waiting_worker_has(daemon: DaemonProcess) -> None:
    # Pooled workers wait with limits.memory (256 MiB); a run's own limit is applied on hand-over.
    big = "a = bytearray(400 << 20)\nfor i in range(0, len(a), 4096): a[i] = 1\nprint(len(a) >> 20)"
    r = daemon.run(big, memory_mb=512)
    assert r["status"] == "ok" and r["stdout"] == b"400\n", r["stderr"]
    assert daemon.run(big, memory_mb=300)["status"] == "memory_limit"
