"""Incremental, zero-copy reader for length-delimited chunks of a byte stream.

The owner says what comes next: ``expect(n)`` for a small chunk (a header; it is
handed over as a view of the staging buffer and must be consumed at once), or
``expect(n, target)`` for a payload that must end up in ``target``.  When a large
payload is pending and nothing is staged, :meth:`get_buffer` returns the target
itself, so the socket's ``recv_into`` writes the payload where it belongs and no
Python code copies it.  Small payloads arrive together with their headers in
the staging buffer and are copied once (cheaper than an extra system call).
``skip(n, then)`` drops bytes nobody wants (a refused request's payload) without a
buffer for them.

Every core reads through it: the DST cores (their frames and sealed records, via
``proto/channel.py``) and the NBD server and client cores.
"""

from __future__ import annotations

from collections.abc import Callable

STAGING_SIZE = 20 << 10  # enough for any handshake message; grown after authentication
DIRECT_MIN = 16 << 10


class ChunkReader:
    """Splits a stream into the chunks its owner asks for, in order."""

    def __init__(
        self,
        on_chunk: Callable[[memoryview], None],
        staging_size: int = STAGING_SIZE,
        direct_min: int = DIRECT_MIN,
    ) -> None:
        self._on_chunk = on_chunk
        self._buf = bytearray(staging_size)
        self._mv = memoryview(self._buf)
        self._direct_min = direct_min
        self._r = 0
        self._w = 0
        self._need = 0
        self._target: memoryview | None = None
        self._filled = 0
        self._direct = False
        self._stopped = False
        self._then: Callable[[memoryview], None] | None = None
        self._skip = 0
        self._skip_then: Callable[[], None] | None = None
        self.direct_bytes = 0  # payload bytes received without a copy (for statistics)
        self.copied_bytes = 0

    def expect(
        self,
        n: int,
        target: memoryview | None = None,
        then: Callable[[memoryview], None] | None = None,
    ) -> None:
        """Ask for the next ``n`` bytes (``n`` > 0), into ``target`` if given; they go to
        ``then`` if given (until the next ``expect``), else to the owner's ``on_chunk``."""
        if n <= 0:
            raise ValueError("expect() needs a positive length")
        if target is None and n > len(self._buf):
            raise ValueError("a staged chunk must fit the staging buffer; give a target")
        self._need = n
        self._target = target
        self._filled = 0
        self._then = then

    def skip(self, n: int, then: Callable[[], None]) -> None:
        """Drop the next ``n`` bytes (``n`` > 0), then call ``then`` (which says what comes
        next with ``expect``)."""
        if n <= 0:
            raise ValueError("skip() needs a positive length")
        self._skip = n
        self._skip_then = then
        self._target = None

    def grow(self, staging_size: int) -> None:
        """Use a larger staging buffer from now on (after authentication)."""
        if staging_size <= len(self._buf):
            return
        n = self._w - self._r
        buf = bytearray(staging_size)
        buf[:n] = self._mv[self._r : self._w]
        self._buf = buf
        self._mv = memoryview(buf)
        self._r, self._w = 0, n

    def drop_target(self) -> None:
        """Write nothing more into the pending target (its owner gave it up): the rest of
        its bytes are skipped, and its handler then runs with an empty view."""
        t = self._target
        if t is None or self._stopped:
            return
        left = self._need - self._filled
        then = self._then or self._on_chunk
        self._direct = False
        self.skip(left, lambda: then(memoryview(b"")))

    def stop(self) -> None:
        """Discard everything from now on (after a protocol error)."""
        self._stopped = True
        self._target = None

    @property
    def buffered(self) -> int:
        return self._w - self._r

    def get_buffer(self) -> memoryview:
        if self._stopped:
            self._r = self._w = 0
            self._direct = False
            return self._mv
        t = self._target
        if t is not None and self._r == self._w and self._need - self._filled >= self._direct_min:
            self._direct = True
            return t[self._filled : self._need]
        self._direct = False
        if self._r == self._w:
            self._r = self._w = 0
        elif self._w == len(self._buf) or (t is None and self._r + self._need > len(self._buf)):
            n = self._w - self._r
            self._buf[:n] = self._mv[self._r : self._w]
            self._r, self._w = 0, n
        return self._mv[self._w :]

    def direct_target(self) -> memoryview | None:
        """Where the next bytes belong when they may be written there directly: the rest
        of a pending target, with nothing staged ahead of it (else None).  Whoever
        writes ``n`` bytes into it then calls ``buffer_updated(n)``, like a socket."""
        t = self._target
        if self._stopped or t is None or self._r != self._w:
            return None
        self._direct = True
        return t[self._filled : self._need]

    def buffer_updated(self, n: int) -> None:
        if self._stopped:
            return
        if self._direct:
            self._direct = False
            self._filled += n
            self.direct_bytes += n
            if self._filled == self._need:
                target = self._target
                assert target is not None
                self._target = None
                (self._then or self._on_chunk)(target[: self._need])
            return
        self._w += n
        self._process()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copying entry point (tests, fuzzing, decrypted records)."""
        mv = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        pos = 0
        while pos < len(mv) and not self._stopped:
            buf = self.get_buffer()
            k = min(len(buf), len(mv) - pos)
            buf[:k] = mv[pos : pos + k]
            pos += k
            self.buffer_updated(k)

    def _process(self) -> None:
        while not self._stopped:
            avail = self._w - self._r
            if avail == 0:
                break
            if self._skip:
                k = min(avail, self._skip)
                self._r += k
                self._skip -= k
                if self._skip:
                    break
                then, self._skip_then = self._skip_then, None
                assert then is not None
                then()
                continue
            t = self._target
            if t is not None:
                k = min(avail, self._need - self._filled)
                t[self._filled : self._filled + k] = self._mv[self._r : self._r + k]
                self._r += k
                self._filled += k
                self.copied_bytes += k
                if self._filled < self._need:
                    break
                self._target = None
                (self._then or self._on_chunk)(t[: self._need])
            else:
                if avail < self._need:
                    break
                view = self._mv[self._r : self._r + self._need]
                self._r += self._need
                (self._then or self._on_chunk)(view)
        if self._r == self._w:
            self._r = self._w = 0


def take_buffered(reader: ChunkReader) -> bytes:
    """Remove and return the staged bytes not yet handed out (used at a mode switch)."""
    data = bytes(reader._mv[reader._r : reader._w])
    reader._r = reader._w = 0
    return data
