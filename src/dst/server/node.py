"""The export node's asyncio shell: accept connections, run cores, execute requests."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from mypy_extensions import mypyc_attr

from dst import trace
from dst.aio.driver import CoreDriver
from dst.aio.listen import bind_listener, bound_address, serve, unlink_unix
from dst.buffers import BufferPool, PooledBuffer
from dst.device import BlockDevice, Capabilities, IoFlags
from dst.errors import IoError
from dst.proto.events import (
    ChecksumMismatch,
    ConnectionDead,
    Disconnecting,
    Event,
    HelloReceived,
    ProbeAnswered,
    Refused,
    Rejected,
    Request,
)
from dst.proto.handshake import Hello
from dst.proto.server import ExportTerms, ServerConfig, ServerCore, SState, honoured_flags
from dst.proto.wire import QUERY_COMMANDS, Command, Refusal, ReqFlags, Status, pack_extents
from dst.server.sessions import Decision, Session, SessionTable, probe_key
from dst.units import Address

log = logging.getLogger("dst.export")

MAX_UNAUTHENTICATED = 64
DEFAULT_PROBE_WAIT = 2.0  # for a client that does not say its ping timeout
MAX_PROBE_ROUNDS = 4  # sessions that keep changing while we probe: give up, the client retries

# the request flags as the device API's IoFlags, built once (a Flag call costs a microsecond)
_IO_FLAGS = tuple(IoFlags(i) for i in range(16))
_FLAG_BITS = len(_IO_FLAGS) - 1  # the request flags that are IoFlags, bit for bit


# compiled (dst.compiled); tests subclass it to play an older export node
@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass
class Export:
    """One named export: a device plus its policy and sessions."""

    name: str
    device: BlockDevice
    identity: Any
    spec: str
    read_only: bool = False
    shared: bool = False
    trim_zeroes: bool = False
    sessions: SessionTable = field(init=False)
    lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.sessions = SessionTable(self.name, self.shared)

    def terms(self, read_only: bool) -> ExportTerms:
        caps: Capabilities = self.device.capabilities
        commands = {
            Command.READ,
            Command.WRITE,
            Command.FLUSH,
            Command.WRITE_ZEROES,
            Command.EXTENTS,
            Command.CACHE,
        }
        if caps.can_trim:
            commands.add(Command.TRIM)
        return ExportTerms(
            size=self.device.size,
            read_only=read_only,
            identity=self.identity,
            min_block=caps.min_block,
            preferred_block=caps.preferred_block,
            commands=frozenset(commands),
            flags=honoured_flags(fast_zero=caps.can_fast_zero),
            trim_zeroes=self.trim_zeroes,
        )


class Connection:
    """One client connection: its core, driven by a :class:`CoreDriver`, and the policy:
    what a handshake, a request or a disconnect means on this export node."""

    def __init__(self, node: ExportNode, sock: socket.socket) -> None:
        self.node = node
        self.core = ServerCore(node.server_config, node.pool)
        self.driver: CoreDriver[Event] = CoreDriver(
            self.core,
            self._on_event,
            name="export connection",
            after_pump=self._after_pump,
            on_lost=self._on_lost,
        )
        self.stream = self.driver.attach(sock)
        self.peer = _peer(sock, self.stream.peer)
        self.driver.name = f"connection from {self.peer}"
        self.export: Export | None = None
        self.session: Session | None = None
        self.closed = asyncio.Event()
        self._disconnect_txn: int | None = None
        self._authenticated = False
        self.running: set[int] = set()
        self.clean = False  # the client detached with DISCONNECT
        self.fenced = False  # closed by us for a newer connection or session
        self._probe: asyncio.Future[bool] | None = None
        self._probe_no = 0

    def start(self) -> None:
        self.driver.start()

    def _on_lost(self, exc: BaseException | None) -> None:
        if not self._authenticated:
            self.node.pending.pop(self, None)
            self._authenticated = True
        if self._probe is not None and not self._probe.done():
            self._probe.set_result(False)
        self.closed.set()

    def _after_pump(self) -> None:
        """Close a connection the core gave up on; stop reading while the client has its
        whole queue depth in flight."""
        core, stream = self.core, self.stream
        if stream.closed:
            return
        if core.dead:
            self.driver.close()
        elif core.state == SState.READY:
            w = core.welcome
            if w is not None and core.in_flight >= w.queue_depth:
                stream.pause_reading()
            else:
                stream.resume_reading()

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, Request):
            self._start_request(ev)
        elif isinstance(ev, HelloReceived):
            self.driver.spawn(self._on_hello(ev), "handshake")
        elif isinstance(ev, ProbeAnswered):
            probe = self._probe
            if ev.probe == self._probe_no and probe is not None and not probe.done():
                probe.set_result(True)
        elif isinstance(ev, Rejected):
            log.warning(
                "%s: rejected transaction %d from %s: %s",
                self._who(),
                ev.txn,
                self.peer,
                ev.message,
            )
        elif isinstance(ev, ChecksumMismatch):
            log.warning(
                "%s: checksum mismatch in transaction %d; asked for a resend", self._who(), ev.txn
            )
        elif isinstance(ev, Disconnecting):
            self._disconnect_txn = ev.txn
            self.driver.spawn(self._disconnect(), "disconnect")
        elif isinstance(ev, Refused):
            if ev.by_peer:
                log.warning("%s refused the handshake: %s", self.peer, ev.message)
            else:
                log.warning("refused %s: %s", self._who(), ev.message)
        elif isinstance(ev, ConnectionDead):
            log.info("closing connection from %s: %s", self.peer, ev.reason)
            self.driver.close()

    def _who(self) -> str:
        h = self.core.hello
        if h is None:
            return self.peer
        return f"client {h.client_id!r} ({self.peer}) on export {h.export!r}"

    # ---- handshake decision -------------------------------------------------------
    async def _on_hello(self, ev: HelloReceived) -> None:
        node = self.node
        hello = ev.hello
        export = node.exports.get(hello.export or "default")
        if export is None:
            names = ", ".join(sorted(node.exports)) or "none"
            self.core.refuse(
                Refusal.UNKNOWN_EXPORT,
                f"unknown export {hello.export!r}; this export node serves: {names}",
            )
            self.driver.pump()
            return
        if node.allow is not None and hello.client_id not in node.allow:
            self.core.refuse(
                Refusal.NOT_ALLOWED,
                f"client id {hello.client_id!r} is not allowed on this export node; add "
                f"--allow {hello.client_id} to dst export",
            )
            self.driver.pump()
            return
        read_only = export.read_only or hello.read_only
        answered: dict[tuple[bytes, int], bool] = {}
        for _ in range(MAX_PROBE_ROUNDS):
            async with export.lock:
                d: Decision = export.sessions.decide(hello, read_only, time.time(), answered)
                if d.probe is None:
                    await self._admit(export, hello, d, read_only, answered)
                    return
            # Probe outside the lock: the export serves everyone else meanwhile, and the
            # table may change (the old session may reconnect), so decide again afterwards.
            old = d.probe
            wait = self._probe_wait(hello)
            conn = old.conn
            alive = await conn.probe(wait) if conn is not None else False
            answered[probe_key(old)] = alive
            log.info(
                "client %r from %s asks for export %r, held by %s from %s: %s",
                hello.client_id,
                self.peer,
                export.name,
                "another session of the same client id"
                if old.client_id == hello.client_id
                else f"client {old.client_id!r}",
                old.address,
                "it answered a probe ping" if alive else f"no answer to a probe ping in {wait:g} s",
            )
            if self.stream.closed:
                return
        self.core.refuse(
            Refusal.TOO_MANY,
            f"the sessions of export {export.name!r} kept changing while this node probed them; "
            "try again",
        )
        self.driver.pump()

    def _probe_wait(self, hello: Hello) -> float:
        """How long an older session gets to answer: the new client's ping timeout, within
        the time the new connection's handshake may take."""
        wait = DEFAULT_PROBE_WAIT if hello.ping_timeout is None else hello.ping_timeout
        return max(0.1, min(wait, self.node.server_config.handshake_timeout / 2))

    async def _admit(
        self,
        export: Export,
        hello: Hello,
        d: Decision,
        read_only: bool,
        answered: dict[tuple[bytes, int], bool],
    ) -> None:
        """Carry out a decision (the export's lock is held): refuse, or fence and serve."""
        node = self.node
        for lost in d.drop:
            if lost.conn is not None:
                lost.conn.stream.close(flush=False)  # counted as lost: the claim lingers
        if d.refusal is not None:
            self.core.refuse(d.refusal, d.message)
            self.driver.pump()
            return
        for old in d.fence:
            if old is d.session:
                why = "a newer connection of the same session"
            elif hello.takeover:
                why = f"a new session of client {hello.client_id!r} that asked for --takeover"
            elif answered.get(probe_key(old)) is False:
                why = f"a new session of client {hello.client_id!r}: it did not answer a probe ping"
            elif old.client_id == hello.client_id:
                why = "a new session of the same client id: its connection was gone"
            else:
                why = f"client {hello.client_id!r}: its claim had expired"
            conn = old.conn
            if conn is not None and conn is not self:
                log.info(
                    "fencing connection from %s (generation %d) of client %r: replaced by %s",
                    conn.peer,
                    old.generation,
                    old.client_id,
                    why,
                )
                if trace.on.proto:
                    trace.emit(
                        "proto",
                        "fence",
                        client=old.client_id,
                        generation=old.generation,
                        export=export.name,
                    )
                await conn.fence()
            elif old is not d.session:
                log.info(
                    "session of client %r on export %r (lost its connection) replaced by %s",
                    old.client_id,
                    export.name,
                    why,
                )
        if self.stream.closed:
            return
        s = export.sessions.install(d, hello)
        s.conn = self
        s.address = self.peer
        self.export = export
        self.session = s
        self.core.accept(export.terms(read_only))
        if self.core.state == SState.READY:
            self._authenticated = True
            node.pending.pop(self, None)
            w = self.core.welcome
            assert w is not None
            log.info(
                "client %r from %s attached export %r (%s, generation %d, cipher %s, checksum %s)",
                hello.client_id,
                self.peer,
                export.name,
                "read-only" if read_only else "read-write",
                hello.generation,
                w.cipher,
                w.checksum,
            )
            if trace.on.proto:
                trace.emit(
                    "proto",
                    "attached",
                    client=hello.client_id,
                    export=export.name,
                    generation=hello.generation,
                    read_only=read_only,
                    cipher=w.cipher,
                    checksum=w.checksum,
                )
        self.driver.pump()

    async def probe(self, wait: float) -> bool:
        """True when the client answers a probe ping within ``wait`` seconds; False when it
        does not, or the connection is gone (or cannot be probed).  Concurrent askers share
        one probe."""
        if self._probe is None or self._probe.done():
            n = self.core.probe()
            if n is None or self.stream.closed:
                return False
            self._probe_no = n
            self._probe = asyncio.get_running_loop().create_future()
            self.driver.pump()
        try:
            return await asyncio.wait_for(asyncio.shield(self._probe), wait)
        except TimeoutError:
            return False

    async def fence(self) -> None:
        """Stop reading this connection and wait for every request it started."""
        self.fenced = True
        self.stream.close(flush=False)
        await self.settled()

    async def settled(self, but: asyncio.Task[Any] | None = None) -> None:
        """Wait until every request started so far has ended: its task (other than
        ``but``), or its device callback."""
        await self.driver.settled(but)

    # ---- requests -------------------------------------------------------------------
    def _start_request(self, req: Request) -> None:
        s = self.session
        assert s is not None
        s.requests += 1
        if req.command not in QUERY_COMMANDS:
            cached = s.completed.get(req.txn)
            if cached is not None:
                # a resend of a request we already applied: ack it again, do not redo it
                if req.payload is not None:
                    req.payload.release()
                if trace.on.txn:
                    trace.emit("txn", "replay-ack", txn=req.txn, attempt=req.attempt, status=cached)
                self.core.reply(req, cached)
                return
            if req.txn in self.running:
                if req.payload is not None:
                    req.payload.release()
                self.core.in_flight -= 1
                return
        if req.command == Command.READ or req.command == Command.WRITE:
            self._start_io(req)
            return
        self.driver.spawn(self._run(req), Command(req.command).name.lower())

    def _start_io(self, req: Request) -> None:
        """A READ or WRITE without a task: the device calls back when it is done (before
        this returns when nothing blocks), and the reply leaves with the others of the
        same pump."""
        export = self.export
        assert export is not None
        flags = _IO_FLAGS[req.flags & _FLAG_BITS]
        self.running.add(req.txn)
        self.driver.begin()
        if req.command == Command.READ:
            buf = self.node.pool.get(req.length)

            def read_done(err: BaseException | None) -> None:
                self._io_done(req, err, buf)

            export.device.start_read(req.offset, buf.view, flags, read_done)
            return

        def write_done(err: BaseException | None) -> None:
            self._io_done(req, err, None)

        view = req.payload.view if req.payload is not None else memoryview(b"")
        export.device.start_write(req.offset, view, flags, write_done)

    def _io_done(self, req: Request, err: BaseException | None, buf: PooledBuffer | None) -> None:
        """The end of a READ or WRITE: the same accounting and reply as :meth:`_run`."""
        export = self.export
        s = self.session
        assert export is not None and s is not None
        self.running.discard(req.txn)
        if req.payload is not None:
            req.payload.release()
        status = 0
        data: memoryview | None = None
        if err is None:
            if buf is not None:
                data = buf.view
                s.bytes_read += req.length
            else:
                s.bytes_written += req.length
        elif isinstance(err, Exception):
            status = self._failure(req, err)
        else:  # cancelled (the loop is stopping): no answer, as for a cancelled task
            if buf is not None:
                buf.release()
            self.driver.end()
            return
        self._served(req, status)
        self.core.reply(req, status, data, buf.release if buf is not None else None)
        # a large read's reply leaves at once, the others with this iteration's
        self.driver.queued(len(data) if data is not None else 0)
        self.driver.end()

    async def _run(self, req: Request) -> None:
        export = self.export
        s = self.session
        assert export is not None and s is not None
        dev = export.device
        flags = _IO_FLAGS[req.flags & _FLAG_BITS]
        status = 0
        data: memoryview | None = None
        buf = None
        self.running.add(req.txn)
        try:
            cmd = req.command
            if cmd == Command.READ:
                buf = self.node.pool.get(req.length)
                await dev.read_into(req.offset, buf.view, flags)
                data = buf.view
                s.bytes_read += req.length
            elif cmd == Command.WRITE:
                assert req.payload is not None or req.length == 0
                view = req.payload.view if req.payload is not None else memoryview(b"")
                await dev.write(req.offset, view, flags)
                s.bytes_written += req.length
            elif cmd == Command.FLUSH:
                await dev.flush()
            elif cmd == Command.TRIM:
                await dev.trim(req.offset, req.length, flags)
            elif cmd == Command.WRITE_ZEROES:
                await dev.write_zeroes(req.offset, req.length, flags)
            elif cmd == Command.CACHE:
                await dev.cache(req.offset, req.length)
            elif cmd == Command.EXTENTS:
                payload = pack_extents(
                    req.offset, req.length, await dev.extents(req.offset, req.length)
                )
                if payload:
                    data = memoryview(payload)
                else:  # a device that answered nothing for the range
                    status = Status.EIO
            else:
                status = Status.ENOTSUP
        except Exception as exc:
            status = self._failure(req, exc)
        finally:
            self.running.discard(req.txn)
            if req.payload is not None:
                req.payload.release()
        self._served(req, status)
        self.core.reply(req, status, data, buf.release if buf is not None else None)
        self.driver.pump()

    def _failure(self, req: Request, exc: Exception) -> int:
        """The status a failed request is answered with; the failure is logged."""
        if isinstance(exc, IoError):
            if exc.errno == errno.EOPNOTSUPP and req.flags & ReqFlags.FAST_ZERO:
                return errno.EOPNOTSUPP  # an answer the client expects, not a failure to log
            log.warning(
                "%s: %s at offset %d length %d failed: %s",
                self._who(),
                Command(req.command).name,
                req.offset,
                req.length,
                exc,
            )
            return exc.errno or errno.EIO
        log.error("%s: request %d failed unexpectedly", self._who(), req.txn, exc_info=exc)
        return int(Status.EIO)

    def _served(self, req: Request, status: int) -> None:
        """What every answered request leaves behind: the replay cache (not for queries,
        which are simply run again), the ENOSPC count and the trace."""
        s, export = self.session, self.export
        assert s is not None and export is not None
        if req.command not in QUERY_COMMANDS:
            s.remember(req.txn, status)
        if status == Status.ENOSPC:
            self.node.enospc += 1
        if trace.on.txn:
            trace.emit(
                "txn",
                "served",
                client=s.client_id,
                export=export.name,
                txn=req.txn,
                attempt=req.attempt,
                op=Command(req.command).name.lower(),
                offset=req.offset,
                length=req.length,
                flags=int(req.flags),
                status=int(status),
            )

    async def _disconnect(self) -> None:
        await self.settled(but=asyncio.current_task())
        if self._disconnect_txn is not None:
            self.core.reply_disconnect(self._disconnect_txn)
        self.clean = True
        self.driver.close()

    async def aclose(self) -> None:
        self.stream.close()
        await self.settled()
        await self.driver.aclose()


