"""A sans-IO NBD server connection: bytes in, events and bytes out.

In the style of h11 and aioquic, :class:`NbdServerConnection` never touches a
socket, a loop or a clock, so every byte sequence (and every chunking of it) can
be tested directly. One instance serves one client connection:

- receiving: either ``receive_data(data)`` (tests, fuzzing) or the zero-copy pair
  ``get_buffer()`` / ``buffer_updated(n)``: the shell ``recv_into()``s the buffer
  it is given. Headers and small payloads land in a staging buffer; while a large
  WRITE payload is pending, ``get_buffer()`` returns (the rest of) the payload
  buffer itself, so its bytes are received in place and never copied.
- events, via ``next_event()``: :class:`ExportChosen`, :class:`Request`,
  :class:`Disconnect`, :class:`ProtocolViolation` (then close the connection).
  Requests are validated first: a bad offset, length, flag or command, or a write
  to a read-only export, is answered by the core itself and never becomes an
  event. Lengths are checked against the caps before anything is allocated. A
  refused WRITE's payload is skipped, and its error reply is queued only once the
  last payload byte arrived: the client may still be sending it, and a reply to a
  request it has not finished sending is one it cannot match (libnbd hangs up).
- sending: ``reply_read`` / ``reply_ok`` / ``reply_block_status`` / ``reply_error``
  for each request, in any order; ``data_to_send()`` returns the queued buffers
  (headers as ``bytes``, read data as the caller's memoryview: keep it alive until it
  is sent). A block status reply is whatever the shell's device answered made valid
  here (see :func:`dst.nbd.meta.block_status_descriptors`).
- metadata contexts: an export offers names (``ExportInfo.contexts``); the client
  selects some with NBD_OPT_SET_META_CONTEXT after structured replies; ``contexts``
  holds the selection for the transmission phase (context id ``i + 1`` is the
  ``i``-th), and BLOCK_STATUS without one is refused.

There are no timers: NBD has none, so unlike the DST core this one takes no ``now``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dst.buffers import BufferPool, PooledBuffer
from dst.device import Extent, IoFlags
from dst.nbd import wire
from dst.nbd.constants import (
    IHAVEOPT,
    REQUEST_MAGIC,
    ClientFlags,
    Command,
    CommandFlags,
    HandshakeFlags,
    NbdError,
    TransmissionFlags,
    nbd_error,
)
from dst.nbd.events import Disconnect, Event, ExportChosen, ProtocolViolation, Request
from dst.nbd.export import ExportInfo
from dst.nbd.meta import block_status_descriptors
from dst.nbd.options import MAX_OPTION_LENGTH, Negotiation, OptionOutcome
from dst.proto.jobs import Job
from dst.proto.reader import ChunkReader

STAGE_SIZE = 64 << 10  # staging buffer for headers and small payloads
DIRECT_THRESHOLD = 16 << 10  # a pending payload at least this big is received in place

_ALLOWED_FLAGS: dict[int, int] = {
    Command.READ: CommandFlags.FUA | CommandFlags.DF,
    Command.WRITE: CommandFlags.FUA,
    Command.FLUSH: CommandFlags.FUA,
    Command.TRIM: CommandFlags.FUA,
    Command.WRITE_ZEROES: CommandFlags.FUA | CommandFlags.NO_HOLE | CommandFlags.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlags.FUA | CommandFlags.REQ_ONE,
    Command.CACHE: CommandFlags.FUA,  # valid on every command (the spec), meaningless here
}


@dataclass(slots=True)
class _Pending:
    """A request waiting for its reply (one per request: not frozen, which costs more)."""

    command: Command
    offset: int
    length: int
    req_one: bool = False


# Built once: an Enum or Flag call costs about a microsecond, per request that adds up.
_NO_FLAGS = IoFlags.NONE
_FUA = IoFlags.FUA


class NbdServerConnection:
    """The server side of one NBD connection (fixed newstyle handshake only)."""

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        default_export: str = "default",
        pool: BufferPool | None = None,
    ) -> None:
        if default_export not in exports:
            raise ValueError(f"default export {default_export!r} is not among the exports")
        self._nego = Negotiation(exports, default_export)
        self.pool = pool if pool is not None else BufferPool()
        self.export: ExportInfo | None = None
        self.export_name: str | None = None
        self.contexts: tuple[str, ...] = ()  # selected metadata contexts; id i + 1 is the i-th
        self.requests_rejected = 0
        self._events: deque[Event] = deque()
        self._out: list[bytes | memoryview] = [
            wire.greeting(HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES)
        ]
        # the receive buffer every core uses: headers staged, payloads received in place
        self._rx = ChunkReader(
            self._on_header, staging_size=STAGE_SIZE, direct_min=DIRECT_THRESHOLD
        )
        self._header = wire.CLIENT_FLAGS.size  # size of the next fixed-size message
        self._rx.expect(self._header)
        self._body: PooledBuffer | None = None  # option data or WRITE payload being filled
        self._body_option = 0  # the option whose data is in _body (when not a WRITE payload)
        self._body_request: tuple[int, IoFlags, int] | None = None  # handle, flags, offset
        self._discard_reply: bytes | None = None  # the refusal sent once that payload is skipped
        self._inflight: dict[int, list[_Pending]] = {}
        self._handed: list[Callable[[], None]] = []  # releases of reply data handed out
        self._recv_closed = False
        self._send_closed = False
        # fixed for the connection once the export is chosen (see _cache_limits)
        self._advertised = 0
        self._fast: tuple[int, int, int, int, int] | None = None

    # ---- state -----------------------------------------------------------
    @property
    def structured(self) -> bool:
        """Whether structured replies were negotiated."""
        return self._nego.structured

    @property
    def in_transmission(self) -> bool:
        return self.export is not None

    @property
    def inflight(self) -> int:
        """Requests handed out as events and not answered yet."""
        return sum(len(v) for v in self._inflight.values())

    def start_shutdown(self) -> None:
        """From now on, options get NBD_REP_ERR_SHUTDOWN and requests ESHUTDOWN."""
        self._nego.shutting_down = True

    # ---- lifecycle (the verbs every core has; this one keeps no deadline) ----------
    def connection_made(self, now: float) -> None:
        """The transport is up; the greeting is already queued."""

    def get_timer(self) -> float | None:
        """The NBD server waits for its client without a deadline: never a timer."""
        return None

    def handle_timer(self, now: float) -> None:
        """Nothing is ever due (see :meth:`get_timer`)."""

    def take_jobs(self) -> list[Job]:
        """Nothing runs off the loop here (no checksums or ciphers on NBD)."""
        return []

    def job_done(self, job: Job, now: float) -> None:
        raise ValueError("the NBD server core never hands out jobs")

    # ---- receiving -------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """A non-empty writable buffer for the next bytes from the peer (a WRITE payload's
        own buffer when one is pending)."""
        return self._rx.get_buffer()

    def buffer_updated(self, nbytes: int, now: float) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer()``."""
        if self._recv_closed or nbytes <= 0:
            return
        self._rx.buffer_updated(nbytes)

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes by copying them into the buffers ``get_buffer()`` hands out."""
        mv = memoryview(data).cast("B")
        while mv.nbytes and not self._recv_closed:
            buf = self.get_buffer()
            n = min(buf.nbytes, mv.nbytes)
            buf[:n] = mv[:n]
            self.buffer_updated(n, now)
            mv = mv[n:]

    def connection_lost(self, now: float) -> None:
        """The transport is gone: give back every buffer still held, answer nothing more."""
        self._close_recv()
        self._send_closed = True
        self._discard_reply = None
        self._release_body()
        self._inflight.clear()
        self._out.clear()  # the owner runs take_handed(): those buffers go back at once
        for ev in self._events:
            if isinstance(ev, Request) and ev.payload is not None:
                ev.payload.release()
        self._events = deque(e for e in self._events if not isinstance(e, Request))

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def _on_header(self, header: memoryview) -> None:
        """The next fixed-size message: a request once an export is chosen, else the
        client flags or an option header."""
        if self.export is not None:
            self._on_request(header)
        elif len(header) == wire.CLIENT_FLAGS.size:
            self._on_client_flags(header)
        else:
            self._on_option_header(header)

    def _next_header(self, size: int) -> None:
        self._header = size
        if not self._recv_closed:
            self._rx.expect(size)

    def _close_recv(self) -> None:
        """Read nothing more from this connection."""
        self._recv_closed = True
        self._rx.stop()

    def _discard_then(self, length: int, reply: bytes | None) -> None:
        """Skip ``length`` bytes the client sends (an unwanted payload or option data);
        ``reply`` goes out once they are consumed."""
        self._discard_reply = reply
        self._rx.skip(length, self._discarded)

    def _discarded(self) -> None:
        if self._discard_reply is not None:
            self._out.append(self._discard_reply)
            self._discard_reply = None
        self._next_header(self._header)

    def _expect_body(self, length: int) -> None:
        """Receive the next ``length`` bytes into a pool buffer (length already capped)."""
        self._body = body = self.pool.get(length)
        self._rx.expect(length, body.view, self._body_received)

    def _body_received(self, _view: memoryview) -> None:
        self._finish_body()
        self._next_header(self._header)

    def _finish_body(self) -> None:
        body, self._body = self._body, None
        assert body is not None
        if self._body_request is not None:
            handle, flags, offset = self._body_request
            self._body_request = None
            self._events.append(Request(handle, Command.WRITE, flags, offset, len(body.view), body))
            return
        try:
            data = bytes(body.view)
        finally:
            body.release()
        self._on_option(self._body_option, data)

    def _release_body(self) -> None:
        body, self._body = self._body, None
        self._body_request = None
        if body is not None:
            body.release()

    def _violation(self, message: str) -> None:
        self._close_recv()
        self._release_body()
        self._events.append(ProtocolViolation(message))

    # ---- handshake -------------------------------------------------------
    def _on_client_flags(self, header: memoryview) -> None:
        (flags,) = wire.CLIENT_FLAGS.unpack(header)
        known = int(ClientFlags.FIXED_NEWSTYLE | ClientFlags.NO_ZEROES)
        if flags & ~known:
            self._violation(f"unknown client flags 0x{flags:08x} (the server knows 0x{known:x})")
            return
        self._nego.no_zeroes = bool(flags & ClientFlags.NO_ZEROES)
        self._next_header(wire.OPTION_HEADER.size)

    def _on_option_header(self, header: memoryview) -> None:
        magic, option, length = wire.OPTION_HEADER.unpack(header)
        if magic != IHAVEOPT:
            self._violation(f"bad option magic 0x{magic:016x} (expected IHAVEOPT)")
            return
        if length > MAX_OPTION_LENGTH:
            self._discard_then(length, None)
            self._apply(self._nego.too_big(option, length))
        elif length:
            self._body_option = option
            self._expect_body(length)
        else:
            self._on_option(option, b"")

    def _on_option(self, option: int, data: bytes) -> None:
        self._apply(self._nego.handle(option, data))

    def _apply(self, outcome: OptionOutcome) -> None:
        self._out.extend(outcome.replies)
        if outcome.violation is not None:
            self._violation(outcome.violation)
        elif outcome.abort:
            self._close_recv()
            self._events.append(Disconnect("the client aborted the handshake"))
        elif outcome.chosen is not None:
            self.export_name = outcome.chosen
            self.export = self._nego.exports[outcome.chosen]
            self.contexts = self._nego.contexts_for(outcome.chosen)
            self._next_header(wire.REQUEST.size)
            self._cache_limits(self.export)
            self._events.append(
                ExportChosen(outcome.chosen, self.export, self.structured, self.contexts)
            )

    # ---- transmission ----------------------------------------------------
    def _cache_limits(self, export: ExportInfo) -> None:
        """What every request is checked against, computed once for the connection."""
        self._advertised = advertised = int(export.transmission_flags(self.structured))
        allowed = []
        for command in (Command.READ, Command.WRITE):
            a = int(_ALLOWED_FLAGS[command])
            if not advertised & TransmissionFlags.SEND_FUA:
                a &= ~int(CommandFlags.FUA)
            if not advertised & TransmissionFlags.SEND_DF:
                a &= ~int(CommandFlags.DF)
            allowed.append(a)
        # READ's allowed flags, WRITE's (-1: refused, read-only), max_block, size, min_block
        write_ok = -1 if export.read_only else allowed[1]
        self._fast = (allowed[0], write_ok, export.max_block, export.size, export.min_block)

    def _on_request(self, header: memoryview) -> None:
        magic, cflags, ctype, handle, offset, length = wire.REQUEST.unpack(header)
        fast = self._fast
        if ctype <= 1 and fast is not None and magic == REQUEST_MAGIC and 0 < length <= fast[2]:
            # READ and WRITE that pass every check of _validate, with plain ints
            ok_flags = fast[ctype]
            if (
                ok_flags >= 0
                and not cflags & ~ok_flags
                and offset + length <= fast[3]
                and not (offset | length) % fast[4]
                and not self._nego.shutting_down
            ):
                if ctype == 0:
                    self._inflight.setdefault(handle, []).append(
                        _Pending(Command.READ, offset, length)
                    )
                    self._events.append(Request(handle, Command.READ, _NO_FLAGS, offset, length))
                else:
                    self._inflight.setdefault(handle, []).append(
                        _Pending(Command.WRITE, offset, length)
                    )
                    self._body_request = (handle, _FUA if cflags & 1 else _NO_FLAGS, offset)
                    self._expect_body(length)
                return
        if magic != REQUEST_MAGIC:
            self._violation(f"bad request magic 0x{magic:08x} (expected 0x{REQUEST_MAGIC:08x})")
            return
        if ctype == Command.DISC:
            self._close_recv()
            self._events.append(Disconnect("the client sent NBD_CMD_DISC"))
            return
        rejection = self._validate(ctype, cflags, offset, length)
        if rejection is not None:
            self.requests_rejected += 1
            code, message = rejection
            reply = self._error_reply(handle, code, message)
            if ctype == Command.WRITE and length:
                # The client may still be sending the payload: a reply now would come before
                # the request is complete on its side (libnbd then drops the connection), so
                # it goes out once the payload has been skipped.
                self._discard_then(length, reply)
            else:
                self._out.append(reply)
            return
        command = Command(ctype)
        flags = IoFlags.NONE
        if cflags & CommandFlags.FUA and command != Command.READ:  # FUA on a read means nothing
            flags |= IoFlags.FUA
        if cflags & CommandFlags.NO_HOLE:
            flags |= IoFlags.NO_HOLE
        if cflags & CommandFlags.FAST_ZERO:
            flags |= IoFlags.FAST_ZERO
        if length == 0 and command != Command.FLUSH:  # nothing to do; answer at once
            if command == Command.READ and self.structured:
                self._out.append(wire.structured_done(handle))
            else:
                self._out.append(wire.simple_reply(handle))
            return
        if command == Command.FLUSH:
            offset = length = 0
        req_one = bool(cflags & CommandFlags.REQ_ONE)
        self._inflight.setdefault(handle, []).append(_Pending(command, offset, length, req_one))
        if command == Command.WRITE:
            self._body_request = (handle, flags, offset)
            self._expect_body(length)
        else:
            self._events.append(Request(handle, command, flags, offset, length))

    def _validate(
        self, ctype: int, cflags: int, offset: int, length: int
    ) -> tuple[int, str] | None:
        """``(nbd error, message)`` when the request must be refused, else None."""
        export = self.export
        assert export is not None
        if self._nego.shutting_down:
            return NbdError.ESHUTDOWN, "the server is shutting down"
        if ctype not in _ALLOWED_FLAGS:
            return NbdError.EINVAL, f"command {ctype} is not supported"
        command = Command(ctype)
        name = command.name
        advertised = self._advertised
        allowed = int(_ALLOWED_FLAGS[command])  # an int: ~ on an IntFlag keeps only known bits
        if not advertised & TransmissionFlags.SEND_FUA:
            allowed &= ~int(CommandFlags.FUA)
        if not advertised & TransmissionFlags.SEND_DF:
            allowed &= ~int(CommandFlags.DF)
        if not advertised & TransmissionFlags.SEND_FAST_ZERO:
            allowed &= ~int(CommandFlags.FAST_ZERO)
        if cflags & ~allowed:
            return NbdError.EINVAL, f"flags 0x{cflags:x} are not valid for {name}"
        writes = command in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)
        if writes and export.read_only:
            return NbdError.EPERM, f"{name} refused: the export is read-only"
        if command == Command.FLUSH:
            if not advertised & TransmissionFlags.SEND_FLUSH:
                return NbdError.EINVAL, "FLUSH is not supported by this export"
            return None
        if command == Command.TRIM and not advertised & TransmissionFlags.SEND_TRIM:
            return NbdError.EINVAL, "TRIM is not supported by this export"
        if command == Command.WRITE_ZEROES and not advertised & TransmissionFlags.SEND_WRITE_ZEROES:
            return NbdError.EINVAL, "WRITE_ZEROES is not supported by this export"
        if command == Command.CACHE and not advertised & TransmissionFlags.SEND_CACHE:
            return NbdError.EINVAL, "CACHE is not supported by this export"
        if command == Command.BLOCK_STATUS:
            if not self.contexts:
                return NbdError.EINVAL, (
                    "BLOCK_STATUS needs a metadata context: select base:allocation with "
                    "NBD_OPT_SET_META_CONTEXT (after NBD_OPT_STRUCTURED_REPLY)"
                )
            if length == 0:
                return NbdError.EINVAL, "BLOCK_STATUS of 0 bytes: ask for at least one byte"
        if command in (Command.READ, Command.WRITE) and length > export.max_block:
            return NbdError.EINVAL, (
                f"{name} of {length} bytes exceeds the maximum block size {export.max_block}"
            )
        if offset + length > export.size:
            code = (
                NbdError.ENOSPC
                if command in (Command.WRITE, Command.WRITE_ZEROES)
                else NbdError.EINVAL
            )
            return code, (
                f"{name} [{offset}, {offset + length}) is beyond the end of the "
                f"{export.size}-byte export"
            )
        if (offset | length) % export.min_block:
            return NbdError.EINVAL, (
                f"{name} at {offset} of {length} bytes is not aligned to {export.min_block}"
            )
        return None

    # ---- sending ---------------------------------------------------------
    def data_to_send(self) -> list[bytes | memoryview]:
        """Everything queued for the peer, in order; the queue is emptied."""
        out, self._out = self._out, []
        return out

    def take_handed(self) -> list[Callable[[], None]]:
        """Releases of reply data handed out by ``data_to_send`` (``reply_read``'s): run
        each once the socket has sent those bytes, or at once if the connection is gone."""
        handed, self._handed = self._handed, []
        return handed

    def _pop(self, handle: int, kind: str = "error", length: int = 0) -> _Pending | None:
        """The oldest unanswered request with ``handle``; checks that a ``kind`` of reply
        ("read", "ok", "status" or "error") fits it."""
        if self._send_closed:
            return None
        pending = self._inflight.get(handle)
        if not pending:
            raise ValueError(f"no request with handle {handle:#x} is waiting for a reply")
        entry = pending[0]
        command = entry.command
        if kind == "read" and (command != Command.READ or length != entry.length):
            raise ValueError(f"reply_read with {length} bytes for {command.name} of {entry.length}")
        if kind == "ok" and command in (Command.READ, Command.BLOCK_STATUS):
            raise ValueError(f"a {command.name} is answered with its data or reply_error")
        if kind == "status" and command != Command.BLOCK_STATUS:
            raise ValueError(f"reply_block_status for {command.name}")
        pending.pop(0)
        if not pending:
            del self._inflight[handle]
        return entry

    def reply_read(
        self, handle: int, data: memoryview, release: Callable[[], None] | None = None
    ) -> None:
        """Answer a READ with its data (one OFFSET_DATA chunk when structured); ``release``
        gives the data's buffer back, through ``take_handed`` once it was sent (at once if
        the reply is not sent: the connection is gone)."""
        entry = self._pop(handle, "read", data.nbytes)
        if entry is None:
            if release is not None:
                release()
            return
        if release is not None:
            self._handed.append(release)
        if self.structured:
            self._out.append(wire.offset_data_header(handle, entry.offset, data.nbytes))
        else:
            self._out.append(wire.simple_reply(handle))
        self._out.append(data)

    def reply_ok(self, handle: int) -> None:
        """Answer a request without data with success."""
        if self._pop(handle, "ok") is None:
            return
        self._out.append(wire.simple_reply(handle))

    def reply_block_status(self, handle: int, statuses: Mapping[str, Sequence[Extent]]) -> None:
        """Answer a BLOCK_STATUS with the extents of each selected context (by name), from
        the request's offset on; one chunk per context, the last with DONE. Extents are
        clipped, aligned and merged here, a context without any is answered as data (always
        true), and REQ_ONE leaves one descriptor."""
        entry = self._pop(handle, "status")
        if entry is None:
            return
        export = self.export
        assert export is not None
        last = len(self.contexts)
        for i, name in enumerate(self.contexts, start=1):
            descriptors = block_status_descriptors(
                entry.offset,
                entry.length,
                statuses.get(name, ()),
                min_block=export.min_block,
                req_one=entry.req_one,
            )
            self._out.append(wire.block_status_chunk(handle, i, descriptors, i == last))

    def reply_error(self, handle: int, errno_value: int, message: str) -> None:
        """Answer with an error; the errno value is mapped to the NBD error set."""
        if self._pop(handle, "error") is None:
            return
        code = nbd_error(errno_value)
        self._out.append(self._error_reply(handle, code, message))

    def _error_reply(self, handle: int, code: int, message: str) -> bytes:
        """A structured ERROR chunk with the message, or a simple reply (never with data)."""
        if self.structured:
            return wire.error_chunk(handle, code, message)
        return wire.simple_reply(handle, code)
