"""Render the settings declarations as the shipped YAML, sandboxd.yaml(5), and the SETTINGS
sections of sandboxd-http(8) and sandboxd-mcp(1).

    python -m sandboxd.tools.settings_doc --write etc/sandboxd/sandboxd.yaml man/sandboxd.yaml.5 man/sandboxd-http.8 \
        man/sandboxd-mcp.1
    python -m sandboxd.tools.settings_doc --check (the same files)

``--check`` fails when a file differs from what the declarations produce, so the config
file and the man pages cannot drift from the code.  In sandboxd-http(8) and sandboxd-mcp(1)
only what lies between the ``BEGIN SETTINGS`` and ``END SETTINGS`` comments is generated.
(The fourth file may be left out: then sandboxd-mcp(1) is not rendered.)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from collections.abc import Iterable
from typing import Any

from .. import __date__, __version__
from ..common import sizes
from ..common.declare import declared, default_of
from ..config import (
    LANGUAGES,
    RUNTIME_DEFAULTS,
    SECTIONS,
    EnvironmentSettings,
    ProfileSettings,
    QuotaLimits,
    RuntimeSettings,
)
from ..http import settings as http_settings
from ..mcp import settings as mcp_settings

SECTION_DOCS = {
    "daemon": "The daemon process: socket, state, capacity and connection limits.",
    "root": "The read-only root runs see. Shared libraries that ELF files in it need are added automatically.",
    "jail": "How each run is confined.",
    "pool": "Warm workers: already confined, waiting for code.",
    "limits": "What a run gets when it does not ask; quotas bound what it may ask for.",
    "network": "Runs with network (quotas say who may ask): their own namespace and interface, a policed way "
               "out through the host, never the host itself.",
    "quotas": "Per calling user: a default, overrides per user and per group (name or number).",
    "profiles": "System call profiles per language, on top of the built-in allowlist.",
    "runtimes": "The languages runs may be in: each one's interpreter, root paths, and how its workers start.",
    "environments": "Named Python environments the daemon builds with pip, as an unprivileged build uid in a jail "
                    "of its own; runs ask for one with \"environment\", and get \"default\" when it is declared.",
}


# What the shipped file sets (not defaults): the profile of sandboxd-http(8), whose quota every
# Dify user shares, sized from Dify's own limits (docs/http.md says why each number).  The quota
# restates max_timeout, max_memory and max_output, which the bridge's settings need, so that they
# stay what they are if the defaults change.
BRIDGE_DAEMON = (
    ("max_frame", "32M", "a request of sandboxd-http's max_body (24M) and its other fields"),
    ("buffer_budget_per_uid", "160M", "its six runs' requests held at once (6 x 24M)"),
)
BRIDGE_QUOTA = ("{concurrent: 6, queued: 64, runs_per_minute: 6000, cpu_seconds_per_hour: 0, max_timeout: 60s,\n"
                "                   max_memory: 1G, max_output: 8M}")
BRIDGE_QUOTA_DOC = ("sandboxd-http (the dify-sandbox API, sandboxd-http(8)) runs every Dify request as this one "
                    "user: 6 at once (what one caller gets of 8 workers, 2 being reserved), Dify's 60 s wait at "
                    "most, 1G and 8M of output a run, no CPU budget (dify-sandbox has none). Add network: true to "
                    "give runs that ask for it (Dify always does) the policed network; without it they run "
                    "without network.")


def _fmt_size(n: int) -> str:
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _fmt_duration(s: float) -> str:
    if s and s < 1:
        return f"{round(s * 1000)}ms"
    if s % 60 == 0 and s >= 60:
        return f"{int(s // 60)}m"
    return f"{s:g}s"


def _scalar(v: Any) -> str:
    """A list item as YAML reads it back: quoted when it would be an alias, a tag or a mapping."""
    text = str(v)
    return f'"{text}"' if not text or text[0] in "*&!%@`'\"{[|>#" or ": " in text else text


def show(f: dataclasses.Field[Any], value: Any) -> str:
    """A value as it is written in the YAML file."""
    conv = f.metadata["convert"]
    if conv is sizes.byte_size:
        return _fmt_size(value)
    if conv is sizes.duration:
        return _fmt_duration(value)
    if conv is sizes.tristate:
        return {"yes": "true", "no": "false"}.get(value, value)
    if conv is sizes.octal_mode:
        return f'"{value:04o}"'
    if conv is sizes.uid_range:
        first, count = value
        return f'"{first}-{first + count - 1}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[]" if not value else "\n" + "\n".join(f"    - {_scalar(v)}" for v in value)
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "\n" + "\n".join(f'    {k}: "{v}"' for k, v in value.items())
    if isinstance(value, str):
        return f'"{value}"' if value == "" or ":" in value else value
    return str(value)


def render_yaml() -> str:
    """The shipped conffile: what an operator changes, nothing that restates a default (the
    defaults live in the code and in sandboxd.yaml(5)), so that upgrades do not prompt about
    a file nobody edited, and no path that belongs to one Debian release (the root's paths
    derive from root.python)."""
    out = [
        "# sandboxd configuration: only what differs from the defaults (no version here: a release",
        "# that changes no shipped value leaves this file alone, and dpkg asks nothing).",
        "# sandboxd.yaml(5) lists every setting with its default; sizes: 256M, 1G; durations: 500ms, 5s, 2m.",
        "# Check with `sandboxctl check-config`; apply with `systemctl reload sandboxd` (SIGHUP).",
        "# Generated from the settings declarations: python3 -m sandboxd.tools.settings_doc --write",
        "#",
        "# The settings people change, for example:",
        "#",
        "# daemon:",
        "#   workers: 16                 # runs at once, all callers together",
        "#   admin_group: sandboxd-admin # may see every job, kill, reload, rebuild",
        "# limits:",
        "#   timeout: 10s                # what a run gets when it does not ask",
        "#   memory: 512M",
        "# quotas:",
        "#   default: {concurrent: 4, runs_per_minute: 600, max_memory: 1G, network: false}",
        "#   users:   {alice: {concurrent: 16, network: true}}",
        "#   groups:  {judges: {cpu_seconds_per_hour: 36000}}",
        "# network:",
        "#   allow: [10.20.0.5/32]       # an internal API runs with network may reach",
        "# environments:                 # Python packages runs may import, built by the daemon",
        "#   default: {requirements: [numpy==1.26.4, pandas==2.1.4], index_url: https://pypi.org/simple,",
        "#             preload: [numpy]}",
        "",
        f"# {SECTION_DOCS['daemon']} For sandboxd-http:",
        "daemon:",
        *[f"  {key + ':':<22} {value:<5} # {why}" for key, value, why in BRIDGE_DAEMON],
        "",
        f"# {SECTION_DOCS['quotas']}",
        *[f"# {line}" for line in textwrap.wrap(BRIDGE_QUOTA_DOC, 98)],
        "quotas:",
        "  users:",
        f"    sandboxd-http: {BRIDGE_QUOTA}",
    ]
    return "\n".join(out) + "\n"


def _man_escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line if line.startswith((".", "'")) else line) for line in text.split("\n"))


KINDS = {
    sizes.byte_size: "size", sizes.duration: "duration", sizes.boolean: "boolean", sizes.text: "string",
    sizes.optional_text: "string", sizes.abs_path: "absolute path", sizes.path_list: "list of absolute paths",
    sizes.pattern_list: "list of glob patterns", sizes.name_list: "list of names",
    sizes.str_map: "mapping of strings to strings", sizes.octal_mode: "octal mode, quoted",
    sizes.uid_range: "uid range low\\-high", sizes.errno_map: "mapping of system call names to errno names",
    sizes.tristate: "true, false or auto", sizes.cidr: "network (CIDR)", sizes.cidr_list: "list of networks (CIDR)",
    sizes.resolvers: "host, or a list of addresses", sizes.url: "URL",
    sizes.requirement_list: "list of requirements", sizes.index_url: "URL or null", sizes.url_list: "list of URLs",
    sizes.environment_names: "list of environment names or *",
}


def kind_of(f: dataclasses.Field[Any]) -> str:
    conv = f.metadata["convert"]
    kinds = {**KINDS, sizes.listen_address: "HOST:PORT", http_settings.api_key: "string",
             mcp_settings.http_address: "HOST:PORT, a port, or empty", mcp_settings.token_list: "list of tokens",
             mcp_settings.origin_list: "list of origins", mcp_settings.host_list: "list of host names",
             mcp_settings.optional_path: "path"}
    return kinds.get(conv) or (conv.__doc__ or "value").strip()


def _man_fields(fields: Iterable[dataclasses.Field[Any]], prefix: str,
                defaults: dict[str, Any] | None = None) -> list[str]:
    lines = []
    for f in fields:
        kind = kind_of(f)
        default = show(f, (defaults or {}).get(f.name, default_of(f)))
        default = default.replace("\n    - ", ", ").replace("\n    ", ", ").removeprefix(", ").strip()
        lines += [".TP", f"\\fB{_man_escape(prefix + f.name)}\\fR ({kind})",
                  _man_escape(f.metadata["doc"]), ".br", f"Default: {_man_escape(default)}"]
    return lines


def render_man() -> str:
    out = [
        f'.TH SANDBOXD.YAML 5 {__date__} "sandboxd {__version__}" "File Formats"',
        ".SH NAME",
        "sandboxd.yaml \\- configuration of the sandboxd daemon",
        ".SH SYNOPSIS",
        "\\fI/etc/sandboxd/sandboxd.yaml\\fR",
        ".SH DESCRIPTION",
        "A YAML mapping of sections.  Every key is optional; a missing key has the default listed here.",
        "Unknown keys are errors.  Sizes are written like \\fB256M\\fR or \\fB1G\\fR (or a number of bytes),",
        "durations like \\fB500ms\\fR, \\fB5s\\fR or \\fB2m\\fR (or a number of seconds).",
        "Errors name the file, the key and the expected form.",
        "Check a file with \\fBsandboxctl check\\-config\\fR \\fIFILE\\fR; apply it with",
        "\\fBsystemctl reload sandboxd\\fR (SIGHUP).  A rejected file leaves the running configuration in place.",
    ]
    for name, cls in SECTIONS.items():
        out += [f".SH {name.upper()}", _man_escape(SECTION_DOCS[name]), *_man_fields(declared(cls), f"{name}.")]
    out += [
        ".SH QUOTAS", _man_escape(SECTION_DOCS["quotas"]),
        "A user entry wins over group entries; among matching groups the most generous value of each limit",
        "wins.  Asking for more than the caller's quota allows is refused (\\fBforbidden\\fR); exceeding a",
        "rate or budget gives \\fBquota_exceeded\\fR with \\fBretry_after_ms\\fR.",
        ".TP", "\\fBquotas.deny_unlisted\\fR (boolean)",
        "Refuse callers that match neither a user nor a group entry.", ".br", "Default: false",
        ".TP", "\\fBquotas.users\\fR, \\fBquotas.groups\\fR (mappings)",
        "Name or number to any subset of the limits below, e.g.",
        "\\fBalice: {concurrent: 16, max_memory: 2G, network: true}\\fR.", ".br", "Default: {}",
        "(the shipped file has one user entry, for \\fBsandboxd\\-http\\fR, whose quota every Dify request",
        "shares: see \\fBsandboxd\\-http\\fR(8))",
        *_man_fields(declared(QuotaLimits), "quotas.default."),
        ".SH PROFILES", _man_escape(SECTION_DOCS["profiles"]),
        "Languages: " + ", ".join(LANGUAGES) + ".  System calls are named, so one profile serves every",
        "architecture.  \\fBsandboxctl syscalls\\fR \\fIFILE\\fR prints the lines to add for a program.",
        *_man_fields(declared(ProfileSettings), "profiles.python3."),
        ".SH RUNTIMES", _man_escape(SECTION_DOCS["runtimes"]),
        "A Python worker is a fork of the fork server's interpreter; a Node.js worker is \\fBnode\\fR exec'd",
        "inside a fully confined worker (every step done, the filter loaded), where a bootstrap of sandboxd's",
        "waits for the request.  \\fBenabled: auto\\fR means: when the interpreter is installed.",
        *[line for lang in LANGUAGES
          for line in _man_fields(declared(RuntimeSettings), f"runtimes.{lang}.", RUNTIME_DEFAULTS[lang])],
        ".SH ENVIRONMENTS", _man_escape(SECTION_DOCS["environments"]),
        "Each entry is a name (1\\-32 of a\\-z, 0\\-9, _ and \\-) mapped to the keys below.  A build runs at start",
        "and after a reload that changes an entry (\\fBsandboxctl env build\\fR \\fINAME\\fR builds on demand);",
        "until the first build of an environment is ready its runs wait for it (at most",
        "\\fBdaemon.environment_wait\\fR), then are refused with \\fBunavailable\\fR;",
        "a build whose site\\-packages cannot go into its root (under \\fI/tmp\\fR, say, or",
        "\\fBroot.exclude\\fR) fails,",
        "and a failed build keeps the previous one serving (\\fBsandboxctl env list\\fR says why).",
        "Builds live under \\fBdaemon.environments_dir\\fR; the libraries their ELF files need join the",
        "environment's root.  \\fBquotas.*.environments\\fR lists the names a caller may ask for.",
        *_man_fields(declared(EnvironmentSettings), "environments.NAME."),
        ".SH EXAMPLE",
        ".nf",
        "root:",
        "  extra_paths: [/opt/venv/lib/python3.11/site\\-packages]",
        "  python_path: [/opt/venv/lib/python3.11/site\\-packages]",
        "jail:",
        "  preload: [numpy]",
        "environments:",
        "  default:",
        "    requirements: [numpy==1.26.4, pandas==2.1.4]",
        "    index_url: https://pypi.org/simple",
        "    preload: [numpy]",
        "quotas:",
        "  default: {concurrent: 2, runs_per_minute: 120}",
        "  groups:",
        "    judges: {concurrent: 16, cpu_seconds_per_hour: 36000}",
        ".fi",
        ".SH FILES",
        "\\fI/etc/sandboxd/sandboxd.yaml\\fR",
        ".SH SEE ALSO",
        "\\fBsandboxd\\fR(8), \\fBsandboxctl\\fR(8), \\fBsandboxd\\-http\\fR(8)",
    ]
    return "\n".join(out) + "\n"


BEGIN = '.\\" BEGIN SETTINGS (generated from sandboxd/{module}/settings.py by python3 -m sandboxd.tools.settings_doc)'
END = '.\\" END SETTINGS'
LISTEN_DEFAULTS = {sizes.listen_address: http_settings.DEFAULT_LISTEN, mcp_settings.http_address: "none (stdio)"}


def render_settings(cls: type[Any]) -> list[str]:
    """A process's settings as man page entries: key, variables, kind, doc, default."""
    lines = []
    for f in declared(cls):
        names = ", ".join(f"\\fB{_man_escape(env)}\\fR" for env in f.metadata["env"])
        default = LISTEN_DEFAULTS.get(f.metadata["convert"]) or show(f, default_of(f))
        if default in ('""', "[]"):
            default = "none"
        lines += [".TP", f"\\fB{_man_escape(f.name)}\\fR ({kind_of(f)}{'; ' + names if names else ''})",
                  _man_escape(f.metadata["doc"]), ".br", f"Default: {_man_escape(default)}"]
    return lines


