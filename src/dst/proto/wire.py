"""Byte layouts of the DST node protocol: constants, headers, status codes.

All integers are little-endian.  See docs/protocol.md for the prose version.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

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


ALL_COMMANDS = frozenset(Command)
WRITE_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})


class ReqFlags(IntFlag):
    NONE = 0
    FUA = 1
    PREFLUSH = 2
    NO_HOLE = 4


ALL_REQ_FLAGS = ReqFlags.FUA | ReqFlags.PREFLUSH | ReqFlags.NO_HOLE


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
    return command == Command.READ and status == Status.OK
