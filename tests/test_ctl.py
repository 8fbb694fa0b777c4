"""sandboxctl end to end: every subcommand, text and JSON output, exit statuses."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from harness import REPO, DaemonProcess, as_user, merge

NUMPY_DIR = "/usr/lib/python3/dist-packages/numpy"


def ctl(daemon: DaemonProcess | None, *args: str, stdin: bytes = b"", user: str | None = None,
        socket: str | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, SANDBOXD_SOCKET=socket or (daemon.socket if daemon else "/nonexistent.sock"))
    kw = as_user(user) if user else {}
    return subprocess.run([sys.executable, "-m", "sandboxd.ctl", *args], input=stdin, capture_output=True,
                          env=env, cwd=REPO, timeout=120, **kw)


def js(proc: subprocess.CompletedProcess[bytes]) -> Any:
    """The one JSON object of --json (stdout holds nothing else)."""
    data = json.loads(proc.stdout)
    assert isinstance(data, dict) and isinstance(data["ok"], bool) and "id" not in data, data
    return data


def b64(text: str) -> bytes:
    return base64.b64decode(text)


def test_status_text_and_json(daemon: DaemonProcess) -> None:
    p = ctl(daemon, "status")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert out.startswith("sandboxd ") and "root " in out and "capacity " in out and "python3+net" in out
    data = js(ctl(daemon, "status", "--json"))
    assert data["server"] == "sandboxd" and data["self_test"]["passed"] is True
    assert js(ctl(daemon, "--json", "status"))["pid"] == data["pid"]  # --json before or after the command


def test_run_mirrors_the_program(daemon: DaemonProcess, tmp_path: Path) -> None:
    p = ctl(daemon, "run", "-c", "import sys; print('out'); print('err', file=sys.stderr)")
    assert p.returncode == 0 and p.stdout == b"out\n"
    err = p.stderr.decode().splitlines()
    assert err[0] == "err" and err[-1].startswith("sandboxd: ok | exit 0 |") and "run " in err[-1]
    assert ctl(daemon, "run", "-c", "raise SystemExit(3)").returncode == 3
    assert ctl(daemon, "run", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)").returncode == 128 + 11
    p = ctl(daemon, "run", "--timeout", "500ms", "-c", "while True: pass")
    assert p.returncode == 120 and "sandboxd: timeout" in p.stderr.decode()  # a limit: reserved, not 1
    p = ctl(daemon, "run", "-c", "import os; os.chroot('/')")
    said = p.stderr.decode()
    assert p.returncode == 1 and "blocked syscall chroot: never allowed in the jail" in said  # the program's exit 1
    p = ctl(daemon, "run", "--memory", "32M", "-c", "a = []\nwhile True: a.append(bytearray(1 << 20))")
    assert p.returncode == 120 and "sandboxd: memory_limit" in p.stderr.decode()  # not 128+9: a limit
    p = ctl(daemon, "run", "--cpu", "0.3s", "-c", "while True: pass")
    assert p.returncode == 120 and "sandboxd: cpu_limit" in p.stderr.decode()
    # sandboxctl's own failures are 120-127; a program's 3 is its 3, never "cannot connect".
    assert ctl(None, "run", "-c", "pass", socket="/run/nonexistent/s.sock").returncode == 126
    code_file = tmp_path / "job.py"
    code_file.write_text("print(1)")
    assert ctl(daemon, "run", "-c", "print(2)", str(code_file)).returncode == 127  # which code? a usage error
    p = ctl(daemon, "run", "--timeout", "2h", "-c", "pass")  # refusals speak the user's units as well
    assert p.returncode == 122 and "timeout_ms 7200000 (2.0 h) is above your limit of" in p.stderr.decode(), p.stderr
    assert "your quota's max_timeout" in p.stderr.decode()
    for option, value in (("--memory", "lots"), ("--timeout", "-1"), ("--max-output", "1Q")):
        p = ctl(daemon, "run", option, value, "-c", "pass")
        assert p.returncode == 127 and option in p.stderr.decode(), p.stderr


def test_run_inputs_outputs_and_json(daemon: DaemonProcess, tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text("import sys, os\nprint(sys.stdin.read()[::-1], open('data.txt').read(), os.environ['X'])\n"
                      "os.makedirs('out/d'); open('out/d/r.txt', 'w').write('result')\n")
    (tmp_path / "data.txt").write_text("DATA")
    outdir = tmp_path / "saved"
    p = ctl(daemon, "run", str(script), "--file", f"data.txt={tmp_path / 'data.txt'}", "--env", "X=42",
            "--out", str(outdir), stdin=b"olleh")
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"hello DATA 42\n"
    assert (outdir / "d" / "r.txt").read_text() == "result"
    (tmp_path / "in.txt").write_bytes(b"abc")
    data = js(ctl(daemon, "run", "--json", "--stdin-file", str(tmp_path / "in.txt"), "-c",
                  "import sys; print(sys.stdin.read())"))
    result = data["result"]
    assert data["ok"] is True and data["exit_status"] == 0
    assert result["status"] == "ok" and b64(result["stdout"]) == b"abc\n" and result["run_id"]
    assert b64(js(ctl(daemon, "run", "--json", "-c", "import sys; sys.stdout.buffer.write(b'\\xff')"))
               ["result"]["stdout"]) == b"\xff"  # bytes in one form, whatever they hold
    p = ctl(daemon, "run", "-", stdin=b"print('from stdin')")  # the code itself on stdin
    assert p.stdout == b"from stdin\n"
    data = js(ctl(daemon, "run", "--json", "--memory", "64", "-c", "x = bytearray(10**9)"))
    assert data["result"]["status"] == "memory_limit" and data["exit_status"] == 120
    # --file PATH takes the file's own name; out/ exists for every run.
    p = ctl(daemon, "run", "--file", str(tmp_path / "data.txt"), "-c",
            "import os; print(open('data.txt').read(), os.path.isdir('out'))")
    assert p.stdout == b"DATA True\n", p.stderr


def test_jobs_kill_and_errors(daemon: DaemonProcess) -> None:
    holder: dict[str, Any] = {}
    t = threading.Thread(target=lambda: holder.update(
        p=ctl(daemon, "run", "--timeout", "30", "-c", "import time; time.sleep(30)")))
    t.start()
    jobs: list[Any] = []
    deadline = time.monotonic() + 15
    while not jobs and time.monotonic() < deadline:
        jobs = js(ctl(daemon, "jobs", "--json"))["jobs"]
    assert len(jobs) == 1
    assert ctl(daemon, "jobs").stdout.decode().splitlines()[0].split()[:3] == ["run", "caller", "run"]
    assert jobs[0]["caller"] == "root" and "root (0)" in ctl(daemon, "jobs").stdout.decode()
    p = ctl(daemon, "kill", jobs[0]["run_id"])
    assert p.returncode == 0 and p.stdout.decode().strip() == f"killed {jobs[0]['run_id']}"
    t.join(30)
    assert holder["p"].returncode == 128 + 9
    assert "sandboxd: killed | by root (uid 0) with kill" in holder["p"].stderr.decode()  # not just "SIGKILL"
    p = ctl(daemon, "kill", "no-such-run")
    assert p.returncode == 125 and "not_found" in p.stderr.decode()
    data = js(ctl(daemon, "kill", "no-such-run", "--json"))
    assert data["error"]["code"] == "not_found"


def test_usage(daemon: DaemonProcess) -> None:
    ctl(daemon, "run", "-c", "pass")
    p = ctl(daemon, "usage")
    assert p.returncode == 0 and p.stdout.decode().splitlines()[2].split()[0] == "root"
    data = js(ctl(daemon, "usage", "--all", "--json"))
    assert any(u["uid"] == 0 and u["usage"]["runs_total"] >= 1 for u in data["users"])
    assert js(ctl(daemon, "usage", "sbx-alice", "--json"))["users"][0]["user"] == "sbx-alice"


def test_permissions_and_exit_codes_for_other_users(daemon: DaemonProcess) -> None:
    p = ctl(daemon, "usage", "root", user="sbx-alice")
    assert p.returncode == 122 and "forbidden" in p.stderr.decode()
    assert ctl(daemon, "jobs", user="sbx-alice").returncode == 122
    assert ctl(daemon, "reload", user="sbx-alice").returncode == 122
    assert ctl(daemon, "syscalls", "-c", "pass", user="sbx-alice").returncode == 122
    p = ctl(daemon, "run", "-c", "print(7)", user="sbx-alice")
    assert p.returncode == 0 and p.stdout == b"7\n"
    p = ctl(daemon, "status", user="sbx-carol")
    assert p.returncode == 126 and "group sbx-clients: join it" in p.stderr.decode(), p.stderr
    secret = Path(tempfile.mkdtemp()) / "secret.txt"  # an input file the caller cannot read
    secret.write_text("s")
    secret.chmod(0)
    try:
        p = ctl(daemon, "run", "--stdin-file", str(secret), "-c", "pass", user="sbx-alice")
        assert p.returncode == 127 and f"{secret}: Permission denied" in p.stderr.decode()  # not "cannot talk"
    finally:
        shutil.rmtree(secret.parent)


def test_connection_and_usage_errors(daemon: DaemonProcess) -> None:
    p = ctl(None, "status", socket="/run/nonexistent/sandboxd.sock")
    assert p.returncode == 126 and "is sandboxd running" in p.stderr.decode()
    data = js(ctl(None, "status", "--json", socket="/run/nonexistent/sandboxd.sock"))
    assert data["ok"] is False and data["error"]["code"] == "cannot_connect"  # client-side errors: the same shape
    assert ctl(daemon, "frobnicate").returncode == 127
    assert js(ctl(daemon, "frobnicate", "--json"))["error"]["code"] == "usage"
    assert ctl(daemon, "run", "--file", "nonsense", "-c", "pass").returncode == 127
    # Global options before or after the subcommand; --version.
    p = subprocess.run([sys.executable, "-m", "sandboxd.ctl", "status", "--socket", daemon.socket, "--json"],
                       capture_output=True, cwd=REPO, timeout=60)
    assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True
    p = subprocess.run([sys.executable, "-m", "sandboxd.ctl", "--version"], capture_output=True, cwd=REPO, timeout=60)
    assert p.returncode == 0 and p.stdout.decode().startswith("sandboxctl (sandboxd) ")


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("daemon: {workers: 4}\n")
    p = ctl(None, "check-config", str(good))
    assert p.returncode == 0 and p.stdout.decode().startswith(f"{good}: ok")
    bad = tmp_path / "bad.yaml"
    bad.write_text("daemon: {workers: many}\nlimits: {memory: lots}\n")
    p = ctl(None, "check-config", str(bad))
    assert p.returncode == 1
    assert f"{bad}:1:10: daemon.workers: expected an integer from 1 to 4096, got 'many'" in p.stdout.decode()
    data = js(ctl(None, "check-config", str(bad), "--json"))
    assert data["ok"] is False and data["error"]["code"] == "bad_config"
    assert data["error"]["errors"][1] == {"file": str(bad), "key": "limits.memory", "line": 2, "column": 10,
                                          "message": "expected a size like 256M, 1G or a number of bytes, got 'lots'"}
    broken = tmp_path / "broken.yaml"
    broken.write_text("daemon:\n  workers: [1\n")
    p = ctl(None, "check-config", str(broken))
    assert p.returncode == 1 and p.stdout.decode().startswith(f"{broken}:3:1: not valid YAML"), p.stdout
    octal = tmp_path / "octal.yaml"
    octal.write_text("daemon: {socket_mode: 660}\n")
    assert "660 unquoted is the decimal number 660" in ctl(None, "check-config", str(octal)).stdout.decode()
    assert ctl(None, "check-config", str(tmp_path / "missing.yaml")).returncode == 1
    assert ctl(None, "check-config", f"{REPO}/etc/sandboxd/sandboxd.yaml").returncode == 0


def test_reload(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon()
    d.write_config(merge(d.config, {"quotas": {"default": {"concurrent": 5}}}))
    p = ctl(d, "reload")
    assert p.returncode == 0 and "quotas changed" in p.stdout.decode()
    assert js(ctl(d, "usage", "--json"))["users"][0]["quota"]["concurrent"] == 5


def test_rebuild_root_shows_progress_then_the_summary(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon()
    p = ctl(d, "rebuild-root")
    assert p.returncode == 0, p.stderr
    err, out = p.stderr.decode(), p.stdout.decode()
    assert "collecting" in err and "building  [" in err and "entries" in err
    assert out.startswith("root ") and " built in " in out and "hard-linked" in out
    data = js(ctl(d, "rebuild-root", "--if-changed", "--json"))
    assert data["root"]["reused"] is True
    assert ctl(d, "run", "-c", "print('new root')").stdout == b"new root\n"


@pytest.mark.slow
def test_rebuilds_back_to_back_and_at_once_all_succeed(make_daemon: Any) -> None:
    # A rebuild used to delete, when its old root was retired, the root the next one was writing.
    d: DaemonProcess = make_daemon()
    for _ in range(4):
        p = ctl(d, "rebuild-root", "--json")
        assert p.returncode == 0, p.stderr
    procs = [subprocess.Popen([sys.executable, "-m", "sandboxd.ctl", "--socket", d.socket, "rebuild-root", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with d.client() as c:
        root = c.status()["root"]["path"]
        assert os.path.isdir(root) and os.path.realpath(os.path.join(os.path.dirname(root), "current")) == root
        assert c.run("import json; print(json.dumps([1]))")["stdout"] == b"[1]\n"
    time.sleep(1.5)  # old roots go once their workers are gone; the current one stays
    assert os.path.isdir(root)


def test_syscalls_discovery(daemon: DaemonProcess) -> None:
    code = ("import os, fcntl\nos.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))\n"
            "try:\n    fcntl.flock(open('/tmp/l', 'w'), fcntl.LOCK_EX)\nexcept OSError as e:\n    print(e.errno)\n")
    p = ctl(daemon, "syscalls", "-c", code)
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert "sched_setscheduler" in out and "allow: [sched_setscheduler]" in out
    assert "flock" in out.split("refused even in discovery mode")[1]
    data = js(ctl(daemon, "syscalls", "--json", "-c", code))
    assert data["missing"] == [{"name": "sched_setscheduler", "count": 1}]
    assert data["refused"][0]["name"] == "flock" and data["refused"][0]["why"] == "never allowed"
    assert data["yaml"] == "profiles:\n  python3:\n    allow: [sched_setscheduler]\n"
    assert b64(data["result"]["stdout"]) == b"1\n"  # flock still got EPERM; the run went on
    # A normal run of the same code is refused the call, and names it, with advice that leads on.
    r = js(ctl(daemon, "run", "--json", "-c", code))["result"]
    assert r["status"] == "blocked_syscall" and r["blocked_syscall"] == "sched_setscheduler"
    assert "sandboxctl syscalls FILE" in r["advice"]
    p = ctl(daemon, "run", "-c", "import socket; socket.create_connection(('127.0.0.1', 9))")
    err = p.stderr.decode()
    assert "blocked syscall socket: the run had no network: ask for it (sandboxctl run --network" in err, err
    # A refusal the run survived shows in the text verdict too.
    p = ctl(daemon, "run", "-c", "import fcntl\ntry:\n    fcntl.flock(open('/tmp/l', 'w'), fcntl.LOCK_EX)\n"
                                 "except OSError:\n    pass")
    assert p.returncode == 0 and "refused and survived: flock x1" in p.stderr.decode(), p.stderr


def test_what_runs_say_reaches_sandboxctl_reports_escaped_even_when_piped(daemon: DaemonProcess) -> None:
    """Threat 28: a run's stderr that `syscalls` quotes in its report reaches the terminal escaped,
    piped or not (ssh host sandboxctl ..., a pager); the run's own output stays byte-exact in a pipe."""
    code = 'import sys; sys.stderr.write("\\x1b]0;pwned\\x07\\n"); print("\\x1b[2J")'
    p = ctl(daemon, "syscalls", "-c", code)
    assert p.returncode == 0 and b"\\x1b]0;pwned\\x07" in p.stdout, p.stdout
    assert b"\x1b" not in p.stdout + p.stderr and b"\x07" not in p.stdout + p.stderr, p.stdout
    p = ctl(daemon, "run", "-c", code)
    assert p.stdout == b"\x1b[2J\n" and p.stderr.startswith(b"\x1b]0;pwned\x07\n"), p  # exact: it is the run's


