"""Parsing of sizes, durations, rates and addresses, as the command line takes them."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from dst.errors import UsageError

DEFAULT_DST_PORT = 10810
DEFAULT_NBD_PORT = 10809

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str, what: str = "size") -> int:
    """``64K`` -> 65536 (powers of 1024)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UsageError(
            f"invalid {what} {text!r}: use a number with an optional K, M, G or T suffix, e.g. 64K"
        )
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value != int(value):
        raise UsageError(f"invalid {what} {text!r}: it must be a whole number of bytes")
    return int(value)


def parse_rate(text: str, what: str = "rate") -> int:
    """``100M`` or ``100M/s`` -> bytes per second."""
    t = str(text).strip()
    if t.lower().endswith("/s"):
        t = t[:-2]
    return parse_size(t, what)


def parse_duration(text: str | float, what: str = "duration") -> float:
    """Seconds, floats allowed."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"invalid {what} {text!r}: give seconds, e.g. 5 or 0.5") from None
    if value < 0 or value != value:
        raise UsageError(f"invalid {what} {text!r}: it must not be negative")
    return value


_BINARY = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(n: float) -> str:
    """Bytes as a person reads them, in the one style every message and table uses:
    binary units, whole values bare, others to one decimal (65536 -> ``64 KiB``,
    186151731 -> ``177.5 MiB``, 1000 -> ``1000 B``)."""
    v = float(n)
    for unit, factor in _BINARY:
        if abs(v) >= factor:
            q = v / factor
            return f"{q:.0f} {unit}" if q == int(q) else f"{q:.1f} {unit}"
    return f"{v:.0f} B"


def format_size(n: int) -> str:
    """A size in the common style (see :func:`format_bytes`)."""
    return format_bytes(n)


def format_rate(bytes_per_second: float) -> str:
    """``186151731`` -> ``177.5 MiB/s``: a rate is a size per second, in the same style."""
    return f"{format_bytes(bytes_per_second)}/s"


def format_duration(seconds: float) -> str:
    """Seconds as a person reads them: ``850 µs``, ``4.1 ms``, ``12.3 s``, ``3 min 20 s``,
    ``2 h 05 min``."""
    s = float(seconds)
    if s < 0.001:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        ms = s * 1e3
        return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h:02d} h"


@dataclass(frozen=True)
class Address:
    """A stream endpoint: TCP (host, port) or a unix socket path."""

    host: str | None = None
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.path is not None:
            return True
        host = self.host or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


_HOST_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


def parse_address(
    text: str, default_port: int = DEFAULT_DST_PORT, what: str = "address"
) -> Address:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``unix:PATH``; a bare host takes the default port."""
    t = text.strip()
    hint = "use HOST:PORT, [IPv6]:PORT or unix:PATH"
    if t.startswith("unix:"):
        path = t[5:]
        if not path:
            raise UsageError(f"invalid {what} {text!r}: the unix socket path is empty; {hint}")
        return Address(path=path)
    if not t:
        raise UsageError(f"invalid {what} {text!r}: {hint}")
    if "://" in t:
        raise UsageError(f"invalid {what} {text!r}: give an address, not a URI; {hint}")
    if "/" in t:  # a path is never looked up as a host name
        raise UsageError(
            f"invalid {what} {text!r}: a unix socket needs the unix: prefix, e.g. unix:{t}"
        )
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise UsageError(f"invalid {what} {text!r}: missing ']'; {hint}")
        host = t[1:end]
        rest = t[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UsageError(f"invalid {what} {text!r}: {hint}")
        port_text = rest[1:] if rest else ""
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"invalid {what} {text!r}: {host!r} is not an IPv6 address") from None
    elif t.count(":") > 1:
        raise UsageError(
            f"invalid {what} {text!r}: put IPv6 addresses in brackets, e.g. [::1]:{default_port}"
        )
    elif ":" in t:
        host, port_text = t.rsplit(":", 1)
    else:
        host, port_text = t, ""
    if not host:
        raise UsageError(f"invalid {what} {text!r}: the host is empty; {hint}")
    if not t.startswith("[") and not _HOST_RE.fullmatch(host):
        raise UsageError(f"invalid {what} {text!r}: {host!r} is not a host name; {hint}")
    if port_text == "":
        port = default_port
    else:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise UsageError(f"invalid {what} {text!r}: the port must be a number from 0 to 65535")
        port = int(port_text)
    return Address(host=host, port=port)
