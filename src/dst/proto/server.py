"""Export-node side of the DST node protocol, one core per connection.

The core runs the handshake (with the challenge-response when keys are
configured), then turns frames into validated :class:`Request` events and
replies into bytes.  Session policy (one writer, fencing, duplicate writes) is
the shell's business: it sees :class:`HelloReceived` and answers with
:meth:`ServerCore.accept` or :meth:`ServerCore.refuse`.

Before the handshake is accepted the core allocates nothing proportional to a
length field: handshake bodies are capped at 16 KiB and staged in a fixed buffer.
"""

from __future__ import annotations

import secrets
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from dst.buffers import BufferPool, PooledBuffer
from dst.crypto.aead import Opener, Sealer, derive_session_keys, get_cipher
from dst.crypto.auth import Transcript, proof, verify_proof
from dst.crypto.checksums import Checksum, get_checksum
from dst.errors import ProtocolError
from dst.proto.channel import Buf, Channel
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
from dst.proto.handshake import (
    Challenge,
    Hello,
    Proof,
    Refuse,
    Welcome,
    choose_algorithm,
    choose_version,
)
from dst.proto.jobs import InOrder, Job
from dst.proto.wire import (
    ALL_REQ_FLAGS,
    BASE_REQ_FLAGS,
    HS_HEADER,
    HS_MAGIC,
    MAX_HANDSHAKE_BODY,
    REP_HEADER,
    REP_MAGIC,
    REQ_HEADER,
    REQ_MAGIC,
    WRITE_COMMANDS,
    Command,
    MsgType,
    Refusal,
    Status,
    pack_handshake,
)

SKIP_CHUNK = 1 << 20

# plain ints on the per-request path (an IntEnum attribute or call costs more)
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)


@dataclass
class ServerConfig:
    ciphers: tuple[str, ...] = ("none",)
    checksums: tuple[str, ...] = ("crc32c",)
    key: bytes | None = None
    keys: Mapping[str, bytes] | None = None
    max_request: int = 32 << 20
    queue_depth: int = 128
    handshake_timeout: float = 10.0
    offload: bool = False  # large payload crypto/checksums as Jobs for a worker pool


@dataclass(frozen=True)
class ExportTerms:
    """What the shell grants for the export a client asked for."""

    size: int
    read_only: bool
    identity: uuid.UUID
    min_block: int = 1
    preferred_block: int = 4096
    commands: frozenset[int] = field(default_factory=lambda: frozenset(Command))
    flags: int = int(ALL_REQ_FLAGS)  # announced in FLAGS; any other bit is refused EINVAL
    trim_zeroes: bool = False


def honoured_flags(*, fast_zero: bool) -> int:
    """The FLAGS of a WELCOME: every request flag, FAST_ZERO only where the storage can
    zero natively (elsewhere the client refuses it itself, without sending it)."""
    return int(ALL_REQ_FLAGS if fast_zero else BASE_REQ_FLAGS)


class SState(Enum):
    HANDSHAKE = "handshake"
    AUTH = "auth"
    DECIDING = "deciding"
    READY = "ready"
    CLOSED = "closed"


@dataclass
class ServerStats:
    requests: int = 0
    rejected: int = 0
    checksum_errors: int = 0
    pings: int = 0
    probes: int = 0


