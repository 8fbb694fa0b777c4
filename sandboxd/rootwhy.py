"""Why does ``import MODULE`` fail in the jail?  Look in the root the way the import
system and the dynamic loader would, and say what is missing and how to fix it.

Answers the two questions behind most support threads of this kind of sandbox:
"No module named X" (the package directory is not in the root, or not on sys.path)
and "libX.so: cannot open shared object file" (an extension needs a library the root
does not have).
"""

from __future__ import annotations

import os
import re
import stat
import sys
import sysconfig
from typing import Any

from .jail.root.elf import is_elf
from .jail.root.ldpath import LibraryResolver

EXT_SUFFIXES = tuple(dict.fromkeys([sysconfig.get_config_var("EXT_SUFFIX") or ".so", ".abi3.so", ".so"]))
HOST_SITE_DIRS = ("/usr/lib/python3/dist-packages", "/usr/local/lib/python{v}/dist-packages",
                  "/usr/lib/python{v}/site-packages", "/opt")


def find_module(name: str, search: list[str], prefix: str = "") -> str | None:
    """Where ``name`` (dotted) would be imported from, looking under ``prefix`` (a root)."""
    found = _find(name.split("."), search, prefix)
    return None if found is None else found[len(prefix):]


def _find(parts: list[str], search: list[str], prefix: str) -> str | None:
    for base in search:
        path = prefix + base
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            pkg = os.path.join(path, part)
            if os.path.isdir(pkg) and (os.path.exists(os.path.join(pkg, "__init__.py")) or not last):
                path = pkg
                if last:
                    return pkg
                continue
            if last:
                for suffix in (".py", *EXT_SUFFIXES):
                    if os.path.isfile(pkg + suffix):
                        return pkg + suffix
                if os.path.isdir(pkg):  # namespace package
                    return pkg
            break
    return None


def extensions(path: str, prefix: str) -> list[str]:
    """ELF files of a module (one file) or package (its whole tree), as paths inside the root."""
    full = prefix + path
    if os.path.isfile(full):
        return [path] if is_elf(full) else []
    out = []
    for top, _dirs, files in os.walk(full):
        for f in files:
            if ".so" in f and is_elf(os.path.join(top, f)):
                out.append(os.path.join(top, f)[len(prefix):])
    return sorted(out)


def _public(path: str) -> bool:
    """Could anyone find this path (every directory searchable, the file readable by others)?"""
    parts = os.path.abspath(path).split("/")
    for i in range(2, len(parts) + 1):
        try:
            mode = os.stat("/".join(parts[:i]) or "/").st_mode
        except OSError:
            return False
        needed = stat.S_IXOTH if stat.S_ISDIR(mode) else stat.S_IROTH
        if not mode & needed:
            return False
    return True


def explain(name: str, root: str, run_path: list[str], private_ok: bool = False) -> dict[str, Any]:
    """Everything ``sandboxctl root why`` prints, as data.

    The daemon looks on the host as root; unless ``private_ok`` (an admin asked), a place
    on the host is named only if any user could have found it there.
    """
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    report: dict[str, Any] = {"module": name, "root": root, "searched": run_path, "found": None,
                              "extensions": [], "missing_libraries": {}, "advice": []}
    found = find_module(name, run_path, prefix=root)
    if found is None:
        host_dirs = [d.format(v=v) for d in HOST_SITE_DIRS] + [p for p in sys.path if p.startswith("/")]
        on_host = find_module(name, list(dict.fromkeys(host_dirs)))
        if on_host and not (private_ok or _public(on_host)):
            on_host = None
        report["on_host"] = on_host
        if on_host:
            top = os.path.dirname(on_host) if os.path.isfile(on_host) else on_host
            site = os.path.dirname(top) if name.count(".") == 0 else top
            report["advice"].append(
                f"{name} is on this host at {on_host} but not in the root: add {top} to root.extra_paths and "
                f"{site} to root.python_path, then reload (libraries its extensions need come along)")
        else:
            report["advice"].append(f"{name} is neither in the root nor in the usual places on this host; "
                                    "install it (e.g. into a virtualenv) and add its site-packages to the root")
        return report
    report["found"] = found
    resolver = LibraryResolver(sysroot=root)  # the host's search directories, looked up in the root
    for ext in extensions(found, root):
        needed_found, missing = resolver.closure([ext])
        report["extensions"].append({"file": ext, "libraries": sorted(needed_found)})
        report["missing_libraries"].update(missing)
    host = LibraryResolver()
    for obj, names in report["missing_libraries"].items():
        for lib in names:
            hit = next((p for d in host.system_dirs if os.path.isfile(p := os.path.join(d, lib))), None)
            if hit:
                report["advice"].append(f"{obj} needs {lib}, which the host has at {hit}: rebuild the root "
                                        "(sandboxctl rebuild-root) so it is picked up, or add it to root.paths")
            else:
                report["advice"].append(f"{obj} needs {lib}, which this host does not have either: install the "
                                        "package that provides it, then rebuild the root")
    return report


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment_advice(module: str, environment: str, environments: list[dict[str, Any]]) -> list[str]:
    """Where ``module`` could come from: another environment that has a distribution of its
    name, or the requirement to add to this one (the distribution's name may differ)."""
    top = _normal(module.split(".")[0])
    holders = [e["name"] for e in environments
               if e["name"] != environment and any(_normal(p["name"]) == top for p in e.get("packages", []))]
    advice = [f"environment {name} has {module.split('.')[0]}: run with \"environment\": \"{name}\""
              for name in holders]
    target = environment or ("default" if not environments else environments[0]["name"])
    advice.append(f"to have it, add {module.split('.')[0]} (its name on the index may differ) to "
                  f"environments.{target}.requirements and reload, or run sandboxctl env build {target}")
    return advice
