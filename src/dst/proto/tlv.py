"""Type-length-value fields of handshake messages.

Rule for extensions: an unknown field is ignored, unless its type has the
CRITICAL bit set, in which case the receiver refuses the handshake.  So new
optional parameters can be added without a version bump.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from dst.errors import ProtocolError

TLV_HEADER = struct.Struct("<HH")
CRITICAL = 0x8000


def encode(fields: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for t, v in fields:
        if len(v) > 0xFFFF:
            raise ValueError(f"TLV {t} too long")
        out += TLV_HEADER.pack(t, len(v))
        out += v
    return bytes(out)


def decode(body: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    n = len(body)
    while pos < n:
        if pos + TLV_HEADER.size > n:
            raise ProtocolError("truncated handshake field header")
        t, ln = TLV_HEADER.unpack_from(body, pos)
        pos += TLV_HEADER.size
        if pos + ln > n:
            raise ProtocolError(f"handshake field {t} claims {ln} bytes but only {n - pos} remain")
        yield t, body[pos : pos + ln]
        pos += ln


def u8(v: int) -> bytes:
    return struct.pack("<B", v)


def u16(v: int) -> bytes:
    return struct.pack("<H", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def get_int(t: int, v: bytes) -> int:
    if len(v) not in (1, 2, 4, 8):
        raise ProtocolError(f"handshake field {t} has a bad integer length {len(v)}")
    return int.from_bytes(v, "little")


def get_str(t: int, v: bytes) -> str:
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"handshake field {t} is not valid UTF-8") from None
