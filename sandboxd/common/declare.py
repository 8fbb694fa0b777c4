"""Settings declared once -- name, type, default, converter, one line of doc, environment
names -- and the loader that reads them, for every process of sandboxd.

A section is a frozen dataclass whose fields come from ``setting``.  ``convert_section``
turns a YAML mapping into that section's values, ``from_environment`` takes the ones a
section names variables for; both append errors that name where the value came from and
what was expected::

    /etc/sandboxd/sandboxd.yaml: quotas.default.max_memory: expected a size like 256M, ...
    environment: MAX_WORKERS: expected an integer from 1 to 1024, got 'many'

The shipped YAML and the man pages are rendered from the same declarations
(``sandboxd.tools.settings_doc``), so neither can drift from the code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any

from .hints import did_you_mean

# What a variable may say for true and false: Go's strconv.ParseBool's words (dify-sandbox's
# variables are read by Go), and yes/no/on/off.
TRUE_WORDS = ("1", "t", "T", "true", "TRUE", "True", "yes", "on")
FALSE_WORDS = ("0", "f", "F", "false", "FALSE", "False", "no", "off")


def setting(default: Any, convert: Callable[[Any], Any], doc: str, env: tuple[str, ...] = ()) -> Any:
    """A declared field: its default, the converter that checks a raw value, its doc, and the
    environment variables that may set it (later ones win)."""
    meta = {"convert": convert, "doc": doc, "env": env}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def declared(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if "convert" in f.metadata]


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def convert(f: dataclasses.Field[Any], value: Any, where: str, errors: list[str]) -> Any:
    """``value`` through ``f``'s converter; ``dataclasses.MISSING`` (and an error) if it fails."""
    try:
        return f.metadata["convert"](value)
    except ValueError as e:
        errors.append(f"{where}: expected {e}, got {value!r}")
        return dataclasses.MISSING


def convert_section(cls: type[Any], raw: Any, where: str, errors: list[str], prefix: str = "") -> dict[str, Any]:
    """A YAML mapping's values for section ``cls``; unknown keys and bad values are errors
    named ``{where}{key}`` (``where`` ends with the separator: "quotas.default.", "FILE: ")."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(f"{where.rstrip('. ').rstrip(':') or 'top level'}: expected a mapping of settings, got {raw!r}")
        return {}
    fields = {f.name: f for f in declared(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        f = fields.get(str(key))
        if f is None:
            errors.append(f"{where}{prefix}{key}: unknown setting" + did_you_mean(str(key), fields))
            continue
        converted = convert(f, value, f"{where}{prefix}{key}", errors)
        if converted is not dataclasses.MISSING:
            out[f.name] = converted
    return out


def _env_value(f: dataclasses.Field[Any], text: str) -> Any:
    """An environment string as the YAML value the converter takes."""
    if f.type in ("bool", bool):
        return True if text in TRUE_WORDS else False if text in FALSE_WORDS else text
    if f.type in ("int", int) and re.fullmatch(r"\s*-?\d+\s*", text):
        return int(text)
    return text


def from_environment(cls: type[Any], env: Mapping[str, str], errors: list[str]) -> dict[str, Any]:
    """The values of section ``cls`` that its declared variables set in ``env`` (empty ones don't)."""
    out: dict[str, Any] = {}
    for f in declared(cls):
        for name in f.metadata["env"]:
            if env.get(name, "") != "":
                converted = convert(f, _env_value(f, env[name]), f"environment: {name}", errors)
                if converted is not dataclasses.MISSING:
                    out[f.name] = converted
    return out


def from_file(cls: type[Any], path: str, section: str, errors: list[str]) -> dict[str, Any]:
    """Section ``cls``'s values from a small YAML file of its keys, or of the same keys under
    ``section:`` (so one file can serve a process alone or sit beside others)."""
    import yaml  # only the processes that read a settings file pay for it

    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except OSError as e:
        errors.append(f"{path}: cannot read: {e.strerror}")
        return {}
    except yaml.YAMLError as e:
        errors.append(f"{path}: not valid YAML: {e}")
        return {}
    prefix = ""
    if isinstance(data, dict) and set(data) == {section}:
        data, prefix = data[section], f"{section}."
    if data is not None and not isinstance(data, dict):
        errors.append(f"{path}: {prefix or 'top level'}: expected a mapping of settings")
        return {}
    return convert_section(cls, data, f"{path}: ", errors, prefix=prefix)


def from_command_line(cls: type[Any], given: Mapping[str, Any], errors: list[str]) -> dict[str, Any]:
    """Raw values of the command line's options (named as the settings), converted; an error
    names the option (``--max-body``)."""
    fields = {f.name: f for f in declared(cls)}
    out: dict[str, Any] = {}
    for key, value in given.items():
        converted = convert(fields[key], value, f"--{key.replace('_', '-')}", errors)
        if converted is not dataclasses.MISSING:
            out[key] = converted
    return out
