"""The bitmap file, the activity log, start-up decisions and crash consistency."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dst.backends import open_device
from dst.device import BlockDevice
from dst.errors import DstError
from dst.layers import FaultDevice, MirrorDevice
from dst.layers.activity import ActivityLog
from dst.layers.bitmap import BITMAP_BASE, SLOTS, Record
from dst.layers.dirtybits import BLOCK, Bitmap
from tests.model import contents, in_sync, until

KIB = 1 << 10
MIB = 1 << 20
G = 4096
EXT = 64 * KIB


# ---------------------------------------------------------------- the in-memory bitmap


def test_bitmap_set_clear_and_search() -> None:
    bm = Bitmap(100_000)
    assert bm.set(5, 70) == 65 and bm.set(60, 80) == 10
    assert bm.count() == 75 and bm.test(5) and not bm.test(4) and bm.test(79)
    assert bm.next_set(0) == 5 and bm.next_set(80) is None
    assert bm.run_end(5, 1000) == 80 and bm.run_end(5, 30) == 30
    assert bm.clear(10, 20) == 10 and bm.run_end(5, 1000) == 10 and bm.next_set(10) == 20
    bm.set(99_990, 200_000)  # clipped to the end
    assert bm.count() == 75 and bm.next_set(81) == 99_990
    # a range reaching the end grows the stored-as-set tail instead of storing a page
    assert bm.full_from == 99_990 and bm.dirty_pages == {0} and bm.meta_changed
    rng = random.Random(4)
    ref = [False] * 3000
    small = Bitmap(3000)
    for _ in range(400):
        a, b = sorted(rng.randrange(3001) for _ in range(2))
        on = rng.random() < 0.6
        (small.set if on else small.clear)(a, b)
        ref[a:b] = [on] * (b - a)
    assert [small.test(i) for i in range(3000)] == ref
    assert small.count() == sum(ref)
    i, runs = small.next_set(0), []
    while i is not None:
        j = small.run_end(i, 3000)
        runs.append((i, j))
        i = small.next_set(j)
    assert sum(j - i for i, j in runs) == sum(ref)


def test_bitmap_regrain_and_merge() -> None:
    old = Bitmap(64)  # 64 KiB regions
    old.set(1, 2)
    old.set(10, 12)
    new = Bitmap(64 * 16)  # 4 KiB regions
    new.regrain(old, 64 * KIB, 4 * KIB)
    assert new.count() == 3 * 16 and new.test(16) and new.test(10 * 16) and not new.test(15)
    back = Bitmap(64)
    back.regrain(new, 4 * KIB, 64 * KIB)
    assert list(back.runs()) == list(old.runs()) == [(1, 2), (10, 12)]
    a, b = Bitmap(50_000), Bitmap(50_000)
    a.set(0, 10)
    b.set(5, 20)
    b.set(45_000, 45_001)
    a.dirty_pages.clear()
    assert a.merge(b) == 11 and a.count() == 21 and a.dirty_pages == {0, 1}
    assert list(a.runs()) == [(0, 20), (45_000, 45_001)]


# ---------------------------------------------------------------- the record on disk


def peek(path: Path, size: int, granularity: int = G) -> Record:
    """Read a record as it is on disk, without locking it (the mirror may hold it)."""
    rec = Record(str(path), size, granularity, EXT)
    rec.fd = os.open(path, os.O_RDONLY)
    try:
        assert rec._load() is None
    finally:
        os.close(rec.fd)
        rec.fd = None
    return rec


def test_record_round_trip_and_torn_metadata(tmp_path: Path) -> None:
    path = tmp_path / "bm"

    async def main() -> None:
        rec, why = Record.open(str(path), MIB, G, EXT)
        assert why is not None and "is new" in why
        ident = uuid.uuid4()
        rec.add_slot(0, "dst://a/x", ident, full=False).generation = 7
        rec.add_slot(3, "b" * 80, None, full=True)
        rec.generation = 7
        rec.mark(0, 10_000, 9000)
        rec.al = [2, 5]
        await rec.sync()
        with pytest.raises(DstError, match="in use by another process"):
            Record.open(str(path), MIB, G, EXT)
        await rec.abandon()

        back, why = Record.open(str(path), MIB, G, EXT)
        assert why is None and back.generation == 7 and back.al == [2, 5]
        assert back.mirror_id == rec.mirror_id
        s0, s3 = back.slots[0], back.slots[3]
        assert s0 is not None and s3 is not None
        assert (s0.name, s0.identity, s0.generation, s0.full) == ("dst://a/x", ident, 7, False)
        assert (s3.name, s3.identity, s3.full) == ("b" * 64, None, True)
        assert back.bitmaps[0] is not None and back.bitmaps[0].count() == 3
        assert back.bitmaps[3] is not None and back.bitmaps[3].count() == MIB // G
        back.generation = 8
        back.mark_meta()
        await back.sync()  # written to the other copy
        await back.abandon()

        with open(path, "r+b") as f:  # tear the newer copy: the older one is used
            f.seek((back.seq % 2) * BLOCK + 100)
            f.write(b"\x99" * 8)
        again, why = Record.open(str(path), MIB, G, EXT)
        assert why is None and again.generation == 7
        await again.abandon()
        with open(path, "r+b") as f:
            f.seek((rec.seq % 2) * BLOCK + 100)
            f.write(b"\x99" * 8)
        broken, why = Record.open(str(path), MIB, G, EXT)
        assert why is not None and "damaged" in why and broken.slots == [None] * SLOTS
        await broken.close()  # a fresh record replaces the damaged one

        other, why = Record.open(str(path), 2 * MIB, G, EXT)
        assert why is not None and "records a mirror of" in why
        await other.close()

    asyncio.run(main())


def test_record_converts_a_changed_granularity(tmp_path: Path) -> None:
    async def main() -> None:
        rec, _ = Record.open(str(tmp_path / "bm"), MIB, 64 * KIB, EXT)
        rec.add_slot(1, "x", None, full=False)
        rec.mark(1, 70 * KIB, 1)
        await rec.close()
        finer, why = Record.open(str(tmp_path / "bm"), MIB, 4 * KIB, EXT)
        bm = finer.bitmaps[1]
        assert why is None and bm is not None and bm.count() == 16 and bm.next_set(0) == 16
        await finer.close()

    asyncio.run(main())


PIB = 1 << 50


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_petabyte_record_is_sparse_in_memory_and_on_disk(tmp_path: Path) -> None:
    """Two legs of 1 PiB at 64 KiB: 2 GiB of bits each if stored whole.  Three dirty
    regions far apart cost three pages; a full resync costs one number; a partly copied
    full resync is recorded exactly; nothing is ever written whole."""
    path = tmp_path / "bm"

    async def main() -> None:
        rec, _ = Record.open(str(path), PIB, 64 * KIB, EXT)
        rec.add_slot(0, "a", None, full=False)
        rec.add_slot(1, "b", None, full=False)
        for off in (0, PIB // 2, PIB - 4096):
            rec.mark(1, off, 4096)
        await rec.sync()
        bm = rec.bitmaps[1]
        assert bm is not None and bm.count() == 3 and len(bm.pages) == 2  # last one: the tail
        assert allocated(path) < 1 * MIB
        await rec.close()

        back, why = Record.open(str(path), PIB, 64 * KIB, EXT)
        bm = back.bitmaps[1]
        assert why is None and bm is not None
        assert [first for first, _ in bm.runs()] == [0, PIB // 2 // (64 * KIB), bm.nbits - 1]
        a = back.bitmaps[0]
        assert a is not None
        a.fill()  # leg a needs a full resync: nothing stored
        back.mark_meta()
        await back.sync()
        assert allocated(path) < 1 * MIB and a.count() == a.nbits
        a.clear(0, 1000)  # a resync copied the first 1000 regions
        await back.sync(force=True)
        await back.close()

        again, _ = Record.open(str(path), PIB, 64 * KIB, EXT)
        a = again.bitmaps[0]
        assert a is not None and a.next_set(0) == 1000 and a.count() == a.nbits - 1000
        await again.close()
        assert allocated(path) < 1 * MIB

    asyncio.run(main())


def downgrade(path: Path, version: int) -> None:
    """Rewrite both metadata copies of a file as version 1 or 2 wrote them: 8 leg slots,
    then (version 2) the full_from table, then the activity log."""
    import zlib

    from dst.layers import bitmap as bmod

    with open(path, "r+b") as f:
        for copy in range(2):
            f.seek(copy * BLOCK)
            raw = bytearray(f.read(BLOCK))
            if raw[:8] != bmod.MAGIC:
                continue
            head = list(bmod.HEAD.unpack_from(raw))
            nal = head[10]
            al = raw[bmod.AL_AT : bmod.AL_AT + 4 * nal]
            fulls = raw[bmod.FULLS_AT : bmod.FULLS_AT + 8 * bmod.OLD_SLOTS]
            head[1], head[9] = version, bmod.OLD_SLOTS
            old = bytearray(BLOCK)
            bmod.HEAD.pack_into(old, 0, *head)
            end = bmod.SLOTS_AT + bmod.OLD_SLOTS * bmod.SLOT.size
            old[bmod.SLOTS_AT : end] = raw[bmod.SLOTS_AT : end]
            if version == 2:
                old[end : end + len(fulls)] = fulls
                end += len(fulls)
            old[end : end + len(al)] = al
            old[bmod.CRC_AT :] = zlib.crc32(old[: bmod.CRC_AT]).to_bytes(4, "little")
            f.seek(copy * BLOCK)
            f.write(old)


def versions_in(path: Path) -> set[int]:
    import struct

    with open(path, "rb") as f:
        copies = [f.read(BLOCK) for _ in range(2)]
    return {struct.unpack_from("<I", c, 8)[0] for c in copies if c[:8] == b"DSTMBMP1"}


@pytest.mark.parametrize("version", [1, 2])
def test_older_format_versions_are_read_and_converted(tmp_path: Path, version: int) -> None:
    """Version 1 stored every bit in place and no tail table, version 2 added the table;
    both had 8 slots.  Each is read as it is and its metadata is written in version 3 (16
    slots) at the next sync, with the same legs, bits and activity log."""
    from dst.layers import bitmap as bmod

    path = tmp_path / "bm"

    async def main() -> None:
        rec, _ = Record.open(str(path), MIB, G, EXT)
        rec.add_slot(2, "c", None, full=False).generation = 5
        rec.add_slot(7, "h", None, full=False)
        rec.mark(2, 8192, 100)
        if version == 2:
            bm = rec.bitmaps[7]
            assert bm is not None
            bm.clear(0, bm.nbits)
            bm.set(200, bm.nbits)  # stored as a tail: full_from = 200
        rec.al = [3]
        await rec.sync()
        await rec.abandon()
        downgrade(path, version)
        assert versions_in(path) == {version}
        old, why = Record.open(str(path), MIB, G, EXT)
        bm, tail = old.bitmaps[2], old.bitmaps[7]
        s2 = old.slots[2]
        assert why is None and bm is not None and list(bm.runs()) == [(2, 3)]
        assert s2 is not None and s2.name == "c" and s2.generation == 5 and not s2.checkpoint
        assert tail is not None and old.al == [3]
        assert list(tail.runs()) == ([(200, tail.nbits)] if version == 2 else [])
        assert old.meta_dirty  # converted at the next write
        await old.sync()
        await old.abandon()
        assert bmod.VERSION in versions_in(path)
        again, why = Record.open(str(path), MIB, G, EXT)
        bm = again.bitmaps[2]
        assert why is None and bm is not None and list(bm.runs()) == [(2, 3)] and again.al == [3]
        assert again.free_index() == 0 and len(again.slots) == bmod.SLOTS
        await again.close()

    asyncio.run(main())


def test_activity_log_is_durable_before_the_write_and_dropped_lazily(tmp_path: Path) -> None:
    path = tmp_path / "bm"

    async def main() -> None:
        rec, _ = Record.open(str(path), 4 * MIB, G, EXT)
        await rec.sync()
        al = ActivityLog(rec, limit=3)
        await al.begin(0, 10)
        assert peek(path, 4 * MIB).al == [0]
        await al.begin(EXT * 2 - 1, 2)  # spans extents 1 and 2
        assert peek(path, 4 * MIB).al == [0, 1, 2]
        al.end(0, 10)
        seq = rec.seq
        await al.begin(5, 1)  # extent 0 is still recorded: no metadata write
        assert rec.seq == seq
        al.end(5, 1)
        await al.begin(EXT * 5, 1)  # room is made from extents without writes in flight
        assert peek(path, 4 * MIB).al == [1, 2, 5]
        al.end(EXT * 2 - 1, 2)
        al.end(EXT * 5, 1)
        await rec.close()
        assert peek(path, 4 * MIB).al == [] and peek(path, 4 * MIB).clean

    asyncio.run(main())


# ---------------------------------------------------------------- mirrors across restarts


async def open_mirror(inners: Sequence[BlockDevice], path: Path, **kw: Any) -> MirrorDevice:
    legs = [FaultDevice(x, name=f"leg{i}") for i, x in enumerate(inners)]
    kw.setdefault("granularity", G)
    kw.setdefault("al_extent", EXT)
    m = MirrorDevice(legs, bitmap=str(path), **kw)
    m.retry_min = 0.05
    await m.start()
    return m


def dirty(m: MirrorDevice, name: str) -> int:
    return int(next(x for x in m.statistics()["members"] if x["uri"] == name)["dirty_bytes"])


async def same(inners: Sequence[BlockDevice]) -> bool:
    first = await contents(inners[0])
    return all([await contents(x) == first for x in inners[1:]])


def test_a_new_bitmap_means_a_full_resync(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        inners = [open_device("memory:1M") for _ in range(2)]
        await inners[0].write(0, b"old data on the first leg")
        m = await open_mirror(inners, tmp_path / "bm")
        await in_sync(m)
        assert await same(inners)
        await m.aclose()

    with caplog.at_level(logging.INFO, logger="dst.mirror"):
        asyncio.run(main())
    assert "leg1: full resync: the bitmap file" in caplog.text and "is new" in caplog.text


def test_a_clean_restart_resyncs_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        inners = [open_device("memory:1M") for _ in range(2)]
        m = await open_mirror(inners, tmp_path / "bm", assume_clean=True)
        await m.write(0, b"x" * 100_000)
        await m.abandon()  # legs stay open; a clean stop is recorded below by hand
        rec, why = Record.open(str(tmp_path / "bm"), MIB, G, EXT)
        assert why is None and rec.al == [0, 1]
        await rec.close()
        m = await open_mirror(inners, tmp_path / "bm")
        assert m.statistics()["sync"] == "in-sync" and dirty(m, "leg1") == 0
        await m.abandon()

    asyncio.run(main())


@pytest.mark.parametrize("held", [0, 1])
def test_a_crash_in_the_middle_of_a_mirrored_write(
    held: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Drop the mirror while one leg has a write and the other has not: after the
    start-up resync the legs are identical (old or new data, but the same)."""

    async def main() -> None:
        inners = [open_device("memory:4M") for _ in range(2)]
        # a small activity log: older extents are dropped as new ones are recorded
        m = await open_mirror(inners, tmp_path / "bm", assume_clean=True, al_limit=2)
        await m.write(0, random.Random(1).randbytes(MIB))
        await m.write(40 * EXT, b"\x01" * 2 * EXT)
        legs = [x.dev for x in m.legs]
        mine, other = legs[held], legs[1 - held]
        assert isinstance(mine, FaultDevice) and isinstance(other, FaultDevice)
        mine.hold_changes()
        before = other.applied["write"]
        write = asyncio.create_task(m.write(48 * EXT + 16 * KIB, b"\xee" * 100 * KIB))
        await until(lambda: other.applied["write"] == before + 1, what="one leg to apply")
        await m.abandon()  # the crash
        with contextlib.suppress(asyncio.CancelledError):
            await write
        assert not await same(inners)

        m = await open_mirror(inners, tmp_path / "bm", al_limit=2)
        # only the extents of the activity log are resynced: the write spans two
        assert dirty(m, "leg1") == 2 * EXT and dirty(m, "leg0") == 0
        await in_sync(m)
        assert await same(inners)
        await m.aclose()

    with caplog.at_level(logging.INFO, logger="dst.mirror"):
        asyncio.run(main())
    assert "activity log: the client node stopped with writes in flight in 2 extents" in caplog.text


