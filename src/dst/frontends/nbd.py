"""Serve a BlockDevice over NBD, so qemu, libnbd tools, fio and the kernel attach it.

A thin asyncio shell around :class:`dst.nbd.NbdServerConnection`: each client
connection is the core driven by a :class:`~dst.aio.driver.CoreDriver`. A READ or
WRITE the core validated starts on the shared device and is answered in its callback
(in the same pump when nothing blocks); the other commands run as tasks. Replies
complete out of order. All connections share one device, hence
``CAN_MULTI_CONN``: a FLUSH on any connection covers writes acked on all of them.

Read replies are sent without copying: the header and the pooled read buffer go
to ``sendmsg`` as separate buffers. The stream may keep a view of that buffer
queued, so it goes back to the pool only once the stream's byte counter shows the
kernel took all of it (the core hands the release with the reply). Each connection has at most
``max_inflight`` requests and ``max_inflight_bytes`` of payload in flight; past
either, the connection stops reading until replies drain (backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from dst.aio.driver import CoreDriver
from dst.aio.listen import bind_listener, bound_address, serve, unlink_unix
from dst.buffers import BufferPool
from dst.device import BlockDevice, Extent, IoFlags, piece_flags, pieces
from dst.errors import IoError
from dst.layers.checkpoints import CHANGED_PREFIX, changed_extents, checkpoint_contexts
from dst.nbd import (
    MAX_BLOCK,
    Command,
    Disconnect,
    Event,
    ExportChosen,
    ExportInfo,
    NbdServerConnection,
    ProtocolViolation,
    Request,
)
from dst.nbd.meta import BASE_ALLOCATION
from dst.units import Address

log = logging.getLogger("dst.nbd")

EXPORT_NAME = "default"
MAX_INFLIGHT = 64
MAX_INFLIGHT_BYTES = 128 << 20
CLOSE_TIMEOUT = 10.0
_OPS = {
    Command.READ: "read",
    Command.WRITE: "write",
    Command.FLUSH: "flush",
    Command.TRIM: "trim",
    Command.WRITE_ZEROES: "zero",
    Command.BLOCK_STATUS: "block_status",
    Command.CACHE: "cache",
}
CONTEXTS = (BASE_ALLOCATION,)  # the metadata contexts every device answers (see _status)
# ... and one x-dst:changed:NAME per checkpoint of a device with a --bitmap record


def nbd_uri(addr: Address, export: str = "") -> str:
    """The NBD URI of an address (doc/uri.md): nbd://HOST:PORT/NAME, nbd+unix:///NAME?socket=P."""
    name = quote(export, safe="")
    if addr.path is not None:
        return f"nbd+unix:///{name}?socket={quote(addr.path, safe='/')}"
    host = addr.host or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"nbd://{host}:{addr.port}/{name}"


def export_info(device: BlockDevice, description: str = "") -> ExportInfo:
    """What the NBD server advertises for ``device``: exactly its capabilities."""
    caps = device.capabilities
    return ExportInfo(
        size=device.size,
        read_only=caps.read_only,
        can_flush=caps.can_flush,
        can_fua=caps.can_fua,
        can_trim=caps.can_trim,
        can_zero=caps.can_zero,
        can_fast_zero=caps.can_fast_zero,
        can_cache=True,  # a hint every device takes (a no-op where it cannot prefetch)
        can_multi_conn=caps.can_multi_conn,
        min_block=caps.min_block,
        preferred_block=caps.preferred_block,
        max_block=min(caps.max_request, MAX_BLOCK),
        description=description,
        contexts=(*CONTEXTS, *checkpoint_contexts(device)),
    )


