"""Configuration and events of the sans-IO NBD client core (``dst.nbd.client``)."""

from __future__ import annotations

from dataclasses import dataclass

from dst.device import Extent
from dst.nbd.constants import TransmissionFlags
from dst.nbd.events import Event


@dataclass
class NbdClientConfig:
    """The export to ask for and the (live-tunable) resend knobs."""

    export: str = ""
    structured: bool = True
    resends: int = 10
    resend_timeout: float = 5.0
    handshake_timeout: float = 10.0
    queue_depth: int = 128
    contexts: tuple[str, ...] = ()  # metadata contexts to ask for, e.g. (BASE_ALLOCATION,)


@dataclass(frozen=True)
class ServerExport:
    """The export as the server described it."""

    size: int
    flags: TransmissionFlags
    structured: bool
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 << 20
    contexts: tuple[tuple[str, int], ...] = ()  # (name, id) of the selected metadata contexts

    def context_id(self, name: str) -> int | None:
        return next((i for n, i in self.contexts if n == name), None)


@dataclass(frozen=True)
class Connected(Event):
    """The handshake ended; requests flow (``generation`` counts connections)."""

    export: ServerExport
    generation: int
    reconnect: bool


@dataclass(slots=True)
class Completed(Event):
    """A request ended: ``error`` is 0 or an errno value; a successful BLOCK_STATUS carries
    the ``base:allocation`` extents, validated and clipped to the request.  One per
    request, so not frozen: a frozen dataclass costs several times more to build."""

    handle: int
    error: int
    message: str = ""
    attempts: int = 1
    timed_out: bool = False
    extents: tuple[Extent, ...] = ()


@dataclass(frozen=True)
class ConnectionDead(Event):
    """Close this connection; unanswered requests are resent after the next handshake."""

    reason: str


@dataclass(frozen=True)
class ServerViolation(ConnectionDead):
    """The server broke the protocol (bad magic, unknown handle, data beyond the request)."""


@dataclass(frozen=True)
class ExportRefused(Event):
    """The server refused the export, or a different export answers now; close."""

    message: str
    permanent: bool
