"""Byte layouts of the DST node protocol: constants, headers, status codes.

All integers are little-endian.  See docs/protocol.md for the prose version.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from dst.device import Extent, ExtentFlags
from dst.errors import ProtocolError

PROTOCOL_VERSION = 1
MIN_VERSION = 1
MAX_VERSION = 1

HS_MAGIC = b"DSTH"  # handshake message
REQ_MAGIC = b"DSTQ"  # request (client -> export node)
REP_MAGIC = b"DSTA"  # reply / ack (export node -> client)

# handshake message: magic, type, flags, body length
HS_HEADER = struct.Struct("<4sHHI")
# request: magic, command, flags, txn id, attempt, length, offset
REQ_HEADER = struct.Struct("<4sHHQIIQ")
# reply: magic, command, status, txn id, attempt, length
REP_HEADER = struct.Struct("<4sHHQII")
# record (encrypted channel): sealed length
REC_HEADER = struct.Struct("<I")
# one descriptor of an EXTENTS reply: length, flags
EXTENT = struct.Struct("<II")

MAX_HANDSHAKE_BODY = 16 << 10
DEFAULT_MAX_REQUEST = 32 << 20
DEFAULT_QUEUE_DEPTH = 128


class MsgType(IntEnum):
    HELLO = 1
    CHALLENGE = 2
    PROOF = 3
    WELCOME = 4
    REFUSE = 5


class Command(IntEnum):
    READ = 1
    WRITE = 2
    FLUSH = 3
    TRIM = 4
    WRITE_ZEROES = 5
    PING = 6
    DISCONNECT = 7
    EXTENTS = 8  # allocation status; only sent when the WELCOME's COMMANDS has bit 8
    CACHE = 9  # prefetch hint; only sent when the WELCOME's COMMANDS has bit 9


ALL_COMMANDS = frozenset(Command)
WRITE_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
# change nothing, so never replayed: a resend simply runs again
QUERY_COMMANDS = frozenset({Command.READ, Command.EXTENTS, Command.CACHE})
DATA_REPLY_COMMANDS = frozenset({Command.READ, Command.EXTENTS})  # a successful reply has data
MAX_EXTENTS = 1 << 16  # descriptors in one EXTENTS reply (512 KiB)
MAX_EXTENTS_LENGTH = 0xFFFFFFFF  # the request's 32-bit length field


class ReqFlags(IntFlag):
    NONE = 0
    FUA = 1
    PREFLUSH = 2
    NO_HOLE = 4
    FAST_ZERO = 8  # WRITE_ZEROES: ENOTSUP at once rather than writing zeroes


ALL_REQ_FLAGS = ReqFlags.FUA | ReqFlags.PREFLUSH | ReqFlags.NO_HOLE | ReqFlags.FAST_ZERO
# what an export node honoured before FAST_ZERO existed (its WELCOME's FLAGS)
BASE_REQ_FLAGS = ReqFlags.FUA | ReqFlags.PREFLUSH | ReqFlags.NO_HOLE


class Status(IntEnum):
    """Reply status: Linux errno values, plus DST's own codes from 0x1000."""

    OK = 0
    EPERM = errno.EPERM
    EIO = errno.EIO
    ENOMEM = errno.ENOMEM
    EINVAL = errno.EINVAL
    ENOSPC = errno.ENOSPC
    EOVERFLOW = errno.EOVERFLOW
    ENOTSUP = errno.EOPNOTSUPP
    ESHUTDOWN = errno.ESHUTDOWN
    CHECKSUM = 0x1000  # the request's checksum did not match: resend it
    FENCED = 0x1001  # this connection was replaced by a newer one of the same session


def status_name(code: int) -> str:
    try:
        return Status(code).name
    except ValueError:
        return errno.errorcode.get(code, f"status {code}")


