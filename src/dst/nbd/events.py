"""Events the NBD server core hands to its shell, in the order they happened."""

from __future__ import annotations

from dataclasses import dataclass

from dst.buffers import PooledBuffer
from dst.device import IoFlags
from dst.nbd.constants import Command
from dst.nbd.export import ExportInfo


class Event:
    """Base class of everything ``next_event()`` returns."""

    __slots__ = ()


@dataclass(frozen=True)
class ExportChosen(Event):
    """The handshake ended; requests for this export follow."""

    name: str
    export: ExportInfo
    structured: bool
    contexts: tuple[str, ...] = ()  # the metadata contexts selected; id i + 1 is the i-th


@dataclass(eq=False, slots=True)
class Request(Event):
    """A validated request the shell must answer with exactly one reply (made per request,
    so not frozen: a frozen dataclass costs several times more to build).

    ``command`` is READ, WRITE, FLUSH, TRIM, WRITE_ZEROES or BLOCK_STATUS; offset and
    length are already checked against the export. A WRITE carries its ``payload``,
    lent by the pool: the shell releases it once the data is written. A BLOCK_STATUS is
    answered with the extents of every selected context (``reply_block_status``).
    """

    handle: int
    command: Command
    flags: IoFlags
    offset: int
    length: int
    payload: PooledBuffer | None = None


@dataclass(frozen=True)
class Disconnect(Event):
    """The client ended the session cleanly (NBD_CMD_DISC or NBD_OPT_ABORT).

    Answer what is in flight, send what is queued, then close.
    """

    reason: str


@dataclass(frozen=True)
class ProtocolViolation(Event):
    """The client broke the protocol; send what is queued and close the connection."""

    message: str