class ServerCore:
    """Sans-IO export-node connection."""

    def __init__(self, config: ServerConfig, pool: BufferPool | None = None) -> None:
        self.config = config
        self.pool = pool or BufferPool()
        self.state = SState.HANDSHAKE
        self.hello: Hello | None = None
        self.terms: ExportTerms | None = None
        self.welcome: Welcome | None = None
        self.stats = ServerStats()
        self._events: deque[Event] = deque()
        self._channel = Channel(self._on_chunk, max_record=config.max_request + 4096)
        self._rx = "hs_header"
        self._channel.frames.expect(HS_HEADER.size)
        self._hs_deadline: float | None = None
        self._transcript = Transcript()
        self._key: bytes | None = None
        self._checksum: Checksum = get_checksum("none")
        self._digest = 0
        self._dead = False
        self._req: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
        self._req_head = b""
        self._payload: PooledBuffer | None = None
        self._skip_left = 0
        self._scratch: bytearray | None = None
        self.in_flight = 0
        self._probes = 0
        self._order = InOrder()
        self._channel.offload = config.offload
        # fixed once the export is granted: READ allowed, WRITE allowed, largest read, size,
        # the request flags not honoured
        self._fast = (False, False, 0, 0, -1)

    # ---- lifecycle -------------------------------------------------------------
    def connection_made(self, now: float) -> None:
        self._hs_deadline = now + self.config.handshake_timeout

    def connection_lost(self, now: float) -> None:
        self.state = SState.CLOSED
        self._hs_deadline = None
        self._channel.stop()
        self._channel.discard_output()
        if self._payload is not None:
            self._payload.release()
            self._payload = None

    def get_timer(self) -> float | None:
        return self._hs_deadline

    def handle_timer(self, now: float) -> None:
        if self._hs_deadline is not None and now >= self._hs_deadline:
            self._hs_deadline = None
            self._die(f"no complete handshake within {self.config.handshake_timeout:g} s")

    # ---- receive ---------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        return self._channel.get_buffer()

    def buffer_updated(self, nbytes: int, now: float) -> None:
        try:
            self._channel.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._die(f"protocol error: {exc}")

    def receive_data(self, data: Buf, now: float) -> None:
        try:
            self._channel.feed(data)
        except ProtocolError as exc:
            self._die(f"protocol error: {exc}")

    def _die(self, reason: str) -> None:
        if not self._dead:
            self._dead = True
            self._channel.stop()
            if self._payload is not None:
                self._payload.release()
                self._payload = None
            self._events.append(ConnectionDead(reason))

    def _on_chunk(self, chunk: memoryview) -> None:
        rx = self._rx
        if rx == "header":
            self._on_request_header(chunk)
        elif rx == "payload":
            if self._digest:
                self._rx = "trailer"
                self._channel.frames.expect(self._digest)
            else:
                self._on_request_complete(b"")
        elif rx == "trailer":
            self._on_request_complete(bytes(chunk))
        elif rx == "skip":
            self._skip_left -= len(chunk)
            self._expect_skip()
        elif rx == "hs_header":
            magic, mtype, _flags, n = HS_HEADER.unpack(chunk)
            if magic != HS_MAGIC:
                raise ProtocolError(
                    f"bad handshake magic {bytes(magic)!r}: the peer does not speak the DST "
                    "node protocol"
                )
            if n > MAX_HANDSHAKE_BODY:
                raise ProtocolError(f"handshake message of {n} bytes exceeds {MAX_HANDSHAKE_BODY}")
            self._hs_type = mtype
            self._hs_head = bytes(chunk)
            if n == 0:
                self._on_handshake(b"")
            else:
                self._rx = "hs_body"
                self._channel.frames.expect(n)
        elif rx == "hs_body":
            self._on_handshake(bytes(chunk))

    # ---- handshake -------------------------------------------------------------
    def _on_handshake(self, body: bytes) -> None:
        mtype = self._hs_type
        frame = self._hs_head + body
        self._rx = "hs_header"
        if mtype == MsgType.REFUSE:
            r = Refuse.decode(body)
            self._events.append(Refused(r.reason, r.message, by_peer=True, permanent=True))
            self._die(f"the client refused: {r.message}")
            return
        if self.state == SState.HANDSHAKE and mtype == MsgType.HELLO:
            hello = Hello.decode(body)
            self.hello = hello
            self._transcript.add(frame)
            v = choose_version(hello.min_version, hello.max_version)
            if v.refusal is not None:
                self.refuse(v.refusal, v.message)
                return
            cfg = self.config
            has_keys = cfg.key is not None or cfg.keys is not None
            if has_keys and not hello.auth:
                self.refuse(
                    Refusal.AUTH_REQUIRED,
                    "this export node requires authentication; give the client the same "
                    "--key-file as the export node",
                )
                return
            if not has_keys and hello.auth:
                self.refuse(
                    Refusal.AUTH_UNEXPECTED,
                    "the client holds a key but this export node has none; give the export node "
                    "the same --key-file, or drop --key-file on the client",
                )
                return
            if has_keys:
                if cfg.keys is not None:
                    self._key = cfg.keys.get(hello.client_id)
                    if self._key is None:
                        self.refuse(
                            Refusal.NOT_ALLOWED,
                            f"client id {hello.client_id!r} has no key on this export node; add "
                            "it to the --keys file",
                        )
                        return
                else:
                    self._key = cfg.key
                c = pack_handshake(MsgType.CHALLENGE, Challenge(secrets.token_bytes(32)).encode())
                self._transcript.add(c)
                self._channel.send([c])
                self.state = SState.AUTH
                self._channel.frames.expect(HS_HEADER.size)
                return
            self._decide()
            return
        if self.state == SState.AUTH and mtype == MsgType.PROOF:
            assert self._key is not None and self.hello is not None
            p = Proof.decode(body)
            if not verify_proof(self._key, "client", self._transcript.digest(), p.proof):
                self.refuse(
                    Refusal.AUTH_FAILED,
                    "authentication failed: the client's key differs from the export node's key"
                    f" for client id {self.hello.client_id!r}; use the same key file on both sides",
                )
                return
            self._transcript.add(frame)
            self._decide()
            return
        raise ProtocolError(
            f"unexpected handshake message type {mtype} in state {self.state.value}"
        )

    def _decide(self) -> None:
        assert self.hello is not None
        self.state = SState.DECIDING
        self._events.append(HelloReceived(self.hello, authenticated=self._key is not None))

    def refuse(self, reason: Refusal, message: str) -> None:
        """Answer the handshake with a refusal; the shell closes after sending."""
        self._channel.send([pack_handshake(MsgType.REFUSE, Refuse(reason, message).encode())])
        self._events.append(Refused(reason, message, by_peer=False, permanent=True))
        self._hs_deadline = None
        self._dead = True
        self._channel.stop()
        self.state = SState.CLOSED

    def accept(self, terms: ExportTerms) -> None:
        """Grant the export on these terms (the core picks algorithms and limits)."""
        hello = self.hello
        assert hello is not None and self.state == SState.DECIDING
        cfg = self.config
        ours_c = cfg.ciphers if self._key is not None else ("none",)
        c = choose_algorithm("cipher", ours_c, hello.ciphers)
        if c.refusal is not None:
            self.refuse(c.refusal, c.message)
            return
        k = choose_algorithm("checksum", cfg.checksums, hello.checksums)
        if k.refusal is not None:
            self.refuse(k.refusal, k.message)
            return
        commands = 0
        for cmd in terms.commands:
            commands |= 1 << cmd
        welcome = Welcome(
            version=int(choose_version(hello.min_version, hello.max_version).value or 1),
            size=terms.size,
            read_only=terms.read_only,
            identity=terms.identity,
            cipher=str(c.value),
            checksum=str(k.value),
            max_request=min(cfg.max_request, hello.max_request),
            queue_depth=min(cfg.queue_depth, hello.queue_depth),
            min_block=terms.min_block,
            preferred_block=terms.preferred_block,
            commands=commands,
            flags=terms.flags,
            trim_zeroes=terms.trim_zeroes,
        )
        body = welcome.encode_unproven()
        if self._key is not None:
            self._transcript.add(body)
            body += Proof(proof(self._key, "server", self._transcript.digest())).encode()
        self._channel.send([pack_handshake(MsgType.WELCOME, body)])
        self.welcome = welcome
        self.terms = terms
        self._checksum = get_checksum(welcome.checksum)
        self._digest = self._checksum.digest_size
        self._hs_deadline = None
        self.state = SState.READY
        self._rx = "header"
        self._fast = (
            Command.READ in terms.commands,
            Command.WRITE in terms.commands and not terms.read_only,
            welcome.max_request,
            terms.size,
            ~terms.flags,
        )
        self._channel.frames.grow(256 << 10)
        self._channel.frames.expect(REQ_HEADER.size)
        if welcome.cipher != "none":
            assert self._key is not None
            cipher = get_cipher(welcome.cipher)
            c2s, s2c = derive_session_keys(self._key, self._transcript.digest(), cipher)
            self._channel.start_sealing(Sealer(cipher, s2c), Opener(cipher, c2s))

    # ---- requests ----------------------------------------------------------------
    def _on_request_header(self, chunk: memoryview) -> None:
        magic, command, flags, txn, attempt, length, offset = REQ_HEADER.unpack(chunk)
        if magic != REQ_MAGIC:
            raise ProtocolError(f"bad request magic {bytes(magic)!r}")
        self._req = (command, flags, txn, attempt, length, offset)
        self._req_head = bytes(chunk)
        if command == _WRITE and length:
            assert self.welcome is not None
            if length > self.welcome.max_request:
                # answer it and skip the payload without allocating it
                self._skip_left = length + self._digest
                self._reject(
                    txn,
                    command,
                    Status.EINVAL,
                    f"write of {length} bytes exceeds the negotiated maximum of "
                    f"{self.welcome.max_request}",
                )
                self._expect_skip()
                return
            self._payload = self.pool.get(length)
            self._rx = "payload"
            self._channel.frames.expect(length, self._payload.view)
            return
        if self._digest:
            self._rx = "trailer"
            self._channel.frames.expect(self._digest)
        else:
            self._on_request_complete(b"")

    def _expect_skip(self) -> None:
        if self._skip_left <= 0:
            self._rx = "header"
            self._channel.frames.expect(REQ_HEADER.size)
            return
        if self._scratch is None:
            self._scratch = bytearray(SKIP_CHUNK)
        n = min(self._skip_left, SKIP_CHUNK)
        self._rx = "skip"
        self._channel.frames.expect(n, memoryview(self._scratch)[:n])

    def _on_request_complete(self, digest: bytes) -> None:
        req, head = self._req, self._req_head
        payload, self._payload = self._payload, None
        self._rx = "header"
        self._channel.frames.expect(REQ_HEADER.size)
        cs = self._checksum
        job = None
        ok = True
        if self._digest:
            if (
                self._channel.offload
                and payload is not None
                and len(payload.view) > cs.inline_limit
            ):
                view = payload.view
                job = self._channel.new_job(lambda: cs.verify(digest, head, view))
            elif payload is None:
                ok = cs.compute(head) == digest
            else:
                ok = cs.compute(head, payload.view) == digest
        if job is None and not self._order:
            self._request_verified(req, payload, ok)  # nothing waits ahead of it
            return

        def complete() -> None:
            good = bool(job.result) if job is not None and job.error is None else ok
            self._request_verified(req, payload, good)

        self._order.add(job, complete)

    def job_done(self, job: Job, now: float) -> None:
        """The shell finished ``job`` on a worker; let its results take effect."""
        try:
            job.finish()
            self._order.drain()
        except ProtocolError as exc:
            self._die(f"protocol error: {exc}")

    def take_jobs(self) -> list[Job]:
        return self._channel.take_jobs()

    def take_handed(self) -> list[Callable[[], None]]:
        return self._channel.take_handed()

    def _request_verified(
        self, req: tuple[int, int, int, int, int, int], payload: PooledBuffer | None, ok: bool
    ) -> None:
        command, flags, txn, attempt, length, offset = req
        if self._dead:
            if payload is not None:
                payload.release()
            return
        if not ok:
            if payload is not None:
                payload.release()
            self.stats.checksum_errors += 1
            self._events.append(ChecksumMismatch(txn, "request"))
            self._send_reply(command, Status.CHECKSUM, txn, attempt, None)
            return
        read_ok, write_ok, max_read, size, bad_flags = self._fast
        if (
            (command == _READ and read_ok and length <= max_read)
            or (command == _WRITE and write_ok)
        ) and (not flags & bad_flags and offset + length <= size):
            # a READ or WRITE that passes every check of _validate
            self.stats.requests += 1
            self.in_flight += 1
            self._events.append(Request(command, flags, txn, attempt, offset, length, payload))
            return
        problem = self._validate(command, flags, length, offset)
        if problem is not None:
            if payload is not None:
                payload.release()
            self._reject(txn, command, problem[0], problem[1], attempt)
            return
        if command == Command.PING:
            if txn == 0:
                # the answer to our probe (a client never uses transaction id 0)
                if 0 < attempt <= self._probes:
                    self._events.append(ProbeAnswered(attempt))
                return
            self.stats.pings += 1
            self._send_reply(command, Status.OK, txn, attempt, None)
            return
        self.stats.requests += 1
        if command == Command.DISCONNECT:
            self._events.append(Disconnecting(txn))
            return
        self.in_flight += 1
        self._events.append(Request(command, flags, txn, attempt, offset, length, payload))

    def _validate(
        self, command: int, flags: int, length: int, offset: int
    ) -> tuple[int, str] | None:
        terms = self.terms
        assert terms is not None and self.welcome is not None
        try:
            cmd = Command(command)
        except ValueError:
            return Status.ENOTSUP, f"unknown command {command}"
        if cmd not in terms.commands and cmd not in (Command.PING, Command.DISCONNECT):
            return Status.ENOTSUP, f"{cmd.name} is not supported by this export"
        if flags & ~terms.flags:
            return Status.EINVAL, (
                f"request flags {flags:#x} include some this export node did not announce "
                f"(it honours {terms.flags:#x})"
            )
        if cmd in (Command.PING, Command.DISCONNECT, Command.FLUSH):
            return None
        if terms.read_only and cmd in WRITE_COMMANDS:
            return Status.EPERM, f"{cmd.name} on a read-only export"
        if cmd == Command.READ and length > self.welcome.max_request:
            return Status.EINVAL, (
                f"read of {length} bytes exceeds the negotiated maximum of "
                f"{self.welcome.max_request}"
            )
        if cmd == Command.EXTENTS and length == 0:
            return Status.EINVAL, "EXTENTS of 0 bytes: ask for at least one byte"
        if offset + length > terms.size:
            # as every device answers it (dst.device.refusal): no room there for a write or
            # zeroes; nothing there to read, trim or describe
            status = (
                Status.ENOSPC if cmd in (Command.WRITE, Command.WRITE_ZEROES) else Status.EINVAL
            )
            return status, (
                f"{cmd.name} of [{offset}, {offset + length}) is beyond the end of the "
                f"{terms.size}-byte export"
            )
        return None

    def _reject(
        self, txn: int, command: int, status: int, message: str, attempt: int | None = None
    ) -> None:
        self.stats.rejected += 1
        self._events.append(Rejected(txn, command, status, message))
        self._send_reply(command, status, txn, self._req[3] if attempt is None else attempt, None)

    # ---- replies -------------------------------------------------------------------
    def reply(
        self,
        req: Request,
        status: int,
        data: memoryview | None = None,
        on_handed: Callable[[], None] | None = None,
    ) -> None:
        """Ack a request (``data`` for a successful READ).  ``on_handed`` (e.g. the release
        of the data's buffer) runs via ``take_handed`` once the reply left the core, or at
        once if it never will."""
        self.in_flight -= 1
        if self._dead or self.state != SState.READY:
            if on_handed is not None:
                on_handed()
            return
        self._send_reply(
            req.command, status, req.txn, req.attempt, data if status == 0 else None, on_handed
        )

    def _send_reply(
        self,
        command: int,
        status: int,
        txn: int,
        attempt: int,
        data: memoryview | None,
        on_handed: Callable[[], None] | None = None,
    ) -> None:
        n = len(data) if data is not None else 0
        head = REP_HEADER.pack(REP_MAGIC, command, status, txn, attempt, n)
        parts: list[Buf] = [head, data] if data is not None and n else [head]
        self._channel.send(parts, self._checksum if self._digest else None, on_handed)

    def probe(self) -> int | None:
        """Ask the client for a sign of life: a PING reply frame with transaction id 0 that a
        client announcing PING_TIMEOUT answers with a PING request of id 0 and the same
        attempt number (:class:`ProbeAnswered`).  Returns that number, or None when this
        connection cannot be probed (not serving, or the client does not answer probes)."""
        hello = self.hello
        if self._dead or self.state != SState.READY or hello is None or hello.ping_timeout is None:
            return None
        self._probes += 1
        self.stats.probes += 1
        self._send_reply(Command.PING, Status.OK, 0, self._probes, None)
        return self._probes

    def reply_disconnect(self, txn: int) -> None:
        if not self._dead:
            self._send_reply(Command.DISCONNECT, Status.OK, txn, 1, None)

    def data_to_send(self) -> list[Buf]:
        return self._channel.data_to_send()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def dead(self) -> bool:
        return self._dead
