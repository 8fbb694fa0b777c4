"""Node.js runs: the same jail, verdicts and limits as Python's (THREATS 26 and the
classes that apply to a runtime), through the real daemon."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import require
from harness import DaemonProcess

from sandboxd.client import SandboxdError

NODE = "/usr/bin/node"


@pytest.fixture
def d(daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    require(os.path.exists(NODE) and shutil.which("node") is not None, "node is not installed")
    yield daemon
    r = daemon.run("console.log('still here')", language="nodejs")  # every probe leaves the daemon serving
    assert (r["status"], r["stdout"]) == ("ok", b"still here\n"), r


def js(d: DaemonProcess, code: str, **kw: Any) -> Any:
    return d.run(code, language="nodejs", **kw)


# -- what a user expects ------------------------------------------------------------------
def test_console_log_and_exit_codes(d: DaemonProcess) -> None:
    r = js(d, "console.log('hello', 6 * 7); console.error('to stderr')")
    assert (r["status"], r["exit_code"], r["stdout"], r["stderr"]) == ("ok", 0, b"hello 42\n", b"to stderr\n")
    r = js(d, "process.exit(3)")
    assert (r["status"], r["exit_code"]) == ("exit_nonzero", 3)
    r = js(d, "process.exitCode = 5")
    assert (r["status"], r["exit_code"]) == ("exit_nonzero", 5)


def test_javascript_is_an_alias(d: DaemonProcess) -> None:
    assert d.run("console.log(typeof process)", language="javascript")["stdout"] == b"object\n"


def test_uncaught_errors_give_their_stack(d: DaemonProcess) -> None:
    r = js(d, "function f() { throw new TypeError('boom') }\nf()")
    assert (r["status"], r["exit_code"]) == ("exit_nonzero", 1)
    assert b"TypeError: boom" in r["stderr"] and b"/work/main.js:1" in r["stderr"]
    r = js(d, "Promise.reject(new Error('rejected'))")
    assert r["status"] == "exit_nonzero" and b"rejected" in r["stderr"]
    r = js(d, "}); process.exit(7); (function () {")  # no way out of the module wrapper
    assert r["status"] == "exit_nonzero" and b"SyntaxError" in r["stderr"]


def test_stdin_timers_promises_and_exit_listeners(d: DaemonProcess) -> None:
    code = """
let s = '';
process.stdin.on('data', (c) => s += c);
process.stdin.on('end', () => setTimeout(() => console.log('stdin', s.toUpperCase()), 20));
Promise.resolve().then(() => console.log('micro'));
process.on('exit', (code) => console.log('exit', code));
"""
    r = js(d, code, stdin=b"abc")
    assert (r["status"], r["stdout"]) == ("ok", b"micro\nstdin ABC\nexit 0\n"), r


def test_commonjs_main_module(d: DaemonProcess) -> None:
    code = ("console.log(require.main === module, __filename, __dirname, typeof exports, "
            "JSON.stringify(Object.keys(require.cache)), process.argv.length)")
    r = js(d, code)
    assert r["stdout"] == b'true /work/main.js /work object ["/work/main.js"] 2\n', r
    r = js(d, "console.log(require('./lib').double(21))", files={"lib.js": b"exports.double = (x) => 2 * x\n"})
    assert r["stdout"] == b"42\n", r


def test_worker_threads(d: DaemonProcess) -> None:
    code = """
const { Worker } = require('worker_threads');
const w = new Worker("require('worker_threads').parentPort.postMessage(6 * 7)", { eval: true });
w.on('message', (m) => console.log('worker says', m));
"""
    assert js(d, code)["stdout"] == b"worker says 42\n"


def test_buffers_base64_json_and_the_scratch_dir(d: DaemonProcess) -> None:
    code = """
const fs = require('fs');
fs.writeFileSync('note.txt', Buffer.from('aGVsbG8=', 'base64'));
fs.mkdirSync('out', { recursive: true }); fs.writeFileSync('out/result.json', JSON.stringify({ ok: true }));
console.log(fs.readFileSync('note.txt', 'utf8'), fs.existsSync('/etc/shadow'), fs.existsSync('/proc'),
            fs.readFileSync('input.txt', 'utf8').trim());
