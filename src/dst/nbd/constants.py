"""Numbers of the NBD protocol (doc/proto.md of the NetworkBlockDevice project).

Everything on the wire is big-endian. Names follow the specification without the
``NBD_`` prefix, grouped by the field they appear in.
"""

from __future__ import annotations

import errno
from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes from the server
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", server greeting and every client option
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

DEFAULT_PORT = 10809
EXPORT_NAME_PADDING = 124  # zero bytes after the NBD_OPT_EXPORT_NAME reply, unless NO_ZEROES
MAX_STRING = 4096  # the specification's upper bound for names and messages


class HandshakeFlags(IntFlag):
    """16 bits the server sends after IHAVEOPT."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlags(IntFlag):
    """32 bits the client answers with; any other bit ends the connection."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlags(IntFlag):
    """16 bits describing an export, sent when the client chooses it."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERROR = 1 << 31


class OptionReply(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERROR + 1
    ERR_POLICY = _REP_ERROR + 2
    ERR_INVALID = _REP_ERROR + 3
    ERR_PLATFORM = _REP_ERROR + 4
    ERR_TLS_REQD = _REP_ERROR + 5
    ERR_UNKNOWN = _REP_ERROR + 6
    ERR_SHUTDOWN = _REP_ERROR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERROR + 8
    ERR_TOO_BIG = _REP_ERROR + 9


class Info(IntEnum):
    """Information types in NBD_REP_INFO replies to NBD_OPT_INFO / NBD_OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlags(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlags(IntFlag):
    DONE = 1 << 0


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class NbdError(IntEnum):
    """The only error values allowed on the wire (they equal Linux errno values)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


_ERRNO_TO_NBD: dict[int, NbdError] = {
    errno.EPERM: NbdError.EPERM,
    errno.EACCES: NbdError.EPERM,
    errno.EROFS: NbdError.EPERM,
    errno.EIO: NbdError.EIO,
    errno.ENOMEM: NbdError.ENOMEM,
    errno.EINVAL: NbdError.EINVAL,
    errno.ENOSPC: NbdError.ENOSPC,
    errno.EDQUOT: NbdError.ENOSPC,  # the specification asks for these two as ENOSPC
    errno.EFBIG: NbdError.ENOSPC,
    errno.EOVERFLOW: NbdError.EOVERFLOW,
    errno.ENOTSUP: NbdError.ENOTSUP,
    errno.EOPNOTSUPP: NbdError.ENOTSUP,
    errno.ESHUTDOWN: NbdError.ESHUTDOWN,
}


def nbd_error(err: int | None) -> NbdError:
    """Map a local errno value to the NBD error set; anything unknown becomes EIO."""
    return _ERRNO_TO_NBD.get(err or 0, NbdError.EIO)
