"""``linear``: members concatenated end to end, plus what every multi-member layer shares.

A linear (and a stripe) device has no redundancy: a member failure is an I/O
error to the caller.  Requests that cross a member boundary are split and the
pieces run concurrently; a PREFLUSH becomes a flush of *every* member first,
because writes acked earlier may sit on members this request does not touch.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
from abc import abstractmethod
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar, cast

from dst.device import (
    CACHE,
    EXTENTS,
    READ,
    TRIM,
    WRITE,
    ZERO,
    BlockDevice,
    Buffer,
    Capabilities,
    Extent,
    IoCounters,
    IoFlags,
    checked_extents,
    fast_zero_refused,
    merge_extents,
)
from dst.errors import DstError, IoError, UsageError
from dst.units import format_size

log = logging.getLogger("dst.stack")
T = TypeVar("T")


def merge_capabilities(caps: Sequence[Capabilities]) -> Capabilities:
    """What a stack over these devices can promise: the intersection of theirs."""
    return Capabilities(
        read_only=any(c.read_only for c in caps),
        can_flush=all(c.can_flush for c in caps),
        can_fua=all(c.can_fua for c in caps),
        can_trim=all(c.can_trim for c in caps) and not any(c.read_only for c in caps),
        can_zero=all(c.can_zero for c in caps),
        can_fast_zero=all(c.can_fast_zero for c in caps),
        can_multi_conn=all(c.can_multi_conn for c in caps),
        min_block=max(c.min_block for c in caps),
        preferred_block=max(c.preferred_block for c in caps),
        max_request=min(c.max_request for c in caps),
    )


def as_bytes_view(data: Buffer) -> memoryview:
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


async def gather_all(aws: Sequence[Awaitable[None]]) -> None:
    """Run pieces concurrently and wait for *all* of them (they use the caller's buffer)
    before raising the first error."""
    if len(aws) == 1:
        await aws[0]
        return
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def gather_results(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Run queries concurrently, wait for all of them, then raise the first error."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return cast(list[T], results)


def member_summary(dev: BlockDevice) -> dict[str, Any]:
    """One member as status shows it: its own statistics plus uri, state, identity, size."""
    try:
        stats = dict(dev.statistics())
    except Exception as exc:  # a member's statistics must never break status
        stats = {"statistics_error": str(exc)}
    stats.update(
        uri=dev.name,
        state=dev.state,
        identity=str(dev.identity) if dev.identity is not None else None,
        size=dev.size,
    )
    return stats


def combined_state(devices: Sequence[BlockDevice]) -> str:
    """Without redundancy the stack is as healthy as its sickest member."""
    states = {d.state for d in devices}
    for s in ("failed", "reconnecting", "connecting"):
        if s in states:
            return s
    return "connected"


class Composite(BlockDevice):
    """A device over several members: checks, capabilities, state, statistics, close."""

    kind = "composite"

    def __init__(self, members: Sequence[BlockDevice], *, name: str | None = None) -> None:
        if not members:
            raise UsageError(f"a {self.kind} device needs at least one member")
        self.members = list(members)
        self.name = name or self.kind
        self.size = 0
        self.capabilities = Capabilities()
        self.counters: IoCounters = IoCounters()
        self._closed = False
        self.state = combined_state(self.members)
        for m in self.members:
            m.subscribe(self._member_state)

    def _member_state(self, dev: BlockDevice, state: str) -> None:
        self.set_state(combined_state(self.members))

    async def start(self) -> None:
        """Check that every member is reachable, then lay the members out."""
        missing = [m.name for m in self.members if m.state != "connected" or m.size <= 0]
        if missing:
            raise DstError(
                f"{self.kind} member{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"not reachable; a {self.kind} device has no redundancy, so every member must "
                "be up to start"
            )
        self.capabilities = merge_capabilities([m.capabilities for m in self.members])
        self._layout()
        self.set_state(combined_state(self.members))

    @abstractmethod
    def _layout(self) -> None:
        """Compute the size and where each member's bytes are (stripe or concatenation)."""

    async def _preflush(self, flags: IoFlags) -> IoFlags:
        if flags & IoFlags.PREFLUSH:
            await self.flush()
            flags &= ~IoFlags.PREFLUSH
        return flags

    def _fast_zero_possible(self, flags: IoFlags) -> None:
        """A FAST_ZERO that a member could never take is refused before any member
        zeroes its part. (One that a member refuses at run time may leave the other
        parts zeroed: the caller writes zeroes over all of it, which is what it asked.)"""
        if flags & IoFlags.FAST_ZERO and not self.capabilities.can_fast_zero:
            self.counters.errors += 1
            raise fast_zero_refused(self.name, "a member cannot zero fast")

    async def flush(self) -> None:
        try:
            await gather_all([m.flush() for m in self.members])
        except IoError:
            self.counters.errors += 1
            raise
        self.counters.flushes += 1

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "mode": self.kind,
            "size": self.size,
            "state": self.state,
            "members": [member_summary(m) for m in self.members],
        }
        stats.update(self.counters.as_dict())
        return stats

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        results = await asyncio.gather(*(m.aclose() for m in self.members), return_exceptions=True)
        for m, r in zip(self.members, results, strict=True):
            if isinstance(r, Exception):
                log.warning("%s: closing member %s failed: %s", self.name, m.name, r)