try { fs.writeFileSync('/usr/x', 'y'); } catch (e) { console.log(e.code); }
"""
    r = js(d, code, files={"input.txt": b"from the request\n"})
    assert r["stdout"] == b"hello false false from the request\nEROFS\n", r
    assert r["files"] == {"result.json": b'{"ok":true}'}


def test_difys_javascript_wrapper(d: DaemonProcess) -> None:
    """Dify's code node wraps the user's main({...}) like this (in words: inputs from base64
    JSON, the result printed between <<RESULT>> markers)."""
    user = "function main({ a, b }) {\n  return { sum: a + b, text: `${a}+${b}` };\n}\n"
    inputs = base64.b64encode(json.dumps({"a": 2, "b": 40}).encode()).decode()
    wrapper = (f"{user}\nconst inputs = JSON.parse(Buffer.from('{inputs}', 'base64').toString('utf-8'));\n"
               "const output = main(inputs);\nconsole.log(`<<RESULT>>${JSON.stringify(output)}<<RESULT>>`);\n")
    r = js(d, wrapper)
    match = re.search(rb"<<RESULT>>(.*)<<RESULT>>", r["stdout"], re.DOTALL)
    assert match and json.loads(match.group(1)) == {"sum": 42, "text": "2+40"}, r


# -- verdicts --------------------------------------------------------------------------------
def test_heap_blow_up_is_memory_limit(d: DaemonProcess) -> None:
    r = js(d, "const a = []; while (true) a.push(new Array(1e6).fill(1.5))", memory_mb=128, timeout_ms=20000)
    assert r["status"] == "memory_limit", (r["status"], r["stderr"][-300:])
    r = js(d, "const a = []; while (true) a.push(Buffer.alloc(1 << 24, 1))", memory_mb=128, timeout_ms=20000)
    assert r["status"] == "memory_limit", (r["status"], r["stderr"][-300:])  # outside V8's heap: the cgroup


def test_a_webassembly_memory_bomb_is_memory_limit(d: DaemonProcess) -> None:
    code = """
const mem = new WebAssembly.Memory({ initial: 256, maximum: 65536 });
for (;;) { const before = mem.buffer.byteLength; mem.grow(256); new Uint8Array(mem.buffer, before).fill(7); }
"""
    r = js(d, code, memory_mb=128, timeout_ms=20000)
    assert r["status"] == "memory_limit", (r["status"], r["stderr"][-300:])


def test_an_infinite_loop_is_timeout_or_cpu_limit(d: DaemonProcess) -> None:
    assert js(d, "for (;;) {}", timeout_ms=1000)["status"] in ("timeout", "cpu_limit")
    assert js(d, "for (;;) {}", timeout_ms=3000, cpu_ms=300)["status"] == "cpu_limit"


def test_an_output_flood_is_output_limit(d: DaemonProcess) -> None:
    r = js(d, "const s = 'x'.repeat(65536); for (;;) process.stdout.write(s)", max_output=1 << 20)
    assert r["status"] == "output_limit" and r["stdout_truncated"] and len(r["stdout"]) == 1 << 20


def test_child_process_is_refused_and_named(d: DaemonProcess) -> None:
    r = js(d, "require('child_process').execSync('echo hi')")
    assert (r["status"], r["blocked_syscall"]) == ("blocked_syscall", "clone"), r
    r = js(d, "try { require('child_process').spawn('/bin/sh', ['-c', 'sleep 100'], { detached: true }); }\n"
              "catch (e) { console.log(e.code); }")
    assert r["status"] == "ok" and r["stdout"] == b"EPERM\n" and r["denied_syscalls"] == {"clone": 1}, r


def test_syscall_discovery_knows_javascript(d: DaemonProcess) -> None:
    with d.client() as c:
        reply = c.call("syscalls", code="console.log(require('os').hostname() === 'sandbox')", language="nodejs")
    assert reply["profile"] == "nodejs" and reply["result"]["stdout"] == b"true\n", reply


def test_root_why_resolves_node_modules_in_the_jail(d: DaemonProcess) -> None:
    with d.client() as c:
        assert c.call("root_why", module="node:fs", language="nodejs")["importable"] is True
        missing = c.call("root_why", module="left-pad", language="nodejs")
    assert missing["importable"] is False and "MODULE_NOT_FOUND" in missing["import"]["error"]
    assert "runtimes.nodejs.paths" in missing["advice"][0]


def test_a_run_with_other_memory_gets_a_worker_of_its_own(d: DaemonProcess) -> None:
    # The heap limit of V8 is set when node starts: a run asking for more memory than the
    # pooled workers were made for gets a worker started for its own limit.
    code = "console.log(Math.round(require('v8').getHeapStatistics().heap_size_limit / 2 ** 20))"
    small, big = js(d, code, memory_mb=128), js(d, code, memory_mb=1024)
    assert int(small["stdout"]) < 200 < int(big["stdout"]), (small["stdout"], big["stdout"])


# -- THREATS: what a Node run must not reach -----------------------------------------------
def test_01_no_descriptor_leads_out_of_the_run(d: DaemonProcess) -> None:
    code = """
