"""``ChangeTracker``: changed-block tracking for a device that is not a mirror.

A single member, a stripe or a linear device served with ``--bitmap FILE`` gets this
layer on top.  It keeps the same record as a mirror (:class:`dst.layers.bitmap.Record`)
with no leg slots, only checkpoints, and the same activity log: every write, trim and
zeroing is marked in every checkpoint (in memory) and its extents are recorded durably
*before* it is passed down, so after a crash of the client node the extents that were
in the log count as changed (a false positive costs a copy; a lost change would cost a
backup that silently misses it).  A mirror does the same in its own write path.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from dst.device import (
    TRIM,
    WRITE,
    ZERO,
    BlockDevice,
    Buffer,
    Done,
    IoFlags,
    Layer,
    Rule,
    fast_zero_refused,
    run_in_task,
)
from dst.errors import DstError, IoError, UsageError
from dst.layers.activity import ActivityLog
from dst.layers.bitmap import Record
from dst.layers.linear import as_bytes_view
from dst.layers.mirror import AL_EXTENT, AL_LIMIT, DEFAULT_GRANULARITY, SPLIT_EXTENTS
from dst.units import format_size

log = logging.getLogger("dst.checkpoint")


def check_granularity(granularity: int) -> int:
    if granularity < 512 or granularity & (granularity - 1):
        raise UsageError(
            f"invalid bitmap granularity {granularity}: give a power of two of at least 512, "
            "e.g. 64K"
        )
    return granularity


class ChangeTracker(Layer):
    """Marks every change in the checkpoints of a ``--bitmap`` record, then passes it on."""

    kind = "tracker"

    def __init__(
        self,
        inner: BlockDevice,
        *,
        bitmap: str,
        granularity: int = DEFAULT_GRANULARITY,
        al_extent: int = AL_EXTENT,
        al_limit: int = AL_LIMIT,
    ) -> None:
        super().__init__(inner)
        self.bitmap_path = bitmap
        self.granularity = check_granularity(granularity)
        if al_extent & (al_extent - 1):
            raise UsageError(f"invalid activity-log extent {al_extent}: give a power of two")
        self.al_extent = max(al_extent, granularity)
        self.al_limit = al_limit
        self.record = Record(None, 0, granularity, self.al_extent)
        self.al = ActivityLog(self.record, al_limit)
        self.members = [inner]  # what status and live settings look through
        self.identity = inner.identity
        self.state = inner.state
        inner.subscribe(self._inner_state)
        self._started = False
        self._closed = False

    def _inner_state(self, dev: BlockDevice, state: str) -> None:
        self.set_state(state)

    async def start(self) -> None:
        """Open the record; forget mirror legs it may hold (this device is not a mirror)."""
        self.size = self.inner.size
        self.capabilities = self.inner.capabilities
        rec, why = Record.open(self.bitmap_path, self.size, self.granularity, self.al_extent)
        try:
            if why is not None and "is new" not in why:
                log.warning("%s; it starts over with no checkpoint", why)
            legs = rec.leg_slots()
            if legs:
                names = ", ".join(s.name for s in (rec.slots[i] for i in legs) if s is not None)
                log.warning(
                    "the bitmap file %s records mirror legs (%s): forgotten, as this device "
                    "is not a mirror (a mirror started on this file again resyncs them fully)",
                    self.bitmap_path,
                    names,
                )
                for i in legs:
                    rec.free_slot(i)
            if self.capabilities.read_only:
                await rec.abandon()  # nothing changes on a read-only device, the record included
            else:
                rec.al = []
                rec.clean = False
                rec.mark_meta()
                await rec.sync()
        except BaseException:
            await rec.abandon()
            raise
        self.record = rec
        self.al = ActivityLog(rec, self.al_limit)
        self._started = True
        log.info(
            "changed-block tracking in %s, granularity %s: %d checkpoint(s)",
            self.bitmap_path,
            format_size(self.granularity),
            len(rec.checkpoints),
        )

    # ---- changes ---------------------------------------------------------------------
    def check(self, rule: Rule, offset: int, length: int, *, split: bool = False) -> None:
        """A tracker that is not running refuses everything (EIO); then the one check."""
        if self._closed or not self._started:
            raise IoError(errno.EIO, f"{self.name}: {rule.op} on a device that is not running")
        super().check(rule, offset, length, split=split)

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        view = as_bytes_view(data)
        n = len(view)
        self.check(WRITE, offset, n)
        if n == 0:
            await self.inner.write(offset, view, flags)
            return
        await self.al.begin(offset, n)
        try:
            await self.inner.write(offset, view, flags)
        finally:
            self.al.end(offset, n)

    def start_write(self, offset: int, data: memoryview, flags: IoFlags, done: Done) -> None:
        """Without a task when the activity log already holds the extents (hot ones)."""
        n = data.nbytes
        try:
            self.check(WRITE, offset, n)
        except IoError as e:
            done(e)
            return
        if n == 0 or not self.al.try_begin(offset, n):
            run_in_task(self.write(offset, data, flags), done)
            return

        def ended(err: BaseException | None) -> None:
            self.al.end(offset, n)
            done(err)

        self.inner.start_write(offset, data, flags, ended)

    def start_read(self, offset: int, buf: memoryview, flags: IoFlags, done: Done) -> None:
        self.inner.start_read(offset, buf, flags, done)

    async def _ranged(self, rule: Rule, offset: int, length: int, flags: IoFlags) -> None:
        """Big trims and zeroes go a few extents at a time, so the activity log stays small."""
        self.check(rule, offset, length)
        step = self.al_extent * SPLIT_EXTENTS
        pos, end = offset, offset + length
        while pos < end:
            n = min(step - pos % step, end - pos)
            last = pos + n >= end
            await self.al.begin(pos, n)
            try:
                f = flags if last else flags & ~IoFlags.FUA
                if rule is TRIM:
                    await self.inner.trim(pos, n, f)
                else:
                    await self.inner.write_zeroes(pos, n, f)
            finally:
                self.al.end(pos, n)
            pos += n

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        if not self.capabilities.can_trim:
            raise IoError(errno.EOPNOTSUPP, f"{self.name} does not support trim")
        await self._ranged(TRIM, offset, length, flags)

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        if flags & IoFlags.FAST_ZERO and not self.capabilities.can_fast_zero:
            # refused below anyway: not worth an activity-log write and a changed mark
            self.check(ZERO, offset, length)  # EPERM first when read-only
            raise fast_zero_refused(self.name, "the device below cannot zero fast")
        await self._ranged(ZERO, offset, length, flags)

    def statistics(self) -> dict[str, Any]:
        return self.inner.statistics()

    async def aclose(self) -> None:
        """Record a clean stop (empty activity log), then close the device below."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.record.close()
        except (DstError, OSError) as e:
            log.error("%s: could not record a clean stop in %s: %s", self.name, self.bitmap_path, e)
        await self.inner.aclose()


async def track_changes(dev: BlockDevice, bitmap: str | None, granularity: int) -> BlockDevice:
    """``dev`` with changed-block tracking in ``bitmap`` (``dev`` itself without one).  The
    result owns ``dev``: a failed start closes it."""
    if bitmap is None:
        return dev
    try:
        tracker = ChangeTracker(dev, bitmap=bitmap, granularity=granularity)
        await tracker.start()
    except BaseException:
        await dev.aclose()
        raise
    return tracker
