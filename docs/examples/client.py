"""Run code, keep state in a session, and handle refusals: the Python client in one page.

    python3 docs/examples/client.py [SOCKET]
"""

import sys

from sandboxd.client import Client, SandboxdError

with Client(sys.argv[1] if len(sys.argv) > 1 else None) as c:
    r = c.run("import sys; print(sum(map(int, sys.stdin.read().split())))", stdin=b"1 2 3", timeout="2s")
    print("run:", r.status, r.text.strip(), f"({r.wall_ms:.1f} ms)")

    r = c.run("open('out/report.txt', 'w').write('done')")
    print("files:", r.files)

    with c.session(memory="256M") as s:  # an interpreter that keeps its state between execs
        s.exec("import json; data = {'n': 41}")
        print("session:", s.exec("data['n'] + 1").value)

    r = c.run("import socket; socket.create_connection(('127.0.0.1', 9))")
    print("refused:", r.status, r.blocked_syscall, "-", r.get("advice"))

    try:
        c.run("pass", timeout="1h")
    except SandboxdError as e:
        print("error:", e.code, e.message)
