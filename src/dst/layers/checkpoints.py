"""Checkpoints: what changed on the device since a named moment (incremental backup).

A checkpoint is a slot of the client node's ``--bitmap`` record (the mirror's own, or a
:class:`~dst.layers.tracker.ChangeTracker`'s for the other layouts) whose bits are set
for every region written, trimmed or zeroed since it was added.  The activity log marks
every change in every checkpoint before the change is issued, so a checkpoint never
misses one, not even across a crash of the client node (docs/mirror.md).

Over NBD each checkpoint is the metadata context ``x-dst:changed:NAME``: bit 0 of a
block's status is set when it changed.  The functions here are what the control socket
and the NBD front end call; they take the served device and find its record.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, Protocol

from dst.device import BlockDevice, Capabilities, Extent, ExtentFlags, merge_extents
from dst.errors import DstError, UsageError
from dst.layers.activity import ActivityLog
from dst.layers.bitmap import MAX_CHECKPOINTS, Record
from dst.layers.resync import dirty_bytes

log = logging.getLogger("dst.checkpoint")

CHANGED_PREFIX = "x-dst:changed:"
CHANGED = ExtentFlags(1)  # bit 0 of an x-dst:changed context: written, trimmed or zeroed
UNCHANGED = ExtentFlags(0)
MAX_EXTENTS = 1 << 16  # per answer; a caller asks again from where it stopped
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class Tracked(Protocol):
    """A device that keeps a record: a mirror or a change tracker."""

    @property
    def record(self) -> Record: ...
    @property
    def al(self) -> ActivityLog: ...
    @property
    def bitmap_path(self) -> str | None: ...
    @property
    def capabilities(self) -> Capabilities: ...


def tracked_of(dev: BlockDevice | None) -> Tracked | None:
    """The device's record keeper, or None when it has none (no ``--bitmap``, or not a
    layer that tracks changes)."""
    from dst.layers.mirror import MirrorCore
    from dst.layers.tracker import ChangeTracker

    if isinstance(dev, (MirrorCore, ChangeTracker)) and dev.bitmap_path is not None:
        return dev
    return None


def check_name(name: str) -> str:
    """A checkpoint name: 1 to 64 letters, digits, '.', '_' or '-', not starting with a
    punctuation mark (it becomes part of an NBD context name and a file name in scripts)."""
    if not _NAME.match(name):
        raise UsageError(
            f"invalid checkpoint name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, e.g. backup-1"
        )
    return name


def _need(dev: BlockDevice | None, what: str) -> Tracked:
    t = tracked_of(dev)
    if t is None:
        raise DstError(
            f"cannot {what}: checkpoints are kept in the --bitmap file, and this client node "
            "runs without one; restart `dst attach` with --bitmap FILE"
        )
    return t


def _writable(t: Tracked, what: str) -> None:
    if t.record.fd is None:
        raise DstError(
            f"cannot {what}: the device is read-only, so nothing changes and the bitmap file "
            f"{t.bitmap_path} is not written"
        )


def _info(t: Tracked, slot: int) -> dict[str, Any]:
    s = t.record.slots[slot]
    assert s is not None
    return {
        "name": s.name,
        "created": round(s.created, 6),
        "changed_bytes": dirty_bytes(t.record, slot),
        "context": CHANGED_PREFIX + s.name,
    }


def _names(t: Tracked) -> list[str]:
    return [s.name for i in t.record.checkpoints if (s := t.record.slots[i]) is not None]


async def add_checkpoint(dev: BlockDevice | None, name: str) -> dict[str, Any]:
    """Start tracking changes under ``name``; durable in the bitmap file before this returns.
    Writes in flight at this moment count as changed (they may land after it)."""
    check_name(name)
    t = _need(dev, f"add checkpoint {name}")
    _writable(t, f"add checkpoint {name}")
    rec = t.record
    if rec.find_checkpoint(name) is not None:
        raise DstError(
            f"a checkpoint named {name} already exists; remove it first "
            f"(`dst ctl checkpoint remove {name}`) or choose another name"
        )
    slot = rec.add_checkpoint(name, time.time())
    if slot is None:
        raise DstError(
            f"cannot add checkpoint {name}: the bitmap file holds at most {MAX_CHECKPOINTS} "
            f"checkpoints ({', '.join(_names(t))}); remove one first"
        )
    for offset, length in list(t.al.changing):
        rec.mark(slot, offset, length)
    try:
        await rec.sync()
    except BaseException:
        rec.free_slot(slot)
        raise
    log.info(
        "checkpoint %s added: changes from now on are NBD context %s%s",
        name,
        CHANGED_PREFIX,
        name,
    )
    return _info(t, slot)


async def remove_checkpoint(dev: BlockDevice | None, name: str) -> dict[str, Any]:
    """Stop tracking ``name`` and free its slot (its pages become holes in the file)."""
    check_name(name)
    t = _need(dev, f"remove checkpoint {name}")
    rec = t.record
    slot = rec.find_checkpoint(name)
    if slot is None:
        known = ", ".join(_names(t)) or "none"
        raise DstError(f"no checkpoint named {name}; the checkpoints are: {known}")
    _writable(t, f"remove checkpoint {name}")
    info = _info(t, slot)
    rec.free_slot(slot)
    await rec.sync()
    log.info("checkpoint %s removed (%d changed bytes were tracked)", name, info["changed_bytes"])
    return {"removed": name, "checkpoints": _names(t)}


def list_checkpoints(dev: BlockDevice | None) -> dict[str, Any]:
    """Every checkpoint, oldest first, with how many bytes changed since it was added."""
    t = tracked_of(dev)
    if t is None:
        return {"bitmap": None, "granularity": None, "limit": MAX_CHECKPOINTS, "checkpoints": []}
    rec = t.record
    items = sorted((_info(t, i) for i in rec.checkpoints), key=lambda c: c["created"])
    return {
        "bitmap": t.bitmap_path,
        "granularity": rec.granularity,
        "limit": MAX_CHECKPOINTS,
        "checkpoints": items,
    }


def checkpoint_contexts(dev: BlockDevice | None) -> tuple[str, ...]:
    """The NBD metadata contexts of the checkpoints, ``x-dst:changed:NAME`` each."""
    t = tracked_of(dev)
    if t is None:
        return ()
    return tuple(CHANGED_PREFIX + n for n in sorted(_names(t)))


def changed_extents(dev: BlockDevice | None, name: str, offset: int, length: int) -> list[Extent]:
    """What changed in ``[offset, offset + length)`` since checkpoint ``name``: consecutive
    extents from ``offset``, CHANGED or UNCHANGED, in whole units of the granularity (and of
    the device's minimum block, so no block is ever cut in two).  A checkpoint removed since
    the caller chose it answers CHANGED everywhere: nothing tracks it any more."""
    t = tracked_of(dev)
    rec = t.record if t is not None else None
    slot = rec.find_checkpoint(name) if rec is not None else None
    bm = rec.bitmaps[slot] if rec is not None and slot is not None else None
    if t is None or rec is None or bm is None:
        return [Extent(offset, length, CHANGED)] if length > 0 else []
    g = rec.granularity
    unit = math.lcm(g, max(t.capabilities.min_block, 1))
    end = offset + length
    last = -(-end // g)
    out: list[Extent] = []
    pos = offset
    bit = bm.next_set(offset // g)
    while bit is not None and bit < last and len(out) < MAX_EXTENTS:
        stop = bm.run_end(bit, last)
        a = max(pos, bit * g // unit * unit)
        b = min(end, -(-stop * g // unit) * unit)
        if a > pos:
            out.append(Extent(pos, a - pos, UNCHANGED))
        if b > a:
            out.append(Extent(a, b - a, CHANGED))
            pos = b
        bit = bm.next_set(max(stop, -(-pos // g)))
    if pos < end and len(out) < MAX_EXTENTS:
        out.append(Extent(pos, end - pos, UNCHANGED))
    return merge_extents(out)


def checkpoint_status(dev: BlockDevice | None) -> list[dict[str, Any]] | None:
    """The checkpoints for the status document (None without a --bitmap record)."""
    if tracked_of(dev) is None:
        return None
    items: list[dict[str, Any]] = list_checkpoints(dev)["checkpoints"]
    return items