class _Connection:
    """One client: its core, driven by a :class:`CoreDriver`, and the policy: requests go
    to the shared device, replies and backpressure come back."""

    def __init__(self, front: NbdFrontend, sock: socket.socket) -> None:
        self.front = front
        self.core = NbdServerConnection(
            {EXPORT_NAME: front.export}, default_export=EXPORT_NAME, pool=front.pool
        )
        self.driver: CoreDriver[Event] = CoreDriver(
            self.core,
            self._on_event,
            name="NBD connection",
            after_pump=self._apply_backpressure,
            on_lost=self._on_lost,
        )
        self.stream = self.driver.attach(sock)
        self.peer = self.stream.peer
        self.driver.name = f"NBD connection from {self.peer}"
        self.inflight_bytes = 0
        self.closed = asyncio.Event()
        self._paused = False
        self.closer: asyncio.Task[None] | None = None

    def start(self) -> None:
        log.debug("NBD client connected from %s", self.peer)
        self.driver.start()

    def _on_lost(self, exc: BaseException | None) -> None:
        if exc is not None:
            log.debug("NBD connection from %s lost: %s", self.peer, exc)
        self.closed.set()
        self.front._forget(self)

    # ---- events ------------------------------------------------------------
    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, Request):
            self._dispatch(ev)
        elif isinstance(ev, ExportChosen):
            log.debug(
                "NBD client %s chose export %r (structured replies: %s, contexts: %s)",
                self.peer,
                ev.name,
                ev.structured,
                ", ".join(ev.contexts) or "none",
            )
        elif isinstance(ev, Disconnect):
            log.debug("NBD client %s disconnects: %s", self.peer, ev.reason)
            self.begin_close()
        elif isinstance(ev, ProtocolViolation):
            self.front.stats["protocol_errors"] += 1
            log.warning("closing NBD connection from %s: %s", self.peer, ev.message)
            self.begin_close()

    def _dispatch(self, req: Request) -> None:
        if req.command == Command.READ:
            self.inflight_bytes += req.length
            self._start_read(req)
            return
        if req.command == Command.WRITE:
            self.inflight_bytes += req.length
            self._start_write(req)
            return
        self.driver.spawn(self._run(req), _OPS[req.command])

    # ---- reads and writes: started on the device, finished in its callback ----------
    def _start_read(self, req: Request) -> None:
        """No task: the device calls back when the data is in the buffer (at once for a
        page-cache read), and the reply goes out with the others of this pump."""
        front = self.front
        front.stats["requests"]["read"] += 1
        buf = front.pool.get(req.length)
        n = req.length
        driver = self.driver
        driver.begin()

        def release() -> None:  # the reply left (or never will): the buffer goes back
            buf.release()
            self.inflight_bytes -= n
            self._apply_backpressure()

        def done(err: BaseException | None) -> None:
            if err is None:
                front.stats["bytes_read"] += n
                self.core.reply_read(req.handle, buf.view, release)
            else:
                release()
                self._failed(req, err)
            driver.end()
            driver.queued(n if err is None else 0)  # a large reply leaves at once

        front.device.start_read(req.offset, buf.view, req.flags, done)

    def _start_write(self, req: Request) -> None:
        front = self.front
        front.stats["requests"]["write"] += 1
        payload = req.payload
        assert payload is not None
        driver = self.driver
        driver.begin()

        def done(err: BaseException | None) -> None:
            payload.release()
            self.inflight_bytes -= req.length
            if err is None:
                front.stats["bytes_written"] += req.length
                self.core.reply_ok(req.handle)
            else:
                self._failed(req, err)
            driver.end()
            driver.wake()

        front.device.start_write(req.offset, payload.view, req.flags, done)

    def _failed(self, req: Request, exc: BaseException) -> None:
        """Answer a failed request with its errno; an unexpected error is logged as a bug."""
        self.front.stats["errors"] += 1
        if isinstance(exc, IoError):
            self.core.reply_error(req.handle, exc.errno or errno.EIO, str(exc))
            return
        if not isinstance(exc, asyncio.CancelledError):
            log.error(
                "NBD %s of %d bytes at %d failed: %r",
                _OPS[req.command],
                req.length,
                req.offset,
                exc,
                exc_info=exc,
            )
        self.core.reply_error(req.handle, errno.EIO, f"internal error: {exc!r}")

    @property
    def busy(self) -> int:
        """Requests in flight: tasks, and reads and writes started on the device."""
        return self.driver.busy

    def _apply_backpressure(self) -> None:
        busy = (
            self.driver.busy >= self.front.max_inflight
            or self.inflight_bytes >= self.front.max_inflight_bytes
        )
        if busy and not self._paused:
            self._paused = True
            self.front.stats["read_pauses"] += 1
            self.stream.pause_reading()
        elif not busy and self._paused and self.closer is None:
            self._paused = False
            self.stream.resume_reading()

    # ---- requests ----------------------------------------------------------
    async def _run(self, req: Request) -> None:
        """A request other than READ and WRITE (those start on the device without a
        task: :meth:`_start_read`, :meth:`_start_write`)."""
        try:
            self.front.stats["requests"][_OPS[req.command]] += 1
            try:
                await self._execute(req)
            except Exception as exc:
                self._failed(req, exc)
            self.driver.wake()
            with contextlib.suppress(ConnectionError):
                await self.stream.drain()
        finally:
            if req.payload is not None:
                req.payload.release()

    async def _execute(self, req: Request) -> None:
        """Run one request on the device and queue its success reply."""
        dev = self.front.device
        core = self.core
        if req.command == Command.FLUSH:
            await dev.flush()
        elif req.command == Command.TRIM:
            await self._in_chunks(dev.trim, req)
        elif req.command == Command.WRITE_ZEROES:
            await self._in_chunks(dev.write_zeroes, req)
        elif req.command == Command.CACHE:
            try:
                await dev.cache(req.offset, req.length)  # the core checked the range
            except OSError as exc:  # a prefetch not made is no reason to fail the request
                log.debug("NBD cache at %d+%d not taken: %s", req.offset, req.length, exc)
        elif req.command == Command.BLOCK_STATUS:
            statuses = {name: await self._status(name, req) for name in core.contexts}
            core.reply_block_status(req.handle, statuses)
            return
        core.reply_ok(req.handle)

    async def _status(self, context: str, req: Request) -> list[Extent]:
        """The extents of one metadata context; the core makes the reply valid."""
        if context == BASE_ALLOCATION:
            return await self.front.device.extents(req.offset, req.length)
        if context.startswith(CHANGED_PREFIX):  # a checkpoint removed since: all changed
            name = context[len(CHANGED_PREFIX) :]
            return changed_extents(self.front.device, name, req.offset, req.length)
        return []  # a context offered without an answer here: the core reports data

    async def _in_chunks(self, op: Callable[[int, int, IoFlags], Any], req: Request) -> None:
        """TRIM and WRITE_ZEROES may exceed the device's request limit: split them, in
        order (FUA on the last piece covers them all)."""
        step = self.front.device.capabilities.max_request
        for pos, n, last in pieces(req.offset, req.length, step):
            await op(pos, n, piece_flags(req.flags, last))

    # ---- closing -----------------------------------------------------------
    def begin_close(self) -> None:
        """Stop reading, finish what is in flight, send it, then close."""
        if self.closer is None and not self.stream.closed:
            self.stream.pause_reading()
            self.closer = self.driver.spawn(self._close_when_done(), "close")

    async def _close_when_done(self) -> None:
        timeout = self.front.close_timeout
        me = asyncio.current_task()
        try:
            await asyncio.wait_for(self.driver.settled(but=me), timeout)
            self.driver.send(now=True)
            await asyncio.wait_for(self.stream.wait_sent(), timeout)
        except TimeoutError:
            log.warning("NBD connection from %s did not finish in %.1f s", self.peer, timeout)
        finally:
            for t in list(self.driver.tasks):
                if t is not me:
                    t.cancel()
            self.stream.close()