class LinearDevice(Composite):
    """Members one after another: member i holds bytes [start_i, start_i + size_i)."""

    kind = "linear"

    def __init__(self, members: Sequence[BlockDevice], *, name: str | None = None) -> None:
        super().__init__(members, name=name)
        self.starts: list[int] = []

    def _layout(self) -> None:
        self.starts = []
        pos = 0
        for m in self.members:
            self.starts.append(pos)
            pos += m.size
        self.size = pos
        log.info(
            "linear over %d members: %s (%d bytes) = %s",
            len(self.members),
            format_size(self.size),
            self.size,
            " + ".join(f"{format_size(m.size)} on {m.name}" for m in self.members),
        )

    def _pieces(self, offset: int, length: int) -> list[tuple[BlockDevice, int, int, int]]:
        """(member, offset in member, offset in request, length) for each member touched."""
        out: list[tuple[BlockDevice, int, int, int]] = []
        i = bisect.bisect_right(self.starts, offset) - 1
        pos, end = offset, offset + length
        while pos < end:
            m = self.members[i]
            n = min(end, self.starts[i] + m.size) - pos
            if n > 0:
                out.append((m, pos - self.starts[i], pos - offset, n))
                pos += n
            i += 1
        return out

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        view = as_bytes_view(buf)
        self.check(READ, offset, len(view))
        flags = await self._preflush(flags)
        await gather_all(
            [
                m.read_into(mo, view[r : r + n], flags)
                for m, mo, r, n in self._pieces(offset, len(view))
            ]
        )
        self.counters.reads += 1
        self.counters.bytes_read += len(view)

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        view = as_bytes_view(data)
        self.check(WRITE, offset, len(view))
        flags = await self._preflush(flags)
        await gather_all(
            [m.write(mo, view[r : r + n], flags) for m, mo, r, n in self._pieces(offset, len(view))]
        )
        self.counters.writes += 1
        self.counters.bytes_written += len(view)

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(TRIM, offset, length)
        if not self.capabilities.can_trim:
            raise IoError(errno.EOPNOTSUPP, f"{self.name} does not support trim")
        flags = await self._preflush(flags)
        await gather_all([m.trim(mo, n, flags) for m, mo, _, n in self._pieces(offset, length)])
        self.counters.trims += 1

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(ZERO, offset, length)
        self._fast_zero_possible(flags)
        flags = await self._preflush(flags)
        await gather_all(
            [m.write_zeroes(mo, n, flags) for m, mo, _, n in self._pieces(offset, length)]
        )
        self.counters.zeroes += 1

    async def cache(self, offset: int, length: int) -> None:
        self.check(CACHE, offset, length)
        await gather_all([m.cache(mo, n) for m, mo, _, n in self._pieces(offset, length)])
        self.counters.caches += 1

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Each member's extents for its piece, shifted to the device's offsets; an answer
        that stops short ends the result there (the caller asks again from that point)."""
        self.check(EXTENTS, offset, length)
        pieces = self._pieces(offset, length)
        answers = await gather_results([m.extents(mo, n) for m, mo, _, n in pieces])
        out: list[Extent] = []
        for (m, mo, r, n), got in zip(pieces, answers, strict=True):
            checked_extents(m.name, mo, n, got)
            shift = offset + r - mo
            out.extend(Extent(e.offset + shift, e.length, e.flags) for e in got)
            if got[-1].end < mo + n:
                break
        return merge_extents(out)
