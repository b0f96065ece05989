"""The activity log: extents with writes in flight, made durable before those writes are
issued, so that after a crash of the client node only these extents can differ between
legs that were in sync (and count as changed for every checkpoint)."""

from __future__ import annotations

import asyncio
import collections

from dst.layers.bitmap import AL_MAX, Record


class ActivityLog:
    """Extents with writes in flight, made durable *before* those writes are issued.

    After a crash of the client node only these extents can differ between legs
    that were in sync, so start-up resyncs just them (and counts them as changed in
    every checkpoint).  Extents stay recorded after their writes finish and are dropped
    lazily (least recently used first, never one with writes in flight) when room is
    needed: hot extents cost no metadata write.

    Every change is marked in the record's checkpoints at :meth:`begin`, before anything
    is awaited, and stays in ``changing`` until :meth:`end`, so a checkpoint added while
    it is in flight gets it too.
    """

    def __init__(self, record: Record, limit: int) -> None:
        self.record = record
        self.limit = max(1, min(limit, AL_MAX))
        self.enabled = record.fd is not None
        self.active: dict[int, int] = {}
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict(
            (e, None) for e in record.al
        )
        self.added: dict[int, int] = {}
        self.changing: collections.Counter[tuple[int, int]] = collections.Counter()
        self._room = asyncio.Event()

    def extents(self, offset: int, length: int) -> range:
        e = self.record.al_extent
        return range(offset // e, (offset + max(length, 1) - 1) // e + 1)

    def _evict(self, want: int) -> None:
        for e in list(self.lru):
            if len(self.lru) + want <= self.limit:
                return
            if e not in self.active:
                del self.lru[e]
                self.added.pop(e, None)

    def _changed(self, offset: int, length: int) -> None:
        self.record.mark_changed(offset, length)
        self.changing[(offset, length)] += 1

    def try_begin(self, offset: int, length: int) -> bool:
        """:meth:`begin` without waiting, when it needs no metadata write (every extent is
        recorded durably already); False, and nothing done, when it would wait."""
        if self.enabled:
            rec = self.record
            ext = self.extents(offset, length)
            need = 0
            for e in ext:
                if e not in self.lru:
                    return False
                need = max(need, self.added.get(e, 0))
            if rec.durable < need:
                return False
            for e in ext:
                self.active[e] = self.active.get(e, 0) + 1
                self.lru.move_to_end(e)
        self._changed(offset, length)
        return True

    async def begin(self, offset: int, length: int) -> None:
        self._changed(offset, length)
        if not self.enabled:
            return
        rec = self.record
        ext = self.extents(offset, length)
        for e in ext:
            self.active[e] = self.active.get(e, 0) + 1
        try:
            need = 0
            new = []
            for e in ext:
                if e in self.lru:
                    self.lru.move_to_end(e)
                    need = max(need, self.added.get(e, 0))
                else:
                    new.append(e)
            if new:
                self._evict(len(new))
                while len(self.lru) + len(new) > AL_MAX:
                    self._room.clear()
                    await self._room.wait()
                    self._evict(len(new))
                    new = [e for e in new if e not in self.lru]
                for e in new:
                    self.lru[e] = None
                rec.al = list(self.lru)
                rec.mark_meta()
                for e in new:
                    self.added[e] = rec.version
                need = rec.version
            if rec.durable < need:
                await rec.sync()
        except BaseException:
            self.end(offset, length)
            raise

    def retain(self, offset: int, length: int) -> None:
        """One more reference to extents a caller already holds through :meth:`begin`, so
        they stay recorded after that caller's :meth:`end` (an asynchronous leg keeps the
        extents of its queued writes until they are on it); :meth:`end` releases it."""
        if not self.enabled:
            return
        for e in self.extents(offset, length):
            assert e in self.active, "retain() needs the extent held by begin()"
            self.active[e] += 1

    def end(self, offset: int, length: int) -> None:
        key = (offset, length)
        left = self.changing[key] - 1
        if left > 0:
            self.changing[key] = left
        else:
            self.changing.pop(key, None)
        if not self.enabled:
            return
        for e in self.extents(offset, length):
            n = self.active.get(e, 0) - 1
            if n > 0:
                self.active[e] = n
            else:
                self.active.pop(e, None)
        self._room.set()