def render_settings_section(page: str, cls: type[Any], module: str) -> str:
    """``page`` with its SETTINGS entries rendered afresh between the markers."""
    begin = BEGIN.format(module=module)
    head, sep, rest = page.partition(begin + "\n")
    _old, sep2, tail = rest.partition(END + "\n")
    if not sep or not sep2:
        raise ValueError(f"the page lacks the lines {begin!r} and {END!r}")
    return head + sep + "\n".join(render_settings(cls)) + "\n" + sep2 + tail


def rendered(paths: list[str]) -> list[str]:
    """What each of the files should hold."""
    pages = []
    for path, cls, module in zip(paths[2:], (http_settings.Settings, mcp_settings.Settings), ("http", "mcp"),
                                 strict=False):
        with open(path, encoding="utf-8") as f:
            pages.append(render_settings_section(f.read(), cls, module))
    return [render_yaml(), render_man(), *pages]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", nargs="+", metavar="FILE", help="YAML MAN5 HTTP_MAN8 [MCP_MAN1]")
    p.add_argument("--check", nargs="+", metavar="FILE", help="YAML MAN5 HTTP_MAN8 [MCP_MAN1]")
    args = p.parse_args(argv)
    paths = args.write or args.check
    if not paths or len(paths) not in (3, 4):
        p.print_help()
        return 2
    texts = rendered(paths)
    if args.write:
        for path, text in zip(paths, texts, strict=True):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return 0
    stale = []
    for path, text in zip(paths, texts, strict=True):
        try:
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    stale.append(path)
        except OSError:
            stale.append(path)
    if stale:
        print(f"out of date with the settings declarations: {', '.join(stale)}\n"
              "regenerate: python3 -m sandboxd.tools.settings_doc --write etc/sandboxd/sandboxd.yaml "
              "man/sandboxd.yaml.5 man/sandboxd-http.8 man/sandboxd-mcp.1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
