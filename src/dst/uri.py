"""Member URIs: ``dst://HOST[:PORT][/NAME]``, ``dst+unix:///NAME?socket=PATH`` and NBD URIs."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from dst.errors import UsageError
from dst.units import DEFAULT_DST_PORT, DEFAULT_NBD_PORT, Address

SCHEMES = ("dst", "dst+unix", "dst+tcp", "nbd", "nbd+unix", "nbd+tcp")


@dataclass(frozen=True)
class MemberUri:
    protocol: str  # "dst" or "nbd"
    address: Address
    export: str
    text: str

    def __str__(self) -> str:
        return self.text


def format_uri(protocol: str, address: Address, export: str = "") -> str:
    name = urllib.parse.quote(export, safe="")
    if address.path is not None:
        return f"{protocol}+unix:///{name}?socket={urllib.parse.quote(address.path, safe='/')}"
    host = address.host or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{protocol}://{host}:{address.port}/{name}"


def parse_member(text: str) -> MemberUri:
    """Parse a member URI; errors say which form is expected."""
    forms = (
        "dst://HOST[:PORT][/NAME], dst+unix:///NAME?socket=PATH, nbd://HOST[:PORT]/NAME or "
        "nbd+unix:///NAME?socket=PATH"
    )
    u = urllib.parse.urlsplit(text)
    scheme = u.scheme.lower()
    if scheme not in SCHEMES:
        raise UsageError(f"invalid member {text!r}: use {forms}")
    protocol = scheme.split("+")[0]
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    query = urllib.parse.parse_qs(u.query)
    if scheme.endswith("+unix"):
        if u.netloc:
            raise UsageError(
                f"invalid member {text!r}: a unix URI has no host; write {scheme}:///NAME?socket=PATH"
            )
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise UsageError(f"invalid member {text!r}: add ?socket=PATH naming the unix socket")
        addr = Address(path=sockets[0])
    else:
        if not u.hostname:
            raise UsageError(f"invalid member {text!r}: the host is missing; use {forms}")
        try:
            port = u.port
        except ValueError:
            raise UsageError(
                f"invalid member {text!r}: the port must be a number from 0 to 65535"
            ) from None
        default = DEFAULT_DST_PORT if protocol == "dst" else DEFAULT_NBD_PORT
        addr = Address(host=u.hostname, port=port or default)
    if protocol == "dst" and not export:
        export = "default"
    return MemberUri(protocol, addr, export, text)
