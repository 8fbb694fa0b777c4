"""Reading sandboxd.yaml: every section through its declarations, the cross-checks, and errors
that name the file, line, column, key and expected form::

    /etc/sandboxd/sandboxd.yaml:12:5: quotas.default.max_memory: expected a size like 256M, 1G
    or a number of bytes, got 'lots'
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from ..common import sizes
from ..common.declare import convert_section
from ..common.hints import did_you_mean
from ..jail.spec.runtimes import LANGUAGES, RUNTIME_DEFAULTS, START
from ..jail.spec.sections import ProfileSettings, RootSettings, RuntimeSettings
from .checks import cross_checks
from .sections import DEFAULT_CONFIG, SECTIONS, Config, EnvironmentSettings, QuotaLimits, QuotaPolicy


class ConfigError(Exception):
    """The file's errors: ``errors`` as "key: message" strings, ``located`` as records with
    the file, key, line and column (1-based; None where the file does not say)."""

    def __init__(self, path: str, errors: list[str], text: str | None = None,
                 mark: tuple[int, int] | None = None) -> None:
        self.path = path
        self.errors = errors
        self.located = locate(path, errors, text, mark)
        super().__init__("\n".join(_where(e) + e["message"] if not e["key"] else
                                   f"{_where(e)}{e['key']}: {e['message']}" for e in self.located))


def _where(e: dict[str, Any]) -> str:
    return f"{e['file']}:{e['line']}:{e['column']}: " if e["line"] else f"{e['file']}: "


def locate(path: str, errors: list[str], text: str | None,
           mark: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Each "key.path: message" error with where the key is written in ``text``."""
    positions = _key_positions(text) if text is not None and mark is None else {}
    out = []
    for error in errors:
        key, sep, message = error.partition(": ")
        if not sep or " " in key:
            key, message = "", error
        line, column = mark or (None, None)
        parts = key.split(".") if key else []
        for n in range(len(parts), 0, -1):  # the deepest key the file has (a missing one: its parent)
            found = positions.get(tuple(parts[:n]))
            if found:
                line, column = found
                break
        out.append({"file": path, "key": key or None, "line": line, "column": column, "message": message})
    return out


def _key_positions(text: str) -> dict[tuple[str, ...], tuple[int, int]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    found: dict[tuple[str, ...], tuple[int, int]] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    here = (*prefix, str(key.value))
                    found[here] = (key.start_mark.line + 1, key.start_mark.column + 1)
                    walk(value, here)

    walk(root, ())
    return found


def parse(data: Any, path: str = "<config>") -> Config:
    """Validate a loaded YAML document; raise ``ConfigError`` listing every problem."""
    errors: list[str] = []
    warnings: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, ["expected a mapping of sections at the top level"])
    known = {*SECTIONS, "quotas", "profiles", "runtimes", "environments"}
    for key in data:
        if key not in known:
            errors.append(f"{key}: unknown section" + did_you_mean(str(key), sorted(known)))
    sections = {name: cls(**_section(cls, data.get(name), name, errors)) for name, cls in SECTIONS.items()}
    quotas = _parse_quotas(data.get("quotas"), errors)
    profiles = _parse_profiles(data.get("profiles"), errors)
    runtimes = _parse_runtimes(data.get("runtimes"), sections["root"], errors, warnings)
    environments = _parse_environments(data.get("environments"), errors)
    cfg = Config(path=path, quotas=quotas, profiles=profiles, runtimes=runtimes, environments=environments,
                 **sections)
    cross_checks(cfg, errors, warnings)
    if errors:
        raise ConfigError(path, errors)
    return dataclasses.replace(cfg, warnings=tuple(warnings))


def _parse_quotas(raw: Any, errors: list[str]) -> QuotaPolicy:
    if raw is None:
        return QuotaPolicy()
    if not isinstance(raw, dict):
        errors.append(f"quotas: expected a mapping, got {raw!r}")
        return QuotaPolicy()
    for key in raw:
        if key not in ("default", "users", "groups", "deny_unlisted"):
            errors.append(f"quotas.{key}: unknown setting (expected default, users, groups or deny_unlisted)")
    default = QuotaLimits(**_section(QuotaLimits, raw.get("default"), "quotas.default", errors))
    tables: dict[str, dict[str, Mapping[str, Any]]] = {}
    for table in ("users", "groups"):
        entries = raw.get(table) or {}
        if not isinstance(entries, dict):
            errors.append(f"quotas.{table}: expected a mapping of names (or numeric ids) to limits")
            entries = {}
        tables[table] = {str(name): _section(QuotaLimits, limits, f"quotas.{table}.{name}", errors)
                         for name, limits in entries.items()}
    deny = raw.get("deny_unlisted", False)
    if not isinstance(deny, bool):
        errors.append(f"quotas.deny_unlisted: expected true or false, got {deny!r}")
        deny = False
    return QuotaPolicy(default, tables["users"], tables["groups"], deny)


