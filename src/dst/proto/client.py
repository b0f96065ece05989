"""Client side of the DST node protocol: handshake and the transaction engine.

One :class:`ClientCore` lives for a whole client session, across connections.
Every request is a transaction with a 64-bit id unique in the session.  Each
attempt waits ``resend_timeout`` for its ack; after ``resends + 1`` expiries the
transaction fails with EIO.  The clock runs while disconnected, so a transaction
ends at the latest ``(resends + 1) * resend_timeout`` after submission.  A broken
connection only means "send again after the next handshake".
"""

from __future__ import annotations

import heapq
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from dst.buffers import BufferPool, PooledBuffer
from dst.crypto.aead import Opener, Sealer, derive_session_keys, get_cipher
from dst.crypto.auth import Transcript, proof, verify_proof
from dst.crypto.checksums import Checksum, get_checksum
from dst.device import Extent
from dst.errors import ProtocolError
from dst.proto.channel import Buf, Channel
from dst.proto.events import (
    ChecksumMismatch,
    Completed,
    ConnectionDead,
    Event,
    Ready,
    Refused,
    Resent,
)
from dst.proto.handshake import Challenge, Hello, Proof, Refuse, Welcome
from dst.proto.jobs import InOrder, Job
from dst.proto.wire import (
    EXTENT,
    HS_HEADER,
    HS_MAGIC,
    MAX_EXTENTS,
    MAX_HANDSHAKE_BODY,
    PERMANENT_REFUSALS,
    REP_HEADER,
    REP_MAGIC,
    REQ_HEADER,
    REQ_MAGIC,
    Command,
    MsgType,
    Refusal,
    ReqFlags,
    Status,
    pack_handshake,
    status_name,
    unpack_extents,
)

_READ = int(Command.READ)  # plain ints on the per-request path
_EXTENTS = int(Command.EXTENTS)
_CACHE = int(Command.CACHE)
_FAST_ZERO = int(ReqFlags.FAST_ZERO)


@dataclass
class ClientConfig:
    """Everything the client side negotiates and the transaction knobs (live-tunable)."""

    export: str = "default"
    client_id: str = "client"
    session: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    read_only: bool = False
    ciphers: tuple[str, ...] = ("aes-256-gcm", "chacha20-poly1305", "none")
    checksums: tuple[str, ...] = ("crc32c", "xxh3", "blake2b", "sha256", "none")
    key: bytes | None = None
    max_request: int = 32 << 20
    queue_depth: int = 128
    resends: int = 10
    resend_timeout: float = 5.0
    ping_interval: float = 5.0
    ping_timeout: float = 2.0
    handshake_timeout: float = 10.0
    takeover: bool = False  # fence a live session of the same client id instead of being refused
    offload: bool = False  # large payload crypto/checksums as Jobs for a worker pool


class State(Enum):
    DISCONNECTED = "disconnected"
    HANDSHAKE = "handshake"
    READY = "ready"
    CLOSED = "closed"


@dataclass(eq=False, slots=True)
class Txn:
    id: int
    command: int
    offset: int
    length: int
    flags: int
    payload: memoryview | None
    into: memoryview | None
    submitted: float
    deadline: float
    attempt: int = 0  # sends so far (the wire's attempt number)
    expiries: int = 0  # timeouts so far
    sent: bool = False  # sent on the current connection and not answered there


@dataclass
class ClientStats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    errors: int = 0
    resends: int = 0
    timeouts: int = 0
    checksum_errors: int = 0
    late_replies: int = 0
    pings: int = 0
    probes: int = 0  # probe pings of the export node answered
    connections: int = 0


