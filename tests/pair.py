"""A client core and an export-node core wired back to back, in memory, on virtual time.

The "network" between them is a pair of byte queues the test can inspect, cut,
corrupt or hold; the export side executes requests against a bytearray with the
same replay cache the real export node keeps.  Nothing here sleeps.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from dst.proto.client import ClientConfig, ClientCore
from dst.proto.events import Event, HelloReceived, Request
from dst.proto.server import ExportTerms, ServerConfig, ServerCore
from dst.proto.wire import Command, Status

IDENTITY = uuid.UUID("00000000-0000-4000-8000-000000000001")


def join(parts: list[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


@dataclass
class FakeExport:
    """Storage plus the export node's session memory (replay cache)."""

    size: int = 1 << 20
    read_only: bool = False
    data: bytearray = field(default_factory=bytearray)
    completed: dict[int, int] = field(default_factory=dict)
    applied: list[tuple[int, int]] = field(default_factory=list)  # (txn, command) in order

    def __post_init__(self) -> None:
        if not self.data:
            self.data = bytearray(self.size)


class Pair:
    def __init__(
        self,
        client_config: ClientConfig | None = None,
        server_config: ServerConfig | None = None,
        export: FakeExport | None = None,
        auto_reply: bool = True,
    ) -> None:
        self.now = 0.0
        self.client_config = client_config or ClientConfig(
            checksums=("crc32c",),
            resends=3,
            resend_timeout=1.0,
            ping_interval=5.0,
            ping_timeout=2.0,
        )
        self.server_config = server_config or ServerConfig(checksums=("crc32c",))
        self.client = ClientCore(self.client_config)
        self.export = export or FakeExport()
        self.auto_reply = auto_reply
        self.held: list[Request] = []
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.server: ServerCore | None = None
        self.c2s = bytearray()  # bytes in flight toward the export node
        self.s2c = bytearray()
        self.cut = False  # bytes are lost (a dead link that has not noticed yet)
        self.reverse_jobs = False  # finish offloaded jobs in reverse order (ordering test)
        self.jobs_run = 0

    # ---- connections ------------------------------------------------------------
    def connect(self) -> None:
        self.server = ServerCore(self.server_config)
        self.server.connection_made(self.now)
        self.client.connection_made(self.now)
        self.cut = False
        self.c2s.clear()
        self.s2c.clear()
        self.run()

    def disconnect(self) -> None:
        self.client.connection_lost(self.now)
        if self.server is not None:
            self.server.connection_lost(self.now)
        self.server = None
        self.c2s.clear()
        self.s2c.clear()

    # ---- moving bytes -------------------------------------------------------------
    def run(self, deliver: bool = True) -> None:
        """Move bytes both ways and let the export side act, until nothing changes."""
        for _ in range(1000):
            moved = False
            out = join(self.client.data_to_send())
            if out and not self.cut:
                self.c2s += out
            if self.server is not None and self.c2s and deliver:
                data, self.c2s[:] = bytes(self.c2s), b""
                self.server.receive_data(data, self.now)
                moved = True
            if self.server is not None:
                self._server_events()
                back = join(self.server.data_to_send())
                if back and not self.cut:
                    self.s2c += back
            if self.s2c and deliver:
                data, self.s2c[:] = bytes(self.s2c), b""
                self.client.receive_data(data, self.now)
                moved = True
            while (ev := self.client.next_event()) is not None:
                self.client_events.append(ev)
            moved = self._run_jobs() or moved
            if not moved:
                break

    def _run_jobs(self) -> bool:
        """Play the shell's worker pool: run offloaded jobs, possibly out of order."""
        ran = False
        for core in (self.client, self.server):
            if core is None:
                continue
            jobs = core.take_jobs()
            if self.reverse_jobs:
                jobs.reverse()
            for job in jobs:
                job.run()
                self.jobs_run += 1
                core.job_done(job, self.now)
                ran = True
        return ran

    def _server_events(self) -> None:
        assert self.server is not None
        while (ev := self.server.next_event()) is not None:
            self.server_events.append(ev)
            if isinstance(ev, HelloReceived):
                self.server.accept(
                    ExportTerms(self.export.size, self.export.read_only, IDENTITY, trim_zeroes=True)
                )
            elif isinstance(ev, Request):
                if self.auto_reply:
                    self.execute(ev)
                else:
                    self.held.append(ev)

    def execute(self, req: Request, server: ServerCore | None = None) -> None:
        """Apply a request to the storage (replay cache like the real node) and reply."""
        srv = server or self.server
        e = self.export
        if req.command != Command.READ and req.txn in e.completed:
            if req.payload is not None:
                req.payload.release()
            if srv is not None:
                srv.reply(req, e.completed[req.txn])
            return
        data = None
        if req.command == Command.READ:
            data = memoryview(bytes(e.data[req.offset : req.offset + req.length]))
        elif req.command == Command.WRITE:
            assert req.payload is not None
            e.data[req.offset : req.offset + req.length] = req.payload.view
            req.payload.release()
        elif req.command in (Command.TRIM, Command.WRITE_ZEROES):
            e.data[req.offset : req.offset + req.length] = bytes(req.length)
        if req.command != Command.READ:
            e.completed[req.txn] = Status.OK
            e.applied.append((req.txn, req.command))
        if srv is not None:
            srv.reply(req, Status.OK, data)

    def advance(self, dt: float, step: float = 0.05) -> None:
        """Let virtual time pass, firing timers as they come due."""
        end = self.now + dt
        while True:
            t = self.client.get_timer()
            if t is None or t > end:
                break
            self.now = max(self.now, t)
            self.client.handle_timer(self.now)
            self.run()
        self.now = end
        self.run()

    def take_events(self) -> list[Event]:
        evs, self.client_events = self.client_events, []
        return evs
