"""Small pure converters for settings: each takes a YAML value and returns the typed
value or raises ``ValueError`` whose message is the expected form."""

from __future__ import annotations

import errno
import ipaddress
import re
from collections.abc import Callable
from typing import Any

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
_DURATIONS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def byte_size(value: Any) -> int:
    """``256M``, ``1G``, ``4096`` (bytes) -> int."""
    if isinstance(value, bool):
        raise ValueError("a size like 256M, 1G or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size like 256M, 1G or a number of bytes")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError("a size like 256M, 1G or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def duration(value: Any) -> float:
    """``500ms``, ``5s``, ``2m``, ``1h`` or a number of seconds -> float seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration like 500ms, 5s or 2m")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration like 500ms, 5s or 2m")
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(value))
    if not m or m.group(2) not in _DURATIONS:
        raise ValueError("a duration like 500ms, 5s or 2m")
    return float(m.group(1)) * _DURATIONS[m.group(2)]


def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"an integer from {lo} to {hi}")
        return int(value)

    convert.__doc__ = f"integer from {lo} to {hi}"
    return convert


def float_range(lo: float, hi: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ValueError(f"a number from {lo} to {hi}")
        return float(value)

    convert.__doc__ = f"number from {lo} to {hi}"
    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("a non-empty string")
    return value


def optional_text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def python_code(value: Any) -> str:
    """Python source that must compile (empty or null: none)."""
    code = optional_text(value)
    if code:
        try:
            compile(code, "<warmup>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            raise ValueError(f"Python code that compiles ({type(e).__name__}: {e})") from None
    return code


def abs_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError("an absolute path")
    return value


def path_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("/") for v in value):
        raise ValueError("a list of absolute paths")
    return tuple(value)


def pattern_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("a list of glob patterns")
    return tuple(value)


def name_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.]+", v)
                                                for v in value):
        raise ValueError("a list of names (letters, digits, '_' and '.')")
    return tuple(value)


def tristate(value: Any) -> str:
    """true, false or auto -> "yes", "no" or "auto"."""
    if value is True or value == "yes":
        return "yes"
    if value is False or value == "no":
        return "no"
    if value == "auto":
        return "auto"
    raise ValueError("true, false or auto")


def flag_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and re.fullmatch(r"--[A-Za-z0-9_=.,:/-]+", v)
                                                for v in value):
        raise ValueError("a list of --flags (letters, digits and _=.,:/- only)")
    return tuple(value)


def str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError('a mapping of strings to strings, e.g. {OMP_NUM_THREADS: "1"}')
    return dict(value)


def octal_mode(value: Any) -> int:
    """A file mode: a quoted string of octal digits ("0660"), or a real number (0o660, 432).
    An unquoted 660 in a YAML file, which YAML reads as the decimal 660, is refused where the
    file is read (config.load sees how it was written)."""
    if isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{3,4}", value):
        return int(value.replace("o", ""), 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o7777:
        return value
    raise ValueError('an octal file mode, quoted, like "0660"')


def uid_range(value: Any) -> tuple[int, int]:
    """``"880000-881023"`` -> (first uid, count)."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(value))
    if not m:
        raise ValueError('a uid range like "880000-881023"')
    lo, hi = int(m.group(1)), int(m.group(2))
    if lo < 1000 or hi < lo or hi > 2**31 - 2:
        raise ValueError("a uid range from at least 1000 up to at most 2147483646, low-high")
    return lo, hi - lo + 1


def choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return str(value)

    convert.__doc__ = "one of " + ", ".join(options)
    return convert


def errno_map(value: Any) -> dict[str, int]:
    """``{clone3: ENOSYS}`` -> {"clone3": 38}."""
    if not isinstance(value, dict):
        raise ValueError("a mapping of syscall names to errno names, e.g. {clone3: ENOSYS}")
    out = {}
    for name, err in value.items():
        code = getattr(errno, str(err), None) if isinstance(err, str) else err
        if not isinstance(name, str) or not isinstance(code, int) or isinstance(code, bool):
            raise ValueError("a mapping of syscall names to errno names, e.g. {clone3: ENOSYS}")
        out[name] = code
    return out


def cidr(value: Any) -> str:
    """``10.231.0.0/16`` (IPv4 or IPv6, host bits zero; a bare address is a /32 or /128)."""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_network(value, strict=True))
        except ValueError:
            pass
    raise ValueError("a network like 10.231.0.0/16 or fd00::/64 (host bits zero)")