class NbdFrontend:
    """Serves one BlockDevice over NBD as export ``default`` (and the empty name)."""

    kind = "nbd"

    def __init__(
        self,
        device: BlockDevice,
        address: Address,
        *,
        description: str = "",
        pool: BufferPool | None = None,
        max_inflight: int = MAX_INFLIGHT,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
        close_timeout: float = CLOSE_TIMEOUT,
        listener: socket.socket | None = None,
    ) -> None:
        """``listener``: a socket already bound to ``address`` (``bind_listener``), so a
        caller can take the address before it has a device to serve."""
        self.device = device
        self.requested = address
        self.address = address
        self.export = export_info(device, description or f"DST device {device.name}")
        self.pool = pool if pool is not None else BufferPool()
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.close_timeout = close_timeout
        self.stats: dict[str, Any] = {
            "connections_total": 0,
            "requests": dict.fromkeys(_OPS.values(), 0),
            "bytes_read": 0,
            "bytes_written": 0,
            "errors": 0,
            "protocol_errors": 0,
            "requests_rejected": 0,
            "read_pauses": 0,
        }
        self._conns: set[_Connection] = set()
        self._listener = listener
        self._sock: socket.socket | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def uri(self) -> str:
        """The NBD URI clients connect to (the real port once started)."""
        return nbd_uri(self.address)

    async def start(self) -> None:
        """Bind and start accepting; logs ``serving NBD on URI``."""
        if self._sock is not None:
            raise RuntimeError("this NBD front end is already started")
        sock, self._listener = self._listener, None
        if sock is None:
            sock = bind_listener(self.requested, what="serve NBD")
        self._sock = sock
        self.address = bound_address(sock, self.requested)
        self._serve_task = asyncio.get_running_loop().create_task(serve(sock, self._on_client))
        if not self.address.is_loopback:
            log.warning(
                "NBD has no authentication: anyone who reaches %s can read and write the "
                "device; serve on a loopback address or a unix socket, or firewall the port",
                self.address,
            )
        log.info("serving NBD on %s", self.uri)

    def refresh_contexts(self) -> None:
        """Offer the checkpoints as they are now (added or removed at run time) to the
        connections that come from now on; a connection keeps what it chose."""
        contexts = (*CONTEXTS, *checkpoint_contexts(self.device))
        if contexts != self.export.contexts:
            self.export = replace(self.export, contexts=contexts)

    async def _on_client(self, sock: socket.socket) -> None:
        if self._closed:
            sock.close()
            return
        self.refresh_contexts()
        conn = _Connection(self, sock)
        self._conns.add(conn)
        self.stats["connections_total"] += 1
        conn.start()

    def _forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            self.stats["requests_rejected"] += conn.core.requests_rejected

    def statistics(self) -> dict[str, Any]:
        """Counters since start: connections, requests per op, bytes, errors."""
        s = dict(self.stats)
        s["requests"] = dict(self.stats["requests"])
        s["connections_open"] = len(self._conns)
        s["requests_rejected"] += sum(c.core.requests_rejected for c in self._conns)
        s["inflight"] = sum(c.busy for c in self._conns)
        return s

    async def aclose(self) -> None:
        """Stop accepting, let in-flight requests finish, close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:  # never started: nothing was served
            self._listener.close()
            self._listener = None
            unlink_unix(self.requested)
        if self._sock is None:
            return
        if self._serve_task is not None:
            self._serve_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve_task
        if self._sock is not None:
            self._sock.close()
            if self.requested.path is not None:
                unlink_unix(self.requested)
        conns = list(self._conns)
        for conn in conns:
            conn.core.start_shutdown()
            conn.begin_close()
        closers = [c.closer for c in conns if c.closer is not None]
        if closers:
            await asyncio.wait(closers, timeout=self.close_timeout + 1.0)
        for conn in conns:
            conn.stream.abort()
            await conn.driver.aclose()  # cancels and awaits what is left; errors are logged
        log.info("stopped serving NBD on %s", self.uri)

    async def __aenter__(self) -> NbdFrontend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