def test_a_crash_while_degraded_resyncs_only_dirty_regions(tmp_path: Path) -> None:
    async def main() -> None:
        inners = [open_device("memory:2M") for _ in range(2)]
        m = await open_mirror(inners, tmp_path / "bm", assume_clean=True)
        legs = [x.dev for x in m.legs]
        assert isinstance(legs[1], FaultDevice)
        legs[1].go_down(budget=0.01)
        await m.write(0, b"\x01" * 4096)
        for i in range(1, 6):
            await m.write(i * 300 * KIB, b"\x02" * 5000)
        assert dirty(m, "leg1") == 4096 + 5 * 2 * G
        disk = peek(tmp_path / "bm", 2 * MIB)  # already durable: the writes were acked
        assert disk.bitmaps[1] is not None and disk.bitmaps[1].count() == 11
        assert disk.slots[1] is not None and disk.slots[1].generation < disk.generation
        await m.abandon()

        m = await open_mirror(inners, tmp_path / "bm")
        stats = m.statistics()
        assert [x["sync"] for x in stats["members"]] == ["in-sync", "resyncing"]
        # dirty regions, plus the activity-log extents (everything written recently)
        assert 11 * G <= dirty(m, "leg1") <= 11 * G + 6 * EXT
        await in_sync(m)
        assert await same(inners)
        await m.aclose()

    asyncio.run(main())


