"""What a run can do: the functional contract of the jail, through the real daemon."""

from __future__ import annotations

import time
from typing import Any

from harness import DaemonProcess, wait_until


def run(daemon: DaemonProcess, code: str, **kw: Any) -> Any:
    return daemon.run(code, **kw)


def test_hello_world(daemon: DaemonProcess) -> None:
    r = run(daemon, "print('hello, world')")
    assert r["status"] == "ok", r
    assert r["exit_code"] == 0
    assert r["stdout"] == b"hello, world\n"
    assert r["stderr"] == b""
    assert r["run_id"]
    assert r["wall_ms"] > 0 and r["cpu_ms"] > 0


def test_a_run_within_one_time_slice_still_counts_its_cpu(daemon: DaemonProcess) -> None:
    """A short run ends before the scheduler charges its slice to its cgroup (it did for 4 runs
    in 5 paced ones): its answer counts the runner's own CPU, and its worker's end the rest."""
    with daemon.client() as c:
        before = c.usage()[0]["usage"]["cpu_ms_total"]
        cpus = []
        for _ in range(20):
            cpus.append(c.run("print(1)")["cpu_ms"])
            time.sleep(0.01)
        assert min(cpus) > 0, cpus
        assert wait_until(lambda: c.usage()[0]["usage"]["cpu_ms_total"] >= before + sum(cpus), 5)


def test_stdout_and_stderr_are_separate(daemon: DaemonProcess) -> None:
    r = run(daemon, "import sys\nprint('out')\nprint('err', file=sys.stderr)\nprint('out2')")
    assert r["stdout"] == b"out\nout2\n"
    assert r["stderr"] == b"err\n"


def test_exit_codes(daemon: DaemonProcess) -> None:
    r = run(daemon, "import sys; sys.exit(42)")
    assert (r["status"], r["exit_code"], r["signal"]) == ("exit_nonzero", 42, None)
    r = run(daemon, "raise SystemExit('bye')")
    assert (r["status"], r["exit_code"], r["stderr"]) == ("exit_nonzero", 1, b"bye\n")
    r = run(daemon, "import os; os._exit(3)")
    assert (r["status"], r["exit_code"]) == ("exit_nonzero", 3)
    assert run(daemon, "raise SystemExit(0)")["status"] == "ok"


def test_uncaught_exception_has_a_clean_traceback(daemon: DaemonProcess) -> None:
    r = run(daemon, "def f():\n    return 1 / 0\nf()")
    assert r["status"] == "exit_nonzero" and r["exit_code"] == 1
    err = r["stderr"].decode()
    assert err.startswith("Traceback (most recent call last):\n")
    assert 'File "<code>", line 3, in <module>' in err
    assert "return 1 / 0" in err  # source lines are shown
    assert "ZeroDivisionError: division by zero" in err
    assert "sandboxd" not in err  # the jail's own frames are not part of the user's traceback


def test_syntax_error(daemon: DaemonProcess) -> None:
    r = run(daemon, "def (:\n")
    assert r["status"] == "exit_nonzero"
    assert b"SyntaxError" in r["stderr"]


