"""A zero-copy stream over a non-blocking socket.

asyncio's transports join or copy buffers on write (Python 3.11), and
``BufferedProtocol`` hides the socket from ``sendmsg``.  This small shell reads
with ``recv_into`` straight into the buffer a sans-IO core asks to be filled, and
writes header + payload memoryviews with one ``sendmsg`` call, queueing only what
the kernel did not take.  It works on the default loop and on uvloop (both
support ``add_reader``/``add_writer`` on sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

IOV_MAX = 1024
HIGH_WATER = 8 << 20
READS_PER_WAKEUP = 16


class Receiver(Protocol):
    """The receiving side of a sans-IO core, as seen by the shell."""

    def get_buffer(self) -> memoryview:
        """A writable buffer for the next bytes from the socket (never empty)."""
        ...

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last buffer."""
        ...

    def connection_lost(self, exc: BaseException | None) -> None:
        """EOF (``exc`` None) or an error; called once."""
        ...


log = logging.getLogger("dst.net")

#: Send buffer asked for on unix sockets.  The default (about 200 KiB) takes a 1 MiB
#: request or reply in several rounds of sendmsg, wake-up and recv between the two
#: processes; with room for a few whole requests each side does one system call per
#: request and both keep working (docs/benchmarks.md, "Socket buffers").  TCP sockets
#: keep the kernel's auto-tuning, which grows to the same size on its own.
UNIX_SEND_BUFFER = 4 << 20
_capped_logged = False


def _ask_send_buffer(sock: socket.socket) -> None:
    """Ask for UNIX_SEND_BUFFER; say once per process when the kernel gives less."""
    global _capped_logged
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2  # Linux doubles it
    except OSError:
        return
    if got < UNIX_SEND_BUFFER and not _capped_logged:
        _capped_logged = True
        log.info(
            "unix socket send buffers are capped at %d KiB by net.core.wmem_max; "
            "raise it to %d (sysctl -w net.core.wmem_max=%d) for faster large I/O",
            got >> 10,
            UNIX_SEND_BUFFER,
            UNIX_SEND_BUFFER,
        )


class SocketStream:
    """One connected socket, owned by exactly one receiver."""

    def __init__(self, sock: socket.socket, receiver: Receiver) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock.family == socket.AF_UNIX:
            _ask_send_buffer(sock)
        self.sock = sock
        self.receiver = receiver
        self.loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._out: deque[bytes | memoryview] = deque()
        self._out_bytes = 0
        self._writer_armed = False
        self._flush_scheduled = False
        self._reading = False
        self._closed = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self._queued_total = 0
        self._after: deque[tuple[int, Callable[[], None]]] = deque()
        try:
            self.peer = _peer_name(sock)
        except OSError:
            self.peer = "?"

    # ---- reading -------------------------------------------------------
    def start(self) -> None:
        self.resume_reading()

    def pause_reading(self) -> None:
        if self._reading and not self._closed:
            self.loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._closed:
            self.loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _on_readable(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            if self._closed or not self._reading:
                return
            buf = self.receiver.get_buffer()
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lose(exc)
                return
            if n == 0:
                self._lose(None)
                return
            self.bytes_in += n
            self.receiver.buffer_updated(n)
            if n < len(buf):
                return

    # ---- writing -------------------------------------------------------
    @property
    def write_buffer_size(self) -> int:
        return self._out_bytes

    def write(self, buffers: Iterable[bytes | bytearray | memoryview], now: bool = False) -> None:
        """Send buffers in order; what the kernel does not take now is queued (not copied).

        The send happens later in this loop iteration, so that everything written during it
        leaves in one ``sendmsg``; ``now`` sends at once, for a caller that knows it wrote
        all it had (a pump that answered every request of one receive)."""
        if self._closed:
            return
        out = self._out
        added = 0
        for b in buffers:
            if b.__class__ is bytes:  # headers, trailers: queued as they are
                if b:
                    out.append(b)
                    added += len(b)
                continue
            mv = b if isinstance(b, memoryview) else memoryview(b)
            if mv.nbytes:
                if mv.ndim != 1 or mv.format != "B":
                    mv = mv.cast("B")
                out.append(mv)
                added += mv.nbytes
        self._out_bytes += added
        self._queued_total += added
        if self._writer_armed:
            return
        if now:
            if self._out:
                self._flush()
        elif not self._flush_scheduled:
            # one sendmsg for everything written during this loop iteration
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if not self._closed and not self._writer_armed:
            self._flush()

    def _flush(self) -> None:
        while self._out:
            batch = list(self._out)[:IOV_MAX] if len(self._out) > IOV_MAX else list(self._out)
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._lose(exc)
                return
            self.bytes_out += sent
            self._out_bytes -= sent
            if not self._out_bytes:  # the usual case: the kernel took it all
                self._out.clear()
                break
            while sent:
                head = self._out[0]
                n = len(head) if head.__class__ is bytes else head.nbytes  # type: ignore[union-attr]
                if sent >= n:
                    sent -= n
                    self._out.popleft()
                else:
                    self._out[0] = memoryview(head)[sent:]
                    sent = 0
        if self._out and not self._writer_armed:
            self.loop.add_writer(self._fd, self._flush)
            self._writer_armed = True
        elif not self._out and self._writer_armed:
            self.loop.remove_writer(self._fd)
            self._writer_armed = False
        after = self._after
        while after and after[0][0] <= self.bytes_out:
            after.popleft()[1]()
        if self._drain_waiters and self._out_bytes < HIGH_WATER:
            self._wake_drainers(None)

    def after_sent(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything queued so far has left (or the stream closed).

        Used to give pooled buffers back only when the kernel no longer needs them.
        """
        if self._closed or self.bytes_out >= self._queued_total:
            callback()
        else:
            self._after.append((self._queued_total, callback))

    async def wait_sent(self) -> None:
        """Wait until everything queued so far has left (or the stream closed)."""
        if self._closed or self.bytes_out >= self._queued_total:
            return
        fut: asyncio.Future[None] = self.loop.create_future()

        def sent() -> None:
            if not fut.done():
                fut.set_result(None)

        self.after_sent(sent)
        await fut

    async def drain(self) -> None:
        """Wait until the send queue is below the high-water mark."""
        if self._closed:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed")
        if self._out_bytes < HIGH_WATER:
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    def _wake_drainers(self, exc: BaseException | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for f in waiters:
            if not f.done():
                if exc is None:
                    f.set_result(None)
                else:
                    f.set_exception(exc)

    # ---- closing -------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def _lose(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._teardown()
        self._wake_drainers(ConnectionResetError(errno.ECONNRESET, "connection lost"))
        self.receiver.connection_lost(exc)

    def _teardown(self) -> None:
        self._closed = True
        if self._reading:
            self.loop.remove_reader(self._fd)
            self._reading = False
        if self._writer_armed:
            self.loop.remove_writer(self._fd)
            self._writer_armed = False
        self._out.clear()
        self._out_bytes = 0
        after, self._after = self._after, deque()
        for _, cb in after:
            cb()
        with contextlib.suppress(OSError):
            self.sock.close()

    def close(self, flush: bool = True) -> None:
        """Close now; with ``flush`` a last non-blocking attempt to send the queue first."""
        if self._closed:
            return
        if flush and self._out:
            self._flush()
        self._lose(None)

    def abort(self) -> None:
        """Reset the connection without sending what is queued."""
        if self._closed:
            return
        with contextlib.suppress(OSError):
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        self._lose(None)


def _peer_name(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return "unix"
    host, port = sock.getpeername()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
