"""A real sandboxd-http for tests and the benchmark: started as an unprivileged test user
on 127.0.0.1 with a free port, ready when it sends READY=1 (with the port, and the agent-check's
when it has one) on its NOTIFY_SOCKET."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from harness import Child, _die_with_parent, as_user

KEY = "sbx-test-key-0123456789"
USER = "sbx-http"


class BridgeProcess(Child):
    def __init__(self, daemon_socket: str, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 user: str = USER, key: str | None = KEY) -> None:
        self.dir = tempfile.mkdtemp(prefix="sandboxd-http-test-")
        os.chmod(self.dir, 0o755)
        self.daemon_socket = daemon_socket
        self.env = env or {}
        self.args = args
        self.user = user
        self.key = key
        self.log_path = os.path.join(self.dir, "bridge.log")
        self.notify_path = os.path.join(self.dir, "notify.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.port = 0
        self.agent_port = 0  # with agent_listen: the agent-check's port

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sandboxd.http", "--socket", self.daemon_socket, "--listen", "127.0.0.1:0",
                *self.args]

    def start(self, timeout: float = 20.0) -> BridgeProcess:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(self.notify_path)
        os.chmod(self.notify_path, 0o666)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": self.notify_path, "LANG": "C.UTF-8",
               **({"API_KEY": self.key} if self.key else {}), **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/",
                                         preexec_fn=_die_with_parent, **as_user(self.user))
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                notify.settimeout(0.2)
                try:
                    msg = notify.recv(4096).decode()
                except TimeoutError:
                    if self.proc.poll() is not None:
                        break
                    continue
                m = re.search(r"STATUS=listening on 127\.0\.0\.1:(\d+)", msg)
                if "READY=1" in msg.split("\n") and m:
                    self.port = int(m.group(1))
                    agent = re.search(r"agent-check on 127\.0\.0\.1:(\d+)", msg)
                    self.agent_port = int(agent.group(1)) if agent else 0
                    self.url = f"http://127.0.0.1:{self.port}"
                    return self
        finally:
            notify.close()
        self.kill()
        raise RuntimeError(f"sandboxd-http did not become ready:\n{self.log()}")

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Api-Key": self.key} if self.key else {}

    def close(self) -> None:
        try:
            self.stop()
        finally:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> BridgeProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
