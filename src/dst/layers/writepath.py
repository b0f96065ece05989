"""The mirror's write path: each change fanned out to the legs at once, then settled.

A change (write, trim, zeroes) holds its byte-range lock and its activity-log extents
while :meth:`WritePath._fan_out` sends it to every leg that takes writes, and
:meth:`WritePath._settle` then turns what failed into degraded legs and bitmap marks,
made durable before the caller hears; a FAST_ZERO that some legs refused is redone on
them without it (:meth:`WritePath._redo_refused`).  Flush and cache go the same way.
The rules are stated in ``dst.layers.mirror``.  A mixin of
:class:`dst.layers.mirror.MirrorCore`: the state it names below is the core's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from dst.device import (
    CACHE,
    TRIM,
    WRITE,
    ZERO,
    BlockDevice,
    Buffer,
    Capabilities,
    IoCounters,
    IoFlags,
    Rule,
    fast_zero_refused,
)
from dst.errors import IoError
from dst.layers.activity import ActivityLog
from dst.layers.bitmap import Record
from dst.layers.linear import as_bytes_view
from dst.layers.resync import DEGRADED, IN_SYNC, Foreground, Leg, RangeLocks
from dst.layers.shipper import Shipper, barrier, reserve, ship

log = logging.getLogger("dst.mirror")
T = TypeVar("T")
LegOp = Callable[[BlockDevice, int, int], Awaitable[None]]

SPLIT_EXTENTS = 64  # trims and zeroes are done this many activity-log extents at a time


class LegTimeout(IoError):
    """A leg did not answer within --leg-timeout while another leg had already taken the
    request: the leg is degraded instead of holding the writer up."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ETIMEDOUT, message)