class Refusal(IntEnum):
    """Why a handshake was refused; the message says it for humans."""

    BAD_HANDSHAKE = 1
    VERSION = 2
    UNKNOWN_EXPORT = 3
    AUTH_REQUIRED = 4
    AUTH_FAILED = 5
    AUTH_UNEXPECTED = 6
    NOT_ALLOWED = 7
    BUSY = 8
    REPLACED = 9
    NO_COMMON_CIPHER = 10
    NO_COMMON_CHECKSUM = 11
    STALE_GENERATION = 12
    TOO_MANY = 13
    IDENTITY_CHANGED = 14
    SIZE_CHANGED = 15
    SHUTTING_DOWN = 16
    INTERNAL = 17


# A refusal that will not go away by trying again.
PERMANENT_REFUSALS = frozenset(
    {
        Refusal.BAD_HANDSHAKE,
        Refusal.VERSION,
        Refusal.UNKNOWN_EXPORT,
        Refusal.AUTH_REQUIRED,
        Refusal.AUTH_FAILED,
        Refusal.AUTH_UNEXPECTED,
        Refusal.NOT_ALLOWED,
        Refusal.REPLACED,
        Refusal.NO_COMMON_CIPHER,
        Refusal.NO_COMMON_CHECKSUM,
        Refusal.IDENTITY_CHANGED,
        Refusal.SIZE_CHANGED,
        Refusal.BUSY,
    }
)


@dataclass(frozen=True, slots=True)
class RequestHeader:
    command: int
    flags: int
    txn: int
    attempt: int
    length: int
    offset: int

    def pack(self) -> bytes:
        return REQ_HEADER.pack(
            REQ_MAGIC, self.command, self.flags, self.txn, self.attempt, self.length, self.offset
        )


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    command: int
    status: int
    txn: int
    attempt: int
    length: int

    def pack(self) -> bytes:
        return REP_HEADER.pack(
            REP_MAGIC, self.command, self.status, self.txn, self.attempt, self.length
        )


def pack_handshake(msg_type: MsgType, body: bytes) -> bytes:
    return HS_HEADER.pack(HS_MAGIC, msg_type, 0, len(body)) + body


def request_carries_payload(command: int) -> bool:
    return command == Command.WRITE


def reply_carries_payload(command: int, status: int) -> bool:
    return command in DATA_REPLY_COMMANDS and status == Status.OK


def pack_extents(offset: int, length: int, extents: Sequence[Extent]) -> bytes:
    """The payload of an EXTENTS reply for ``[offset, offset + length)``: descriptors from
    ``offset`` on, at most MAX_EXTENTS, none past the range; the extents must be consecutive
    from ``offset`` (what a device answers)."""
    out = bytearray()
    end = offset + length
    for e in extents[:MAX_EXTENTS]:
        n = min(e.end, end) - e.offset
        if n <= 0:
            break
        out += EXTENT.pack(n, int(e.flags) & 0xFFFFFFFF)
    return bytes(out)


def unpack_extents(offset: int, length: int, payload: bytes | memoryview) -> list[Extent]:
    """The extents of an EXTENTS reply to ``[offset, offset + length)``; ProtocolError when
    it breaks the rules (empty, an empty descriptor, more than asked). Unknown flag bits are
    dropped."""
    n, rest = divmod(len(payload), EXTENT.size)
    if rest or not 0 < n <= MAX_EXTENTS:
        raise ProtocolError(
            f"an EXTENTS reply of {len(payload)} bytes is not 1 to {MAX_EXTENTS} "
            f"descriptors of {EXTENT.size} bytes"
        )
    known = int(ExtentFlags.HOLE | ExtentFlags.ZERO)
    out: list[Extent] = []
    pos, end = offset, offset + length
    for size, flags in EXTENT.iter_unpack(payload):
        if size == 0 or pos + size > end:
            raise ProtocolError(
                f"an EXTENTS reply for [{offset}, {end}) has a descriptor of {size} bytes at {pos}"
            )
        out.append(Extent(pos, size, ExtentFlags(flags & known)))
        pos += size
    return out