def test_a_replaced_leg_gets_a_full_resync(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        inners = [open_device("memory:1M") for _ in range(2)]
        m = await open_mirror(inners, tmp_path / "bm", assume_clean=True)
        await m.write(0, b"\x06" * 5000)
        await m.abandon()
        inners = [inners[0], open_device("memory:1M")]  # a blank store under the old name
        m = await open_mirror(inners, tmp_path / "bm")
        assert dirty(m, "leg1") == MIB
        await in_sync(m)
        assert await same(inners)
        await m.aclose()

    with caplog.at_level(logging.WARNING, logger="dst.mirror"):
        asyncio.run(main())
    assert "leg1: full resync: its identity changed from" in caplog.text
    assert "a blank or replaced store" in caplog.text


def test_a_leg_without_identity_is_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        inners = [open_device("memory:1M") for _ in range(2)]
        legs: list[BlockDevice] = [
            FaultDevice(inners[0], name="leg0"),
            FaultDevice(inners[1], name="leg1", identity=None),
        ]
        m = MirrorDevice(legs, bitmap=str(tmp_path / "bm"), granularity=G, assume_clean=True)
        await m.start()
        await m.abandon()
        legs = [
            FaultDevice(inners[0], name="leg0"),
            FaultDevice(inners[1], name="leg1", identity=None),
        ]
        m = MirrorDevice(legs, bitmap=str(tmp_path / "bm"), granularity=G)
        await m.start()
        assert dirty(m, "leg1") == MIB
        await m.aclose()

    with caplog.at_level(logging.WARNING, logger="dst.mirror"):
        asyncio.run(main())
    assert "leg1: full resync: it has no identity" in caplog.text


def test_no_current_leg_reachable_refuses_to_start(tmp_path: Path) -> None:
    async def main() -> None:
        inners = [open_device("memory:1M") for _ in range(2)]
        m = await open_mirror(inners, tmp_path / "bm", assume_clean=True)
        first = m.legs[0].dev
        assert isinstance(first, FaultDevice)
        first.go_down(budget=0.01)
        await m.write(0, b"only on leg1")  # leg0 is behind from now on
        await m.aclose()
        legs = [FaultDevice(x, name=f"leg{i}") for i, x in enumerate(inners)]
        legs[1].go_down(budget=None)
        m = MirrorDevice(list(legs), bitmap=str(tmp_path / "bm"), granularity=G)
        with pytest.raises(DstError) as e:
            await m.start()
        text = str(e.value)
        assert "no current leg of the mirror is reachable" in text
        assert "leg0 is behind (generation" in text and "leg1 is current but not reachable" in text
        assert "remove" in text
        await m.abandon()

    asyncio.run(main())


@pytest.mark.parametrize("replaced", [False, True])
def test_a_current_leg_down_at_start_is_checked_when_it_returns(
    replaced: bool, tmp_path: Path
) -> None:
    async def main() -> None:
        inners = [open_device("memory:1M") for _ in range(2)]
        m = await open_mirror(inners, tmp_path / "bm", assume_clean=True)
        await m.write(0, b"\x03" * MIB)
        await m.abandon()
        rec, _ = Record.open(str(tmp_path / "bm"), MIB, G, EXT)
        await rec.close()  # as if it had stopped cleanly
        legs = [FaultDevice(x, name=f"leg{i}") for i, x in enumerate(inners)]
        legs[1].go_down(budget=None)
        m = MirrorDevice(list(legs), bitmap=str(tmp_path / "bm"), granularity=G, al_extent=EXT)
        await m.start()
        assert m.state == "degraded"
        await m.write(8192, b"\x04" * 100)
        if replaced:
            legs[1].identity = uuid.uuid4()
        legs[1].come_up()
        assert dirty(m, "leg1") == (MIB if replaced else G)
        await in_sync(m)
        assert await same(inners)
        await m.aclose()

    asyncio.run(main())


def test_forgotten_and_unrecorded_legs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        inners = [open_device("memory:1M") for _ in range(2)]
        m = await open_mirror(inners, tmp_path / "bm", assume_clean=True)
        await m.abandon()
        legs = [
            FaultDevice(inners[0], name="leg0"),
            FaultDevice(open_device("memory:1M"), name="x"),
        ]
        m = MirrorDevice(list(legs), bitmap=str(tmp_path / "bm"), granularity=G)
        await m.start()
        assert dirty(m, "x") == MIB and dirty(m, "leg0") == 0
        await in_sync(m)
        await m.aclose()

    with caplog.at_level(logging.WARNING, logger="dst.mirror"):
        asyncio.run(main())
    assert (
        "leg leg1 (identity" in caplog.text
        and "is recorded but not given: forgotten" in caplog.text
    )
    assert "x: full resync: it is not recorded in the bitmap file" in caplog.text


def test_a_full_resync_cut_short_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        inners = [open_device("memory:2M") for _ in range(2)]
        await inners[0].write(0, b"\x5a" * 2 * MIB)  # data: zeroes would go in one step
        m = await open_mirror(inners, tmp_path / "bm", resync_rate=2 * MIB)
        await until(lambda: (m.statistics()["resync"] or {}).get("bytes_done", 0) > 0)
        await m.abandon()
        m = await open_mirror(inners, tmp_path / "bm")
        assert dirty(m, "leg1") == 2 * MIB
        await in_sync(m)
        await m.aclose()

    with caplog.at_level(logging.WARNING, logger="dst.mirror"):
        asyncio.run(main())
    assert "leg1: full resync: its earlier full resync did not finish" in caplog.text


def test_legs_found_under_new_names_by_identity(tmp_path: Path) -> None:
    async def main() -> None:
        inners = [open_device("memory:1M") for _ in range(2)]
        m = await open_mirror(inners, tmp_path / "bm", assume_clean=True)
        await m.abandon()
        legs = [FaultDevice(x, name=f"moved{i}") for i, x in enumerate(reversed(inners))]
        m = MirrorDevice(list(legs), bitmap=str(tmp_path / "bm"), granularity=G)
        await m.start()
        assert m.statistics()["sync"] == "in-sync"
        assert peek(tmp_path / "bm", MIB).slots[0] is not None
        await m.aclose()
        names = {s.name for s in peek(tmp_path / "bm", MIB).slots if s is not None}
        assert names == {"moved0", "moved1"}

    asyncio.run(main())


def test_bitmap_pages_are_laid_out_per_slot(tmp_path: Path) -> None:
    async def main() -> None:
        rec, _ = Record.open(str(tmp_path / "bm"), 64 * MIB, G, EXT)
        rec.add_slot(2, "x", None, full=False)
        rec.mark(2, 40 * KIB, 1)  # bit 10: byte 1, bit 2
        await rec.close()
        stride = 4096  # 2048 bytes of bits, rounded up to a block
        with open(tmp_path / "bm", "rb") as f:
            f.seek(BITMAP_BASE + 2 * stride)
            assert f.read(2) == b"\x00\x04"
        assert os.path.getsize(tmp_path / "bm") == BITMAP_BASE + SLOTS * stride

    asyncio.run(main())


@pytest.mark.timeout(10)
def test_sync_does_not_spin_on_a_finished_writer_whose_callback_is_pending(tmp_path: Path) -> None:
    """A write task can be finished while its done-callback has not run yet; a second
    ``sync`` then must start a new write instead of awaiting the finished one forever
    (awaiting a finished task does not yield, so the loop would never run the callback)."""

    async def main() -> None:
        rec, _ = Record.open(str(tmp_path / "bm"), MIB, G, EXT)
        await rec.sync(force=True)

        async def finished_write() -> None:
            return None

        task = asyncio.get_running_loop().create_task(finished_write())
        await asyncio.sleep(0)
        assert task.done()
        rec._writer = task
        task.add_done_callback(rec._writer_done)  # scheduled, not yet run
        rec.version = rec.durable + 1
        await rec.sync()  # in this same step: before the fix it never returned
        assert not rec.pending
        await rec.close()

    asyncio.run(main())
