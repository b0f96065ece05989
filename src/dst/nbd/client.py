"""A sans-IO NBD client: fixed newstyle handshake, then requests with resend across connections.

One :class:`NbdClientCore` lives for a whole member session, across connections,
like the DST :class:`~dst.proto.client.ClientCore`: bytes and ``now`` go in; bytes
to send, events and the next timer deadline come out. It asks for structured
replies and the configured metadata contexts, then NBD_OPT_GO (NBD_OPT_EXPORT_NAME
only when GO is unsupported); the option phase is in :mod:`dst.nbd.client_handshake`.
A BLOCK_STATUS is only sent on a connection whose server selected
``base:allocation`` (otherwise it completes at once with EOPNOTSUPP), and its reply
is checked against the specification's rules before the extents are handed over.

Requests carry 64-bit handles (the request id, stable across resends); many are in
flight and replies may come in any order. Read data is received straight into the
caller's buffer (``get_buffer()`` hands out a slice of it). Everything from the
server is validated: a bad magic, an unknown handle or data beyond what was asked
becomes a :class:`ServerViolation` event (close the connection), never an exception.

NBD has no pings and no session, so: a connection with requests in flight that
receives nothing for ``resend_timeout`` is declared dead; after a reconnect every
request without a reply is sent again (at-least-once: a write may be applied
twice); a request fails with EIO ``(resends + 1) * resend_timeout`` after it was
submitted, or when it would need more than ``resends + 1`` sends.
"""

from __future__ import annotations

import errno
import struct
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dst.device import Extent
from dst.nbd import wire
from dst.nbd.client_events import (
    Completed as Completed,
)
from dst.nbd.client_events import (
    Connected as Connected,
)
from dst.nbd.client_events import (
    ConnectionDead as ConnectionDead,
)
from dst.nbd.client_events import (
    ExportRefused as ExportRefused,
)
from dst.nbd.client_events import (
    NbdClientConfig as NbdClientConfig,
)
from dst.nbd.client_events import (
    ServerExport as ServerExport,
)
from dst.nbd.client_events import (
    ServerViolation as ServerViolation,
)
from dst.nbd.client_handshake import Handshake
from dst.nbd.constants import (
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlags,
    NbdError,
    Option,
    ReplyFlags,
    ReplyType,
    TransmissionFlags,
)
from dst.nbd.events import Event
from dst.nbd.meta import BASE_ALLOCATION, parse_block_status
from dst.proto.jobs import Job
from dst.proto.reader import ChunkReader

STAGE_SIZE = 64 << 10  # staging buffer for headers, option replies and chunk metadata
DIRECT_THRESHOLD = 16 << 10  # read data at least this big is received in place
MAX_CHUNK_META = 16 << 10  # the same for the payload of an error chunk
MAX_STATUS_CHUNK = 4 + 8 * (1 << 20)  # a block status chunk of more descriptors: violation
_ERROR_BIT = 1 << 15
_SIMPLE_REST = struct.Struct(">IQ")  # error, handle (after the magic)
_CHUNK_REST = struct.Struct(">HHQI")  # flags, type, handle, length (after the magic)
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ZEROES = bytes(1 << 20)
_COMMANDS = (
    Command.READ,
    Command.WRITE,
    Command.FLUSH,
    Command.TRIM,
    Command.WRITE_ZEROES,
    Command.BLOCK_STATUS,
    Command.CACHE,
)
_NBD_ERRNO = {e.value: e.value for e in NbdError}  # the wire values are Linux errno values
_DONE = int(ReplyFlags.DONE)  # a plain int: int & IntFlag runs Flag arithmetic in Python
_CACHE = int(Command.CACHE)  # CACHE and above (WRITE_ZEROES) may go unsent: _unsupported