def _parse_runtimes(raw: Any, root: RootSettings, errors: list[str],
                    warnings: list[str]) -> dict[str, RuntimeSettings]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append("runtimes: expected a mapping of language names to runtimes")
        raw = {}
    for name in raw:
        if name not in LANGUAGES:
            errors.append(f"runtimes.{name}: unknown language (known: {', '.join(LANGUAGES)}; a language needs a "
                          "bootstrap of sandboxd's own)")
    out: dict[str, RuntimeSettings] = {}
    for lang in LANGUAGES:
        given = _section(RuntimeSettings, raw.get(lang), f"runtimes.{lang}", errors)
        rt = RuntimeSettings(**{**RUNTIME_DEFAULTS[lang], **given})
        key = f"runtimes.{lang}"
        if rt.start != START[lang]:
            errors.append(f"{key}.start: {lang} workers start by {START[lang]}, got {rt.start}")
        interpreter = rt.interpreter or (root.python if lang == "python3" else "")
        if not interpreter.startswith("/"):
            errors.append(f"{key}.interpreter: expected an absolute path, got {rt.interpreter!r}")
            interpreter = "/"
        available, why_not = rt.enabled != "no", "" if rt.enabled != "no" else f"{key}.enabled is false"
        if available and rt.enabled == "auto" and not os.path.exists(interpreter):
            available, why_not = False, f"{interpreter} is not installed on this host"
            warnings.append(f"{key}: {why_not}: {lang} runs are refused (install it and reload to have them)")
        out[lang] = dataclasses.replace(rt, interpreter=interpreter, available=available, why_not=why_not)
    return out


def _parse_environments(raw: Any, errors: list[str]) -> dict[str, EnvironmentSettings]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append("environments: expected a mapping of environment names to environments")
        return {}
    out = {}
    for name, body in raw.items():
        if not isinstance(name, str) or not sizes.ENVIRONMENT_NAME.fullmatch(name):
            errors.append(f"environments.{name}: a name is 1-32 of a-z, 0-9, '_' and '-', starting with a letter "
                          "or digit")
            continue
        given = _section(EnvironmentSettings, body, f"environments.{name}", errors)
        env = EnvironmentSettings(**given)
        if not env.requirements:
            errors.append(f"environments.{name}.requirements: an environment installs at least one requirement")
        if not env.index_url and not env.extra_index_urls and not env.find_links:
            errors.append(f"environments.{name}: pip needs somewhere to get packages: index_url, extra_index_urls "
                          "or find_links")
        out[name] = env
    return out


def _parse_profiles(raw: Any, errors: list[str]) -> dict[str, ProfileSettings]:
    profiles = {lang: ProfileSettings() for lang in LANGUAGES}
    if raw is None:
        return profiles
    if not isinstance(raw, dict):
        errors.append("profiles: expected a mapping of language names to profiles")
        return profiles
    for name, body in raw.items():
        if name not in LANGUAGES:
            errors.append(f"profiles.{name}: unknown language (known: {', '.join(LANGUAGES)})")
            continue
        profiles[name] = ProfileSettings(**_section(ProfileSettings, body, f"profiles.{name}", errors))
    return profiles


def load(path: str = DEFAULT_CONFIG) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        m = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        raise ConfigError(path, [f"not valid YAML: {problem}" + (f" ({context})" if context else "")], text,
                          (m.line + 1, m.column + 1) if m is not None else None) from None
    ambiguous = _decimal_modes(text)
    try:
        cfg = parse(data, os.path.abspath(path))
    except ConfigError as e:
        raise ConfigError(e.path, [*ambiguous, *e.errors], text) from None
    if ambiguous:
        raise ConfigError(os.path.abspath(path), ambiguous, text)
    return cfg


MODE_KEYS = (("daemon", "socket_mode"),)


def _decimal_modes(text: str) -> list[str]:
    """Modes written as unquoted decimal digits (660): YAML reads them as decimal numbers,
    not the octal the digits look like (0660 and 0o660 are octal to it)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    out = []
    for section, key in MODE_KEYS:
        node = _child(_child(root, section), key)
        if isinstance(node, yaml.ScalarNode) and node.style is None and re.fullmatch(r"[1-9][0-9]*", node.value):
            out.append(f'{section}.{key}: {node.value} unquoted is the decimal number {node.value} to YAML, '
                       f'not the octal mode it looks like: write "0{node.value}" (quoted)')
    return out


def _child(node: Any, key: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None




def _section(cls: type[Any], raw: Any, prefix: str, errors: list[str]) -> dict[str, Any]:
    return convert_section(cls, raw, f"{prefix}.", errors)
