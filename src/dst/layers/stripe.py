"""``stripe``: RAID0 over N members in chunks of CHUNK bytes.

Chunk unit ``u`` (bytes ``[u*CHUNK, (u+1)*CHUNK)``) lives on member ``u % N`` at
member offset ``(u // N) * CHUNK``.  The units a request touches on one member are
consecutive there, so each member gets *one* request per caller request (data
gathered or scattered through a bounce buffer when several units are involved),
and the members run concurrently.  Every member contributes the same number of
whole chunks: the smallest member decides, the rest of the larger ones is unused.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Awaitable, Sequence
from typing import Any

from dst.device import (
    CACHE,
    EXTENTS,
    READ,
    TRIM,
    WRITE,
    ZERO,
    BlockDevice,
    Buffer,
    Extent,
    IoFlags,
    all_extents,
    merge_extents,
)
from dst.errors import DstError, IoError, UsageError
from dst.layers.linear import Composite, as_bytes_view, gather_all, gather_results, log
from dst.units import format_size

Piece = tuple[int, int, int]  # offset in member, offset in request, length


class StripeDevice(Composite):
    """Chunks dealt round-robin over the members."""

    kind = "stripe"

    def __init__(
        self, members: Sequence[BlockDevice], chunk: int, *, name: str | None = None
    ) -> None:
        if chunk <= 0:
            raise UsageError(f"invalid stripe chunk {chunk}: give a positive size such as 64K")
        super().__init__(members, name=name)
        self.chunk = chunk
        self.per_member = 0

    def _layout(self) -> None:
        c = self.chunk
        block = self.capabilities.min_block
        if c % block:
            raise DstError(
                f"stripe chunk {format_size(c)} is not a multiple of the members' block size "
                f"{block}; choose a chunk that is"
            )
        smallest = min(m.size for m in self.members)
        self.per_member = smallest // c * c
        if self.per_member == 0:
            raise DstError(
                f"stripe chunk {format_size(c)} is larger than the smallest member "
                f"({format_size(smallest)}); choose a smaller chunk"
            )
        self.size = self.per_member * len(self.members)
        unused = [
            f"{format_size(m.size - self.per_member)} on {m.name}"
            for m in self.members
            if m.size > self.per_member
        ]
        log.info(
            "stripe over %d members, chunk %s: %s (%d bytes), %s from each%s",
            len(self.members),
            format_size(c),
            format_size(self.size),
            self.size,
            format_size(self.per_member),
            f"; unused: {', '.join(unused)}" if unused else "",
        )

    def _split(self, offset: int, length: int) -> dict[int, list[Piece]]:
        """Member index -> its pieces, in member order (consecutive on the member)."""
        c, n = self.chunk, len(self.members)
        out: dict[int, list[Piece]] = {}
        pos, end = offset, offset + length
        unit = offset // c
        while pos < end:
            within = pos - unit * c
            size = min(c - within, end - pos)
            out.setdefault(unit % n, []).append(((unit // n) * c + within, pos - offset, size))
            pos += size
            unit += 1
        return out

    async def _read_member(
        self, m: BlockDevice, pieces: list[Piece], view: memoryview, flags: IoFlags
    ) -> None:
        if len(pieces) == 1:
            mo, r, size = pieces[0]
            await m.read_into(mo, view[r : r + size], flags)
            return
        total = sum(p[2] for p in pieces)
        bounce = bytearray(total)
        await m.read_into(pieces[0][0], memoryview(bounce), flags)
        pos = 0
        for _, r, size in pieces:
            view[r : r + size] = bounce[pos : pos + size]
            pos += size

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        view = as_bytes_view(buf)
        self.check(READ, offset, len(view))
        flags = await self._preflush(flags)
        split = self._split(offset, len(view))
        await gather_all(
            [self._read_member(self.members[i], p, view, flags) for i, p in split.items()]
        )
        self.counters.reads += 1
        self.counters.bytes_read += len(view)

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        view = as_bytes_view(data)
        self.check(WRITE, offset, len(view))
        flags = await self._preflush(flags)
        aws: list[Awaitable[None]] = []
        for i, pieces in self._split(offset, len(view)).items():
            if len(pieces) == 1:
                mo, r, size = pieces[0]
                aws.append(self.members[i].write(mo, view[r : r + size], flags))
            else:
                gathered = b"".join(view[r : r + size] for _, r, size in pieces)
                aws.append(self.members[i].write(pieces[0][0], gathered, flags))
        await gather_all(aws)
        self.counters.writes += 1
        self.counters.bytes_written += len(view)

    def _ranges(self, offset: int, length: int) -> list[tuple[BlockDevice, int, int]]:
        """Each member's one contiguous range, computed without walking the chunks (a trim
        of a whole device would otherwise visit millions of them)."""
        if length <= 0:
            return []
        c, n, end = self.chunk, len(self.members), offset + length
        u0, u1 = offset // c, (end - 1) // c
        out: list[tuple[BlockDevice, int, int]] = []
        for i, m in enumerate(self.members):
            first = u0 + (i - u0) % n
            last = u1 - (u1 - i) % n
            if first > last:
                continue
            start = (first // n) * c + (offset - first * c if first == u0 else 0)
            stop = (last // n) * c + (end - last * c if last == u1 else c)
            out.append((m, start, stop - start))
        return out

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(TRIM, offset, length)
        if not self.capabilities.can_trim:
            raise IoError(errno.EOPNOTSUPP, f"{self.name} does not support trim")
        flags = await self._preflush(flags)
        await gather_all([m.trim(mo, n, flags) for m, mo, n in self._ranges(offset, length)])
        self.counters.trims += 1

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(ZERO, offset, length)
        self._fast_zero_possible(flags)
        flags = await self._preflush(flags)
        await gather_all(
            [m.write_zeroes(mo, n, flags) for m, mo, n in self._ranges(offset, length)]
        )
        self.counters.zeroes += 1

    async def cache(self, offset: int, length: int) -> None:
        """Each member prefetches its one range of the request."""
        self.check(CACHE, offset, length)
        await gather_all([m.cache(mo, n) for m, mo, n in self._ranges(offset, length)])
        self.counters.caches += 1

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Every member's extents over its one range, dealt back chunk by chunk; whole rows
        on which all members agree become one extent without visiting their chunks (a hole
        of many gigabytes is one step, not one per chunk)."""
        self.check(EXTENTS, offset, length)
        if not length:
            return []
        ranges = self._ranges(offset, length)
        answers = await gather_results([all_extents(m, mo, n) for m, mo, n in ranges])
        maps: dict[int, tuple[list[int], list[Extent]]] = {}
        for (m, _, _), got in zip(ranges, answers, strict=True):
            maps[self.members.index(m)] = ([e.offset for e in got], got)

        def at(member: int, mo: int) -> Extent:
            starts, exts = maps[member]
            return exts[bisect.bisect_right(starts, mo) - 1]

        c, n, end = self.chunk, len(self.members), offset + length
        row = c * n
        out: list[Extent] = []
        pos = offset
        while pos < end:
            unit, within = divmod(pos, c)
            mo = (unit // n) * c + within
            if within == 0 and unit % n == 0 and end - pos >= row:
                first = at(0, mo)
                rows = (end - pos) // row
                for j in range(n):
                    e = first if j == 0 else at(j, mo)
                    rows = 0 if e.flags != first.flags else min(rows, (e.end - mo) // c)
                    if not rows:
                        break
                if rows:
                    out.append(Extent(pos, rows * row, first.flags))
                    pos += rows * row
                    continue
            e = at(unit % n, mo)
            size = min(c - within, e.end - mo, end - pos)
            out.append(Extent(pos, size, e.flags))
            pos += size
        return merge_extents(out)

    def statistics(self) -> dict[str, Any]:
        stats = super().statistics()
        stats["chunk"] = self.chunk
        stats["per_member"] = self.per_member
        return stats
