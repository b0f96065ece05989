"""Checkpoints (changed-block tracking): the record's checkpoint slots, the change tracker
over one device, a mirror's checkpoints, restarts, crashes and the write order."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from dst.backends import open_device
from dst.device import BlockDevice, Extent
from dst.errors import DstError, UsageError
from dst.layers import FaultDevice, MirrorDevice, build_stack
from dst.layers import bitmap as bmod
from dst.layers.bitmap import MAX_CHECKPOINTS, MAX_LEGS, Record
from dst.layers.checkpoints import (
    CHANGED,
    UNCHANGED,
    add_checkpoint,
    changed_extents,
    check_name,
    checkpoint_contexts,
    list_checkpoints,
    remove_checkpoint,
)
from dst.layers.tracker import ChangeTracker
from tests.model import fault_legs, in_sync, until

KIB = 1 << 10
MIB = 1 << 20
G = 64 * KIB


def spans(extents: list[Extent]) -> list[tuple[int, int]]:
    """The changed (offset, length) ranges of an answer."""
    return [(e.offset, e.length) for e in extents if e.flags == CHANGED]


async def tracker(
    path: Path, size: str = "16M", al_extent: int = 4 * MIB, al_limit: int = 512
) -> ChangeTracker:
    t = ChangeTracker(
        open_device(f"memory:{size}"),
        bitmap=str(path),
        granularity=G,
        al_extent=al_extent,
        al_limit=al_limit,
    )
    await t.start()
    return t


def test_names_are_checked() -> None:
    assert check_name("backup-1.a_b") == "backup-1.a_b"
    for bad in ("", "-x", "a:b", "a b", "x" * 65, "é"):
        with pytest.raises(UsageError, match="invalid checkpoint name"):
            check_name(bad)


def test_record_keeps_checkpoints_apart_from_legs(tmp_path: Path) -> None:
    """Checkpoints live in slots 8-15, with their name and creation time; leg slots stay
    0-7 and a free leg slot is never a checkpoint's."""

    async def main() -> None:
        rec, _ = Record.open(str(tmp_path / "bm"), 4 * MIB, G, 4 * MIB)
        for i in range(MAX_LEGS):
            rec.add_slot(i, f"leg{i}", None, full=False)
        assert rec.free_index() is None
        slot = rec.add_checkpoint("b1", 1_700_000_000.25)
        assert slot == MAX_LEGS and rec.checkpoints == [slot]
        rec.mark_changed(100 * KIB, 1)
        rec.free_slot(3)
        assert rec.free_index() == 3
        await rec.close()

        back, why = Record.open(str(tmp_path / "bm"), 4 * MIB, G, 4 * MIB)
        s = back.slots[slot]
        bm = back.bitmaps[slot]
        assert why is None and s is not None and bm is not None
        assert (s.name, s.checkpoint, s.created, s.identity) == ("b1", True, 1_700_000_000.25, None)
        assert list(bm.runs()) == [(1, 2)]
        assert back.leg_slots() == [i for i in range(MAX_LEGS) if i != 3]
        assert back.find_checkpoint("b1") == slot and back.find_checkpoint("b2") is None
        await back.close()

    asyncio.run(main())


def test_writes_after_add_are_changed_exactly_and_writes_before_are_not(tmp_path: Path) -> None:
    async def main() -> None:
        t = await tracker(tmp_path / "bm")
        await t.write(0, b"a" * 4096)  # before: not in the checkpoint
        info = await add_checkpoint(t, "b1")
        assert info["name"] == "b1" and info["changed_bytes"] == 0
        assert info["context"] == "x-dst:changed:b1"
        assert checkpoint_contexts(t) == ("x-dst:changed:b1",)
        await t.write(3 * G + 10, b"b" * 100)  # one region
        await t.write_zeroes(8 * G, 2 * G + 1)  # three regions
        await t.trim(16 * MIB - G, G)  # the last region
        got = changed_extents(t, "b1", 0, t.size)
        assert spans(got) == [(3 * G, G), (8 * G, 3 * G), (16 * MIB - G, G)]
        assert got[0] == Extent(0, 3 * G, UNCHANGED) and sum(e.length for e in got) == t.size
        # a request that starts and ends inside regions is answered from its own offset
        part = changed_extents(t, "b1", 3 * G + 5, 6 * G)
        assert part[0] == Extent(3 * G + 5, G - 5, CHANGED) and part[-1].end == 9 * G + 5
        listing = list_checkpoints(t)
        assert [c["changed_bytes"] for c in listing["checkpoints"]] == [5 * G]
        assert listing["bitmap"] == str(tmp_path / "bm") and listing["granularity"] == G
        await t.aclose()

    asyncio.run(main())


