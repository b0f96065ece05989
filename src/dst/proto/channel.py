"""The per-connection byte channel under both cores: plain frames, or AEAD records.

Before and during the handshake, frames travel as they are.  Once both sides
agreed on a cipher, every frame is sealed as one record:
``u32 sealed_length | ciphertext+tag``; the length bytes are the AEAD's
associated data, nonces are per-direction counters, so tampering, replay,
reordering and truncation all fail the tag check.  The frame layer above never
knows which mode it is in.
"""

from __future__ import annotations

from collections.abc import Callable

from dst.crypto.aead import Opener, Sealer
from dst.errors import ProtocolError
from dst.proto.reader import ChunkReader, take_buffered
from dst.proto.wire import REC_HEADER

Buf = bytes | bytearray | memoryview


class Channel:
    """Owns the receive path (socket bytes -> frame chunks) and the send queue."""

    def __init__(self, on_frame_chunk: Callable[[memoryview], None], max_record: int) -> None:
        self.frames = ChunkReader(on_frame_chunk)
        self._records: ChunkReader | None = None
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._max_record = max_record
        self._rec_len = 0
        self._out: list[Buf] = []
        self.out_bytes = 0

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

    def stop(self) -> None:
        self.frames.stop()
        if self._records is not None:
            self._records.stop()

    @property
    def sealed(self) -> bool:
        return self._sealer is not None

    def start_sealing(self, sealer: Sealer, opener: Opener) -> None:
        """Switch both directions to AEAD records; staged bytes are records already."""
        self._sealer = sealer
        self._opener = opener
        self._records = ChunkReader(self._on_record_chunk)
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
            self._records.expect(n, memoryview(bytearray(n)))
        else:
            self._rec_len = 0
            plain = self._opener.open(chunk, self._rec_aad)
            self._records.expect(REC_HEADER.size)
            self.frames.feed(plain)

    # ---- send ----------------------------------------------------------
    def send(self, parts: list[Buf]) -> None:
        """Queue one frame (its parts in order)."""
        if self._sealer is None:
            for p in parts:
                self._out.append(p)
                self.out_bytes += len(p)
            return
        plain = b"".join(parts) if len(parts) > 1 else bytes(parts[0])
        n = len(plain) + self._sealer.cipher.tag_size
        aad = REC_HEADER.pack(n)
        sealed = self._sealer.seal(plain, aad)
        self._out.append(aad)
        self._out.append(sealed)
        self.out_bytes += len(aad) + len(sealed)

    def data_to_send(self) -> list[Buf]:
        out, self._out = self._out, []
        self.out_bytes = 0
        return out
