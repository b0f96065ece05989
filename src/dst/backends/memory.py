"""``memory:SIZE``: a volatile store in anonymous memory, for tests and demos.

The mapping is private, anonymous and not reserved, so a large device costs
nothing until it is written, and trimmed pages go back to the kernel
(``MADV_DONTNEED`` on a private anonymous mapping refills them with zeroes).

What was written is recorded per granule (a page, or larger for very large devices)
for ``extents``: the kernel cannot say (a swapped-out page is not resident but holds
data), so the store keeps its own map.
"""

from __future__ import annotations

import errno
import mmap
import re
import uuid
from typing import Any

from dst.backends.base import Backend, fill_zeroes
from dst.device import HOLE_ZERO, Extent, ExtentFlags
from dst.errors import StorageError
from dst.units import format_size

PAGE = mmap.PAGESIZE
MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000)  # not in every stub set
MAX_GRANULES = 16 << 20  # the allocation map costs at most 16 MiB

# granule states in the allocation map, and what extents reports for them
HOLE, DATA, ZEROED = 0, 1, 2
_STATUS = {HOLE: HOLE_ZERO, DATA: ExtentFlags.DATA, ZEROED: ExtentFlags.ZERO}
_RUNS = {state: re.compile(bytes([state]) + b"+") for state in _STATUS}


class MemoryBackend(Backend):
    """Bytes in RAM, gone when the process ends; calls are cheap, so they run inline."""

    kind = "memory"
    blocking = False
    can_trim = True
    can_zero = True
    can_fua = True
    can_flush = True
    trim_reads_zeroes = True

    def __init__(self, spec: str, size: int, *, read_only: bool = False) -> None:
        self.spec = spec
        self.size = size
        self.read_only = read_only
        self.identity = uuid.uuid4()  # nothing survives the process, so neither does this
        try:
            self._map = mmap.mmap(
                -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
            )
        except OSError as e:
            raise StorageError(
                f"cannot map {format_size(size)} of memory for {spec}: {e.strerror}; "
                "give a smaller size"
            ) from None
        self._view: memoryview | None = memoryview(self._map)
        self.granule = PAGE
        while -(-size // self.granule) > MAX_GRANULES:
            self.granule *= 2
        self._map_state = bytearray(-(-size // self.granule))  # all HOLE

    def _mem(self) -> memoryview:
        if self._view is None:
            raise OSError(errno.EBADF, f"{self.spec} is closed")
        return self._view

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = self._mem()[offset : offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self._mem()[offset : offset + len(buf)] = buf
        if len(buf):
            g = self.granule
            first, last = offset // g, -(-(offset + len(buf)) // g)
            self._map_state[first:last] = bytes([DATA]) * (last - first)

    def trim(self, offset: int, length: int) -> None:
        self.zero(offset, length, True)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        """Give whole pages back to the kernel; zero the partial pages at the edges (always
        fast: nothing larger than a page is written, so FAST_ZERO changes nothing).

        The granules it covers whole become holes, or (NO_HOLE) allocated zeroes; the
        partial ones at the edges keep their state, which stays true (zeroes were written
        into data, or into what already read as zeroes)."""
        mem = self._mem()
        end = offset + length
        g = self.granule
        first, last = -(-offset // g), end // g
        if last > first:
            state = HOLE if may_trim else ZEROED
            self._map_state[first:last] = bytes([state]) * (last - first)
        start_page = -(-offset // PAGE) * PAGE
        end_page = end // PAGE * PAGE
        if end_page - start_page <= 0:
            fill_zeroes(mem[offset:end])
            return
        fill_zeroes(mem[offset:start_page])
        fill_zeroes(mem[end_page:end])
        self._map.madvise(mmap.MADV_DONTNEED, start_page, end_page - start_page)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Runs of the allocation map: never written or trimmed is a hole (reads zeroes)."""
        self._mem()
        states, g = self._map_state, self.granule
        end = offset + length
        out: list[Extent] = []
        pos, last = offset, -(-end // g)
        while pos < end:
            i = pos // g
            state = states[i]
            m = _RUNS[state].match(states, i, last)
            assert m is not None
            stop = min(end, m.end() * g)
            out.append(Extent(pos, stop - pos, _STATUS[state]))
            pos = stop
        return out

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
            self._map.close()

    def statistics(self) -> dict[str, Any]:
        stats = super().statistics()
        stats["volatile"] = True
        return stats
