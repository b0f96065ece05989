"""The per-connection byte channel under both cores: plain frames, or AEAD records.

Before and during the handshake, frames travel as they are.  Once both sides
agreed on a cipher, the frame stream is carried in sealed records:
``u32 sealed_length | ciphertext+tag``; the length bytes are the AEAD's
associated data, nonces are per-direction counters, so tampering, replay,
reordering and truncation all fail the tag check.  The frame layer above never
knows which mode it is in.

A large payload is a record of its own (the frame's header and trailer go in
small records beside it).  That keeps encryption as cheap as the cipher: the
sender seals straight from the payload's buffer into a pooled record buffer,
and the receiver, whose frame parser already knows where that payload belongs
once the header record was opened, decrypts straight into its destination.
Nothing of a record is acted on before its tag checked.

The channel also appends each frame's checksum trailer.  With ``offload`` on,
large records are sealed/opened and large trailers computed as :class:`Job` s that
the shell runs on a worker pool; record numbers are taken in wire order and the
send queue only releases bytes up to the first unfinished job, so the order of
frames on the wire never changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from dst.buffers import BufferPool, PooledBuffer
from dst.crypto.aead import Opener, Sealer
from dst.crypto.checksums import Checksum
from dst.errors import ProtocolError
from dst.proto.jobs import Job
from dst.proto.reader import ChunkReader, take_buffered
from dst.proto.wire import REC_HEADER

Buf = bytes | bytearray | memoryview

# Sealed records and their plaintexts live in reusable buffers (one event loop per
# process): a fresh megabyte per record cost more than sealing it (docs/benchmarks.md).
_RECORDS = BufferPool(max_retained=128 << 20)
#: Records at least this large use pooled buffers; smaller ones are cheap fresh bytes.
POOLED_MIN = 64 << 10


class _AfterHandOver:
    """A marker in the send queue: call ``fn`` once the bytes before it left the core."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn


class _Trailer:
    """A frame's checksum trailer, computed when its record is sealed (maybe off the loop)."""

    __slots__ = ("checksum", "parts", "size")

    def __init__(self, checksum: Checksum, parts: list[Buf]) -> None:
        self.checksum = checksum
        self.parts = parts
        self.size = sum(len(p) for p in parts)  # bytes it covers

    def __len__(self) -> int:
        return self.checksum.digest_size

    def compute(self) -> bytes:
        return self.checksum.compute(*self.parts)


class _Opening:
    """A received record on its way to the frame parser (in arrival order)."""

    __slots__ = ("job", "plain")

    def __init__(self, plain: PooledBuffer | None) -> None:
        self.plain = plain  # the plaintext's pooled buffer, if it has one
        self.job: Job | None = None

    def release(self) -> None:
        if self.plain is not None:
            self.plain.release()
            self.plain = None