def test_refusals_and_remove(tmp_path: Path) -> None:
    async def main() -> None:
        plain = open_device("memory:1M")
        with pytest.raises(DstError, match="runs without one; restart `dst attach` with --bitmap"):
            await add_checkpoint(plain, "b1")
        assert list_checkpoints(plain)["checkpoints"] == [] and checkpoint_contexts(plain) == ()
        t = await tracker(tmp_path / "bm")
        for i in range(MAX_CHECKPOINTS):
            await add_checkpoint(t, f"c{i}")
        with pytest.raises(DstError, match="already exists"):
            await add_checkpoint(t, "c0")
        with pytest.raises(DstError, match=f"at most {MAX_CHECKPOINTS} checkpoints"):
            await add_checkpoint(t, "one-more")
        await t.write(0, b"x")
        r = await remove_checkpoint(t, "c3")
        assert r["removed"] == "c3" and "c3" not in r["checkpoints"]
        with pytest.raises(DstError, match="no checkpoint named c3"):
            await remove_checkpoint(t, "c3")
        # a connection that chose c3 before it went: everything counts as changed
        assert changed_extents(t, "c3", 0, MIB) == [Extent(0, MIB, CHANGED)]
        new = await add_checkpoint(t, "again")  # the freed slot, clean
        assert new["changed_bytes"] == 0
        await plain.aclose()
        await t.aclose()

    asyncio.run(main())


def test_a_removed_checkpoint_leaves_holes_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bm"

    async def main() -> None:
        t = await tracker(path, "1G")
        await add_checkpoint(t, "b1")
        for i in range(16):
            await t.write(i * 64 * MIB, b"x")  # far apart: one page per 2 GiB, so one page
        await t.record.sync()
        with_pages = os.stat(path).st_blocks
        await remove_checkpoint(t, "b1")
        assert os.stat(path).st_blocks < with_pages
        await t.aclose()

    asyncio.run(main())


def test_a_clean_restart_keeps_checkpoints(tmp_path: Path) -> None:
    async def main() -> None:
        t = await tracker(tmp_path / "bm")
        await add_checkpoint(t, "b1")
        await t.write(5 * G, b"x" * G)
        await t.aclose()
        again = await tracker(tmp_path / "bm")
        assert spans(changed_extents(again, "b1", 0, again.size)) == [(5 * G, G)]
        await again.write(9 * G, b"y")
        assert spans(changed_extents(again, "b1", 0, again.size)) == [(5 * G, G), (9 * G, G)]
        await again.aclose()

    asyncio.run(main())


def test_a_crash_counts_the_activity_log_as_changed(tmp_path: Path) -> None:
    """The record is left as a crash leaves it (no clean stop): every extent of the
    activity log counts as changed at the next start, so no change is lost."""

    async def main() -> None:
        t = await tracker(tmp_path / "bm", "64M", al_extent=4 * MIB)
        await add_checkpoint(t, "b1")
        await t.write(5 * MIB + 7, b"x" * 10)
        await t.write(40 * MIB, b"y" * G)
        await t.record.abandon()  # kill -9: nothing more reaches the file
        again = await tracker(tmp_path / "bm", "64M", al_extent=4 * MIB)
        got = spans(changed_extents(again, "b1", 0, again.size))
        assert got == [(4 * MIB, 4 * MIB), (40 * MIB, 4 * MIB)]  # the two extents, whole
        await again.aclose()
        third = await tracker(tmp_path / "bm", "64M", al_extent=4 * MIB)  # clean since
        assert spans(changed_extents(third, "b1", 0, third.size)) == got
        await third.aclose()

    asyncio.run(main())


