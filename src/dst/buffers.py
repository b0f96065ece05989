"""A bounded pool of reusable transaction buffers.

Steady-state I/O takes buffers from here and gives them back, so it allocates
nothing per request, and the memory kept for reuse has a ceiling. Pure Python,
no locks: every user lives on one event loop thread.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class BufferPool:
    """Power-of-two size classes; keeps at most ``max_retained`` bytes for reuse."""

    def __init__(self, max_retained: int = 256 << 20) -> None:
        self.max_retained = max_retained
        self._free: dict[int, list[bytearray]] = {}
        self.stats = PoolStats()

    def get(self, length: int) -> PooledBuffer:
        cls = _size_class(length)
        if cls > MAX_CLASS:
            self.stats.allocated += 1
            self.stats.outstanding += 1
            return PooledBuffer(self, bytearray(length), length, -1)
        free = self._free.get(cls)
        if free:
            raw = free.pop()
            self.stats.retained_bytes -= len(raw)
            self.stats.reused += 1
        else:
            raw = bytearray(1 << cls)
            self.stats.allocated += 1
        self.stats.outstanding += 1
        return PooledBuffer(self, raw, length, cls)

    def _give_back(self, buf: PooledBuffer) -> None:
        self.stats.outstanding -= 1
        if buf.cls < 0 or self.stats.retained_bytes + len(buf.raw) > self.max_retained:
            return
        self._free.setdefault(buf.cls, []).append(buf.raw)
        self.stats.retained_bytes += len(buf.raw)