class ClientCore:
    """Sans-IO client: feed it bytes and time, take bytes, events and a timer."""

    def __init__(self, config: ClientConfig, pool: BufferPool | None = None) -> None:
        self.config = config
        self.pool = pool or BufferPool()
        self.state = State.DISCONNECTED
        self.generation = 0
        self.welcome: Welcome | None = None
        self.first_welcome: Welcome | None = None
        self.stats = ClientStats()
        self._events: deque[Event] = deque()
        self._next_id = 1
        self._txns: dict[int, Txn] = {}
        self._unsent: deque[Txn] = deque()  # to send, oldest first (may hold stale entries)
        self._heap: list[tuple[float, int, int]] = []
        self._in_flight_sent = 0
        self._checksum: Checksum = get_checksum("none")
        self._digest_size = 0
        self._rx_state = "hs_header"
        self._rep: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self._rep_head = b""
        self._rep_buf: PooledBuffer | None = None
        self._rep_view: memoryview | None = None
        self._order = InOrder()
        self._verifying: set[int] = set()
        self._channel = Channel(self._on_chunk, max_record=1)
        self._hs_deadline: float | None = None
        self._last_rx = 0.0
        self._ping: Txn | None = None
        self._dead = False
        self._closing_txn: int | None = None
        # what this connection's export node lacks, answered here instead (_answer_here)
        self._unhonoured = _FAST_ZERO
        self._cache_offered = False

    # ---- connection lifecycle -------------------------------------------
    def connection_made(self, now: float) -> None:
        """A new transport is up: start the handshake with a higher generation."""
        self.generation += 1
        self.stats.connections += 1
        self.state = State.HANDSHAKE
        self._dead = False
        self._channel = Channel(self._on_chunk, max_record=self.config.max_request + 4096)
        self._channel.frames.grow(256 << 10)
        self._channel.offload = self.config.offload
        self._order = InOrder()
        self._verifying = set()
        self._rx_state = "hs_header"
        self._channel.frames.expect(HS_HEADER.size)
        self._hs_deadline = now + self.config.handshake_timeout
        self._last_rx = now
        self._ping = None
        self._nonce = secrets.token_bytes(32)
        self._transcript = Transcript()
        self._challenged = False
        cfg = self.config
        hello = Hello(
            export=cfg.export,
            client_id=cfg.client_id,
            session=cfg.session,
            generation=self.generation,
            read_only=cfg.read_only,
            ciphers=cfg.ciphers if cfg.key is not None else ("none",),
            checksums=cfg.checksums,
            max_request=cfg.max_request,
            queue_depth=cfg.queue_depth,
            nonce=self._nonce,
            auth=cfg.key is not None,
            # asked only until the session is first welcomed: a reconnect of a session the
            # export node knows is never subject to the one-writer rule, and one it forgot
            # (the node restarted) must not take the export from anyone
            takeover=cfg.takeover and self.first_welcome is None,
            ping_timeout=cfg.ping_timeout,
        )
        frame = pack_handshake(MsgType.HELLO, hello.encode())
        self._transcript.add(frame)
        self._channel.send([frame])

    def connection_lost(self, now: float) -> None:
        """The transport is gone; unacked transactions wait for the next connection."""
        if self.state == State.CLOSED:
            return
        self.state = State.DISCONNECTED
        self._hs_deadline = None
        self._ping = None
        self._in_flight_sent = 0
        for t in self._txns.values():
            t.sent = False
        self._unsent = deque(self._txns.values())
        self._channel.stop()
        self._channel.discard_output()

    def close(self) -> None:
        """Ask the export node to end the session cleanly (after in-flight work)."""
        if self.state == State.READY:
            self._closing_txn = self._submit(Command.DISCONNECT, 0, 0, 0, None, None, self._last_rx)

    def shutdown(self, status: int = Status.ESHUTDOWN, message: str = "device closed") -> None:
        """Fail everything still pending (the owner is going away)."""
        for t in list(self._txns.values()):
            self._finish(t, status, message)
        self.state = State.CLOSED

    def abandon(self, status: int, message: str) -> int:
        """Fail every pending transaction now and never resend it; stop reading this
        connection (its replies would only be late).  The owner drops the transport, so
        the next connection has a higher generation and the export node finishes or
        drops everything of this one before it serves the next (docs/protocol.md,
        section 5).  Returns how many transactions were given up."""
        txns = [t for t in self._txns.values() if t.id != self._closing_txn]
        for t in txns:
            self._finish(t, status, message)
        if self.state != State.CLOSED and not self._dead:
            self._dead = True
            self._channel.stop()
        return len(txns)

    # ---- receive ----------------------------------------------------------
    def get_buffer(self) -> memoryview:
        return self._channel.get_buffer()

    def buffer_updated(self, nbytes: int, now: float) -> None:
        self._now = now
        self._last_rx = now
        try:
            self._channel.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._die(f"protocol error from the export node: {exc}")

    def receive_data(self, data: Buf, now: float) -> None:
        self._now = now
        self._last_rx = now
        try:
            self._channel.feed(data)
        except ProtocolError as exc:
            self._die(f"protocol error from the export node: {exc}")

    def _die(self, reason: str) -> None:
        if not self._dead:
            self._dead = True
            self._channel.stop()
            self._events.append(ConnectionDead(reason))

    def _on_chunk(self, chunk: memoryview) -> None:
        st = self._rx_state
        if st == "hs_header":
            magic, mtype, _flags, n = HS_HEADER.unpack(chunk)
            if magic != HS_MAGIC:
                raise ProtocolError(
                    f"bad handshake magic {bytes(magic)!r}; is this a DST export node?"
                )
            if n > MAX_HANDSHAKE_BODY:
                raise ProtocolError(f"handshake message of {n} bytes exceeds {MAX_HANDSHAKE_BODY}")
            self._hs_type = mtype
            self._hs_head = bytes(chunk)
            if n == 0:
                self._on_handshake(b"")
            else:
                self._rx_state = "hs_body"
                self._channel.frames.expect(n)
        elif st == "hs_body":
            self._on_handshake(bytes(chunk))
        elif st == "header":
            self._on_reply_header(chunk)
        elif st == "payload":
            if self._digest_size:
                self._rx_state = "trailer"
                self._channel.frames.expect(self._digest_size)
            else:
                self._on_reply_complete(b"")
        elif st == "trailer":
            self._on_reply_complete(bytes(chunk))

    # ---- handshake -------------------------------------------------------
    def _on_handshake(self, body: bytes) -> None:
        mtype = self._hs_type
        frame = self._hs_head + body
        if mtype == MsgType.REFUSE:
            r = Refuse.decode(body)
            self._refused(r.reason, r.message, by_peer=True)
            return
        key = self.config.key
        if mtype == MsgType.CHALLENGE:
            if key is None or self._challenged:
                raise ProtocolError("unexpected CHALLENGE from the export node")
            Challenge.decode(body)
            self._challenged = True
            self._transcript.add(frame)
            p = pack_handshake(
                MsgType.PROOF, Proof(proof(key, "client", self._transcript.digest())).encode()
            )
            self._transcript.add(p)
            self._channel.send([p])
            self._rx_state = "hs_header"
            self._channel.frames.expect(HS_HEADER.size)
            return
        if mtype != MsgType.WELCOME:
            raise ProtocolError(f"unexpected handshake message type {mtype}")
        welcome, covered = Welcome.decode(body)
        if key is not None:
            if not self._challenged:
                self._refuse_peer(
                    Refusal.AUTH_UNEXPECTED,
                    "the export node does not authenticate but this client holds a key; give the "
                    "export node the same --key-file, or drop --key-file on the client",
                )
                return
            self._transcript.add(covered)
            if not verify_proof(key, "server", self._transcript.digest(), welcome.proof):
                self._refuse_peer(
                    Refusal.AUTH_FAILED,
                    "authentication failed: the export node's key differs from this client's key; "
                    "use the same key file on both sides",
                )
                return
        if welcome.cipher not in (self.config.ciphers if key else ("none",)):
            raise ProtocolError(
                f"export node chose cipher {welcome.cipher!r}, which we did not offer"
            )
        if welcome.checksum not in self.config.checksums:
            raise ProtocolError(
                f"export node chose checksum {welcome.checksum!r}, which we did not offer"
            )
        first = self.first_welcome
        if first is not None:
            if welcome.identity != first.identity:
                self._refuse_peer(
                    Refusal.IDENTITY_CHANGED,
                    f"the export's identity changed from {first.identity} to {welcome.identity}: "
                    "a different backing store answers at this address; check the export node, "
                    "then re-attach",
                )
                return
            if welcome.size != first.size:
                self._refuse_peer(
                    Refusal.SIZE_CHANGED,
                    f"the export's size changed from {first.size} to {welcome.size} bytes; "
                    "re-attach to use the new size",
                )
                return
        self.welcome = welcome
        self._unhonoured = _FAST_ZERO & ~welcome.flags
        self._cache_offered = bool(welcome.commands & (1 << Command.CACHE))
        self._checksum = get_checksum(welcome.checksum)
        self._digest_size = self._checksum.digest_size
        if welcome.cipher != "none":
            assert key is not None
            cipher = get_cipher(welcome.cipher)
            c2s, s2c = derive_session_keys(key, self._transcript.digest(), cipher)
            self._channel.start_sealing(Sealer(cipher, c2s), Opener(cipher, s2c))
        self.state = State.READY
        self._hs_deadline = None
        reconnect = self.first_welcome is not None
        if first is None:
            self.first_welcome = welcome
        self._events.append(Ready(welcome, self.generation, reconnect))
        self._rx_state = "header"
        self._channel.frames.expect(REP_HEADER.size)
        self._send_pending()

    def _refuse_peer(self, reason: Refusal, message: str) -> None:
        self._channel.send([pack_handshake(MsgType.REFUSE, Refuse(reason, message).encode())])
        self._refused(reason, message, by_peer=False)

    def _refused(self, reason: int, message: str, by_peer: bool) -> None:
        permanent = reason in PERMANENT_REFUSALS
        self._events.append(Refused(reason, message, by_peer, permanent))
        if permanent and self.first_welcome is not None:
            self.shutdown(Status.EIO, f"member refused: {message}")
        self._dead = True
        self._channel.stop()

    # ---- replies -----------------------------------------------------------
    def _on_reply_header(self, chunk: memoryview) -> None:
        magic, command, status, txn_id, attempt, length = REP_HEADER.unpack(chunk)
        if magic != REP_MAGIC:
            raise ProtocolError(f"bad reply magic {bytes(magic)!r}")
        if txn_id == 0 and command == Command.PING:
            # the export node's probe: is this client alive?  Answered once verified.
            if length:
                raise ProtocolError(f"probe ping claims {length} payload bytes")
        elif txn_id >= self._next_id or txn_id == 0:
            raise ProtocolError(f"reply for transaction {txn_id}, which was never sent")
        self._rep = (command, status, txn_id, attempt, length)
        self._rep_head = bytes(chunk)
        t = self._txns.get(txn_id)
        if t is not None and t.command != command:
            raise ProtocolError(
                f"reply for transaction {txn_id} names command {command}, not {t.command}"
            )
        carries = command in (_READ, _EXTENTS) and status == 0
        if not carries and length:
            raise ProtocolError(f"reply without data claims {length} payload bytes")
        if carries:
            if command == Command.EXTENTS:
                if length % EXTENT.size or not 0 < length <= EXTENT.size * MAX_EXTENTS:
                    raise ProtocolError(f"an EXTENTS reply of {length} bytes")
            elif t is not None and length != t.length:
                raise ProtocolError(f"read reply of {length} bytes for a {t.length}-byte read")
            if length > self.config.max_request:
                raise ProtocolError(
                    f"read reply of {length} bytes exceeds the maximum request size"
                )
            if length:
                if t is not None and t.into is not None:
                    self._rep_buf = None
                    self._rep_view = t.into
                else:
                    pb = self.pool.get(length)
                    self._rep_buf = pb
                    self._rep_view = pb.view
                self._rx_state = "payload"
                self._channel.frames.expect(length, self._rep_view)
                return
        self._rep_buf = None
        self._rep_view = None
        if self._digest_size:
            self._rx_state = "trailer"
            self._channel.frames.expect(self._digest_size)
        else:
            self._on_reply_complete(b"")

    def _on_reply_complete(self, digest: bytes) -> None:
        command, status, txn_id, attempt, _length = self._rep
        view, buf, head = self._rep_view, self._rep_buf, self._rep_head
        self._rep_buf = None
        self._rep_view = None
        self._rx_state = "header"
        self._channel.frames.expect(REP_HEADER.size)
        cs = self._checksum
        job = None
        if not self._digest_size:
            ok = True
        elif self._channel.offload and view is not None and len(view) > cs.inline_limit:
            self._verifying.add(txn_id)
            job = self._channel.new_job(lambda: cs.verify(digest, head, view))
            ok = False
        elif view is None:
            ok = cs.compute(head) == digest
        else:
            ok = cs.compute(head, view) == digest
        if job is None and not self._order and command != _EXTENTS and txn_id:
            # the common case, nothing waits ahead of it: no closure, no extents, no probe
            if buf is not None:
                buf.release()
            self._reply_verified(command, status, txn_id, ok)
            return

        def complete() -> None:
            self._verifying.discard(txn_id)
            good = bool(job.result) if job is not None and job.error is None else ok
            extents: tuple[Extent, ...] = ()
            t = self._txns.get(txn_id) if txn_id else None
            try:
                if good and command == Command.EXTENTS and view is not None and t is not None:
                    extents = tuple(unpack_extents(t.offset, t.length, view))
            finally:
                if buf is not None:
                    buf.release()
            if txn_id == 0:
                self._answer_probe(attempt, good)
            else:
                self._reply_verified(command, status, txn_id, good, extents)

        self._order.add(job, complete)

    def job_done(self, job: Job, now: float) -> None:
        """The shell finished ``job`` on a worker; let its results take effect."""
        self._now = now
        try:
            job.finish()
            self._order.drain()
        except ProtocolError as exc:
            self._die(f"protocol error from the export node: {exc}")

    def take_jobs(self) -> list[Job]:
        return self._channel.take_jobs()

    def _reply_verified(
        self, command: int, status: int, txn_id: int, ok: bool, extents: tuple[Extent, ...] = ()
    ) -> None:
        t = self._txns.get(txn_id)
        if not ok:
            self.stats.checksum_errors += 1
            self._events.append(ChecksumMismatch(txn_id, "reply"))
            if t is not None:
                self._resend(t, "checksum mismatch in the reply")
            return
        if t is None:
            if self._ping is not None and self._ping.id == txn_id:
                self._ping = None
                return
            self.stats.late_replies += 1
            return
        if t.sent:
            t.sent = False
            self._in_flight_sent -= 1
        if status == Status.CHECKSUM:
            self.stats.checksum_errors += 1
            self._events.append(ChecksumMismatch(txn_id, "request"))
            self._resend(t, "the export node saw a checksum mismatch")
            return
        if status == Status.FENCED:
            t.sent = False
            self._die("the export node says this connection was replaced by a newer one")
            return
        self._finish(t, status, "" if status == 0 else status_name(status), extents=extents)
        if command == Command.DISCONNECT:
            self._die("disconnected")
        self._send_pending()

    def _answer_probe(self, probe: int, ok: bool) -> None:
        """Answer the export node's probe at once, outside the queue-depth limit: a session
        that does not answer within the probing node's wait may be replaced."""
        if not ok:
            self.stats.checksum_errors += 1
            self._events.append(ChecksumMismatch(0, "probe"))
            return
        if self.state != State.READY or self._dead:
            return
        self.stats.probes += 1
        head = REQ_HEADER.pack(REQ_MAGIC, Command.PING, 0, 0, probe, 0, 0)
        self._channel.send([head], self._checksum if self._digest_size else None)

    def _finish(
        self,
        t: Txn,
        status: int,
        message: str,
        timed_out: bool = False,
        extents: tuple[Extent, ...] = (),
    ) -> None:
        if self._txns.pop(t.id, None) is None:
            return
        if t.sent:
            self._in_flight_sent -= 1
            t.sent = False
        if status == 0:
            self.stats.completed += 1
        elif timed_out:
            self.stats.failed += 1
        else:
            self.stats.errors += 1
        self._events.append(Completed(t.id, status, t.attempt, message, timed_out, extents))

    # ---- submit and send ---------------------------------------------------
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
        """Start a transaction; the payload (WRITE) and ``into`` (READ) must stay valid until
        its :class:`Completed` event."""
        if self.state == State.CLOSED:
            raise ProtocolError("the client session is closed")
        return self._submit(command, offset, length, flags, payload, into, now)

    def _submit(
        self,
        command: int,
        offset: int,
        length: int,
        flags: int,
        payload: memoryview | None,
        into: memoryview | None,
        now: float,
    ) -> int:
        tid = self._next_id
        self._next_id += 1
        deadline = now + self.config.resend_timeout
        t = Txn(tid, command, offset, length, flags, payload, into, now, deadline)
        self._txns[tid] = t
        self._unsent.append(t)
        heapq.heappush(self._heap, (deadline, tid, 0))
        self.stats.submitted += 1
        self._send_pending()
        return tid

    def _send_pending(self) -> None:
        if self.state != State.READY or self._dead:
            return
        limit = self.welcome.queue_depth if self.welcome else 1
        unsent, txns = self._unsent, self._txns
        while unsent and self._in_flight_sent < limit:
            t = unsent.popleft()
            if not t.sent and t.id in txns:  # else resent meanwhile, or ended
                if (t.flags & self._unhonoured or t.command == _CACHE) and self._answer_here(t):
                    continue
                self._send(t)

    def _answer_here(self, t: Txn) -> bool:
        """Finish, without sending it, a request this connection's export node does not
        know (an older version, or a node that reconnected as one): FAST_ZERO is refused
        ENOTSUP, which the caller answers by writing the zeroes itself; CACHE, a hint, is
        done. Checked at every send, so a resend after a reconnect obeys the new WELCOME."""
        if t.flags & self._unhonoured:
            self._finish(
                t, Status.ENOTSUP, "the export node does not announce FAST_ZERO: no fast zeroing"
            )
            return True
        if t.command == _CACHE and not self._cache_offered:
            self._finish(t, Status.OK, "")
            return True
        return False

    def _send(self, t: Txn) -> None:
        t.attempt += 1
        t.sent = True
        self._in_flight_sent += 1
        head = REQ_HEADER.pack(REQ_MAGIC, t.command, t.flags, t.id, t.attempt, t.length, t.offset)
        parts: list[Buf] = [head] if t.payload is None else [head, t.payload]
        self._channel.send(parts, self._checksum if self._digest_size else None)
        if t.attempt > 1:
            self.stats.resends += 1

    def _resend(self, t: Txn, why: str) -> None:
        if t.sent:
            t.sent = False
            self._in_flight_sent -= 1
        if self.state == State.READY and not self._dead:
            self._send(t)
            self._events.append(Resent(t.id, t.attempt, why))

    # ---- time ----------------------------------------------------------------
    def get_timer(self) -> float | None:
        when: float | None = None
        heap, txns = self._heap, self._txns
        while heap:
            deadline, tid, expiries = heap[0]
            t = txns.get(tid)
            if t is None or t.expiries != expiries:
                heapq.heappop(heap)
                continue
            when = deadline
            break
        hs = self._hs_deadline
        if hs is not None and (when is None or hs < when):
            when = hs
        if self.state is State.READY and not self._dead:
            ping = self._ping
            at = ping.deadline if ping is not None else self._last_rx + self.config.ping_interval
            if when is None or at < when:
                when = at
        return when

    def handle_timer(self, now: float) -> None:
        cfg = self.config
        if self._hs_deadline is not None and now >= self._hs_deadline:
            self._hs_deadline = None
            self._die(f"no handshake answer within {cfg.handshake_timeout:g} s")
        if self.state == State.READY and not self._dead:
            if self._ping is not None:
                if now >= self._ping.deadline:
                    self._die(
                        f"no answer to a ping within {cfg.ping_timeout:g} s "
                        f"(nothing received for {now - self._last_rx:.1f} s)"
                    )
            elif now >= self._last_rx + cfg.ping_interval:
                self._send_ping(now)
        while self._heap and self._heap[0][0] <= now:
            _, tid, expiries = heapq.heappop(self._heap)
            t = self._txns.get(tid)
            if t is None or t.expiries != expiries:
                continue
            if (self._rx_state in ("payload", "trailer") and self._rep[2] == tid) or (
                tid in self._verifying
            ):
                # its reply is arriving right now: let it finish (the buffer is in use)
                heapq.heappush(self._heap, (now + cfg.resend_timeout, tid, expiries))
                continue
            t.expiries += 1
            self.stats.timeouts += 1
            if t.expiries > cfg.resends:
                sent = (
                    f"sent {t.attempt} time(s)"
                    if t.attempt
                    else "never sent: the member was unreachable"
                )
                self._finish(
                    t,
                    Status.EIO,
                    f"no ack within {now - t.submitted:.1f} s ({t.expiries} timeouts of "
                    f"--resend-timeout {cfg.resend_timeout:g} with --resends {cfg.resends}; {sent})",
                    timed_out=True,
                )
                continue
            t.deadline = now + cfg.resend_timeout
            heapq.heappush(self._heap, (t.deadline, tid, t.expiries))
            self._resend(t, f"no ack within {cfg.resend_timeout:g} s")

    def _send_ping(self, now: float) -> None:
        tid = self._next_id
        self._next_id += 1
        ping = Txn(tid, Command.PING, 0, 0, 0, None, None, now, now + self.config.ping_timeout)
        self._ping = ping
        self.stats.pings += 1
        head = REQ_HEADER.pack(REQ_MAGIC, Command.PING, 0, tid, 1, 0, 0)
        self._channel.send([head], self._checksum if self._digest_size else None)

    # ---- output ----------------------------------------------------------------
    def data_to_send(self) -> list[Buf]:
        return self._channel.data_to_send()

    def take_handed(self) -> list[Callable[[], None]]:
        """Releases of send buffers handed out by ``data_to_send`` (sealed records): run
        each once the socket has sent those bytes, or at once if the connection is gone."""
        return self._channel.take_handed()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def in_flight(self) -> int:
        return len(self._txns)

    @property
    def connected(self) -> bool:
        return self.state == State.READY and not self._dead
