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


def format_size(n: int) -> str:
    """65536 -> ``64 KiB``."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % (factor // 1024 or 1) == 0:
            v = n / factor
            return f"{v:g} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


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