class ExportNode:
    """Serves a set of exports on one listening address."""

    def __init__(
        self,
        exports: dict[str, Export],
        server_config: ServerConfig,
        allow: set[str] | None = None,
    ) -> None:
        self.exports = exports
        self.server_config = server_config
        self.allow = allow
        self.pool = BufferPool()
        self.connections: set[Connection] = set()
        self.pending: dict[Connection, None] = {}  # connections still in their handshake
        self.evicted = 0
        self._evict_logged = -1e9
        self.enospc = 0
        self.started = time.time()
        self._sock: socket.socket | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self.address: Address | None = None
        self._requested: Address | None = None

    async def start(self, listen: Address, sock: socket.socket | None = None) -> Address:
        """Serve on ``listen`` (``sock``: already bound there by the caller)."""
        self._sock = sock if sock is not None else bind_listener(listen, "listen")
        self._requested = listen
        self.address = bound_address(self._sock, listen)
        self._serve_task = asyncio.create_task(serve(self._sock, self._on_client))
        return self.address

    async def _on_client(self, sock: socket.socket) -> None:
        if len(self.pending) >= MAX_UNAUTHENTICATED:
            # Like sshd's MaxStartups: the oldest unfinished handshake makes room, so a flood
            # of idle or garbage connections cannot lock out a client that completes its
            # handshake in a millisecond.
            oldest = next(iter(self.pending))
            self.pending.pop(oldest, None)
            oldest.stream.abort()
            self.evicted += 1
            now = time.monotonic()
            if now - self._evict_logged > 10:
                self._evict_logged = now
                log.warning(
                    "%d connections were still in their handshake (limit %d): closing the "
                    "oldest ones (%d so far); is someone flooding this port?",
                    MAX_UNAUTHENTICATED,
                    MAX_UNAUTHENTICATED,
                    self.evicted,
                )
        conn = Connection(self, sock)
        self.pending[conn] = None
        self.connections.add(conn)
        try:
            conn.start()
            await conn.closed.wait()
            await conn.settled()
        except asyncio.CancelledError:
            conn.stream.close()  # the node is stopping: never leave a connection serving
            raise
        finally:
            self.connections.discard(conn)
            s = conn.session
            if s is not None and conn.export is not None and s.conn is conn:
                table = conn.export.sessions
                table.disconnected(s, time.time(), clean=conn.clean)
                if conn.fenced:
                    pass  # said when it was fenced
                elif conn.clean or s.read_only:
                    log.info(
                        "client %r from %s detached from export %r",
                        s.client_id,
                        conn.peer,
                        conn.export.name,
                    )
                else:
                    log.info(
                        "client %r from %s lost its connection to export %r without detaching; "
                        "its session keeps the claim for %g s",
                        s.client_id,
                        conn.peer,
                        conn.export.name,
                        table.linger,
                    )

    async def aclose(self) -> None:
        """Stop accepting, finish in-flight requests, flush and close every export."""
        conns = list(self.connections)  # before the accept loop forgets them
        if self._serve_task is not None:
            self._serve_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve_task
            self._serve_task = None
        for c in conns:
            await c.aclose()
        for e in self.exports.values():
            with contextlib.suppress(Exception):
                if not e.read_only:
                    await e.device.flush()
            await e.device.aclose()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if self._requested is not None:
                unlink_unix(self._requested)

    def status(self) -> dict[str, Any]:
        exports = []
        sessions = []
        for e in self.exports.values():
            stats = e.device.statistics()
            exports.append(
                {
                    "name": e.name,
                    "backend": e.spec,
                    "size": e.device.size,
                    "identity": str(e.identity),
                    "read_only": e.read_only,
                    "shared": e.shared,
                    "statistics": stats,
                }
            )
            now = time.time()
            for s in e.sessions.all():
                d = s.describe(now, e.sessions.linger)
                d["export"] = e.name
                sessions.append(d)
        return {
            "role": "export",
            "address": str(self.address),
            "since": self.started,
            "exports": exports,
            "sessions": sessions,
            "connections": len(self.connections),
            "enospc": self.enospc,
        }


def _peer(sock: socket.socket, name: str) -> str:
    """The peer for messages; on a unix socket, the client's process id (SO_PEERCRED), so
    that "stop that client node" names the process."""
    if sock.family != socket.AF_UNIX:
        return name
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return name
    pid = struct.unpack("3i", creds)[0]
    return f"unix (pid {pid})" if pid > 0 else name


__all__ = ["Connection", "Export", "ExportNode", "ReqFlags"]
