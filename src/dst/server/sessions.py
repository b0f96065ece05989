"""Who may write to an export: one writer session, fencing, replay of acked writes.

An export has at most one read-write session (unless shared).  A reconnect of
that session (same session id, higher generation) fences the older connection:
the shell stops reading it and waits for every request it started before the new
connection is served, so a delayed request of the old connection can never land
after newer data.  Completed non-read transactions are remembered, so a resent
write is acked again instead of being applied twice.

A *new* session of the same client id (a second client node on the same host, or
one restarted) replaces the old session only when the old one's connection is
gone, fails a probe ping, or the new one asks for ``--takeover``; otherwise it is
refused, because taking the export from a live client node fails that node's I/O.
A clean detach releases the claim at once; an unclean loss keeps it for
``SESSION_LINGER`` seconds so that the lost session can come back and resend.

The table only decides; probing, fencing and timers are the shell's business
(``server/node.py``), which asks again with what the probe found.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dst.proto.handshake import Hello
from dst.proto.wire import Refusal

DEDUP_ENTRIES = 65536
SESSION_LINGER = 120.0  # seconds an uncleanly lost writer session keeps its claim
REPLACED_ENTRIES = 1024


@dataclass(eq=False)
class Session:
    client_id: str
    session: bytes
    read_only: bool
    generation: int = 0
    since: float = field(default_factory=time.time)
    address: str = ""
    connected: bool = False
    disconnected_at: float | None = None
    probes: bool = False  # its current connection answers probe pings
    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    completed: OrderedDict[int, int] = field(default_factory=OrderedDict)
    conn: Any = None  # the serving connection (server.node.Connection)

    def remember(self, txn: int, status: int) -> None:
        self.completed[txn] = status
        if len(self.completed) > DEDUP_ENTRIES:
            self.completed.popitem(last=False)

    def claim_left(self, now: float, linger: float) -> float | None:
        """Seconds this lost session still holds its claim (None while connected)."""
        if self.connected or self.disconnected_at is None:
            return None
        return max(0.0, linger - (now - self.disconnected_at))

    def describe(self, now: float | None = None, linger: float = SESSION_LINGER) -> dict[str, Any]:
        d: dict[str, Any] = {
            "client_id": self.client_id,
            "session": self.session.hex(),
            "generation": self.generation,
            "address": self.address,
            "since": self.since,
            "connected": self.connected,
            "read_only": self.read_only,
            "requests": self.requests,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
        }
        left = None if self.read_only else self.claim_left(now or time.time(), linger)
        if left is not None and self.disconnected_at is not None:
            d["disconnected_at"] = self.disconnected_at
            d["claim_expires_at"] = self.disconnected_at + linger
            d["claim_expires_in"] = round(left, 1)
        return d


def when(t: float) -> str:
    """A wall-clock time for messages: local date and time to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@dataclass
class Decision:
    """What to do with a HELLO: refuse; probe ``probe`` and ask again; or serve with
    ``session`` once the sessions in ``fence`` are fenced.  ``drop``: connections that
    failed a probe, to close as lost (their sessions keep the claim for the linger time)."""

    session: Session | None = None
    fence: list[Session] = field(default_factory=list)
    refusal: Refusal | None = None
    message: str = ""
    probe: Session | None = None
    drop: list[Session] = field(default_factory=list)


def probe_key(s: Session) -> tuple[bytes, int]:
    """What a probe result is about: one connection (generation) of one session."""
    return (s.session, s.generation)


