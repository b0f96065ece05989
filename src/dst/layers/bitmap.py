"""What a client node remembers across restarts (the ``--bitmap FILE``), in memory and on
disk: a mirror's leg identities, generations, per-leg dirty bitmaps, the activity log,
and the changed-block checkpoints of any layout.

On-disk layout (all integers little-endian; docs/mirror.md has the full table)::

    [0, 4096)        metadata block, copy 0
    [4096, 8192)     metadata block, copy 1   (the valid copy with the higher sequence wins)
    [8192, ...)      bitmap of slot i at 8192 + i * stride, stride = bitmap bytes
                     rounded up to 4096; bit b is byte b // 8, bit b % 8 (LSB first);
                     every bit from the slot's full_from on is set whatever the page says

Slots 0-7 are mirror legs (a set bit: the leg may differ there), slots 8-15 checkpoints
(a set bit: written, trimmed or zeroed since the checkpoint was added).

The file is sparse: only pages with a set bit below full_from are written, pages that
become clear are punched out, so its allocated size follows what is dirty, not the
device.  Only changes that must be durable before an ack bump ``version``; cleared bits
ride along with the next write (cleared lazily: a stale set bit only costs a resync).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
import uuid
import zlib
from dataclasses import dataclass, field

from dst.backends.base import PUNCH, fallocate
from dst.errors import DstError, IoError
from dst.layers.dirtybits import _NONZERO, BLOCK, PAGE_BITS, Bitmap

log = logging.getLogger("dst.mirror")

MAGIC = b"DSTMBMP1"
VERSION = 3  # 3: 16 slots (legs and checkpoints); 2: the full_from table; 1, 2 are read
MAX_LEGS = 8
MAX_CHECKPOINTS = 8
SLOTS = MAX_LEGS + MAX_CHECKPOINTS  # legs in 0-7, checkpoints in 8-15
META_COPIES = 2
BITMAP_BASE = META_COPIES * BLOCK
HEAD = struct.Struct("<8sIIQ16sQIIQIII")  # see docs/mirror.md
SLOT = struct.Struct("<16sQII64s")
SLOTS_AT = 128
FULLS_AT = SLOTS_AT + SLOTS * SLOT.size  # u64 full_from per slot
AL_AT = FULLS_AT + 8 * SLOTS
CRC_AT = BLOCK - 4
AL_MAX = (CRC_AT - AL_AT) // 4
OLD_SLOTS = 8  # versions 1 and 2 had leg slots only
AL_AT_V1 = SLOTS_AT + OLD_SLOTS * SLOT.size
FULLS_AT_V2 = AL_AT_V1
AL_AT_V2 = FULLS_AT_V2 + 8 * OLD_SLOTS
PUNCH_SMALL = 256  # where holes cannot be punched, write zero pages for ranges this small
FLAG_CLEAN = 1
SLOT_USED = 1
SLOT_FULL = 2
SLOT_CHECKPOINT = 4


def _layout(version: int) -> tuple[int, int | None, int]:
    """(slots, offset of the full_from table or None, offset of the activity log) of a
    format version."""
    if version == 1:
        return OLD_SLOTS, None, AL_AT_V1
    if version == 2:
        return OLD_SLOTS, FULLS_AT_V2, AL_AT_V2
    return SLOTS, FULLS_AT, AL_AT


@dataclass
class Slot:
    """One leg (or one checkpoint) as the record knows it."""

    name: str
    identity: uuid.UUID | None
    generation: int
    full: bool = False  # needs a full resync (its bits are all set too)
    checkpoint: bool = False  # a checkpoint: its bits are the changes since ``created``
    created: float = 0.0  # Unix time a checkpoint was added


@dataclass
class _Batch:
    """One write of the record: pages and metadata, holes, and what they stand for."""

    writes: list[tuple[int, bytes | None]] = field(default_factory=list)
    punches: list[tuple[int, int]] = field(default_factory=list)
    pages: list[tuple[int, int]] = field(default_factory=list)  # (slot, page) written
    areas: list[int] = field(default_factory=list)  # freed checkpoint slots punched
    al: set[int] | None = None  # the activity log the metadata block records
    split: bool = False  # pages durable before the metadata block is written


def _stride(nbits: int) -> int:
    return -(-((nbits + 7) // 8) // BLOCK) * BLOCK


def _punch(fd: int, offset: int, length: int) -> None:
    """Make a range of the file a hole (it reads as clear bits); where the filesystem
    cannot, small ranges are written with zeroes and large ones left as they are (stale
    set bits there only cost a resync of regions that were in fact clean)."""
    try:
        fallocate(fd, PUNCH, offset, length)
    except OSError:
        if length <= PUNCH_SMALL * BLOCK:
            os.pwrite(fd, bytes(length), offset)


class Record:
    """The client node's record; with ``path`` None it lives in memory only and syncs are
    free."""

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
        self.slots: list[Slot | None] = [None] * SLOTS
        self.bitmaps: list[Bitmap | None] = [None] * SLOTS
        self.checkpoints: list[int] = []  # slots that are checkpoints (marked on every change)
        self.al: list[int] = []
        self._disk_al: set[int] = set()  # the activity log as the file records it
        self._areas: list[int] = []  # freed checkpoint slots whose pages are to be punched
        self._punching: set[int] = set()  # ... not reused until that punch is done
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
            return f"the bitmap file {path} is not a DST bitmap file or is damaged (no valid metadata copy)"
        raw = best[1]
        _, version, block, seq, mid, size, gran, al_ext, gen, nslots, nal, flags = HEAD.unpack_from(
            raw
        )
        known = version in range(1, VERSION + 1)
        want_slots, fulls_at, al_at = _layout(version if known else VERSION)
        if not known or block != BLOCK or nslots != want_slots or nal > (CRC_AT - al_at) // 4:
            return (
                f"the bitmap file {path} has format version {version}, which this version "
                f"of dst does not read (it reads 1 to {VERSION})"
            )
        if size != self.size:
            return (
                f"the bitmap file {path} records a mirror of {size} bytes but the legs now "
                f"give {self.size}"
            )
        if gran <= 0 or al_ext <= 0:
            return f"the bitmap file {path} records an impossible granularity"
        self.seq, self.mirror_id, self.generation = seq, uuid.UUID(bytes=mid), gen
        self.clean = bool(flags & FLAG_CLEAN)
        entries = struct.unpack_from(f"<{nal}I", raw, al_at)
        self._disk_al = set(entries) if al_ext == self.al_extent else {-1}
        # activity-log extents in this record's extent size, so a changed size is harmless
        self.al = sorted(
            {
                x
                for e in entries
                for x in range(e * al_ext // self.al_extent, -(-(e + 1) * al_ext // self.al_extent))
            }
        )
        old_nbits = -(-size // gran)
        for i in range(nslots):
            ident, sgen, sflags, _, name = SLOT.unpack_from(raw, SLOTS_AT + i * SLOT.size)
            if not sflags & SLOT_USED:
                continue
            checkpoint = bool(sflags & SLOT_CHECKPOINT)
            self.slots[i] = Slot(
                name.rstrip(b"\0").decode("utf-8", "replace"),
                None if ident == bytes(16) or checkpoint else uuid.UUID(bytes=ident),
                0 if checkpoint else sgen,
                bool(sflags & SLOT_FULL),
                checkpoint=checkpoint,
                created=sgen / 1e6 if checkpoint else 0.0,
            )
            old = Bitmap(old_nbits)
            if fulls_at is not None:
                old.full_from = min(struct.unpack_from("<Q", raw, fulls_at + 8 * i)[0], old_nbits)
            old.disk_full_from = old.full_from
            self._read_pages(old, BITMAP_BASE + i * _stride(old_nbits))
            if gran == self.granularity:
                old.dirty_pages.clear()
                old.meta_changed = False
                self.bitmaps[i] = old
            else:
                bm = Bitmap(self.nbits)
                bm.regrain(old, gran, self.granularity)
                self.bitmaps[i] = bm
        if version != VERSION:
            log.info(
                "bitmap file %s: format version %d is converted to %d at the next write",
                path,
                version,
                VERSION,
            )
            self.mark_meta()
        if gran != self.granularity:
            log.info(
                "bitmap file %s: granularity changed from %d to %d bytes; bits converted",
                path,
                gran,
                self.granularity,
            )
            self._reset_layout()
        self._refresh_checkpoints()
        if self.al and self.checkpoints:
            # writes may have been in flight in these extents when the client node stopped:
            # they count as changed (a false positive costs a copy, a lost change a backup)
            for e in self.al:
                self.mark_changed(e * self.al_extent, self.al_extent)
            log.warning(
                "bitmap file %s: the client node stopped with writes in flight in %d extents "
                "of %d bytes; they count as changed in every checkpoint",
                path,
                len(self.al),
                self.al_extent,
            )
        return None

    def _read_pages(self, bm: Bitmap, base: int) -> None:
        """Load the written pages of one slot: only the file's data extents are read."""
        assert self.fd is not None
        fd = self.fd
        end = base + _stride(bm.nbits)
        pos = base
        while pos < end:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
                hole_at = min(os.lseek(fd, data_at, os.SEEK_HOLE), end)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return  # nothing written after pos
                data_at, hole_at = pos, end  # no SEEK_DATA here: read it all
            if data_at >= end:
                return
            p = (data_at - base) // BLOCK
            at = base + p * BLOCK
            while at < hole_at:
                n = min(hole_at - at, 1 << 20)
                chunk = os.pread(fd, n, at)
                if not chunk:
                    return
                for q in range(0, len(chunk), BLOCK):
                    bm.load_page((at - base + q) // BLOCK, chunk[q : q + BLOCK])
                at += len(chunk)
            pos = hole_at

    def _reset(self) -> None:
        """Forget what was loaded: a fresh record in the same file."""
        self.slots = [None] * SLOTS
        self.bitmaps = [None] * SLOTS
        self.checkpoints = []
        self.al = []
        self.generation = max(self.generation, 0) + 1
        self.mirror_id = uuid.uuid4()
        self._reset_layout()

    def _reset_layout(self) -> None:
        """Lay the file out for this size: bitmap pages start as holes, and what is set in
        memory is written with the metadata at the next sync."""
        if self.fd is not None:
            os.ftruncate(self.fd, BITMAP_BASE)  # drops every old page (a sparse start)
            os.ftruncate(self.fd, BITMAP_BASE + SLOTS * _stride(self.nbits))
            self._areas.clear()
            self._punching.clear()
        for bm in self.bitmaps:
            if bm is not None:
                bm.dirty_pages.update(bm.pages)
                if bm.full_from < bm.nbits:
                    bm.dirty_pages.add(bm.full_from // PAGE_BITS)
                bm.punch.clear()
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
        s = self.slots[slot]
        self.slots[slot] = None
        self.bitmaps[slot] = None
        if s is not None and s.checkpoint:
            self._refresh_checkpoints()
            if self.fd is not None:  # its pages become holes once the freed slot is durable
                self._areas.append(slot)
                self._punching.add(slot)
        self.mark_meta()

    def free_index(self) -> int | None:
        """A free leg slot (legs live in slots 0-7)."""
        return next((i for i in range(MAX_LEGS) if self.slots[i] is None), None)

    def leg_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None and not s.checkpoint]

    # ---- checkpoints ---------------------------------------------------------------------
    def _refresh_checkpoints(self) -> None:
        self.checkpoints = [i for i, s in enumerate(self.slots) if s is not None and s.checkpoint]

    def find_checkpoint(self, name: str) -> int | None:
        for i in self.checkpoints:
            s = self.slots[i]
            if s is not None and s.name == name:
                return i
        return None

    def add_checkpoint(self, name: str, created: float) -> int | None:
        """A new checkpoint with no bit set, in a free checkpoint slot (None: all taken)."""
        free = next(
            (
                i
                for i in range(MAX_LEGS, SLOTS)
                if self.slots[i] is None and i not in self._punching
            ),
            None,
        )
        if free is None:
            return None
        self.slots[free] = Slot(name, None, 0, checkpoint=True, created=round(created * 1e6) / 1e6)
        self.bitmaps[free] = Bitmap(self.nbits)
        self._refresh_checkpoints()
        self.mark_meta()
        return free

    def mark_changed(self, offset: int, length: int) -> None:
        """A change to ``[offset, offset + length)``: set its bits in every checkpoint (in
        memory; the pages reach the file with the next sync, no later than the activity-log
        entry that covers the change leaves it)."""
        for i in self.checkpoints:
            self.mark(i, offset, length)

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
            SLOTS,
            len(al),
            FLAG_CLEAN if self.clean else 0,
        )
        for i, s in enumerate(self.slots):
            if s is None:
                continue
            flags = SLOT_USED | (SLOT_FULL if s.full else 0)
            gen = s.generation
            if s.checkpoint:  # a checkpoint keeps its creation time where a leg's generation is
                flags |= SLOT_CHECKPOINT
                gen = max(0, round(s.created * 1e6))
            ident = s.identity.bytes if s.identity is not None else bytes(16)
            name = s.name.encode("utf-8")[:64]
            SLOT.pack_into(raw, SLOTS_AT + i * SLOT.size, ident, gen, flags, 0, name)
        for i, bm in enumerate(self.bitmaps):
            struct.pack_into("<Q", raw, FULLS_AT + 8 * i, bm.full_from if bm is not None else 0)
        struct.pack_into(f"<{len(al)}I", raw, AL_AT, *al)
        raw[CRC_AT:] = zlib.crc32(raw[:CRC_AT]).to_bytes(4, "little")
        return bytes(raw)

    def _snapshot(self) -> _Batch:
        """What the next write does: (offset, page bytes or None for a hole) for every
        changed page and the metadata, the byte ranges to punch, and which pages these were."""
        batch = _Batch()
        writes, punches, pages = batch.writes, batch.punches, batch.pages
        if any(bm is not None and bm.full_from != bm.disk_full_from for bm in self.bitmaps):
            self.meta_dirty = True  # a moved tail rides along (lowered ones are marked too)
        stride = _stride(self.nbits)
        checkpoint_pages = False
        for i, bm in enumerate(self.bitmaps):
            if bm is None:
                continue
            base = BITMAP_BASE + i * stride
            for first, end in bm.punch:
                punches.append((base + first * BLOCK, (end - first) * BLOCK))
            bm.punch.clear()
            for p in sorted(bm.dirty_pages):
                chunk = bm.page_bytes(p)
                writes.append((base + p * BLOCK, chunk if _NONZERO.search(chunk) else None))
                pages.append((i, p))
            checkpoint_pages = checkpoint_pages or bool(bm.dirty_pages and i in self.checkpoints)
            bm.dirty_pages.clear()
        if self.meta_dirty:
            for slot in self._areas:  # freed checkpoints: holes once the metadata says so
                punches.append((BITMAP_BASE + slot * stride, stride))
            batch.areas, self._areas = self._areas, []
            self.meta_dirty = False
            self.seq += 1
            writes.append(((self.seq % META_COPIES) * BLOCK, self._pack_meta()))
            batch.al = set(self.al)
            # A change leaves the activity log only once its checkpoint bits are durable:
            # when this metadata drops an extent, the pages go first, in their own fdatasync.
            batch.split = checkpoint_pages and bool(self._disk_al - batch.al)
            for bm in self.bitmaps:
                if bm is not None:
                    bm.disk_full_from = bm.full_from
                    bm.meta_changed = False
        return batch

    @staticmethod
    def _write_all(fd: int, batch: _Batch) -> None:
        """Pages with set bits and then the metadata block (the last write in the list),
        one fdatasync (two when ``split``: pages, then metadata); only then the holes.  A
        hole never lands before the metadata that covers it: after fill() the pages are
        punched once full_from = 0 is durable, a freed checkpoint's once the free slot is,
        and every other hole is a page that is truly clear (a torn write leaves the older
        metadata copy valid, and at worst stale set bits)."""
        holes = list(batch.punches)
        for n, (offset, data) in enumerate(batch.writes):
            if data is None:
                holes.append((offset, BLOCK))
                continue
            if batch.split and n == len(batch.writes) - 1:
                os.fdatasync(fd)  # the pages before the metadata block that relies on them
            os.pwrite(fd, data, offset)
        os.fdatasync(fd)
        for offset, length in holes:
            _punch(fd, offset, length)

    async def _write_once(self) -> None:
        target = self.version
        had_meta = self.meta_dirty
        batch = self._snapshot()
        fd = self.fd
        try:
            if fd is not None and (batch.writes or batch.punches):
                io = asyncio.get_running_loop().run_in_executor(None, self._write_all, fd, batch)
                self._io = io
                await asyncio.shield(io)
        except OSError as e:
            self.meta_dirty = self.meta_dirty or had_meta
            self._areas.extend(batch.areas)
            for i, p in batch.pages:
                bm = self.bitmaps[i]
                if bm is not None:
                    bm.dirty_pages.add(p)
            raise IoError(
                errno.EIO,
                f"cannot record the state in the bitmap file {self.path}: {e.strerror}; "
                "free space or fix the disk of the client node",
            ) from None
        if batch.al is not None:
            self._disk_al = batch.al
        self._punching.difference_update(batch.areas)
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