class WritePath:
    """Write, trim, write_zeroes, cache and flush of the mirror."""

    name: str
    legs: list[Leg]
    record: Record
    al: ActivityLog
    al_extent: int
    leg_timeout: float
    async_max_lag: int
    async_on_congestion: str
    capabilities: Capabilities
    counters: IoCounters
    foreground: Foreground
    locks: RangeLocks
    _unflushed: set[int]
    _closed: bool

    if TYPE_CHECKING:  # the core's (dst.layers.mirror)

        def in_sync_legs(self) -> list[Leg]: ...

        def degrade(self, leg: Leg, why: str) -> bool: ...

        def check(self, rule: Rule, offset: int, length: int, *, split: bool = False) -> None: ...

        def _running(self, op: str) -> None: ...

        def _try_resync(self, leg: Leg) -> None: ...

        def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]: ...

        async def _sync_quietly(self) -> None: ...

        async def _on_leg(self, leg: Leg, aw: Awaitable[None]) -> None: ...

        def _errors(self, op: str, results: list[tuple[Leg, BaseException]]) -> str: ...

    # ---- fan-out ---------------------------------------------------------------------------
    async def _to_end(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a change to the end even if the caller is cancelled: stopping half-way would
        leave the legs different (and the caller's buffer is in use until then)."""
        task = self._spawn(coro)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            while not task.done():
                try:
                    await asyncio.wait([task])
                except asyncio.CancelledError:
                    continue
            if not task.cancelled():
                task.exception()
            raise

    async def _fan_out(
        self, op: str, targets: list[Leg], call: Callable[[Leg], Awaitable[None]]
    ) -> list[BaseException | None]:
        """Run ``call`` on every target leg at once; each result is None or the error.

        A leg that has not answered ``leg_timeout`` seconds after an in-sync leg took the
        request is not waited for: its result is a :class:`LegTimeout`, and its request,
        still running, is fenced (given up and never resent).  Until an in-sync leg
        answers, every leg is waited for, within its own transaction budget."""

        async def on_leg(x: Leg) -> None:
            # the leg's request is made when its task first runs: a task cancelled before
            # that (the client node stopping) leaves no request made and never awaited
            await self._on_leg(x, call(x))

        tasks = [self._spawn(on_leg(x)) for x in targets]
        pending: set[asyncio.Task[None]] = set(tasks)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break  # the deadline passed
            if deadline is None and any(
                t.done() and not t.cancelled() and t.exception() is None and x.status == IN_SYNC
                for t, x in zip(tasks, targets, strict=True)
            ):
                deadline = loop.time() + self.leg_timeout
        results: list[BaseException | None] = []
        for t, leg in zip(tasks, targets, strict=True):
            if t.done():
                results.append(t.exception() if not t.cancelled() else asyncio.CancelledError())
                continue
            why = (
                f"no ack for a {op} within --leg-timeout {self.leg_timeout:g} s "
                f"(its link is {leg.dev.state})"
            )
            results.append(LegTimeout(why))
            self._abandon(leg, t, why)
        return results

    def _abandon(self, leg: Leg, task: asyncio.Task[None], why: str) -> None:
        """Stop waiting for a leg's request: fence the device so it fails now and never
        lands later, and keep the leg from resyncing until every such request ended."""
        leg.abandoned += 1

        def ended(t: asyncio.Task[None]) -> None:
            if not t.cancelled():
                t.exception()  # a failure is expected here: the leg is already degraded
            leg.abandoned -= 1
            if leg.abandoned == 0 and not self._closed:
                self._try_resync(leg)

        task.add_done_callback(ended)
        leg.dev.fence(why)

    # ---- changes: write, trim, zeroes ------------------------------------------------------
    async def _change(
        self,
        op: str,
        offset: int,
        length: int,
        fn: LegOp,
        data: memoryview | None = None,
        flags: IoFlags = IoFlags.NONE,
        fallback: LegOp | None = None,
    ) -> None:
        self.foreground.begin()
        held: list[tuple[Shipper, int]] = []
        try:
            held = await reserve(self, length if data is not None else 0)
            async with self.locks.lock(offset, offset + length):
                await self.al.begin(offset, length)
                try:
                    sync = [x for x in self.legs if not x.asynchronous]
                    targets = [x for x in sync if x.status != DEGRADED]
                    skipped = [x for x in sync if x.status == DEGRADED]
                    if not targets:
                        raise IoError(errno.EIO, f"{self.name}: no in-sync leg to {op} to")
                    results = await self._fan_out(op, targets, lambda x: fn(x.dev, offset, length))
                    if fallback is not None:
                        results = await self._redo_refused(
                            op, targets, results, lambda x: fallback(x.dev, offset, length)
                        )
                    err = await self._settle(
                        op, targets, results, skipped, [(offset, length)], diverge=True
                    )
                    if err is None:
                        self._unflushed.update(self.al.extents(offset, length))
                    if len(sync) < len(self.legs):
                        await ship(self, op, offset, length, data, flags, err)
                finally:
                    self.al.end(offset, length)
            if err is not None:
                raise err
        except IoError:
            self.counters.errors += 1  # as reads, extents and flushes count theirs
            raise
        finally:
            for s, n in held:
                s.unreserve(n)
            self.foreground.end()

    async def _redo_refused(
        self,
        op: str,
        targets: list[Leg],
        results: list[BaseException | None],
        call: Callable[[Leg], Awaitable[None]],
    ) -> list[BaseException | None]:
        """A FAST_ZERO that legs refused (ENOTSUP): refused as a whole when every leg
        refused (none changed anything); otherwise the refusing legs zero the slow way
        (``call``), since another leg already zeroed and the legs must stay identical."""
        refused: list[tuple[int, BaseException]] = [
            (i, r)
            for i, r in enumerate(results)
            if isinstance(r, OSError) and r.errno == errno.EOPNOTSUPP
        ]
        if not refused:
            return results
        if len(refused) == len(results):
            why = self._errors(op, [(targets[i], r) for i, r in refused])
            raise IoError(errno.EOPNOTSUPP, f"{self.name}: no fast zeroing: {why}")
        redo = [targets[i] for i, _ in refused]
        log.info(
            "%s: %s refused a fast zero that other legs took: zeroing there without it",
            self.name,
            ", ".join(x.name for x in redo),
        )
        again = await self._fan_out(op, redo, call)
        out = list(results)
        for (i, _), r in zip(refused, again, strict=True):
            out[i] = r
        return out

    async def _settle(
        self,
        op: str,
        targets: list[Leg],
        results: list[BaseException | None],
        skipped: list[Leg],
        ranges: list[tuple[int, int]],
        *,
        diverge: bool,
    ) -> IoError | None:
        """Degrade the legs that failed, mark what they (or skipped legs) missed, make that
        durable, and say whether the caller sees an error."""
        rec = self.record
        for leg in skipped:
            if not leg.removed:
                for o, n in ranges:
                    rec.mark(leg.slot, o, n)
        bad: list[tuple[Leg, BaseException]] = []
        for leg, r in zip(targets, results, strict=True):
            if r is None:
                continue
            if not isinstance(r, OSError):
                raise r  # cancelled, or a bug: not a leg failure
            bad.append((leg, r))
        error: IoError | None = None
        if bad:
            took = [x for x, r in zip(targets, results, strict=True) if r is None]
            keep: Leg | None = None
            if not [x for x in took if x.status == IN_SYNC]:
                keep = next((x for x, _ in bad if x.status == IN_SYNC and not x.removed), None)
                first = next((e for x, e in bad if x is keep), bad[0][1])
                error = IoError(
                    getattr(first, "errno", None) or errno.EIO,
                    f"{self.name}: {op} failed on every in-sync leg: {self._errors(op, bad)}",
                )
                if keep is not None and diverge:
                    # Resyncing legs took data the kept leg has not: degrade them (marking
                    # alone could be undone by their resync clearing a region it copied).
                    for x in took:
                        if not x.removed and self.degrade(x, f"it took a {op} the others failed"):
                            for o, n in ranges:
                                rec.mark(x.slot, o, n)
            for leg, e in bad:
                if leg is keep or leg.removed:
                    continue
                why = str(e) if isinstance(e, LegTimeout) else f"{op} failed: {e}"
                if self.degrade(leg, why):
                    for o, n in ranges:
                        rec.mark(leg.slot, o, n)
        if rec.pending:
            await rec.sync()
        return error

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        view = as_bytes_view(data)
        n = len(view)
        self.check(WRITE, offset, n)
        if n == 0:
            if flags & (IoFlags.FUA | IoFlags.PREFLUSH):
                await self.flush()
            return
        await self._to_end(
            self._change("write", offset, n, lambda d, o, _: d.write(o, view, flags), view, flags)
        )
        self.counters.writes += 1
        self.counters.bytes_written += n

    async def _ranged(
        self,
        op: str,
        offset: int,
        length: int,
        fn: LegOp,
        flags: IoFlags,
        fallback: LegOp | None = None,
    ) -> None:
        """Big trims and zeroes go a few extents at a time, so the activity log stays small."""
        step = self.al_extent * SPLIT_EXTENTS
        pos, end = offset, offset + length
        while pos < end:
            n = min(step - pos % step, end - pos)
            await self._to_end(self._change(op, pos, n, fn, None, flags, fallback))
            pos += n

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(TRIM, offset, length)
        if not self.capabilities.can_trim:
            raise IoError(errno.EOPNOTSUPP, f"{self.name} does not support trim")
        await self._ranged("trim", offset, length, lambda d, o, n: d.trim(o, n, flags), flags)
        self.counters.trims += 1

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        """FAST_ZERO: refused before any leg is asked when a leg that takes writes cannot
        zero fast; a leg that refuses at run time while others zeroed zeroes without it
        (:meth:`_redo_refused`), so the legs never differ."""
        self.check(ZERO, offset, length)
        fallback: LegOp | None = None
        if flags & IoFlags.FAST_ZERO:
            slow = [
                x.name
                for x in self.legs
                if x.status != DEGRADED
                and not x.asynchronous
                and not x.dev.capabilities.can_fast_zero
            ]
            if slow:
                raise fast_zero_refused(self.name, f"{', '.join(slow)} cannot zero fast")
            plain = flags & ~IoFlags.FAST_ZERO

            def fallback(d: BlockDevice, o: int, n: int) -> Awaitable[None]:
                return d.write_zeroes(o, n, plain)

        await self._ranged(
            "zero", offset, length, lambda d, o, n: d.write_zeroes(o, n, flags), flags, fallback
        )
        self.counters.zeroes += 1

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch on every in-sync leg, the legs reads go to; a leg that fails to is only
        logged (it is a hint: its reads work all the same, or fail over as reads do)."""
        self.check(CACHE, offset, length)
        legs = self.in_sync_legs()
        results = await asyncio.gather(
            *(self._on_leg(x, x.dev.cache(offset, length)) for x in legs), return_exceptions=True
        )
        for leg, r in zip(legs, results, strict=True):
            if isinstance(r, OSError):
                log.debug("%s: cache at %d+%d not taken: %s", leg.name, offset, length, r)
            elif isinstance(r, BaseException):
                raise r
        self.counters.caches += 1

    async def flush(self) -> None:
        """Flush every leg that gets writes; a leg whose flush failed may have lost writes
        since its last flush, so those extents are marked for its resync."""
        self._running("flush")
        self.foreground.begin()
        try:
            barrier(self)  # asynchronous legs: the writes before this flush, then the rest
            done, self._unflushed = self._unflushed, set()
            targets = [x for x in self.legs if x.status != DEGRADED and not x.asynchronous]
            results = await self._fan_out("flush", targets, lambda x: x.dev.flush())
            ext = self.al_extent
            err = await self._settle(
                "flush", targets, results, [], [(e * ext, ext) for e in done], diverge=False
            )
            if err is not None:
                self._unflushed |= done
                self.counters.errors += 1
                raise err
            self.counters.flushes += 1
        finally:
            self.foreground.end()