class SessionTable:
    """Sessions of one export."""

    def __init__(self, export: str, shared: bool, linger: float = SESSION_LINGER) -> None:
        self.export = export
        self.shared = shared
        self.linger = linger
        self.writers: dict[bytes, Session] = {}
        self.readers: set[Session] = set()
        self.replaced: OrderedDict[bytes, str] = OrderedDict()

    def all(self) -> list[Session]:
        return [*self.writers.values(), *self.readers]

    def decide(
        self,
        hello: Hello,
        read_only: bool,
        now: float,
        answered: Mapping[tuple[bytes, int], bool] | None = None,
    ) -> Decision:
        """The rules, given what probes found so far (``answered``, by :func:`probe_key`)."""
        if hello.session in self.replaced:
            return Decision(
                refusal=Refusal.REPLACED,
                message=(
                    f"this session of client {hello.client_id!r} was replaced by a newer session "
                    f"of the same client id on export {self.export!r}; restart the client node to "
                    "attach again"
                ),
            )
        if read_only:
            s = Session(hello.client_id, hello.session, True, hello.generation)
            return Decision(session=s)
        mine = self.writers.get(hello.session)
        if mine is not None:
            if hello.generation <= mine.generation:
                return Decision(
                    refusal=Refusal.STALE_GENERATION,
                    message=(
                        f"connection generation {hello.generation} is not newer than "
                        f"{mine.generation}: a stale reconnect of this session was ignored"
                    ),
                )
            return Decision(session=mine, fence=[mine])
        answered = answered or {}
        fence: list[Session] = []
        for other in list(self.writers.values()):
            if other.client_id == hello.client_id:
                if not other.connected or hello.takeover:
                    fence.append(other)  # gone (a restarted client node), or taken over
                    continue
                alive = answered.get(probe_key(other))
                if alive is None and other.probes:
                    return Decision(probe=other)
                if alive is False:
                    fence.append(other)  # connected, but its host did not answer
                    continue
                return Decision(refusal=Refusal.BUSY, message=self._in_use(other))
            if self.shared:
                continue
            left = other.claim_left(now, self.linger)
            if left is None:
                alive = answered.get(probe_key(other))
                if alive is None and other.probes:
                    return Decision(probe=other)
                if alive is False:
                    # its host died with the connection open: a loss like any other
                    if hello.takeover:
                        fence.append(other)
                        continue
                    return Decision(
                        refusal=Refusal.BUSY,
                        drop=[other],
                        message=(
                            f"export {self.export!r} is busy: client {other.client_id!r} from "
                            f"{other.address or '?'} did not answer a probe ping, so its "
                            f"connection was closed; its claim expires in {self.linger:.0f} s "
                            "(so that it can come back and resend); wait, or pass --takeover "
                            "to fence it for good"
                        ),
                    )
                return Decision(
                    refusal=Refusal.BUSY,
                    message=(
                        f"export {self.export!r} is busy: client {other.client_id!r} from "
                        f"{other.address or '?'} has it open read-write since "
                        f"{when(other.since)}; detach that client, attach read-only, or start "
                        "the export with --shared"
                    ),
                )
            if left > 0 and not hello.takeover:
                ago = now - (other.disconnected_at or now)
                return Decision(
                    refusal=Refusal.BUSY,
                    message=(
                        f"export {self.export!r} is busy: client {other.client_id!r} lost its "
                        f"connection {ago:.0f} s ago without detaching, and its claim expires "
                        f"in {left:.0f} s (so that it can come back and resend); wait, or pass "
                        "--takeover to fence it for good"
                    ),
                )
            fence.append(other)  # an expired claim, or one taken over
        s = Session(hello.client_id, hello.session, False, hello.generation)
        return Decision(session=s, fence=fence)

    def _in_use(self, other: Session) -> str:
        return (
            f"export {self.export!r} is in use by client {other.client_id!r} from "
            f"{other.address or '?'} since {when(other.since)}; stop that client node or pass "
            "--takeover"
        )

    def install(self, d: Decision, hello: Hello) -> Session:
        """Record the decision once the fenced connections are drained."""
        s = d.session
        assert s is not None
        for old in d.fence:
            if old is not s:
                old.connected = False
                old.conn = None
                self.writers.pop(old.session, None)
                self.replaced[old.session] = old.client_id
                while len(self.replaced) > REPLACED_ENTRIES:
                    self.replaced.popitem(last=False)
        s.generation = hello.generation
        s.connected = True
        s.disconnected_at = None
        s.probes = hello.ping_timeout is not None
        if s.read_only:
            self.readers.add(s)
        else:
            self.writers[s.session] = s
        return s

    def disconnected(self, s: Session, now: float, clean: bool = False) -> None:
        """The session's connection ended; a clean detach (DISCONNECT) gives up the claim."""
        s.connected = False
        s.disconnected_at = now
        s.conn = None
        if s.read_only:
            self.readers.discard(s)
        elif clean and self.writers.get(s.session) is s:
            del self.writers[s.session]