def test_root_why(make_daemon: Any) -> None:
    require(os.path.isdir(NUMPY_DIR), "python3-numpy is not installed (make dev installs it)")
    d: DaemonProcess = make_daemon({"root": {"extra_paths": [NUMPY_DIR],
                                             "python_path": ["/usr/lib/python3/dist-packages"]}})
    p = ctl(d, "root", "why", "numpy.linalg")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert out.startswith(f"numpy.linalg: in the root at {NUMPY_DIR}/linalg")
    assert "import in the jail: ok" in out
    p = ctl(d, "root", "why", "yaml")
    assert p.returncode == 1
    out = p.stdout.decode()
    assert "yaml: not in the root" in out and "ModuleNotFoundError" in out
    assert "add /usr/lib/python3/dist-packages/yaml to root.extra_paths" in out
    data = js(ctl(d, "root", "why", "numpy", "--json"))
    assert data["importable"] is True and data["missing_libraries"] == {} and len(data["extensions"]) > 5
    # Libraries are named as inside the root, the loader (the interpreter of libc) included.
    libs = {lib for e in data["extensions"] for lib in e["libraries"]}
    assert all(lib.startswith("/") and os.path.isfile(data["root"] + lib) for lib in libs), libs
    assert any(os.path.basename(lib).startswith("ld-linux") for lib in libs), libs


