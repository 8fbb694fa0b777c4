"""The languages runs may be in, and how each one's workers start.

Python's workers are forks of the fork server's interpreter; Node's are exec'd inside the
confined worker (V8 runs threads: it cannot be forked once started).
"""

from __future__ import annotations

from typing import Any

LANGUAGES = ("python3", "nodejs")
ALIASES = {"javascript": "nodejs"}  # other names a request may give a language by

# Each runtime's defaults, over RuntimeSettings': Python forks from the fork server, Node is
# exec'd inside a confined worker (V8 runs threads: it cannot be forked once started).
RUNTIME_DEFAULTS: dict[str, dict[str, Any]] = {
    "python3": {},
    "nodejs": {"enabled": "auto", "interpreter": "/usr/bin/node", "start": "exec", "pool_min": 1, "pool_max": 4},
}
START = {"python3": "fork", "nodejs": "exec"}  # what each language's bootstrap supports

NODE_BOOTSTRAP = "usr/lib/sandboxd/nodejs-bootstrap.js"  # in the root (a generated file): Node workers run it