const fs = require('fs');
const open = [];
for (let fd = 3; fd < 256; fd++) {
  try { const st = fs.fstatSync(fd); open.push([fd, st.isDirectory(), st.isFile(), st.isSocket()]); } catch (e) {}
}
console.log(JSON.stringify(open));
"""
    fds = json.loads(js(d, code)["stdout"])
    assert not [fd for fd, is_dir, is_file, _ in fds if is_dir or is_file], fds  # node's own pipes, epoll, eventfd
    assert [fd for fd, _, _, is_socket in fds if is_socket] == [4]  # the link to the daemon


def test_04_10_no_proc_no_signals_out(d: DaemonProcess) -> None:
    code = """
const out = [require('fs').existsSync('/proc'), process.pid];
for (const [pid, sig] of [[1, 'SIGKILL'], [-1, 'SIGKILL'], [1, 'SIGSTOP']]) {
  try { process.kill(pid, sig); out.push('sent'); } catch (e) { out.push(e.code); }
}
console.log(JSON.stringify(out));
"""
    r = js(d, code)
    # pid 1 is the run's own init (sandboxd-init), and in its namespace signals without a handler do not
    # reach it: the kills "succeed" and do nothing (the report below is init's).
    assert r["status"] == "ok", r
    found, pid, *signals = json.loads(r["stdout"])
    assert found is False and pid == 2 and signals == ["sent", "ESRCH", "sent"], r["stdout"]


def test_11_no_network_and_not_the_daemons_socket(d: DaemonProcess) -> None:
    code = f"""
const net = require('net');
const results = [];
const tryit = (opts) => new Promise((ok) => {{
  try {{
    const s = net.connect(opts);
    s.on('connect', () => {{ results.push('connected'); s.destroy(); ok(); }});
    s.on('error', (e) => {{ results.push(e.code); ok(); }});
  }} catch (e) {{ results.push(e.code); ok(); }}
}});
(async () => {{
  await tryit({{ path: {json.dumps(d.socket)} }});
  await tryit({{ host: '127.0.0.1', port: 80 }});
  await tryit({{ host: '203.0.113.2', port: 80 }});
  console.log(JSON.stringify(results));
}})();
"""
    r = js(d, code)
    assert r["stdout"] == b'["ENOENT","EPERM","EPERM"]\n', r


def test_19_no_escape_from_the_time_limit(d: DaemonProcess) -> None:
    code = """
const { Worker } = require('worker_threads');
for (let i = 0; i < 4; i++) new Worker('for (;;) {}', { eval: true });
setInterval(() => {}, 1000);
"""
    r = js(d, code, timeout_ms=1500)
    assert r["status"] in ("timeout", "cpu_limit") and r["wall_ms"] < 6000, r


def test_26_the_bootstrap_is_out_of_reach(d: DaemonProcess) -> None:
    code = """