def test_root_why_names_private_host_places_only_to_admins(daemon: DaemonProcess) -> None:
    name = f"sbxtest_private_{os.getpid()}"
    private = Path("/opt") / name
    private.mkdir(mode=0o700)
    try:
        (private / "__init__.py").write_text("SECRET = 1\n")
        admin = js(ctl(daemon, "root", "why", name, "--json"))
        assert admin["on_host"] == str(private)
        other = js(ctl(daemon, "root", "why", name, "--json", user="sbx-alice"))
        assert other["on_host"] is None and str(private) not in " ".join(other["advice"])
        private.chmod(0o755)
        (private / "__init__.py").chmod(0o644)
        assert js(ctl(daemon, "root", "why", name, "--json", user="sbx-alice"))["on_host"] == str(private)
    finally:
        shutil.rmtree(private)


@pytest.mark.parametrize("module", ["../etc", "os;rm", ""])
def test_root_why_refuses_bad_names(daemon: DaemonProcess, module: str) -> None:
    p = ctl(daemon, "root", "why", module)
    assert p.returncode == 125 and "bad_request" in p.stderr.decode()


# -- sessions ---------------------------------------------------------------------------------------
def test_session_commands(daemon: DaemonProcess, tmp_path: Path) -> None:
    p = ctl(daemon, "session", "open", "--memory", "128")
    assert p.returncode == 0, p.stderr
    sid = p.stdout.decode().strip()
    assert sid.startswith("s")
    p = ctl(daemon, "session", "exec", sid, "-c", "x = 20")
    assert p.returncode == 0 and "sandboxd: ok" in p.stderr.decode()
    p = ctl(daemon, "session", "exec", sid, "-c", "x * 2 + 2")
    assert (p.returncode, p.stdout) == (0, b"42\n")  # the value, as the interpreter shows it
    assert ctl(daemon, "session", "exec", sid, stdin=b"print(x)").stdout == b"20\n"  # code from stdin
    p = ctl(daemon, "session", "exec", sid, "-c", "1/0")
    assert p.returncode == 1 and b"ZeroDivisionError" in p.stderr and "sandboxd: exception" in p.stderr.decode()
    data = js(ctl(daemon, "session", "exec", sid, "-c", "x", "--json"))["result"]
    assert data["value"] == "20" and data["exec"] == 5 and data["session_id"] == sid
    listed = js(ctl(daemon, "--json", "session", "list"))["sessions"]
    assert [x["session_id"] for x in listed] == [sid] and listed[0]["memory_mb"] == 128
    assert sid in ctl(daemon, "session", "list").stdout.decode()
    assert ctl(daemon, "session", "interrupt", sid).stdout == b"nothing was running\n"
    assert ctl(daemon, "session", "close", sid).returncode == 0
    p = ctl(daemon, "session", "exec", sid, "-c", "x")
    assert p.returncode == 125 and "not_found" in p.stderr.decode() and "(closed)" in p.stderr.decode()
    sid2 = ctl(daemon, "session", "open").stdout.decode().strip()
    assert ctl(daemon, "kill", sid2).returncode == 0  # kill knows session ids
    assert "(killed)" in ctl(daemon, "session", "exec", sid2, "-c", "1").stderr.decode()


