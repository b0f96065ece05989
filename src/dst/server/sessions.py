"""Who may write to an export: one writer session, fencing, replay of acked writes.

An export has at most one read-write session (unless shared).  A reconnect of
that session (same session id, higher generation) fences the older connection:
the shell stops reading it and waits for every request it started before the new
connection is served, so a delayed request of the old connection can never land
after newer data.  Completed non-read transactions are remembered, so a resent
write is acked again instead of being applied twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from dst.proto.handshake import Hello
from dst.proto.wire import Refusal

DEDUP_ENTRIES = 65536
SESSION_LINGER = 120.0  # seconds a disconnected writer session keeps its claim


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
    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    completed: OrderedDict[int, int] = field(default_factory=OrderedDict)
    conn: Any = None  # the serving connection (server.node.Connection)

    def remember(self, txn: int, status: int) -> None:
        self.completed[txn] = status
        if len(self.completed) > DEDUP_ENTRIES:
            self.completed.popitem(last=False)

    def describe(self) -> dict[str, Any]:
        return {
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


@dataclass
class Decision:
    """What to do with a HELLO: refuse, or serve with this session (fencing ``fence``)."""

    session: Session | None = None
    fence: list[Session] = field(default_factory=list)
    refusal: Refusal | None = None
    message: str = ""


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

    def decide(self, hello: Hello, read_only: bool, now: float) -> Decision:
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
        fence: list[Session] = []
        for other in list(self.writers.values()):
            if other.client_id == hello.client_id:
                fence.append(other)  # a restarted client node replaces its old session
            elif not self.shared:
                if other.connected or (
                    other.disconnected_at is not None and now - other.disconnected_at < self.linger
                ):
                    state = (
                        "connected"
                        if other.connected
                        else f"disconnected {now - (other.disconnected_at or now):.0f} s ago, "
                        f"its claim expires in {self.linger - (now - (other.disconnected_at or now)):.0f} s"
                    )
                    return Decision(
                        refusal=Refusal.BUSY,
                        message=(
                            f"export {self.export!r} is busy: client {other.client_id!r} has it "
                            f"open read-write ({state}); detach that client, attach read-only, "
                            "or start the export with --shared"
                        ),
                    )
                fence.append(other)  # an expired claim
        s = Session(hello.client_id, hello.session, False, hello.generation)
        return Decision(session=s, fence=fence)

    def install(self, d: Decision, hello: Hello) -> Session:
        """Record the decision once the fenced connections are drained."""
        s = d.session
        assert s is not None
        for old in d.fence:
            if old is not s:
                self.writers.pop(old.session, None)
                self.replaced[old.session] = old.client_id
                while len(self.replaced) > 1024:
                    self.replaced.popitem(last=False)
        s.generation = hello.generation
        s.connected = True
        s.disconnected_at = None
        if s.read_only:
            self.readers.add(s)
        else:
            self.writers[s.session] = s
        return s

    def disconnected(self, s: Session, now: float) -> None:
        s.connected = False
        s.disconnected_at = now
        s.conn = None
        if s.read_only:
            self.readers.discard(s)