def test_signal_is_reported(daemon: DaemonProcess) -> None:
    r = run(daemon, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert (r["status"], r["signal"], r["signal_name"], r["exit_code"]) == ("signaled", 11, "SIGSEGV", None)


def test_unicode_and_binary_output(daemon: DaemonProcess) -> None:
    r = run(daemon, "print('héllo wörld ✓ 日本語 🐍')")
    assert r["stdout"].decode("utf-8") == "héllo wörld ✓ 日本語 🐍\n"
    r = run(daemon, "import sys; sys.stdout.buffer.write(bytes(range(256)))")
    assert r["stdout"] == bytes(range(256))


def test_five_megabytes_of_output_returned_exactly(daemon: DaemonProcess) -> None:
    code = "import sys\nfor i in range(5 * 1024):\n    sys.stdout.write(f'{i:07d}' * 146 + '\\n')"
    r = run(daemon, code, max_output=10 << 20)
    expected = "".join(f"{i:07d}" * 146 + "\n" for i in range(5 * 1024)).encode()
    assert len(expected) == 5 * 1024 * 1023
    assert r["status"] == "ok"
    assert r["stdout_truncated"] is False
    assert r["stdout"] == expected


def test_stdin(daemon: DaemonProcess) -> None:
    r = run(daemon, "import sys; data = sys.stdin.buffer.read(); print(len(data), data[:5])",
            stdin=b"hello" + b"x" * 100000)
    assert r["stdout"] == b"100005 b'hello'\n"


def test_stdlib_in_memory(daemon: DaemonProcess) -> None:
    code = """
import json, re, datetime, decimal, sqlite3, zlib, hashlib, math, collections
con = sqlite3.connect(":memory:")
con.execute("create table t (x integer)")
con.executemany("insert into t values (?)", [(i,) for i in range(10)])
total = con.execute("select sum(x) from t").fetchone()[0]
d = decimal.Decimal("1.10") + decimal.Decimal("2.20")
z = zlib.decompress(zlib.compress(b"abc" * 1000))
print(json.dumps({"sum": total, "dec": str(d), "re": re.sub(r"a+", "b", "caaat"), "zlib": len(z),
                  "date": datetime.date(2024, 2, 29).isoformat(), "sha": hashlib.sha256(b"x").hexdigest()[:8]}))
"""
    r = run(daemon, code)
    assert r["status"] == "ok", r["stderr"]
    assert r["stdout"] == (b'{"sum": 45, "dec": "3.30", "re": "cbt", "zlib": 3000, "date": "2024-02-29", '
                           b'"sha": "2d711642"}\n')


def test_ssl_tzdata_and_ca_bundle(daemon: DaemonProcess) -> None:
    code = """
import ssl, zoneinfo, datetime
ctx = ssl.create_default_context()
print(ctx.cert_store_stats()["x509_ca"] > 50)
print(datetime.datetime(2024, 7, 1, tzinfo=zoneinfo.ZoneInfo("America/New_York")).utcoffset())
print(open("/etc/ssl/certs/ca-certificates.crt").read().count("BEGIN CERTIFICATE") > 50)
"""
    r = run(daemon, code)
    assert r["status"] == "ok", r["stderr"]
    assert r["stdout"] == b"True\n-1 day, 20:00:00\nTrue\n"


def test_threads_work(daemon: DaemonProcess) -> None:
    code = """
import threading, concurrent.futures
results = []
lock = threading.Lock()
def work(i):
    with lock:
        results.append(i * i)
threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
for t in threads: t.start()
for t in threads: t.join()
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    print(sorted(results) == [i * i for i in range(16)], sum(ex.map(lambda x: x + 1, range(10))))
"""
    r = run(daemon, code)
    assert (r["status"], r["stdout"]) == ("ok", b"True 55\n"), r["stderr"]


def test_subprocess_of_the_roots_python(daemon: DaemonProcess) -> None:
    r = run(daemon, "import subprocess; print(subprocess.run(['python3', '-c', 'print(6*7)'], "
                    "capture_output=True, text=True).stdout.strip())")
    assert (r["status"], r["stdout"]) == ("ok", b"42\n"), r["stderr"]


def test_scratch_is_writable_and_empty_every_run(daemon: DaemonProcess) -> None:
    code = """
import os
print(os.getcwd(), sorted(os.listdir(".")), os.listdir("/tmp"), os.listdir("/var/tmp"), os.listdir("/dev/shm"))
for d in (".", "/tmp", "/var/tmp", "/dev/shm"):
    with open(os.path.join(d, "leftover"), "w") as f:
        f.write("x")
"""
    for _ in range(3):
        r = run(daemon, code)
        assert r["status"] == "ok", r["stderr"]
        assert r["stdout"] == b"/work ['out'] [] [] []\n"  # out/ only, made afresh: nothing of the last run


def test_input_files_and_out_files(daemon: DaemonProcess) -> None:
    code = """
import os
print(open("data/in.txt").read(), open("other.bin", "rb").read())
os.makedirs("out/sub")
open("out/result.txt", "w").write("answer")
open("out/sub/b.bin", "wb").write(bytes(range(10)))
os.symlink("/etc/passwd", "out/link")
"""
    r = run(daemon, code, files={"data/in.txt": b"hello", "other.bin": b"\x00\x01"})
    assert r["status"] == "ok", r["stderr"]
    assert r["stdout"] == b"hello b'\\x00\\x01'\n"
    assert r["files"] == {"result.txt": b"answer", "sub/b.bin": bytes(range(10))}  # the symlink is not followed


def test_out_files_that_cannot_be_returned_do_not_lose_the_rest(daemon: DaemonProcess) -> None:
    code = """
import os
os.makedirs("out", exist_ok=True)
open("out/ok.txt", "w").write("ok")
open(b"out/\\xff", "w").write("not UTF-8")     # no text name for it
open("out/secret", "w").write("s"); os.chmod("out/secret", 0)
for i in range(300):                           # more directories than a process has fds
    os.makedirs(f"out/many/d{i:03}")
open("out/many/d299/last.txt", "w").write("last")
"""
    r = run(daemon, code)
    assert r["status"] == "ok", r["stderr"]
    assert r["files"]["ok.txt"] == b"ok" and r["files"]["many/d299/last.txt"] == b"last"
    assert "secret" not in r["files"] and r["files_truncated"] is True


def test_a_run_cannot_forge_a_setup_failure_or_its_wall_time(daemon: DaemonProcess) -> None:
    find = "import gc, os, time\nh = [o for o in gc.get_objects() if type(o).__name__ == 'Handoff'][0]\n"
    r = run(daemon, find + "h.write(0, 'seccomp', 1, message='seccomp filter could not be loaded')\nos._exit(0)")
    assert r["status"] == "ok" and r["error"] is None
    r = run(daemon, find + "h.write(2, started_ns=time.monotonic_ns() + 10**12)\nprint('x')")
    assert r["status"] == "ok" and 0 < r["wall_ms"] < 10_000


def test_thousands_of_distinct_refused_calls_keep_the_report_small(daemon: DaemonProcess) -> None:
    code = "import ctypes\nlibc = ctypes.CDLL(None)\nfor nr in range(1000, 3000): libc.syscall(nr)\nprint('done')"
    r = run(daemon, code, timeout_ms=20000)
    assert r["status"] == "ok" and r["stdout"] == b"done\n"
    assert len(r["denied_syscalls"]) == 65 and r["denied_syscalls"]["(other)"] == 2000 - 64


def test_environment_is_fresh_and_request_env_applies(daemon: DaemonProcess) -> None:
    r = run(daemon, "import os, json; print(json.dumps(dict(os.environ), sort_keys=True))", env={"GREETING": "hi"})
    env = __import__("json").loads(r["stdout"])
    assert env["GREETING"] == "hi"
    assert env["HOME"] == "/work" and env["LANG"] == "C.UTF-8"
    assert set(env) <= {"GREETING", "HOME", "LANG", "PATH", "TMPDIR", "PYTHONDONTWRITEBYTECODE",
                        "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                        "MPLBACKEND", "MPLCONFIGDIR", "XDG_CACHE_HOME"}
    assert env["MPLBACKEND"] == "Agg" and env["MPLCONFIGDIR"].startswith("/tmp/")
    assert not any(k.startswith(("NOTIFY", "SANDBOXD", "LISTEN", "INVOCATION", "SUDO")) for k in env)


def test_runs_as_main_with_fresh_globals(daemon: DaemonProcess) -> None:
    r = run(daemon, "import sys\nprint(__name__, sys.argv, 'sandboxd' in sys.modules, 'msgpack' in sys.modules)")
    assert r["stdout"] == b"__main__ ['-c'] False False\n"
    r = run(daemon, "print('x' in globals())")
    assert r["stdout"] == b"False\n"


def test_atexit_and_threads_finish_before_exit(daemon: DaemonProcess) -> None:
    code = """
import atexit, threading, time
atexit.register(lambda: print("atexit ran"))
def late():
    time.sleep(0.05)
    print("thread done")
threading.Thread(target=late).start()
print("main done")
"""
    r = run(daemon, code)
    assert r["stdout"] == b"main done\nthread done\natexit ran\n"


def test_result_record_fields(daemon: DaemonProcess) -> None:
    r = run(daemon, "pass")
    for key in ("status", "exit_code", "signal", "stdout", "stderr", "stdout_truncated", "stderr_truncated",
                "wall_ms", "cpu_ms", "memory_peak_kb", "blocked_syscall", "error", "run_id", "files",
                "limits_enforced_by"):
        assert key in r, key
    assert r["limits_enforced_by"] in ("cgroup1", "cgroup2")
    assert r["memory_peak_kb"] > 0
