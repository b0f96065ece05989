"""Events the cores hand to their I/O shells."""

from __future__ import annotations

from dataclasses import dataclass

from dst.buffers import PooledBuffer
from dst.device import Extent
from dst.proto.handshake import Hello, Welcome


@dataclass(frozen=True, slots=True)
class Ready:
    """Client: the handshake finished; ``reconnect`` is False on the first connection."""

    welcome: Welcome
    generation: int
    reconnect: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """Either side: the handshake was refused (by the peer, or by us)."""

    reason: int
    message: str
    by_peer: bool
    permanent: bool


@dataclass(slots=True)
class Completed:
    """Client: a transaction ended with an ack (status 0) or an error; a successful
    EXTENTS carries the extents the export node reported (validated).  One per request,
    so not frozen, like :class:`Request`."""

    txn: int
    status: int
    attempts: int
    message: str = ""
    timed_out: bool = False
    extents: tuple[Extent, ...] = ()


@dataclass(frozen=True, slots=True)
class Resent:
    """Client: a transaction went out again (timeout, checksum error or reconnect)."""

    txn: int
    attempt: int
    why: str


@dataclass(frozen=True, slots=True)
class ChecksumMismatch:
    """Either side: a payload did not match its checksum (it is resent, not used)."""

    txn: int
    where: str


@dataclass(frozen=True, slots=True)
class ConnectionDead:
    """Either side: the shell must close this connection (the core gave up on it)."""

    reason: str


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Export node: a client asks for an export (authenticated if keys are used)."""

    hello: Hello
    authenticated: bool


@dataclass(slots=True)
class Request:
    """Export node: a validated request to run against the export (one per request, so
    not frozen: a frozen dataclass costs several times more to build)."""

    command: int
    flags: int
    txn: int
    attempt: int
    offset: int
    length: int
    payload: PooledBuffer | None


@dataclass(frozen=True, slots=True)
class Rejected:
    """Export node: a request was answered with an error by the core itself."""

    txn: int
    command: int
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Disconnecting:
    """Export node: the client asked to disconnect; finish in-flight work, then close."""

    txn: int


@dataclass(frozen=True, slots=True)
class ProbeAnswered:
    """Export node: the client answered the probe ping number ``probe`` (it is alive)."""

    probe: int


Event = (
    Ready
    | Refused
    | Completed
    | Resent
    | ChecksumMismatch
    | ConnectionDead
    | HelloReceived
    | Request
    | Rejected
    | Disconnecting
    | ProbeAnswered
)