@dataclass(eq=False, slots=True)
class _Req:
    handle: int
    command: int
    flags: int
    offset: int
    length: int
    payload: memoryview | None
    into: memoryview | None
    submitted: float
    attempts: int = 0
    sent: bool = False  # on the wire of the current connection, no reply yet
    reported: bool = False  # the caller has its Completed event (a reply is then dropped)
    in_reply: bool = False  # structured chunks arrived, the final one not yet
    covered: list[tuple[int, int]] = field(default_factory=list)
    statuses: dict[int, list[Extent]] = field(default_factory=dict)  # BLOCK_STATUS, by id
    error: int = 0
    message: str = ""


@dataclass
class ClientStats:
    submitted: int = 0
    completed: int = 0
    errors: int = 0
    failed: int = 0
    resends: int = 0
    timeouts: int = 0
    violations: int = 0
    connections: int = 0


def _unexpected(chunk: memoryview) -> None:
    raise AssertionError("every expected chunk of the NBD client core has its own handler")


class NbdClientCore(Handshake):
    """Sans-IO NBD client for one member: feed it bytes and time, take bytes and events."""

    def __init__(self, config: NbdClientConfig) -> None:
        self.config = config
        self.stats = ClientStats()
        self.export: ServerExport | None = None  # from the first handshake
        self.generation = 0
        self.ready = False
        self.closed = False
        self._events: deque[Event] = deque()
        self._out: list[bytes | memoryview] = []
        self._reqs: dict[int, _Req] = {}  # every request not finished on the wire
        self._queue: deque[_Req] = deque()  # waiting to be sent on this connection
        self._order: deque[_Req] = deque()  # by submission, for the budget timer
        self._next = 1
        self._inflight = 0
        self._progress = 0.0
        self._now = 0.0
        self._hs_deadline: float | None = None
        self._dead = True  # no connection yet
        self._rx = self._new_reader()
        self._current: _Req | None = None  # the request whose data is being received
        self._option = 0
        self._info: dict[int, tuple[int, ...]] = {}
        self._structured = False
        self._no_zeroes = False
        self._meta: dict[int, str] = {}  # metadata contexts of this connection, by id

    # ---- connection lifecycle ------------------------------------------------
    def connection_made(self, now: float) -> None:
        """A new transport is up: the server speaks first."""
        self._now = now
        self.generation += 1
        self.stats.connections += 1
        self.ready = self._dead = self._structured = False
        self._rx = self._new_reader()
        self._inflight = 0
        self._out, self._info, self._option = [], {}, 0
        self._meta = {}
        self._expect(wire.GREETING.size, self._on_greeting)
        self._hs_deadline = now + self.config.handshake_timeout

    def connection_lost(self, now: float) -> None:
        """The transport is gone; every unanswered request waits for the next connection."""
        self._now = now
        if self._hs_deadline is not None and not self._dead:
            hint = " (is the export name right?)" if self._option == Option.EXPORT_NAME else ""
            self._events.append(
                ConnectionDead(f"the server closed the connection during the handshake{hint}")
            )
        self.ready, self._dead, self._hs_deadline = False, True, None
        self._rx.stop()
        self._inflight, self._out = 0, []
        self._current = None
        for r in list(self._reqs.values()):
            if r.reported:
                del self._reqs[r.handle]
            r.sent = r.in_reply = False
            r.covered, r.statuses, r.error = [], {}, 0
        self._queue = deque(self._reqs.values())

    def close(self) -> None:
        """Send NBD_CMD_DISC: the server answers what is in flight, then hangs up."""
        if self.ready and not self._dead:
            self._out.append(self._request_header(Command.DISC, 0, self._take_handle(), 0, 0))
        self.closed = True

    def shutdown(self, error: int = errno.ESHUTDOWN, message: str = "device closed") -> None:
        """Fail every request still pending (the owner is going away or gave up)."""
        self.closed = self._dead = True
        self._rx.stop()
        for r in list(self._reqs.values()):
            if not r.reported:
                self._report(r, error, message)
        self._reqs.clear()
        self._queue.clear()

    def abandon(self, error: int, message: str) -> int:
        """Fail every unanswered request now and never resend it (the owner drops the
        transport next); returns how many were given up."""
        given_up = [r for r in self._reqs.values() if not r.reported]
        for r in given_up:
            self._report(r, error, message)
        self._queue.clear()
        self._dead = True
        self._rx.stop()
        return len(given_up)

    @property
    def in_flight(self) -> int:
        return sum(1 for r in self._reqs.values() if not r.reported)

    # ---- submitting ------------------------------------------------------------
    def submit(
        self,
        command: int,
        offset: int,
        length: int,
        flags: int,
        now: float,
        payload: memoryview | None = None,
        into: memoryview | None = None,
    ) -> int:
        """Queue a request; ``payload`` (WRITE) and ``into`` (READ) stay valid until its
        :class:`Completed` event. Returns the handle."""
        buf = payload if payload is not None else into
        if (
            self.closed
            or command not in _COMMANDS
            or not (0 <= length <= 0xFFFFFFFF and offset >= 0)
            or (payload is not None) != (command == Command.WRITE)
            or (into is not None) != (command == Command.READ)
            or (buf is not None and buf.nbytes != length)
        ):
            raise ValueError(
                f"invalid NBD request {command} [{offset}, +{length}) (a WRITE takes a payload "
                "and a READ a buffer of its length; nothing after close)"
            )
        self._now = now
        r = _Req(self._take_handle(), command, flags, offset, length, payload, into, now)
        self._reqs[r.handle] = r
        self._queue.append(r)
        self._order.append(r)
        self.stats.submitted += 1
        self._send_pending()
        return r.handle

    def _take_handle(self) -> int:
        handle = self._next
        self._next = (self._next + 1) & 0xFFFFFFFFFFFFFFFF or 1
        return handle

    @staticmethod
    def _request_header(command: int, flags: int, handle: int, offset: int, length: int) -> bytes:
        return wire.REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)

    def _send_pending(self) -> None:
        if not self.ready or self._dead or self.closed:  # nothing may follow NBD_CMD_DISC
            return
        while self._queue and self._inflight < max(1, self.config.queue_depth):
            r = self._queue.popleft()
            if r.reported or r.sent:
                continue
            if r.attempts > self.config.resends:
                self._fail(r, f"sent {r.attempts} time(s) without a reply (--resends)")
                continue
            if r.command == Command.BLOCK_STATUS and BASE_ALLOCATION not in self._meta.values():
                self._reqs.pop(r.handle, None)  # never sent: this server has no such context
                self._report(r, errno.EOPNOTSUPP, "the NBD server has no base:allocation now")
                continue
            if r.command >= _CACHE and self._unsupported(r):
                continue
            if self._inflight == 0:
                self._progress = self._now
            r.sent = True
            r.attempts += 1
            self._inflight += 1
            self.stats.resends += r.attempts > 1
            self._out.append(self._request_header(r.command, r.flags, r.handle, r.offset, r.length))
            if r.payload is not None and r.length:
                self._out.append(r.payload)

    def _unsupported(self, r: _Req) -> bool:
        """Answer, without sending it, a CACHE or FAST_ZERO the server of this connection
        does not advertise (it may differ from the first one's after a reconnect): a cache
        is done (a hint), a fast zero refused with EOPNOTSUPP."""
        flags = self.export.flags if self.export is not None else TransmissionFlags(0)
        if r.command == Command.CACHE and not flags & TransmissionFlags.SEND_CACHE:
            answer, message = 0, ""
        elif (
            r.command == Command.WRITE_ZEROES
            and r.flags & CommandFlags.FAST_ZERO
            and not flags & TransmissionFlags.SEND_FAST_ZERO
        ):
            answer, message = errno.EOPNOTSUPP, "the NBD server does not offer SEND_FAST_ZERO"
        else:
            return False
        self._reqs.pop(r.handle, None)
        self.stats.completed += answer == 0
        self.stats.errors += answer != 0
        self._report(r, answer, message)
        return True

    # ---- output and time ---------------------------------------------------------
    def data_to_send(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    def take_jobs(self) -> list[Job]:
        """Nothing runs off the loop here (no checksums or ciphers on NBD)."""
        return []

    def job_done(self, job: Job, now: float) -> None:
        raise ValueError("the NBD client core never hands out jobs")

    def take_handed(self) -> list[Callable[[], None]]:
        """No send buffer of this core outlives ``data_to_send``'s caller: nothing to run."""
        return []

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def _oldest(self) -> _Req | None:
        while self._order and self._order[0].reported:
            self._order.popleft()
        return self._order[0] if self._order else None

    def get_timer(self) -> float | None:
        cfg = self.config
        times = [] if self._hs_deadline is None else [self._hs_deadline]
        if self.ready and not self._dead and self._inflight:
            times.append(self._progress + cfg.resend_timeout)
        oldest = self._oldest()
        if oldest is not None:
            times.append(oldest.submitted + (cfg.resends + 1) * cfg.resend_timeout)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._now = now
        cfg = self.config
        if self._hs_deadline is not None and now >= self._hs_deadline and not self._dead:
            self._die(f"no handshake answer within {cfg.handshake_timeout:g} s")
        stalled = self._inflight and now >= self._progress + cfg.resend_timeout
        if self.ready and not self._dead and stalled:
            self.stats.timeouts += 1
            self._die(
                f"no reply for {cfg.resend_timeout:g} s (--resend-timeout) with "
                f"{self._inflight} request(s) in flight"
            )
        budget = (cfg.resends + 1) * cfg.resend_timeout
        while (r := self._oldest()) is not None and now >= r.submitted + budget:
            how = f"sent {r.attempts} time(s)" if r.attempts else "never sent: unreachable"
            self._fail(
                r,
                f"no reply within {now - r.submitted:.1f} s ((--resends {cfg.resends} + 1) "
                f"x --resend-timeout {cfg.resend_timeout:g}; {how})",
            )

    def _fail(self, r: _Req, message: str) -> None:
        self.stats.failed += 1
        self._report(r, errno.EIO, message, timed_out=True)
        if not r.sent:
            self._reqs.pop(r.handle, None)
        elif r is self._current:
            self._rx.drop_target()  # the rest of its data is dropped, not written into the buffer
        r.into = r.payload = None

    def _report(
        self,
        r: _Req,
        error: int,
        message: str,
        timed_out: bool = False,
        extents: tuple[Extent, ...] = (),
    ) -> None:
        r.reported = True
        self._events.append(
            Completed(r.handle, error, message, max(r.attempts, 1), timed_out, extents)
        )

    def _die(self, reason: str, violation: bool = False) -> None:
        if not self._dead:
            self._dead = True
            self._rx.stop()  # nothing after a protocol error is parsed
            self._hs_deadline = None
            self.stats.violations += violation
            self._events.append(ServerViolation(reason) if violation else ConnectionDead(reason))

    def _violation(self, message: str) -> None:
        self._die(f"protocol error from the NBD server: {message}", violation=True)

    # ---- receiving -------------------------------------------------------------------
    @staticmethod
    def _new_reader() -> ChunkReader:
        """The receive buffer every core uses, fresh for each connection (the server
        speaks first: its greeting is expected by ``connection_made``)."""
        return ChunkReader(_unexpected, staging_size=STAGE_SIZE, direct_min=DIRECT_THRESHOLD)

    def get_buffer(self) -> memoryview:
        """A non-empty writable buffer for the next bytes (a slice of a read buffer, often)."""
        if self._dead:
            self._rx.stop()  # never into a caller's buffer once the connection is given up
        return self._rx.get_buffer()

    def buffer_updated(self, nbytes: int, now: float) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer()``."""
        self._now = self._progress = now
        if nbytes <= 0 or self._dead:
            return
        self._rx.buffer_updated(nbytes)
        self._send_pending()

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes by copying them into the buffers ``get_buffer()`` hands out."""
        mv = memoryview(data).cast("B")
        while mv.nbytes and not self._dead:
            buf = self.get_buffer()
            n = min(buf.nbytes, mv.nbytes)
            buf[:n] = mv[:n]
            self.buffer_updated(n, now)
            mv = mv[n:]

    def _expect(self, n: int, handler: Callable[[memoryview], None]) -> None:
        if n:
            self._rx.expect(n, then=handler)
        else:
            handler(memoryview(b""))

    def _expect_data(self, sink: memoryview | None, n: int, done: Callable[[], None]) -> None:
        """``n`` bytes into ``sink``, or dropped when it is None; then ``done``."""
        if n == 0:
            done()
        elif sink is None:
            self._rx.skip(n, done)
        else:
            self._rx.expect(n, sink, lambda _view: done())

    # ---- replies -----------------------------------------------------------------------
    def _expect_header(self) -> None:
        self._current = None
        self._expect(4, self._on_magic)

    def _on_magic(self, v: memoryview) -> None:
        (magic,) = wire.U32.unpack(v)
        if magic == SIMPLE_REPLY_MAGIC:
            self._expect(_SIMPLE_REST.size, self._on_simple)
        elif magic == STRUCTURED_REPLY_MAGIC and self._structured:
            self._expect(_CHUNK_REST.size, self._on_chunk)
        else:
            self._violation(f"bad reply magic 0x{magic:08x}")

    def _lookup(self, handle: int) -> _Req | None:
        r = self._reqs.get(handle)
        if r is None or not r.sent:
            self._violation(f"a reply for handle {handle:#x}, which has no request in flight")
            return None
        return r

    def _on_simple(self, v: memoryview) -> None:
        err, handle = _SIMPLE_REST.unpack(v)
        r = self._lookup(handle)
        if r is None:
            return
        if r.in_reply:
            return self._violation(f"a simple reply inside the structured reply to {handle:#x}")
        if r.command == Command.BLOCK_STATUS and not err:
            return self._violation(f"a simple reply without error to BLOCK_STATUS {handle:#x}")
        if err or r.command != Command.READ:
            return self._finish(r, err, "")
        self._current = r
        self._expect_data(r.into, r.length, lambda: self._finish(r, 0, ""))

    def _on_chunk(self, v: memoryview) -> None:
        flags, ctype, handle, length = _CHUNK_REST.unpack(v)
        r = self._lookup(handle)
        if r is None:
            return
        r.in_reply = True
        done = bool(flags & _DONE)
        read = r.command == Command.READ
        if ctype == ReplyType.NONE:
            if length or not done:
                return self._violation(f"a NONE chunk of {length} bytes, DONE {done}")
            return self._end_chunk(r, True)
        if ctype == ReplyType.OFFSET_DATA and read and length > 8:
            return self._expect(8, lambda d: self._on_data(r, _U64.unpack(d)[0], length - 8, done))
        if ctype == ReplyType.OFFSET_HOLE and read and length == _HOLE.size:
            return self._expect(_HOLE.size, lambda d: self._on_hole(r, d, done))
        if ctype == ReplyType.BLOCK_STATUS and r.command == Command.BLOCK_STATUS:
            if not 12 <= length <= MAX_STATUS_CHUNK:
                return self._violation(f"a block status chunk of {length} bytes")
            payload = memoryview(bytearray(length))
            return self._expect_data(payload, length, lambda: self._on_status(r, payload, done))
        if ctype & _ERROR_BIT and 6 <= length <= MAX_CHUNK_META:
            return self._expect(length, lambda d: self._on_error_chunk(r, ctype, bytes(d), done))
        self._violation(f"chunk type {ctype} of {length} bytes for {Command(r.command).name}")

    def _claim(self, r: _Req, offset: int, n: int) -> int | None:
        """The position of [offset, offset+n) in the request; None (a violation) if outside
        it or overlapping an earlier chunk."""
        rel = offset - r.offset
        i = bisect_left(r.covered, (rel, 0))
        overlaps = (i > 0 and r.covered[i - 1][1] > rel) or (
            i < len(r.covered) and r.covered[i][0] < rel + n
        )
        if rel < 0 or rel + n > r.length or overlaps:
            self._violation(
                f"a chunk [{offset}, +{n}) outside or overlapping the request "
                f"[{r.offset}, +{r.length}) of handle {r.handle:#x}"
            )
            return None
        r.covered.insert(i, (rel, rel + n))
        return rel

    def _on_data(self, r: _Req, offset: int, n: int, done: bool) -> None:
        rel = self._claim(r, offset, n)
        if rel is not None:
            self._current = r
            sink = None if r.into is None else r.into[rel : rel + n]
            self._expect_data(sink, n, lambda: self._end_chunk(r, done))

    def _on_hole(self, r: _Req, v: memoryview, done: bool) -> None:
        offset, n = _HOLE.unpack(v)
        rel = self._claim(r, offset, n or r.length + 1)  # an empty hole is a violation too
        if rel is None:
            return
        pos = 0
        while pos < n and r.into is not None:
            step = min(n - pos, len(_ZEROES))
            r.into[rel + pos : rel + pos + step] = _ZEROES[:step]
            pos += step
        self._end_chunk(r, done)

    def _on_status(self, r: _Req, payload: memoryview, done: bool) -> None:
        req_one = bool(r.flags & CommandFlags.REQ_ONE)
        parsed = parse_block_status(payload, r.offset, r.length, req_one)
        if isinstance(parsed, str):
            return self._violation(f"{parsed} (handle {r.handle:#x})")
        ident, extents = parsed
        if ident not in self._meta or ident in r.statuses:
            return self._violation(f"block status for context id {ident}, unknown or repeated")
        r.statuses[ident] = extents
        self._end_chunk(r, done)

    def _on_error_chunk(self, r: _Req, ctype: int, data: bytes, done: bool) -> None:
        err, mlen = struct.unpack_from(">IH", data)
        rest = len(data) - 6 - mlen
        if err == 0 or rest < 0 or (ctype == ReplyType.ERROR_OFFSET and rest != 8):
            return self._violation(f"error chunk type {ctype:#x}: error {err}, message {mlen}")
        if ctype == ReplyType.ERROR_OFFSET:
            (offset,) = _U64.unpack_from(data, 6 + mlen)
            if not r.offset <= offset < r.offset + max(r.length, 1):
                return self._violation(f"an error offset {offset} outside the request")
        if not r.error:
            r.error, r.message = err, data[6 : 6 + mlen].decode("utf-8", "replace")
        self._end_chunk(r, done)

    def _end_chunk(self, r: _Req, done: bool) -> None:
        if not done:
            return self._expect_header()
        covered = sum(b - a for a, b in r.covered)
        if not r.error and r.command == Command.READ and covered != r.length:
            return self._violation(f"success after {covered} of {r.length} bytes were sent")
        if not r.error and r.command == Command.BLOCK_STATUS and len(r.statuses) != len(self._meta):
            return self._violation(f"success with status for {len(r.statuses)} of the contexts")
        self._finish(r, r.error, r.message)

    def _finish(self, r: _Req, err: int, message: str) -> None:
        """The final reply to ``r``: report it (unless already failed) and carry on."""
        self._expect_header()
        if err == NbdError.ESHUTDOWN:  # not an answer: resend after the server is back
            return self._die("the server is shutting down (ESHUTDOWN)")
        del self._reqs[r.handle]
        self._inflight -= 1
        r.sent = False
        if r.reported:
            return
        code = _NBD_ERRNO.get(err, errno.EIO) if err else 0
        if err:
            self.stats.errors += 1
            name = errno.errorcode.get(code, str(code))
            message = f"the NBD server answered {name}" + (f": {message}" if message else "")
        else:
            self.stats.completed += 1
        ident = next((i for i, n in self._meta.items() if n == BASE_ALLOCATION), None)
        extents = () if err or ident is None else tuple(r.statuses.get(ident, ()))
        self._report(r, code, message, extents=extents)
        r.payload = r.into = None