def test_a_write_in_flight_when_a_checkpoint_is_added_counts_as_changed(tmp_path: Path) -> None:
    async def main() -> None:
        inner = FaultDevice(open_device("memory:16M"))
        t = ChangeTracker(inner, bitmap=str(tmp_path / "bm"), granularity=G)
        await t.start()
        inner.hold_changes()
        write = asyncio.ensure_future(t.write(7 * G, b"z" * 10))
        await until(lambda: bool(t.al.changing), what="the write to start")
        await add_checkpoint(t, "b1")
        inner.release_changes()
        await write
        assert spans(changed_extents(t, "b1", 0, t.size)) == [(7 * G, G)]
        await t.aclose()

    asyncio.run(main())


def test_checkpoint_pages_are_durable_before_the_log_drops_their_extent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write into an extent already in the activity log sets bits that are only in
    memory; when that extent later leaves the log, its pages are written and fdatasynced
    before the metadata block that no longer lists it (a crash in between must not lose
    the change)."""
    events: list[str] = []
    pwrite, fdatasync = os.pwrite, os.fdatasync

    def spy_pwrite(fd: int, data: bytes, offset: int) -> int:
        events.append("meta" if offset < bmod.BITMAP_BASE else "page")
        return pwrite(fd, data, offset)

    def spy_fdatasync(fd: int) -> None:
        events.append("sync")
        fdatasync(fd)

    async def main() -> None:
        t = await tracker(tmp_path / "bm", "64M", al_extent=4 * MIB, al_limit=1)
        await add_checkpoint(t, "b1")
        await t.write(0, b"a")  # extent 0 enters the log (bit 0 written with it)
        await t.write(G, b"b")  # hot: bit 1 only in memory
        monkeypatch.setattr(bmod.os, "pwrite", spy_pwrite)
        monkeypatch.setattr(bmod.os, "fdatasync", spy_fdatasync)
        await t.write(8 * MIB, b"c")  # extent 2 replaces extent 0 in the log
        monkeypatch.undo()
        assert events == ["page", "sync", "meta", "sync"], events
        await t.record.abandon()
        again = await tracker(tmp_path / "bm", "64M", al_extent=4 * MIB)
        got = spans(changed_extents(again, "b1", 0, 8 * MIB))
        assert got == [(0, 2 * G)]  # extent 0 is no longer in the log: the page holds it
        await again.aclose()

    asyncio.run(main())


def test_a_mirror_keeps_checkpoints_beside_its_legs(tmp_path: Path) -> None:
    """The mirror marks its checkpoints in its own write path; leg code never sees them:
    a restart matches the legs, an added leg takes a leg slot, and a crash counts the
    activity log as changed in the checkpoints too."""
    path = str(tmp_path / "bm")

    def leg(i: int) -> BlockDevice:
        return FaultDevice(
            open_device(f"file:{tmp_path}/leg{i}.img", size=16 * MIB), name=f"leg{i}"
        )

    def legs(n: int) -> list[BlockDevice]:
        return [leg(i) for i in range(n)]

    async def main() -> None:
        m = MirrorDevice(legs(2), bitmap=path, granularity=G, assume_clean=True)
        await m.start()
        await m.write(0, b"before")
        await add_checkpoint(m, "b1")
        await m.write(2 * G, b"after" * 1000)
        await m.write_zeroes(10 * G, G)
        assert spans(changed_extents(m, "b1", 0, m.size)) == [(2 * G, G), (10 * G, G)]
        await m.aclose()

        m = MirrorDevice(legs(2), bitmap=path, granularity=G)
        await m.start()
        assert m.statistics()["sync"] == "in-sync"  # both legs matched, nothing to copy
        assert spans(changed_extents(m, "b1", 0, m.size)) == [(2 * G, G), (10 * G, G)]
        await m.add(leg(2))
        assert m.legs[-1].slot < MAX_LEGS
        await in_sync(m)
        await m.write(12 * MIB, b"x")
        await m.abandon()  # a crash of the client node: the record is left as it stands
        for x in m.legs:
            await x.dev.aclose()

        m = MirrorDevice(legs(3), bitmap=path, granularity=G)
        await m.start()
        got = spans(changed_extents(m, "b1", 0, m.size))
        assert (12 * MIB, 4 * MIB) in got and (2 * G, G) in got  # the log's extent, whole
        await in_sync(m)  # the legs copy that extent too; the checkpoint does not change
        assert spans(changed_extents(m, "b1", 0, m.size)) == got
        await m.aclose()

    asyncio.run(main())


def test_layouts_share_the_file_safely(tmp_path: Path) -> None:
    """A tracker forgets the legs a mirror recorded in the same file (their data changes
    without the mirror); a mirror on a file with checkpoints only starts as on a new file
    (the first leg copied to the others) and keeps the checkpoints."""
    path = str(tmp_path / "bm")

    async def main() -> None:
        m = await build_stack("mirror", list(fault_legs(2, "4M")), bitmap=path, granularity=G)
        await add_checkpoint(m, "b1")
        await m.aclose()
        one: BlockDevice = await build_stack(
            None, [open_device("memory:4M")], bitmap=path, granularity=G
        )
        assert isinstance(one, ChangeTracker) and one.record.leg_slots() == []
        await one.write(G, b"x")
        await one.aclose()
        m = await build_stack("mirror", list(fault_legs(2, "4M")), bitmap=path, granularity=G)
        assert spans(changed_extents(m, "b1", 0, m.size)) == [(G, G)]
        assert isinstance(m, MirrorDevice) and len(m.record.leg_slots()) == 2
        await m.aclose()
        with pytest.raises(UsageError, match="--resync-rate applies to --mirror only"):
            await build_stack(None, [open_device("memory:1M")], bitmap=path, resync_rate=1)

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["stripe", "linear"])
def test_stripe_and_linear_get_a_tracker(tmp_path: Path, mode: str) -> None:
    async def main() -> None:
        members: list[BlockDevice] = [open_device("memory:4M") for _ in range(2)]
        dev = await build_stack(
            mode,
            members,
            chunk=64 * KIB if mode == "stripe" else None,
            bitmap=str(tmp_path / "bm"),
            granularity=G,
        )
        assert isinstance(dev, ChangeTracker) and dev.size == 8 * MIB
        await add_checkpoint(dev, "b1")
        await dev.write(4 * MIB - 10, b"x" * 20)  # across the members' boundary
        assert spans(changed_extents(dev, "b1", 0, dev.size)) == [(4 * MIB - G, 2 * G)]
        await dev.aclose()

    asyncio.run(main())


def test_a_verify_repair_counts_as_a_change(tmp_path: Path) -> None:
    """Legs that differ may have served different data before a repair: the repaired
    regions are marked, so the next backup copies them; a plain verify marks nothing."""

    async def main() -> None:
        legs = fault_legs(2, "4M")
        m = MirrorDevice(legs, bitmap=str(tmp_path / "bm"), granularity=G, assume_clean=True)
        await m.start()
        await m.write(0, b"\x01" * MIB)
        await add_checkpoint(m, "b1")
        await legs[1].inner.write(3 * G + 5, b"\x02" * 10)  # behind the mirror's back
        await m.verify()
        assert spans(changed_extents(m, "b1", 0, m.size)) == []
        await m.verify(repair=True)
        assert spans(changed_extents(m, "b1", 0, m.size)) == [(3 * G, G)]
        await in_sync(m)
        await m.aclose()

    asyncio.run(main())