def test_repl(daemon: DaemonProcess) -> None:
    script = b"y = 3\ndef f():\n    return y * 2\n\nf()\nprint('out')\nimport nosuchmodule\ny\nexit()\n"
    p = ctl(daemon, "repl", stdin=script)
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert "6\n" in out and "out\n" in out and out.rstrip().endswith(">>>") and "3\n" in out
    assert "ModuleNotFoundError" in p.stderr.decode()
    with daemon.client() as c:
        assert c.sessions() == []  # closed on the way out


def test_repl_ctrl_c_interrupts_the_cell_and_keeps_the_session(daemon: DaemonProcess) -> None:
    env = dict(os.environ, SANDBOXD_SOCKET=daemon.socket)
    proc = subprocess.Popen([sys.executable, "-m", "sandboxd.ctl", "repl"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert proc.stdin is not None
    proc.stdin.write(b"z = 'kept'\nimport time\nfor i in range(600): time.sleep(0.1)\n\n")
    proc.stdin.flush()
    with daemon.client() as c:
        def running() -> bool:
            return any(s["busy"] for s in c.sessions())
        assert _wait(running, 20)
    proc.send_signal(2)  # Ctrl-C
    proc.stdin.write(b"print(z)\n")
    proc.stdin.close()
    proc.stdin = None
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"KeyboardInterrupt" in err and b"kept\n" in out


def _wait(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_bash_completion_names_every_command_and_option() -> None:
    """packaging/debian/completion/sandboxctl (in the .deb) cannot drift from the parser."""
    import argparse

    from sandboxd.ctl import parser

    script = Path(REPO, "packaging", "debian", "completion", "sandboxctl").read_text()
    words = set(script.replace('"', " ").replace("|", " ").replace(")", " ").split())

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            for flag in action.option_strings:
                assert flag in words, f"{p.prog}: {flag} is not in the completion"
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    assert name in words, f"{p.prog}: command {name} is not in the completion"
                    walk(sub)

    walk(parser())
    p = subprocess.run(["bash", "-c", f"source {REPO}/packaging/debian/completion/sandboxctl 2>/dev/null; "
                        "COMP_WORDS=(sandboxctl ses); COMP_CWORD=1; _sandboxctl; echo ${COMPREPLY[@]}"],
                       capture_output=True, text=True, timeout=30)
    assert p.stdout.split() == ["session"], p


def test_the_examples_work_against_the_daemon(daemon: DaemonProcess, tmp_path: Path) -> None:
    """docs/examples: the judge (sandboxctl --meta) and the client page."""
    env = dict(os.environ, SANDBOXD_SOCKET=daemon.socket,
               PATH=f"{REPO}/.venv/bin:{os.environ.get('PATH', '/usr/bin:/bin')}")
    solution = tmp_path / "add.py"
    solution.write_text("a, b = map(int, input().split())\nif a < 0:\n    while True: pass\nprint(a + b)\n")
    cases = tmp_path / "cases"
    cases.mkdir()
    for name, given, want in (("1", "1 2", "3"), ("2", "5 5", "11"), ("3", "-1 0", "")):
        (cases / f"{name}.in").write_text(given + "\n")
        (cases / f"{name}.out").write_text(want + "\n")
    p = subprocess.run(["sh", f"{REPO}/docs/examples/judge.sh", str(solution), str(cases), "1s"],
                       capture_output=True, text=True, env=env, timeout=120)
    verdicts = [line.split()[:2] for line in p.stdout.splitlines()]
    assert verdicts == [["1", "AC"], ["2", "WA"], ["3", "TLE"]] and p.returncode == 1, (p.stdout, p.stderr)
    p = subprocess.run([sys.executable, f"{REPO}/docs/examples/client.py", daemon.socket], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "run: ok 6" in out and "files: {'report.txt': b'done'}" in out and "session: 42" in out
    assert "refused: blocked_syscall socket - the run had no network" in out and "error: forbidden" in out
