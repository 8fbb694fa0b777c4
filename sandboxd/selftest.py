"""The self-test: probes through the real jail, before the daemon reports ready.

The probe is code that must fail at every escape it tries: seeing the daemon's
configuration, state directory or socket, opening an ``AF_INET`` socket without
network, running as uid 0 or outside the run uids, writing the root, seeing the host's
``/proc``, becoming root again.  If any of it works the daemon refuses to serve.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .jail.jail import Jail
from .jail.spec.plans import RunPlan


class SelfTestFailed(Exception):
    pass


PROBE = r'''
import json, os, socket
found = {{}}
found["cannot_see_config"] = not os.path.exists({config!r})
found["cannot_see_state_dir"] = not os.path.exists({state!r})
found["cannot_see_socket"] = not os.path.exists({socket!r})
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    found["no_socket_without_network"] = False
except OSError:
    found["no_socket_without_network"] = True
found["unprivileged_uid"] = {first} <= os.getuid() <= {last} and os.geteuid() != 0
try:
    open("/usr/sandboxd-self-test", "w")
    found["root_read_only"] = False
except OSError:
    found["root_read_only"] = True
found["no_host_proc"] = not os.path.exists("/proc/1/environ")
try:
    os.setuid(0)
    found["cannot_become_root"] = False
except OSError:
    found["cannot_become_root"] = True
# Not a failure, a note: each run has its own device nodes (not the host's, shared by all runs).
found["note:private_dev"] = os.stat("/dev/null").st_dev == os.stat("/dev").st_dev
print(json.dumps(found))
'''


async def run(jail: Jail, config_path: str, state_dir: str, socket_path: str,
              run_uids: tuple[int, int]) -> dict[str, Any]:
    """The report for ``status``; raises ``SelfTestFailed`` when a probe got through."""
    first, count = run_uids
    probe = PROBE.format(config=config_path, state=state_dir, socket=socket_path, first=first,
                         last=first + count - 1)
    t0 = time.monotonic()
    result = await jail.run(RunPlan(run_id="self-test", code=probe, timeout_ms=10_000, cpu_ms=10_000))
    try:
        findings = json.loads(result.stdout.decode())
    except ValueError:
        raise SelfTestFailed(f"self-test did not run: status {result.status}, error {result.error}, "
                             f"stderr {result.stderr[-500:]!r}") from None
    notes = {name.split(":", 1)[1]: findings.pop(name) for name in list(findings) if name.startswith("note:")}
    failed = [name for name, ok in findings.items() if not ok]
    report = {"enabled": True, "passed": not failed, "probes": findings, "notes": notes,
              "seconds": round(time.monotonic() - t0, 3)}
    if failed:
        raise SelfTestFailed(f"self-test failed: the jail allowed {', '.join(failed)}; refusing to start")
    return report