def cidr_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("a list of networks like [10.1.2.0/24, 203.0.113.7/32]")
    out = []
    for item in value:
        try:
            out.append(cidr(item))
        except ValueError:
            raise ValueError(f"a list of networks like [10.1.2.0/24, 203.0.113.7/32] ({item!r} is not one)") from None
    return tuple(out)


def resolvers(value: Any) -> tuple[str, ...]:
    """``host`` (the host's own nameservers that runs may reach) or a list of IP addresses."""
    if value == "host" or value == ["host"]:
        return ("host",)
    if isinstance(value, list):
        try:
            return tuple(str(ipaddress.ip_address(str(v))) for v in value)
        except ValueError:
            pass
    raise ValueError('"host" or a list of resolver IP addresses like [203.0.113.53]')


def url(value: Any) -> str:
    """An http:// proxy URL, or empty."""
    if value in (None, ""):
        return ""
    if isinstance(value, str) and re.fullmatch(r"https?://[^\s/@]+(:\d+)?/?", value):
        return value
    raise ValueError("an http://host:port URL, or empty")


def requirement_list(value: Any) -> tuple[str, ...]:
    """pip requirements, one an item, without options (those are settings of their own)."""
    if not isinstance(value, list) or len(value) > 1000:
        raise ValueError("a list of pip requirements like [numpy==1.26.4, pandas]")
    for item in value:
        if not isinstance(item, str) or not item.strip() or len(item) > 1000 or any(c in item for c in "\n\r\0"):
            raise ValueError(f"a list of pip requirements, one a line ({item!r} is not one)")
        if item.strip().startswith("-"):
            raise ValueError(f"requirements without pip options ({item!r}: use index_url, find_links...)")
    return tuple(item.strip() for item in value)


def index_url(value: Any) -> str:
    """A package index URL (http, https, or file:// for a local one), or empty (none)."""
    if value in (None, ""):
        return ""
    if isinstance(value, str) and re.fullmatch(r"(https?://[^\s]+|file:///[^\s]*)", value) and len(value) < 2000:
        return value
    raise ValueError("an http://, https:// or file:/// URL of a package index, or null")


def url_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("a list of index URLs")
    out = []
    for item in value:
        if not item:
            raise ValueError("a list of index URLs (not empty ones)")
        out.append(index_url(item))
    return tuple(out)


def environment_names(value: Any) -> tuple[str, ...]:
    """Names of environments, or ``*`` for every one."""
    if not isinstance(value, list) or not all(isinstance(v, str) and (v == "*" or ENVIRONMENT_NAME.fullmatch(v))
                                                for v in value):
        raise ValueError("a list of environment names, or [\"*\"] for all")
    return tuple(value)


ENVIRONMENT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def human_size(n: float | None) -> str:
    """Bytes as a person reads them: 512 B, 1.5 KiB, 256.0 MiB."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def human_duration(seconds: float | None) -> str:
    """Seconds as a person reads them: 250 ms, 2.5 s, 16 min, 1.5 h."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def listen_address(value: Any) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8194`` for IPv6) -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", str(value))
    if not m or isinstance(value, bool):
        raise ValueError("HOST:PORT like 127.0.0.1:8194")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 <= int(port) <= 65535:
        raise ValueError("HOST:PORT with a port from 0 to 65535")
    return host, int(port)