class Channel:
    """Owns the receive path (socket bytes -> frame chunks) and the send queue."""

    def __init__(self, on_frame_chunk: Callable[[memoryview], None], max_record: int) -> None:
        self.frames = ChunkReader(on_frame_chunk)
        self._records: ChunkReader | None = None
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._max_record = max_record
        self._rec_len = 0
        self._rec_aad = b""
        self._rec_buf: PooledBuffer | None = None
        self._out: deque[Buf | Job | _AfterHandOver] = deque()
        self._jobs_queued = 0  # jobs in _out
        self._handed: list[Callable[[], None]] = []
        self._opening: deque[_Opening] = deque()
        self._stopped = False
        self.offload = False
        self.jobs: list[Job] = []

    # ---- jobs ------------------------------------------------------------
    def new_job(self, fn: Callable[[], object], then: Callable[[Job], None] | None = None) -> Job:
        job = Job(fn, then)
        self.jobs.append(job)
        return job

    def take_jobs(self) -> list[Job]:
        jobs = self.jobs
        if jobs:  # else the same empty list again: no allocation per pump
            self.jobs = []
        return jobs

    # ---- receive -------------------------------------------------------
    def get_buffer(self) -> memoryview:
        if self._records is not None:
            return self._records.get_buffer()
        return self.frames.get_buffer()

    def buffer_updated(self, n: int) -> None:
        if self._records is not None:
            self._records.buffer_updated(n)
        else:
            self.frames.buffer_updated(n)

    def feed(self, data: Buf) -> None:
        if self._records is not None:
            self._records.feed(data)
        else:
            self.frames.feed(data)

    def discard_output(self) -> None:
        """The connection is gone: queued frames will never be sent, their buffers are free."""
        for item in self._out:
            if isinstance(item, _AfterHandOver):
                self._handed.append(item.fn)
        self._out.clear()
        self._jobs_queued = 0

    def stop(self) -> None:
        """Stop receiving (after a protocol error); what is queued may still be sent."""
        self.frames.stop()
        if self._records is not None:
            self._records.stop()
        self._stopped = True
        for rec in self._opening:
            if rec.job is None or rec.job.done:
                rec.release()  # a running job's buffer goes back when the job ends
        self._opening.clear()

    @property
    def sealed(self) -> bool:
        return self._sealer is not None

    def start_sealing(self, sealer: Sealer, opener: Opener) -> None:
        """Switch both directions to AEAD records; staged bytes are records already."""
        self._sealer = sealer
        self._opener = opener
        self._records = ChunkReader(self._on_record_chunk)
        self._records.grow(256 << 10)
        self._records.expect(REC_HEADER.size)
        leftover = take_buffered(self.frames)
        if leftover:
            self._records.feed(leftover)

    def _on_record_chunk(self, chunk: memoryview) -> None:
        records, opener = self._records, self._opener
        assert records is not None and opener is not None
        if self._rec_len == 0:
            (n,) = REC_HEADER.unpack(chunk)
            if n == 0 or n > self._max_record:
                raise ProtocolError(
                    f"sealed record of {n} bytes is outside 1..{self._max_record}; "
                    "the stream is corrupt"
                )
            self._rec_len = n
            self._rec_aad = bytes(chunk)
            if n < POOLED_MIN and not self._offloads(opener, n):
                records.expect(n)  # opened at once, from the staging buffer
            else:
                self._rec_buf = _RECORDS.get(n)
                records.expect(n, self._rec_buf.view)
            return
        self._rec_len = 0
        records.expect(REC_HEADER.size)
        held, self._rec_buf = self._rec_buf, None
        if self._opening or self._offloads(opener, len(chunk)):
            self._open_queued(opener, chunk, held)
            return
        # The common case, inline: open the record and hand its plaintext over now.
        number = opener.next_counter()
        size = len(chunk) - opener.cipher.tag_size
        try:
            if size < POOLED_MIN:
                plain = opener.open_record(number, chunk, self._rec_aad)
            else:
                direct = self.frames.direct_target()
                if direct is not None and len(direct) >= size:
                    # A payload record, where the frame parser wants it: no copy at all.
                    opener.open_into(number, chunk, self._rec_aad, direct[:size])
                    self.frames.buffer_updated(size)
                    return
                self._deliver_pooled(opener, number, chunk)
                return
        finally:
            if held is not None:
                held.release()
        self.frames.feed(plain)  # copies: the frame parser hands out views of its own

    def _offloads(self, opener: Opener, sealed_len: int) -> bool:
        return self.offload and sealed_len > opener.cipher.inline_limit

    def _deliver_pooled(self, opener: Opener, number: int, chunk: memoryview) -> None:
        """A large record the frame parser does not want in one piece: via a pooled buffer."""
        plain = _RECORDS.get(len(chunk) - opener.cipher.tag_size)
        try:
            opener.open_into(number, chunk, self._rec_aad, plain.view)
            self.frames.feed(plain.view)
        finally:
            plain.release()

    def _open_queued(self, opener: Opener, chunk: memoryview, held: PooledBuffer | None) -> None:
        """Open a record on a worker, or behind records still being opened there; the
        plaintexts reach the frame parser in arrival order.

        These records never open straight into the frame parser's buffers: a worker
        still running when the connection drops would write where the next
        connection's data may already be."""
        aad = self._rec_aad
        number = opener.next_counter()
        size = len(chunk) - opener.cipher.tag_size
        plain = _RECORDS.get(size) if size >= POOLED_MIN else None
        rec = _Opening(plain)

        def open_record() -> Buf:
            if plain is None:
                return opener.open_record(number, chunk, aad)
            opener.open_into(number, chunk, aad, plain.view)
            return plain.view

        if self._offloads(opener, len(chunk)):

            def opened(job: Job) -> None:
                if held is not None:
                    held.release()
                if self._stopped:  # dropped from the queue by stop(): nobody feeds it
                    rec.release()
                    return
                self._opened()

            rec.job = self.new_job(open_record, opened)
            self._opening.append(rec)
            return
        try:
            result = open_record()
        except BaseException:
            rec.release()
            raise
        finally:
            if held is not None:
                held.release()
        rec.job = Job(lambda: result)  # already done: waits its turn behind the others
        rec.job.result = result
        rec.job.done = True
        self._opening.append(rec)
        self._opened()

    def _deliver(self, rec: _Opening, data: Buf) -> None:
        """Hand an opened record's plaintext to the frame parser."""
        try:
            self.frames.feed(data)  # copies: the frame parser hands out its own views
        finally:
            rec.release()

    def _opened(self) -> None:
        q = self._opening
        while q and q[0].job is not None and q[0].job.done:
            rec = q.popleft()
            job = rec.job
            assert job is not None
            if job.error is not None:
                rec.release()
                self.stop()
                if isinstance(job.error, ProtocolError):
                    raise job.error
                raise ProtocolError(f"cannot open a record: {job.error}")
            self._deliver(rec, job.result)

    # ---- send ----------------------------------------------------------
    def send(
        self,
        parts: list[Buf],
        checksum: Checksum | None = None,
        on_handed: Callable[[], None] | None = None,
    ) -> None:
        """Queue one frame (its parts in order), with its checksum trailer if given.

        ``on_handed`` is called (via :meth:`take_handed`) once the whole frame was handed
        to the shell: only then may the buffers it references be reused, since a job may
        still read them and the queue may still hold them behind an earlier job.
        """
        self._send(parts, checksum)
        if on_handed is not None:
            self._out.append(_AfterHandOver(on_handed))

    def take_handed(self) -> list[Callable[[], None]]:
        """Callbacks of frames handed over by the last ``data_to_send``: run them once the
        shell's socket has sent those bytes."""
        done = self._handed
        if done:
            self._handed = []
        return done

    def _send(self, parts: list[Buf], checksum: Checksum | None) -> None:
        sealer = self._sealer
        digest_size = checksum.digest_size if checksum is not None else 0
        if sealer is None:
            self._out.extend(parts)
            if digest_size:
                assert checksum is not None
                # above an algorithm's inline limit, its work is a Job
                if self.offload and sum(len(p) for p in parts) > checksum.inline_limit:
                    self._queue_job(self.new_job(lambda: checksum.compute(*parts)))
                else:
                    self._out.append(checksum.compute(*parts))
            return
        pieces: list[Buf | _Trailer] = list(parts)
        if digest_size and checksum is not None:
            pieces.append(_Trailer(checksum, parts))
        small: list[Buf | _Trailer] = []
        for piece in pieces:
            if not isinstance(piece, _Trailer) and len(piece) >= POOLED_MIN:
                if small:
                    self._seal_small(sealer, small)
                    small = []
                self._seal_large(sealer, piece)
            else:
                small.append(piece)
        if small:
            self._seal_small(sealer, small)

    def _seal_small(self, sealer: Sealer, parts: list[Buf | _Trailer]) -> None:
        """Small parts (headers, trailers, small payloads) share one record."""
        size = sum(len(p) for p in parts)
        sealed_len = size + sealer.cipher.tag_size
        aad = REC_HEADER.pack(sealed_len)
        number = sealer.next_counter()
        trailer = next((p for p in parts if isinstance(p, _Trailer)), None)

        def seal() -> Buf:
            plain = [p.compute() if isinstance(p, _Trailer) else p for p in parts]
            return sealer.seal_record(number, b"".join(plain), aad)

        self._out.append(aad)
        self._queue_job(self._maybe_job(seal, size, trailer))

    def _seal_large(self, sealer: Sealer, payload: Buf) -> None:
        """A large payload is sealed from its own buffer into a pooled record buffer."""
        size = len(payload)
        sealed_len = size + sealer.cipher.tag_size
        record = _RECORDS.get(REC_HEADER.size + sealed_len)
        out = record.view
        REC_HEADER.pack_into(out, 0, sealed_len)
        aad = bytes(out[: REC_HEADER.size])
        number = sealer.next_counter()

        def seal() -> Buf:
            sealer.seal_into(number, payload, aad, out[REC_HEADER.size :])
            return out

        sealed = self._maybe_job(seal, size, None)
        self._queue_job(sealed)
        if isinstance(sealed, Job):
            job = sealed

            def release() -> None:
                # Dropped with the connection while a worker may still write into it:
                # the buffer goes back only when the job is over.
                if job.done:
                    record.release()
                else:
                    job.then = lambda _job: record.release()

            self._out.append(_AfterHandOver(release))
        else:
            self._out.append(_AfterHandOver(record.release))

    def _maybe_job(self, fn: Callable[[], Buf], size: int, trailer: _Trailer | None) -> Buf | Job:
        """``fn()`` now, or as a job when its sealing or checksum is worth a worker."""
        sealer = self._sealer
        assert sealer is not None
        if self.offload and (
            size > sealer.cipher.inline_limit
            or (trailer is not None and trailer.size > trailer.checksum.inline_limit)
        ):
            return self.new_job(fn)
        return fn()

    def _queue_job(self, item: Buf | Job) -> None:
        """Queue a piece of a frame that may be a job (counted: see data_to_send)."""
        if isinstance(item, Job):
            self._jobs_queued += 1
        self._out.append(item)

    def data_to_send(self) -> list[Buf]:
        """Everything queued up to the first frame whose job has not finished."""
        q = self._out
        out: list[Buf] = []
        if not self._jobs_queued:  # the common case: one pass, no job to wait for
            handed = self._handed
            for item in q:
                if item.__class__ is _AfterHandOver:
                    handed.append(item.fn)
                else:
                    out.append(item)  # type: ignore[arg-type]
            q.clear()
            return out
        while q:
            head = q[0]
            if isinstance(head, _AfterHandOver):
                q.popleft()
                self._handed.append(head.fn)
                continue
            if isinstance(head, Job):
                if not head.done:
                    break
                if head.error is not None:
                    raise head.error
                q.popleft()
                self._jobs_queued -= 1
                out.append(head.result)
            else:
                q.popleft()
                out.append(head)
        return out
