"""The per-connection byte channel under both cores: plain frames, or AEAD records.

Before and during the handshake, frames travel as they are.  Once both sides
agreed on a cipher, every frame is sealed as one record:
``u32 sealed_length | ciphertext+tag``; the length bytes are the AEAD's
associated data, nonces are per-direction counters, so tampering, replay,
reordering and truncation all fail the tag check.  The frame layer above never
knows which mode it is in.

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

# Sealed record bodies are received into reusable buffers (one event loop per process).
_RECORDS = BufferPool(max_retained=64 << 20)


def _joined(parts: list[Buf]) -> bytes:
    return b"".join(parts)


class _AfterHandOver:
    """A marker in the send queue: call ``fn`` once the bytes before it left the core."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn


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
        self._handed: list[Callable[[], None]] = []
        self._opening: deque[Job] = deque()
        self.offload = False
        self.jobs: list[Job] = []

    # ---- jobs ------------------------------------------------------------
    def new_job(self, fn: Callable[[], object], then: Callable[[Job], None] | None = None) -> Job:
        job = Job(fn, then)
        self.jobs.append(job)
        return job

    def take_jobs(self) -> list[Job]:
        jobs, self.jobs = self.jobs, []
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

    def stop(self) -> None:
        """Stop receiving (after a protocol error); what is queued may still be sent."""
        self.frames.stop()
        if self._records is not None:
            self._records.stop()
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
        assert self._records is not None and self._opener is not None
        if self._rec_len == 0:
            (n,) = REC_HEADER.unpack(chunk)
            if n == 0 or n > self._max_record:
                raise ProtocolError(
                    f"sealed record of {n} bytes is outside 1..{self._max_record}; "
                    "the stream is corrupt"
                )
            self._rec_len = n
            self._rec_aad = bytes(chunk)
            self._rec_buf = _RECORDS.get(n)
            self._records.expect(n, self._rec_buf.view)
            return
        self._rec_len = 0
        self._records.expect(REC_HEADER.size)
        opener, aad, held = self._opener, self._rec_aad, self._rec_buf
        self._rec_buf = None
        number = opener.next_counter()
        if self.offload and len(chunk) > opener.cipher.inline_limit:
            body = chunk

            def opened(job: Job) -> None:
                if held is not None:
                    held.release()
                self._opened(job)

            self._opening.append(
                self.new_job(lambda: opener.open_record(number, body, aad), opened)
            )
            return
        try:
            plain = opener.open_record(number, chunk, aad)
        finally:
            if held is not None:
                held.release()
        if self._opening:  # keep arrival order behind records still being opened
            job = Job(lambda: plain)
            job.result = plain
            job.done = True
            self._opening.append(job)
            self._opened(None)
        else:
            self.frames.feed(plain)

    def _opened(self, _job: Job | None) -> None:
        q = self._opening
        while q and q[0].done:
            job = q.popleft()
            if job.error is not None:
                self.stop()
                if isinstance(job.error, ProtocolError):
                    raise job.error
                raise ProtocolError(f"cannot open a record: {job.error}")
            self.frames.feed(job.result)

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
        done, self._handed = self._handed, []
        return done

    def _send(self, parts: list[Buf], checksum: Checksum | None) -> None:
        size = sum(len(p) for p in parts)
        off = self.offload  # above an algorithm's inline limit, its work is a Job
        sealer = self._sealer
        digest_size = checksum.digest_size if checksum is not None else 0
        if sealer is None:
            self._out.extend(parts)
            if digest_size:
                assert checksum is not None
                if off and size > checksum.inline_limit:
                    self._out.append(self.new_job(lambda: checksum.compute(*parts)))
                else:
                    self._out.append(checksum.compute(*parts))
            return
        sealed_len = size + digest_size + sealer.cipher.tag_size
        aad = REC_HEADER.pack(sealed_len)
        number = sealer.next_counter()

        def seal() -> bytes:
            plain = [*parts, checksum.compute(*parts)] if digest_size and checksum else parts
            return sealer.seal_record(number, _joined(plain), aad)

        self._out.append(aad)
        if off and (
            size > sealer.cipher.inline_limit
            or (checksum is not None and size > checksum.inline_limit)
        ):
            self._out.append(self.new_job(seal))
        else:
            self._out.append(seal())

    def data_to_send(self) -> list[Buf]:
        """Everything queued up to the first frame whose job has not finished."""
        out: list[Buf] = []
        q = self._out
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
                out.append(head.result)
            else:
                q.popleft()
                out.append(head)
        return out