const Module = require('module');
console.log(JSON.stringify([
  Object.keys(require.cache), Object.keys(Module._cache), process.mainModule.filename, module.parent ?? null,
  process.execArgv.some((a) => a.startsWith('--inspect')),
]));
try { require('inspector').open(0); console.log(require('inspector').url() || 'closed'); }
catch (e) { console.log(e.code); }
"""
    r = js(d, code)
    lines = r["stdout"].splitlines()
    cache, mod_cache, main_file, parent, inspect = json.loads(lines[0])
    assert cache == mod_cache == ["/work/main.js"] and main_file == "/work/main.js" and parent is None
    assert inspect is False and lines[1] == b"closed", lines  # the inspector gets no socket without network
    assert r["denied_syscalls"] == {"socket": 1}


def test_26_internal_bindings_cannot_spawn(d: DaemonProcess) -> None:
    code = "process.binding('spawn_sync').spawn({ file: '/bin/sh', args: ['sh', '-c', 'id'], stdio: [] })"
    r = js(d, code)
    assert r["status"] == "blocked_syscall" and r["blocked_syscall"] == "clone", r  # it forks first: refused
    assert b"uid=" not in r["stdout"]


def test_26_nothing_runs_before_the_code_is_confined(d: DaemonProcess) -> None:
    code = ("const fs = require('fs');\n"
            "console.log(require('os').userInfo().uid !== 0, fs.readFileSync('/etc/hostname', 'utf8').trim());")
    r = js(d, code, env={"NODE_OPTIONS": "--require /work/evil.js"}, files={"evil.js": b"console.log('hoisted')"})
    assert r["stdout"] == b"true sandbox\n", r  # NODE_OPTIONS of the request came after node started


def test_a_mixed_load_of_python_and_node_leaves_nothing(d: DaemonProcess) -> None:
    def one(i: int) -> str:
        if i % 2:
            return str(d.run(f"print({i})")["stdout"])
        return str(js(d, f"console.log({i})")["stdout"])

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(one, range(40)))
    assert outs == [str(f"{i}\n".encode()) for i in range(40)]
    with d.client() as c:
        st = c.status()
    pooled = sum(p["ready"] + p["starting"] for p in st["pool"]["profiles"].values())
    assert st["slots"]["in_use"] <= pooled + 2


def test_status_says_which_runtimes_are_here(d: DaemonProcess) -> None:
    with d.client() as c:
        st = c.status()
    assert st["runtimes"]["nodejs"]["available"] is True and st["runtimes"]["python3"]["available"] is True


def test_an_unavailable_runtime_is_refused_clearly(make_daemon: Any) -> None:
    dd: DaemonProcess = make_daemon({"runtimes": {"nodejs": {"enabled": False}}})
    with pytest.raises(SandboxdError) as e, dd.client() as c:
        c.run("console.log(1)", language="nodejs")
    assert e.value.code == "bad_request" and "not available" in e.value.message
    with dd.client() as c:
        assert c.status()["runtimes"]["nodejs"] == {"available": False, "why_not": "runtimes.nodejs.enabled is false"}


def test_a_node_with_shared_builtins_gets_their_files_in_its_root(tmp_path: Any) -> None:
    """Debian's nodejs loads acorn, cjs-module-lexer and undici from /usr/share/nodejs at start
    (its build's NODE_SHARED_BUILTIN_*_PATH): they must come into the root with it."""
    from sandboxd.jail.root.contents import node_shared_builtins

    builtin = tmp_path / "share" / "acorn.js"
    builtin.parent.mkdir()
    builtin.write_text("// acorn\n")
    link = tmp_path / "share" / "lexer.js"
    link.symlink_to(builtin)
    config = {"target_defaults": {"defines": [f"NODE_SHARED_BUILTIN_ACORN_PATH={builtin}",
                                              f"NODE_SHARED_BUILTIN_CJS_MODULE_LEXER_PATH={link}",
                                              "NODE_SHARED_BUILTIN_GONE_PATH=/nonexistent/x.js", "OTHER=1"]}}
    node = tmp_path / "node"  # an interpreter that answers -e like node: its process.config
    node.write_text(f"#!/bin/sh\necho '{json.dumps(config)}'\n")
    node.chmod(0o755)
    assert node_shared_builtins(str(node)) == (str(builtin), str(link))
    assert node_shared_builtins("/usr/bin/false") == ()
