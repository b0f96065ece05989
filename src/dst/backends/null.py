"""``null:SIZE``: reads zeroes and discards writes, like nbdkit's null plugin.

Useful to measure the protocol and the stack without any storage cost.
"""

from __future__ import annotations

import uuid
from typing import Any

from dst.backends.base import Backend, fill_zeroes
from dst.device import HOLE_ZERO, Extent


class NullBackend(Backend):
    """Every byte reads as zero; writes, trims and zeroes are accepted and forgotten."""

    kind = "null"
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
        self.identity = uuid.uuid4()

    def pread_into(self, buf: memoryview, offset: int) -> None:
        fill_zeroes(buf)

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        pass

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        pass  # nothing to do, so always fast

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Nothing is ever stored: one hole that reads as zeroes (nbdkit's null does this)."""
        return [Extent(offset, length, HOLE_ZERO)]

    def statistics(self) -> dict[str, Any]:
        stats = super().statistics()
        stats["volatile"] = True
        return stats
