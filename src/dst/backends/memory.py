"""``memory:SIZE``: a volatile store in anonymous memory, for tests and demos.

The mapping is private, anonymous and not reserved, so a large device costs
nothing until it is written, and trimmed pages go back to the kernel
(``MADV_DONTNEED`` on a private anonymous mapping refills them with zeroes).
"""

from __future__ import annotations

import errno
import mmap
import uuid
from typing import Any

from dst.backends.base import Backend, fill_zeroes
from dst.errors import StorageError
from dst.units import format_size

PAGE = mmap.PAGESIZE
MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000)  # not in every stub set


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

    def _mem(self) -> memoryview:
        if self._view is None:
            raise OSError(errno.EBADF, f"{self.spec} is closed")
        return self._view

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = self._mem()[offset : offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self._mem()[offset : offset + len(buf)] = buf

    def trim(self, offset: int, length: int) -> None:
        self.zero(offset, length, True)

    def zero(self, offset: int, length: int, may_trim: bool) -> None:
        """Give whole pages back to the kernel; zero the partial pages at the edges."""
        mem = self._mem()
        end = offset + length
        start_page = -(-offset // PAGE) * PAGE
        end_page = end // PAGE * PAGE
        if end_page - start_page <= 0:
            fill_zeroes(mem[offset:end])
            return
        fill_zeroes(mem[offset:start_page])
        fill_zeroes(mem[end_page:end])
        self._map.madvise(mmap.MADV_DONTNEED, start_page, end_page - start_page)

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
            self._map.close()

    def statistics(self) -> dict[str, Any]:
        stats = super().statistics()
        stats["volatile"] = True
        return stats
