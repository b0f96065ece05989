"""Serve a BlockDevice over NBD, so qemu, libnbd tools, fio and the kernel attach it.

A thin asyncio shell around :class:`dst.nbd.NbdServerConnection`: each client
connection is a :class:`~dst.aio.stream.SocketStream` feeding the core, and every
request the core validates runs as its own task against the shared device, so
replies complete out of order. All connections share one device, hence
``CAN_MULTI_CONN``: a FLUSH on any connection covers writes acked on all of them.

Read replies are sent without copying: the header and the pooled read buffer go
to ``sendmsg`` as separate buffers. The stream may keep a view of that buffer
queued, so it goes back to the pool only once the stream's byte counter shows the
kernel took all of it (:class:`_ReplyStream`). Each connection has at most
``max_inflight`` requests and ``max_inflight_bytes`` of payload in flight; past
either, the connection stops reading until replies drain (backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from dst.aio.listen import bind_listener, bound_address, serve, unlink_unix
from dst.aio.stream import Receiver, SocketStream
from dst.buffers import BufferPool, PooledBuffer
from dst.device import BlockDevice, Extent, IoFlags
from dst.errors import IoError
from dst.layers.checkpoints import CHANGED_PREFIX, changed_extents, checkpoint_contexts
from dst.nbd import (
    MAX_BLOCK,
    Command,
    Disconnect,
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


class _ReplyStream(SocketStream):
    """A SocketStream that gives pooled read buffers back once their bytes left.

    ``bytes_out + write_buffer_size`` after a write is the stream position where
    that write ends; the buffer is released as soon as ``bytes_out`` passes it.
    """

    def __init__(
        self, sock: socket.socket, receiver: Receiver, on_release: Callable[[int], None]
    ) -> None:
        super().__init__(sock, receiver)
        self._held: deque[tuple[int, PooledBuffer]] = deque()
        self._on_release = on_release
        self._idle: list[asyncio.Future[None]] = []

    def write_replies(
        self, buffers: Iterable[bytes | memoryview], held: list[PooledBuffer]
    ) -> None:
        """Write ``buffers`` now; ``held`` (referenced by them) go back once all of it is
        sent.  The caller gathered the replies of a whole loop pass already."""
        self.write(buffers, now=True)
        if held:
            end = self.bytes_out + self.write_buffer_size
            self._held.extend((end, buf) for buf in held)
        self._release_sent()

    def _flush(self) -> None:
        super()._flush()
        self._release_sent()

    def _release_sent(self) -> None:
        held = self._held
        while held and (held[0][0] <= self.bytes_out or self.closed):
            _, buf = held.popleft()
            n = buf.view.nbytes
            buf.release()
            self._on_release(n)
        if self._idle and (self.write_buffer_size == 0 or self.closed):
            waiters, self._idle = self._idle, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    def release_all(self) -> None:
        """After the connection is gone: nothing queued will be sent any more."""
        self._release_sent()

    async def wait_sent(self) -> None:
        """Wait until everything queued was handed to the kernel (or the stream closed)."""
        if self.write_buffer_size == 0 or self.closed:
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        self._idle.append(fut)
        await fut


class _Connection:
    """One client: the core, its stream, its request tasks; the Receiver of the stream."""

    def __init__(self, front: NbdFrontend, sock: socket.socket) -> None:
        self.front = front
        self.core = NbdServerConnection(
            {EXPORT_NAME: front.export}, default_export=EXPORT_NAME, pool=front.pool
        )
        self.stream = _ReplyStream(sock, self, self._read_released)
        self.peer = self.stream.peer
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflight_bytes = 0
        self.closed = asyncio.Event()
        self._paused = False
        self._closer: asyncio.Task[None] | None = None
        self._send_scheduled = False
        self._held_pending: list[PooledBuffer] = []
        self.started = 0  # reads and writes started on the device, not yet called back
        self._quiet: list[asyncio.Future[None]] = []

    def start(self) -> None:
        log.debug("NBD client connected from %s", self.peer)
        self.stream.start()
        self._send()

    # ---- Receiver ----------------------------------------------------------
    def get_buffer(self) -> memoryview:
        return self.core.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.core.buffer_updated(nbytes)
        self._handle_events()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.core.connection_lost()
        self.stream.release_all()
        if exc is not None:
            log.debug("NBD connection from %s lost: %s", self.peer, exc)
        self.closed.set()
        self.front._forget(self)

    # ---- events ------------------------------------------------------------
    def _handle_events(self) -> None:
        core = self.core
        while (ev := core.next_event()) is not None:
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
        self._send()
        self._apply_backpressure()

    def _dispatch(self, req: Request) -> None:
        if req.command == Command.READ:
            self.inflight_bytes += req.length
            self._start_read(req)
            return
        if req.command == Command.WRITE:
            self.inflight_bytes += req.length
            self._start_write(req)
            return
        task = asyncio.get_running_loop().create_task(self._run(req))
        self.tasks.add(task)
        self.front.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.front.tasks.discard(task)
        self._ended()

    # ---- reads and writes: started on the device, finished in its callback ----------
    def _start_read(self, req: Request) -> None:
        """No task: the device calls back when the data is in the buffer (at once for a
        page-cache read), and the reply goes out with the others of this loop pass."""
        front = self.front
        front.stats["requests"]["read"] += 1
        buf = front.pool.get(req.length)
        self.started += 1

        def done(err: BaseException | None) -> None:
            self.started -= 1
            if err is None:
                front.stats["bytes_read"] += req.length
                self.core.reply_read(req.handle, buf.view)
                self._send(buf)  # the stream owns the buffer and its accounting now
            else:
                buf.release()
                self.inflight_bytes -= req.length
                self._failed(req, err)
                self._send()
            self._ended()

        front.device.start_read(req.offset, buf.view, req.flags, done)

    def _start_write(self, req: Request) -> None:
        front = self.front
        front.stats["requests"]["write"] += 1
        payload = req.payload
        assert payload is not None
        self.started += 1

        def done(err: BaseException | None) -> None:
            self.started -= 1
            payload.release()
            self.inflight_bytes -= req.length
            if err is None:
                front.stats["bytes_written"] += req.length
                self.core.reply_ok(req.handle)
            else:
                self._failed(req, err)
            self._send()
            self._ended()

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
        return len(self.tasks) + self.started

    def _ended(self) -> None:
        self._apply_backpressure()
        if self._quiet and not self.busy:
            waiters, self._quiet = self._quiet, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    async def _all_done(self) -> None:
        if self.busy:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._quiet.append(fut)
            await fut

    def _read_released(self, nbytes: int) -> None:
        self.inflight_bytes -= nbytes
        self._apply_backpressure()

    def _apply_backpressure(self) -> None:
        busy = (
            self.busy >= self.front.max_inflight
            or self.inflight_bytes >= self.front.max_inflight_bytes
        )
        if busy and not self._paused:
            self._paused = True
            self.front.stats["read_pauses"] += 1
            self.stream.pause_reading()
        elif not busy and self._paused and self._closer is None:
            self._paused = False
            self.stream.resume_reading()

    def _send(self, held: PooledBuffer | None = None) -> None:
        """Queue the core's output; replies finished in one loop pass go out in one sendmsg."""
        if held is not None:
            self._held_pending.append(held)
        if not self._send_scheduled:
            self._send_scheduled = True
            self.stream.loop.call_soon(self.send_now)

    def send_now(self) -> None:
        self._send_scheduled = False
        held, self._held_pending = self._held_pending, []
        self.stream.write_replies(self.core.data_to_send(), held)

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
            self._send()
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
        """TRIM and WRITE_ZEROES may exceed the device's request limit: split them."""
        step = max(self.front.device.capabilities.max_request, 1)
        pos, end = req.offset, req.offset + req.length
        while pos < end:
            n = min(step, end - pos)
            flags = req.flags if pos + n >= end else req.flags & ~IoFlags.FUA
            await op(pos, n, flags)
            pos += n

    # ---- closing -----------------------------------------------------------
    def begin_close(self) -> None:
        """Stop reading, finish what is in flight, send it, then close."""
        if self._closer is None and not self.stream.closed:
            self.stream.pause_reading()
            self._closer = asyncio.get_running_loop().create_task(self._close_when_done())
            self.front.tasks.add(self._closer)
            self._closer.add_done_callback(self.front.tasks.discard)

    async def _close_when_done(self) -> None:
        timeout = self.front.close_timeout
        try:
            if self.busy:
                await asyncio.wait_for(self._all_done(), timeout)
            self.send_now()
            await asyncio.wait_for(self.stream.wait_sent(), timeout)
        except TimeoutError:
            log.warning("NBD connection from %s did not finish in %.1f s", self.peer, timeout)
        finally:
            for t in list(self.tasks):
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
        self.tasks: set[asyncio.Task[None]] = set()
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
        for conn in list(self._conns):
            conn.core.start_shutdown()
            conn.begin_close()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=self.close_timeout + 1.0)
        for conn in list(self._conns):
            conn.stream.abort()
        leftover = set(self.tasks)
        for t in leftover:
            t.cancel()
        if leftover:
            await asyncio.gather(*leftover, return_exceptions=True)
        log.info("stopped serving NBD on %s", self.uri)

    async def __aenter__(self) -> NbdFrontend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
