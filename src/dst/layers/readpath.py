"""The mirror's read path: which in-sync leg answers, failing over, repairing a bad copy.

A read goes to the in-sync leg with the fewest reads in flight
(:meth:`ReadPath._pick_reader`); one that fails or does not answer within the leg
timeout is tried on the next, and the failed leg is then rewritten from the good copy
or degraded (:meth:`ReadPath._read_failed`).  Allocation status (``extents``) is asked
of the in-sync legs the same way.  The rules are stated in ``dst.layers.mirror``.  A
mixin of :class:`dst.layers.mirror.MirrorCore`: the state it names below is the core's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from dst.device import (
    EXTENTS,
    READ,
    BlockDevice,
    Extent,
    IoCounters,
    IoFlags,
    Rule,
    checked_extents,
)
from dst.errors import IoError
from dst.layers.bitmap import Record
from dst.layers.linear import as_bytes_view
from dst.layers.resync import IN_SYNC, Foreground, Leg, RangeLocks

log = logging.getLogger("dst.mirror")
T = TypeVar("T")


class ReadPath:
    """Read_into, read_source and the allocation status of the mirror."""

    name: str
    record: Record
    leg_timeout: float
    counters: IoCounters
    repairs: int
    foreground: Foreground
    locks: RangeLocks
    _rr: int
    _closed: bool

    if TYPE_CHECKING:  # the core's (dst.layers.mirror)

        def in_sync_legs(self) -> list[Leg]: ...

        def degrade(self, leg: Leg, why: str) -> bool: ...

        def check(self, rule: Rule, offset: int, length: int, *, split: bool = False) -> None: ...

        async def flush(self) -> None: ...

        def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]: ...

        async def _sync_quietly(self) -> None: ...

        async def _on_leg(self, leg: Leg, aw: Awaitable[None]) -> None: ...

        def _errors(self, op: str, results: list[tuple[Leg, BaseException]]) -> str: ...

    # ---- reads -------------------------------------------------------------------------------
    def _pick_reader(self, skip: set[Leg]) -> Leg | None:
        cands = [x for x in self.in_sync_legs() if x not in skip]
        if not cands:
            return None
        self._rr += 1
        n = len(cands)
        return min(
            enumerate(cands),
            key=lambda p: (p[1].dev.state != "connected", p[1].reading, (p[0] - self._rr) % n),
        )[1]

    async def _read(
        self, offset: int, view: memoryview, flags: IoFlags, *, skip: Leg | None, held: bool
    ) -> None:
        tried: set[Leg] = {skip} if skip is not None else set()
        failures: list[tuple[Leg, BaseException]] = []
        while True:
            leg = self._pick_reader(tried)
            if leg is None:
                first = failures[0][1] if failures else None
                raise IoError(
                    getattr(first, "errno", None) or errno.EIO,
                    f"{self.name}: read at {offset}+{len(view)} failed on every in-sync leg: "
                    f"{self._errors('no in-sync leg', failures)}",
                )
            tried.add(leg)
            leg.reading += 1
            try:
                await self._read_leg(leg, offset, view, flags, tried)
            except OSError as e:
                failures.append((leg, e))
                continue
            finally:
                leg.reading -= 1
            break
        for bad, why in failures:
            await self._read_failed(bad, why, offset, view, leg, held)

    async def _read_leg(
        self, leg: Leg, offset: int, view: memoryview, flags: IoFlags, tried: set[Leg]
    ) -> None:
        """Read from one leg.  If another in-sync leg could serve and this one has not
        answered within --leg-timeout, it is degraded and fenced: its read fails at once
        (nothing arrives in ``view`` later) and the caller tries the next leg."""
        timer = None
        if any(x not in tried for x in self.in_sync_legs()):
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.leg_timeout, self._read_timed_out, leg)
        try:
            await self._on_leg(leg, leg.dev.read_into(offset, view, flags))
        finally:
            if timer is not None:
                timer.cancel()

    def _read_timed_out(self, leg: Leg) -> None:
        if self._closed or leg.status != IN_SYNC:
            return
        if not any(x is not leg for x in self.in_sync_legs()):
            return  # the last in-sync leg is waited for, within its transaction budget
        why = (
            f"no answer to a read within --leg-timeout {self.leg_timeout:g} s "
            f"(its link is {leg.dev.state})"
        )
        if leg.dev.fence(why) and self.degrade(leg, why):
            self._spawn(self._sync_quietly())

    async def _read_failed(
        self, bad: Leg, err: BaseException, offset: int, view: memoryview, good: Leg, held: bool
    ) -> None:
        """Rewrite the region on a leg that answered with an error; degrade one whose link
        failed, or whose rewrite failed too."""
        if bad.removed or bad.status != IN_SYNC:
            return
        n = len(view)
        if bad.dev.state != "connected":
            if self.degrade(
                bad, f"a read at {offset}+{n} failed while it was {bad.dev.state}: {err}"
            ):
                await self.record.sync()
            return
        log.warning(
            "%s: read error at %d+%d (%s); rewriting the region from %s",
            bad.name,
            offset,
            n,
            err,
            good.name,
        )
        self.repairs += 1
        if held:  # the caller holds the range lock, so the good copy is still current
            await self._rewrite(bad, offset, bytes(view))
            return
        async with self.locks.lock(offset, offset + n):
            if bad.status != IN_SYNC or good.status != IN_SYNC:
                return
            data = bytearray(n)
            try:
                await self._on_leg(good, good.dev.read_into(offset, memoryview(data)))
            except OSError as e:
                log.warning("%s: cannot re-read %d+%d for the rewrite: %s", good.name, offset, n, e)
                return
            await self._rewrite(bad, offset, data)

    async def _rewrite(self, bad: Leg, offset: int, data: bytes | bytearray) -> None:
        try:
            await self._on_leg(bad, bad.dev.write(offset, data))
        except OSError as e:
            if self.degrade(bad, f"rewriting a region that failed to read failed too: {e}"):
                self.record.mark(bad.slot, offset, len(data))
                await self.record.sync()

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        view = as_bytes_view(buf)
        self.check(READ, offset, len(view))
        if flags & IoFlags.PREFLUSH:  # every leg's earlier writes, not just the reader's
            await self.flush()
            flags &= ~IoFlags.PREFLUSH
        self.foreground.begin()
        try:
            await self._read(offset, view, flags, skip=None, held=False)
        except IoError:
            self.counters.errors += 1
            raise
        finally:
            self.foreground.end()
        self.counters.reads += 1
        self.counters.bytes_read += len(view)

    async def read_source(self, offset: int, view: memoryview, target: Leg) -> None:
        """A resync read: from any in-sync leg but the target; the caller holds the lock."""
        await self._read(offset, view, IoFlags.NONE, skip=target, held=True)

    # ---- allocation status -----------------------------------------------------------------
    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation status from an in-sync leg: in-sync legs hold the same bytes, so what
        one reads as zeroes all do. Another in-sync leg answers if that one fails; legs that
        are behind (degraded, resyncing) never answer."""
        self.check(EXTENTS, offset, length)
        try:
            return await self.source_extents(offset, length)
        except IoError:
            self.counters.errors += 1
            raise

    async def source_extents(self, offset: int, length: int) -> list[Extent]:
        """:meth:`extents` without the checks and counters: also what a resync asks."""
        tried: set[Leg] = set()
        failures: list[tuple[Leg, BaseException]] = []
        while (leg := self._pick_reader(tried)) is not None:
            tried.add(leg)
            answer: list[Extent] = []

            async def query(dev: BlockDevice = leg.dev, into: list[Extent] = answer) -> None:
                into.extend(await dev.extents(offset, length))

            try:
                await self._on_leg(leg, query())
            except OSError as e:
                failures.append((leg, e))
                continue
            return checked_extents(leg.name, offset, length, answer)
        first = failures[0][1] if failures else None
        raise IoError(
            getattr(first, "errno", None) or errno.EIO,
            f"{self.name}: extents at {offset}+{length} failed on every in-sync leg: "
            f"{self._errors('no in-sync leg', failures)}",
        )
