"""What goes into a stack's root: the configured paths, the runtimes' own files, an
environment's site-packages, and the files generated for it.

    root_spec(settings, layer)    the base root's spec, or an environment's (base + its site)

Generated files: ``/etc/passwd`` and ``/etc/group`` with one ``runN`` entry per run uid,
``/etc/hostname``, ``/etc/resolv.conf`` naming the resolvers runs with network may reach,
and Node's bootstrap when Node runs here.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess

from ..net import netpolicy
from ..spec.plans import EnvLayer
from ..spec.runtimes import NODE_BOOTSTRAP
from ..spec.sections import NetworkSettings
from ..spec.settings import JailSettings, layer_paths
from .rootfs import RootSpec

BOOTSTRAP_SOURCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "child", "nodejs-bootstrap.js")


def root_spec(s: JailSettings, layer: EnvLayer | None = None) -> RootSpec:
    """The base root's spec, or with ``layer`` its environment's: the base root and the
    environment's site-packages (and Debian's dist-packages if it sees them)."""
    # An environment's site-packages is required as the interpreter is: a root without it would
    # serve the environment's runs without its packages.
    required = (s.root.python, *((layer.site,) if layer else ()))
    return RootSpec((*root_paths(s), *layer_paths(layer)), s.root.exclude, generated_files(s),
                    required=required, hard_links=s.root.hard_links)


def root_paths(s: JailSettings) -> tuple[str, ...]:
    extra = [p for lang, rt in s.runtimes.items() if lang != "python3" for p in (rt.interpreter, *rt.paths)]
    node = s.runtimes.get("nodejs")
    if node is not None:
        extra += node_shared_builtins(node.interpreter)
    return tuple(dict.fromkeys((*s.root.paths, *s.root.extra_paths, *extra)))


def resolvers(network: NetworkSettings) -> list[str]:
    """The resolvers runs with network get: the configured ones, or the host's that they may reach."""
    if network.dns != ("host",):
        return list(network.dns)
    try:
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as f:
            found = netpolicy.resolvers_from(f.read())
    except OSError:
        found = []
    policy = netpolicy.Policy(network.allow, network.deny)
    return [server for server in found if policy.refusal(server) is None]


def generated_files(s: JailSettings) -> dict[str, bytes]:
    first, count = s.jail.run_uids
    passwd = ["root:x:0:0:root:/root:/usr/sbin/nologin",
              "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"]
    group = ["root:x:0:", "nogroup:x:65534:"]
    for i in range(count):
        uid = first + i
        passwd.append(f"run{i}:x:{uid}:{uid}:sandboxd run:/work:/usr/sbin/nologin")
        group.append(f"run{i}:x:{uid}:")
    files = {"etc/passwd": ("\n".join(passwd) + "\n").encode(), "etc/group": ("\n".join(group) + "\n").encode(),
             "etc/hostname": (s.jail.hostname + "\n").encode(),
             "etc/resolv.conf": netpolicy.resolv_conf(resolvers(s.network))}
    if "nodejs" in s.runtimes:
        with open(BOOTSTRAP_SOURCE, "rb") as f:
            files[NODE_BOOTSTRAP] = f.read()
    return files


@functools.lru_cache(maxsize=4)
def node_shared_builtins(interpreter: str) -> tuple[str, ...]:
    """The JavaScript files a node built with shared builtins loads at start, outside its own
    binary (Debian's nodejs: acorn, cjs-module-lexer, undici under /usr/share/nodejs): without
    them in the root it aborts before running anything.  Its build configuration names them
    (NODE_SHARED_BUILTIN_*_PATH); a node that has none (nodesource's, upstream's) gives ()."""
    try:
        out = subprocess.run([interpreter, "-e", "console.log(JSON.stringify(process.config))"], capture_output=True,
                             timeout=20, env={"PATH": "/usr/bin:/bin"}, check=True).stdout
        defines = json.loads(out).get("target_defaults", {}).get("defines", [])
    except (OSError, subprocess.SubprocessError, ValueError, AttributeError):
        return ()
    files = []
    for define in defines if isinstance(defines, list) else []:
        m = re.fullmatch(r"NODE_SHARED_BUILTIN_\w+_PATH=(/.+)", str(define))
        if m and os.path.isfile(m.group(1)):
            files.append(m.group(1))
            real = os.path.realpath(m.group(1))
            if real != m.group(1):
                files.append(real)  # a link into another package's directory: its target too
    return tuple(dict.fromkeys(files))
