"""The template mount namespace of a root, made by a short-lived process of its own.

``python -m sandboxd.jail.root.template ROOT``: a new mount namespace, everything private, the
root bind-mounted onto itself read-only with the five device nodes bound in, and
``pivot_root(".", ".")`` into it (``mounts.enter_template``).  It prints ``ok`` and waits
for its stdin to close; meanwhile the daemon opens ``/proc/PID/ns/mnt``, which keeps the
namespace alive after the process is gone, and gives that fd to the fork server.  So the
fork server never learns where the root is on the host (nothing of the host's paths can
reach a run from its memory), and workers ``setns`` into a copy of the template.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from ...common import launch
from ..kernel import mounts


async def build(root: str, python: str) -> int:
    """An fd holding the template namespace of ``root`` (the caller closes it)."""
    proc = subprocess.Popen(launch.command(python, __name__, root), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd="/", env={"PATH": "/usr/bin:/bin"}, close_fds=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = await _first_line(proc.stdout.fileno())
        if line.strip() != b"ok":
            raise OSError(0, f"building the template mount namespace of {root}: "
                             f"{line.decode(errors='replace').strip()[-2000:] or 'the helper said nothing'}")
        return os.open(f"/proc/{proc.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        proc.stdin.close()  # it may go now: the fd holds the namespace
        proc.stdout.close()
        while proc.poll() is None:
            await asyncio.sleep(0.002)


async def _first_line(fd: int) -> bytes:
    """The child's first line (or all it wrote before exiting), without a thread."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = b""
    while b"\n" not in buf:
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _set, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            break
        buf += chunk
    return buf


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def main(argv: list[str]) -> int:
    try:
        mounts.enter_template(argv[0])
    except Exception as e:  # noqa: BLE001 - the daemon gets the reason
        print(f"{type(e).__name__}: {e}", flush=True)
        return 1
    print("ok", flush=True)
    sys.stdin.read()  # hold the namespace until the daemon has its fd
    return 0

