"""A bounded pool of reusable transaction buffers.

Steady-state I/O takes buffers from here and gives them back, so it allocates
nothing per request, and the memory kept for reuse has a ceiling. Pure Python,
no locks: every user lives on one event loop thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from mypy_extensions import mypyc_attr

MIN_CLASS = 12  # 4 KiB
MAX_CLASS = 26  # 64 MiB


def _size_class(n: int) -> int:
    c = max(MIN_CLASS, (max(n, 1) - 1).bit_length())
    return c


class PooledBuffer:
    """A buffer lent by a :class:`BufferPool`; ``view`` is exactly the asked length."""

    __slots__ = ("_pool", "cls", "raw", "view")

    def __init__(self, pool: BufferPool | None, raw: bytearray, length: int, cls: int) -> None:
        self._pool = pool
        self.raw = raw
        self.cls = cls
        self.view = memoryview(raw)[:length]

    def release(self) -> None:
        """Give the buffer back; using ``view`` afterwards is a bug."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._give_back(self)


@dataclass
class PoolStats:
    allocated: int = 0
    reused: int = 0
    retained_bytes: int = 0
    outstanding: int = 0


# compiled (dst.compiled); tests subclass it to watch what is lent
@mypyc_attr(allow_interpreted_subclasses=True)
class BufferPool:
    """Power-of-two size classes; keeps at most ``max_retained`` bytes for reuse."""

    def __init__(self, max_retained: int = 256 << 20) -> None:
        self.max_retained = max_retained
        self._free: dict[int, list[bytearray]] = {}
        self.stats = PoolStats()

    def get(self, length: int) -> PooledBuffer:
        cls = (length - 1).bit_length() if length > 1 << MIN_CLASS else MIN_CLASS
        stats = self.stats
        if cls > MAX_CLASS:
            stats.allocated += 1
            stats.outstanding += 1
            return PooledBuffer(self, bytearray(length), length, -1)
        free = self._free.get(cls)
        if free:
            raw = free.pop()
            stats.retained_bytes -= len(raw)
            stats.reused += 1
        else:
            raw = bytearray(1 << cls)
            stats.allocated += 1
        stats.outstanding += 1
        return PooledBuffer(self, raw, length, cls)

    def _give_back(self, buf: PooledBuffer) -> None:
        stats = self.stats
        stats.outstanding -= 1
        raw = buf.raw
        if buf.cls < 0 or stats.retained_bytes + len(raw) > self.max_retained:
            return
        free = self._free.get(buf.cls)
        if free is None:
            free = self._free[buf.cls] = []
        free.append(raw)
        stats.retained_bytes += len(raw)
