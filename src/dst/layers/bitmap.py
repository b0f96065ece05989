"""What a mirror remembers across restarts: leg identities, generations, per-leg dirty
bitmaps and the activity log (the ``--bitmap FILE``), in memory and on disk.

On-disk layout (all integers little-endian; docs/mirror.md has the full table)::

    [0, 4096)        metadata block, copy 0
    [4096, 8192)     metadata block, copy 1   (the valid copy with the higher sequence wins)
    [8192, ...)      bitmap of leg slot i at 8192 + i * stride, stride = bitmap bytes
                     rounded up to 4096; bit b is byte b // 8, bit b % 8 (LSB first)

Only changes that must be durable before an ack bump ``version``; cleared bits ride
along with the next write (cleared lazily: a stale set bit only costs a resync).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import logging
import os
import re
import struct
import uuid
import zlib
from dataclasses import dataclass

from dst.errors import DstError, IoError

log = logging.getLogger("dst.mirror")

MAGIC = b"DSTMBMP1"
VERSION = 1
BLOCK = 4096
MAX_LEGS = 8
META_COPIES = 2
BITMAP_BASE = META_COPIES * BLOCK
HEAD = struct.Struct("<8sIIQ16sQIIQIII")  # see docs/mirror.md
SLOT = struct.Struct("<16sQII64s")
SLOTS_AT = 128
AL_AT = SLOTS_AT + MAX_LEGS * SLOT.size
CRC_AT = BLOCK - 4
AL_MAX = (CRC_AT - AL_AT) // 4
FLAG_CLEAN = 1
SLOT_USED = 1
SLOT_FULL = 2

_NONZERO = re.compile(rb"[^\x00]")
_NOTFULL = re.compile(rb"[^\xff]")


def _popcount(b: bytes | bytearray) -> int:
    return int.from_bytes(b, "little").bit_count()


class Bitmap:
    """The dirty bits of one leg: bit ``i`` covers bytes ``[i*g, (i+1)*g)``."""

    def __init__(self, nbits: int) -> None:
        self.nbits = nbits
        self.bits = bytearray((nbits + 7) // 8)
        self.dirty_pages: set[int] = set()

    def _apply(self, first: int, end: int, value: bool) -> int:
        first, end = max(first, 0), min(end, self.nbits)
        if first >= end:
            return 0
        lo, hi = first // 8, (end - 1) // 8
        bits = self.bits
        before = _popcount(bits[lo : hi + 1])
        head = (0xFF << (first % 8)) & 0xFF
        tail = (1 << (end - hi * 8)) - 1
        if lo == hi:
            masks = [(lo, head & tail)]
        else:
            masks = [(lo, head), (hi, tail)]
            bits[lo + 1 : hi] = (b"\xff" if value else b"\x00") * (hi - lo - 1)
        for i, mask in masks:
            bits[i] = bits[i] | mask if value else bits[i] & ~mask
        changed = abs(_popcount(bits[lo : hi + 1]) - before)
        if changed:
            self.dirty_pages.update(range(lo // BLOCK, hi // BLOCK + 1))
        return changed

    def set(self, first: int, end: int) -> int:
        """Set bits ``[first, end)``; return how many were newly set."""
        return self._apply(first, end, True)

    def clear(self, first: int, end: int) -> int:
        return self._apply(first, end, False)

    def fill(self) -> None:
        self.set(0, self.nbits)

    def test(self, i: int) -> bool:
        return bool(self.bits[i // 8] >> (i % 8) & 1)

    def next_set(self, start: int) -> int | None:
        """The first set bit at or after ``start``."""
        if start >= self.nbits:
            return None
        byte = start // 8
        v = self.bits[byte] >> (start % 8)
        if v:
            return start + (v & -v).bit_length() - 1
        m = _NONZERO.search(self.bits, byte + 1)
        if m is None:
            return None
        v = self.bits[m.start()]
        bit = m.start() * 8 + (v & -v).bit_length() - 1
        return bit if bit < self.nbits else None

    def run_end(self, start: int, limit: int) -> int:
        """The end of the run of set bits that begins at ``start``, at most ``limit``."""
        limit = min(limit, self.nbits)
        i = start
        while i < limit:
            if i % 8 == 0:
                m = _NOTFULL.search(self.bits, i // 8, (limit + 7) // 8)
                j = m.start() * 8 if m is not None else limit
                if j > i:
                    i = j
                    continue
            if not self.test(i):
                return i
            i += 1
        return min(i, limit)

    def count(self) -> int:
        return _popcount(self.bits)

    def merge(self, other: Bitmap) -> int:
        """Set every bit that is set in ``other``; return how many were newly set."""
        before = self.count()
        merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
        new = merged.to_bytes(len(self.bits), "little")
        for p in range(0, len(new), BLOCK):
            if new[p : p + BLOCK] != self.bits[p : p + BLOCK]:
                self.dirty_pages.add(p // BLOCK)
        self.bits[:] = new
        return self.count() - before

    def regrain(self, old: Bitmap, old_g: int, new_g: int) -> None:
        """Take over ``old`` (granularity ``old_g``) conservatively at granularity ``new_g``."""
        i = old.next_set(0)
        while i is not None:
            j = old.run_end(i, old.nbits)
            self.set(i * old_g // new_g, -(-j * old_g // new_g))
            i = old.next_set(j)


@dataclass
class Slot:
    """One leg as the record knows it."""

    name: str
    identity: uuid.UUID | None
    generation: int
    full: bool = False  # needs a full resync (its bits are all set too)


def _stride(nbits: int) -> int:
    return -(-((nbits + 7) // 8) // BLOCK) * BLOCK


class Record:
    """The mirror's record; with ``path`` None it lives in memory only and syncs are free."""

    def __init__(self, path: str | None, size: int, granularity: int, al_extent: int) -> None:
        self.path = path
        self.size = size
        self.granularity = granularity
        self.al_extent = al_extent
        self.nbits = -(-size // granularity)
        self.mirror_id = uuid.uuid4()
        self.generation = 1
        self.seq = 0
        self.clean = True
        self.slots: list[Slot | None] = [None] * MAX_LEGS
        self.bitmaps: list[Bitmap | None] = [None] * MAX_LEGS
        self.al: list[int] = []
        self.fd: int | None = None
        self.version = 0
        self.durable = 0
        self.meta_dirty = False
        self._writer: asyncio.Task[None] | None = None
        self._io: asyncio.Future[None] | None = None

    # ---- opening -----------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str | None, size: int, granularity: int, al_extent: int
    ) -> tuple[Record, str | None]:
        """Load or create the record.  The second value is ``None`` when a usable record
        was loaded, else why nothing usable was found (the caller full-resyncs)."""
        rec = cls(path, size, granularity, al_extent)
        if path is None:
            return rec, "no --bitmap file"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DstError(
                f"cannot open the bitmap file {path}: {e.strerror}; give a writable path"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DstError(
                f"the bitmap file {path} is in use by another process; each mirror needs "
                "its own bitmap file"
            ) from None
        rec.fd = fd
        try:
            why = rec._load()
        except BaseException:
            rec._close_fd()
            raise
        if why is not None:
            rec._reset()
        return rec, why

    def _load(self) -> str | None:
        assert self.fd is not None
        fd, path = self.fd, self.path
        if os.fstat(fd).st_size == 0:
            return f"the bitmap file {path} is new"
        best: tuple[int, bytes] | None = None
        for copy in range(META_COPIES):
            raw = os.pread(fd, BLOCK, copy * BLOCK)
            if len(raw) < BLOCK or raw[:8] != MAGIC:
                continue
            if zlib.crc32(raw[:CRC_AT]) != int.from_bytes(raw[CRC_AT:], "little"):
                continue
            seq = HEAD.unpack_from(raw)[3]
            if best is None or seq > best[0]:
                best = (seq, raw)
        if best is None:
            return f"the bitmap file {path} is not a DST mirror bitmap or is damaged (no valid metadata copy)"
        raw = best[1]
        _, version, block, seq, mid, size, gran, al_ext, gen, nslots, nal, flags = HEAD.unpack_from(
            raw
        )
        if version != VERSION or block != BLOCK or nslots != MAX_LEGS or nal > AL_MAX:
            return f"the bitmap file {path} has format version {version}, not {VERSION}"
        if size != self.size:
            return (
                f"the bitmap file {path} records a mirror of {size} bytes but the legs now "
                f"give {self.size}"
            )
        if gran <= 0 or al_ext <= 0:
            return f"the bitmap file {path} records an impossible granularity"
        self.seq, self.mirror_id, self.generation = seq, uuid.UUID(bytes=mid), gen
        self.clean = bool(flags & FLAG_CLEAN)
        entries = struct.unpack_from(f"<{nal}I", raw, AL_AT)
        # activity-log extents in this record's extent size, so a changed size is harmless
        self.al = sorted(
            {
                x
                for e in entries
                for x in range(e * al_ext // self.al_extent, -(-(e + 1) * al_ext // self.al_extent))
            }
        )
        old_nbits = -(-size // gran)
        for i in range(MAX_LEGS):
            ident, sgen, sflags, _, name = SLOT.unpack_from(raw, SLOTS_AT + i * SLOT.size)
            if not sflags & SLOT_USED:
                continue
            self.slots[i] = Slot(
                name.rstrip(b"\0").decode("utf-8", "replace"),
                None if ident == bytes(16) else uuid.UUID(bytes=ident),
                sgen,
                bool(sflags & SLOT_FULL),
            )
            old = Bitmap(old_nbits)
            data = os.pread(fd, len(old.bits), BITMAP_BASE + i * _stride(old_nbits))
            old.bits[: len(data)] = data
            if gran == self.granularity:
                old.dirty_pages.clear()
                self.bitmaps[i] = old
            else:
                bm = Bitmap(self.nbits)
                bm.regrain(old, gran, self.granularity)
                self.bitmaps[i] = bm
        if gran != self.granularity:
            log.info(
                "bitmap file %s: granularity changed from %d to %d bytes; bits converted",
                path,
                gran,
                self.granularity,
            )
            self._reset_layout()
        return None

    def _reset(self) -> None:
        """Forget what was loaded: a fresh record in the same file."""
        self.slots = [None] * MAX_LEGS
        self.bitmaps = [None] * MAX_LEGS
        self.al = []
        self.generation = max(self.generation, 0) + 1
        self.mirror_id = uuid.uuid4()
        self._reset_layout()

    def _reset_layout(self) -> None:
        """Rewrite every bitmap page and the metadata at the next sync."""
        if self.fd is not None:
            os.ftruncate(self.fd, BITMAP_BASE + MAX_LEGS * _stride(self.nbits))
        for bm in self.bitmaps:
            if bm is not None:
                bm.dirty_pages.update(range(-(-len(bm.bits) // BLOCK)))
        self.mark_meta()

    # ---- changes -----------------------------------------------------------------------
    def mark_meta(self) -> None:
        """Metadata changed and must be durable before the next ack that depends on it."""
        self.meta_dirty = True
        self.version += 1

    def bits_for(self, offset: int, length: int) -> tuple[int, int]:
        g = self.granularity
        return offset // g, -(-(offset + max(length, 1)) // g)

    def mark(self, slot: int, offset: int, length: int) -> bool:
        """Mark a byte range dirty for a leg; True when a bit was newly set."""
        bm = self.bitmaps[slot]
        if bm is None:
            return False
        first, end = self.bits_for(offset, length)
        if bm.set(first, end):
            self.version += 1
            return True
        return False

    def add_slot(self, slot: int, name: str, identity: uuid.UUID | None, full: bool) -> Slot:
        """A new leg in a free slot; with ``full`` every bit is set (a full resync)."""
        bm = Bitmap(self.nbits)
        if full:
            bm.fill()
        new = Slot(name.encode("utf-8")[:64].decode("utf-8", "ignore"), identity, 0, full)
        self.slots[slot] = new
        self.bitmaps[slot] = bm
        self.mark_meta()
        return new

    def free_slot(self, slot: int) -> None:
        self.slots[slot] = None
        self.bitmaps[slot] = None
        self.mark_meta()

    def free_index(self) -> int | None:
        return next((i for i, s in enumerate(self.slots) if s is None), None)

    # ---- durability -------------------------------------------------------------------
    def _pack_meta(self) -> bytes:
        raw = bytearray(BLOCK)
        al = self.al  # the activity log never lets it grow past AL_MAX
        if len(al) > AL_MAX:
            raise ValueError(f"activity log of {len(al)} extents exceeds {AL_MAX}")
        HEAD.pack_into(
            raw,
            0,
            MAGIC,
            VERSION,
            BLOCK,
            self.seq,
            self.mirror_id.bytes,
            self.size,
            self.granularity,
            self.al_extent,
            self.generation,
            MAX_LEGS,
            len(al),
            FLAG_CLEAN if self.clean else 0,
        )
        for i, s in enumerate(self.slots):
            if s is None:
                continue
            flags = SLOT_USED | (SLOT_FULL if s.full else 0)
            ident = s.identity.bytes if s.identity is not None else bytes(16)
            name = s.name.encode("utf-8")[:64]
            SLOT.pack_into(raw, SLOTS_AT + i * SLOT.size, ident, s.generation, flags, 0, name)
        struct.pack_into(f"<{len(al)}I", raw, AL_AT, *al)
        raw[CRC_AT:] = zlib.crc32(raw[:CRC_AT]).to_bytes(4, "little")
        return bytes(raw)

    def _snapshot(self) -> tuple[list[tuple[int, bytes]], list[tuple[int, int]]]:
        writes: list[tuple[int, bytes]] = []
        pages: list[tuple[int, int]] = []
        if self.meta_dirty:
            self.meta_dirty = False
            self.seq += 1
            writes.append(((self.seq % META_COPIES) * BLOCK, self._pack_meta()))
        stride = _stride(self.nbits)
        for i, bm in enumerate(self.bitmaps):
            if bm is None or not bm.dirty_pages:
                continue
            for p in sorted(bm.dirty_pages):
                chunk = bytes(bm.bits[p * BLOCK : (p + 1) * BLOCK])
                writes.append((BITMAP_BASE + i * stride + p * BLOCK, chunk))
                pages.append((i, p))
            bm.dirty_pages.clear()
        return writes, pages

    @staticmethod
    def _write_all(fd: int, writes: list[tuple[int, bytes]]) -> None:
        for offset, data in writes:
            os.pwrite(fd, data, offset)
        os.fdatasync(fd)

    async def _write_once(self) -> None:
        target = self.version
        had_meta = self.meta_dirty
        writes, pages = self._snapshot()
        fd = self.fd
        try:
            if fd is not None and writes:
                io = asyncio.get_running_loop().run_in_executor(None, self._write_all, fd, writes)
                self._io = io
                await asyncio.shield(io)
        except OSError as e:
            self.meta_dirty = self.meta_dirty or had_meta
            for i, p in pages:
                bm = self.bitmaps[i]
                if bm is not None:
                    bm.dirty_pages.add(p)
            raise IoError(
                errno.EIO,
                f"cannot record the mirror's state in the bitmap file {self.path}: {e.strerror}; "
                "free space or fix the disk of the client node",
            ) from None
        self.durable = max(self.durable, target)

    async def sync(self, force: bool = False) -> None:
        """Make every change so far durable; concurrent callers share one write + fdatasync."""
        if self.fd is None:
            self.durable = self.version
            return
        if force:
            self.version += 1
        target = self.version
        while self.durable < target:
            w = self._writer
            if w is not None and w.done():
                # Finished, but its done-callback has not run yet: awaiting a finished task
                # does not yield, so waiting on it again would spin forever.
                self._writer = None
                w.result()  # its error is ours too
                continue
            if self._writer is None:
                self._writer = asyncio.get_running_loop().create_task(self._write_once())
                self._writer.add_done_callback(self._writer_done)
            await asyncio.shield(self._writer)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if self._writer is task:
            self._writer = None
        if not task.cancelled():
            task.exception()  # the waiters got it

    @property
    def pending(self) -> bool:
        return self.durable < self.version

    async def close(self) -> None:
        """Record a clean stop (empty activity log) and close the file."""
        if self.fd is None:
            return
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        self.al = []
        self.clean = True
        self.mark_meta()
        try:
            await self.sync()
        finally:
            await self.abandon()

    async def abandon(self) -> None:
        """Close the file as it stands, as a crash would (also releases the lock).  A write
        already handed to a worker thread is waited for: its descriptor must not be reused
        under it."""
        if self._writer is not None:
            self._writer.cancel()
        if self._io is not None:
            await asyncio.wait([self._io])
        self._close_fd()

    def _close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ActivityLog:
    """Extents with writes in flight, made durable *before* those writes are issued.

    After a crash of the client node only these extents can differ between legs
    that were in sync, so start-up resyncs just them.  Extents stay recorded after
    their writes finish and are dropped lazily (least recently used first, never one
    with writes in flight) when room is needed: hot extents cost no metadata write.
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

    async def begin(self, offset: int, length: int) -> None:
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
        if not self.enabled:
            return
        for e in self.extents(offset, length):
            n = self.active.get(e, 0) - 1
            if n > 0:
                self.active[e] = n
            else:
                self.active.pop(e, None)
        self._room.set()
