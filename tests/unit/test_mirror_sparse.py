"""A sparse resync: what the source reads as zeroes is zeroed on the target, not copied.

The legs are memory devices, which keep an allocation map (a hole, written data, zeroes
written without a hole) and answer ``extents`` from it, so each test can see what the
target was sent and what it holds afterwards.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random

import pytest

from dst.backends import open_device
from dst.device import HOLE_ZERO, BlockDevice, Extent, ExtentFlags, IoFlags, Layer, all_extents
from dst.errors import IoError
from dst.layers import FaultDevice
from dst.layers.resync import ZERO_MIN, plan_copy, within
from dst.units import format_size
from tests.model import FlatModel, contents, fault_legs, in_sync, member, started, until

KIB = 1 << 10
MIB = 1 << 20
SIZE = 8 * MIB
DATA, ZERO = ExtentFlags.DATA, ExtentFlags.ZERO
# (offset, length) of the data on the source; everything else is a hole
WRITTEN = [(0, 64 * KIB), (1 * MIB, 256 * KIB), (3 * MIB + 64 * KIB, 64 * KIB), (SIZE - MIB, MIB)]


# ---------------------------------------------------------------- the plan of a step
def test_plan_zeroes_what_reads_as_zeroes_and_copies_the_rest() -> None:
    ext = [
        Extent(0, 128 * KIB, DATA),
        Extent(128 * KIB, 256 * KIB, HOLE_ZERO),  # a hole that reads as zeroes
        Extent(384 * KIB, 128 * KIB, ZERO),  # allocated zeroes: also zeroed (joined)
        Extent(512 * KIB, 128 * KIB, ExtentFlags.HOLE),  # unallocated, not zero: copied
        Extent(640 * KIB, 32 * KIB, HOLE_ZERO),  # shorter than ZERO_MIN: copied
        Extent(672 * KIB, 128 * KIB, DATA),
    ]
    assert plan_copy(0, MIB, ext, 512) == [
        (0, 128 * KIB, False),
        (128 * KIB, 384 * KIB, True),
        (512 * KIB, 512 * KIB, False),  # and what the extents did not cover (800K on)
    ]


def test_plan_rounds_zero_runs_inward_to_the_block() -> None:
    ext = [Extent(0, 1000, DATA), Extent(1000, 200 * KIB, HOLE_ZERO), Extent(1000 + 200 * KIB, 1)]
    start, end = 4096, (1000 + 200 * KIB) // 4096 * 4096
    assert plan_copy(0, 256 * KIB, ext, 4096) == [
        (0, start, False),
        (start, end - start, True),
        (end, 256 * KIB - end, False),
    ]
    assert plan_copy(0, 256 * KIB, [], 512) == [(0, 256 * KIB, False)]  # nothing known
    assert ZERO_MIN == 64 * KIB


def test_a_step_copies_no_more_than_its_budget_but_zeroes_on() -> None:
    plan = [(0, 100 * KIB, False), (100 * KIB, 8 * MIB, True), (100 * KIB + 8 * MIB, MIB, False)]
    # 100K copied, the zeroes on, and the next data cut at the next 4K region after 128K
    got = within(plan, 128 * KIB, 4096, zero_costs=False)
    assert got == [plan[0], plan[1], (100 * KIB + 8 * MIB, 28 * KIB, False)]
    # a target sent zero buffers: the zeroes count, cut at a region boundary
    assert within(plan, 128 * KIB, 4096, zero_costs=True) == [
        plan[0],
        (100 * KIB, 28 * KIB, True),
    ]
    # at least one region, even with a budget smaller than it
    assert within([(0, MIB, False)], 1000, 64 * KIB, zero_costs=False) == [(0, 64 * KIB, False)]


# ---------------------------------------------------------------- a mirror
async def sparse_source(size: int = SIZE) -> tuple[FaultDevice, bytes]:
    """A memory leg with random data in WRITTEN and holes elsewhere; its contents."""
    leg = FaultDevice(open_device(f"memory:{size}"), name="src")
    rng = random.Random(5)
    for off, n in WRITTEN:
        await leg.write(off, rng.randbytes(n))
    return leg, await contents(leg)


def bytes_read(dev: FaultDevice) -> int:
    """What the memory device under a fault layer was read (the test's reads included)."""
    n: int = dev.inner.statistics()["bytes_read"]
    return n


async def zero_ranges(dev: BlockDevice) -> list[tuple[int, int]]:
    """The ranges ``dev`` reports as reading zeroes, joined."""
    out: list[tuple[int, int]] = []
    for e in await all_extents(dev, 0, dev.size):
        if e.flags & ExtentFlags.ZERO:
            if out and out[-1][1] == e.offset:
                out[-1] = (out[-1][0], e.end)
            else:
                out.append((e.offset, e.end))
    return out


def holes_of(written: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    for off, n in sorted(written):
        if off > pos:
            out.append((pos, off))
        pos = off + n
    if pos < size:
        out.append((pos, size))
    return out


def test_an_added_leg_with_old_data_ends_sparse_and_zero_in_the_holes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        src, want = await sparse_source()
        m = await started([src])
        new = FaultDevice(open_device(f"memory:{SIZE}"), name="new")
        await new.write(0, b"\xee" * SIZE)  # a reused store: old data everywhere
        assert await zero_ranges(new) == []
        read_before = bytes_read(src)
        await m.add(new)
        await in_sync(m)
        assert await contents(new) == want
        assert await zero_ranges(new) == holes_of(WRITTEN, SIZE) == await zero_ranges(src)
        # the holes were punched on the target (its map says hole, not allocated zeroes)
        for e in await all_extents(new.inner, 0, SIZE):
            assert e.flags in (DATA, HOLE_ZERO), e
        data = sum(n for _, n in WRITTEN)
        assert bytes_read(src) - read_before == data  # the holes were never read
        assert new.counts["zero"] > 0 and new.inner.statistics()["bytes_written"] == (
            SIZE + data  # the old data, then only the data copied
        )
        # the mirror's own map shows the holes, whichever leg answers
        for _ in range(2):
            assert await zero_ranges(m) == holes_of(WRITTEN, SIZE)
        await m.aclose()

    with caplog.at_level(logging.INFO, logger="dst.mirror"):
        asyncio.run(main())
    data = sum(n for _, n in WRITTEN)
    copied, zeroed = format_size(data), format_size(SIZE - data)  # 1.4 MiB, 6.6 MiB
    assert f"new: resync finished: {copied} copied, {zeroed} zeroed" in caplog.text


def test_progress_counts_zeroed_bytes_as_done() -> None:
    async def main() -> None:
        src, _ = await sparse_source()
        m = await started([src], resync_rate=MIB)  # a step: at most 100K of data
        new = FaultDevice(open_device(f"memory:{SIZE}"), name="new")
        new.delay = 0.01
        await m.add(new)
        seen: list[dict[str, int]] = []
        for _ in range(2000):  # bounded: the resync takes about 1.4 s at 1 MiB/s
            r = member(m, "new")["resync"]
            if r is None:
                break
            seen.append(r)
            await asyncio.sleep(0.01)
        await in_sync(m)
        assert seen, "the resync was never seen running"
        for r in seen:
            assert 0 <= r["bytes_zeroed"] <= r["bytes_done"] <= r["bytes_total"] == SIZE
        last = seen[-1]
        assert last["bytes_zeroed"] > 0  # the first hole is at 64K
        await m.aclose()

    asyncio.run(main())


class NoZeroes(Layer):
    """A device that cannot zero: no WRITE_ZEROES, as some NBD servers."""

    def __init__(self, inner: BlockDevice, name: str) -> None:
        super().__init__(inner)
        self.name = name
        self.capabilities = inner.capabilities.with_(can_zero=False)
        self.identity = inner.identity

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        raise IoError(errno.EOPNOTSUPP, f"{self.name} cannot zero")


def test_a_target_that_cannot_zero_gets_zero_buffers() -> None:
    async def main() -> None:
        src, want = await sparse_source()
        m = await started([NoZeroes(src, "src")])
        assert not m.capabilities.can_zero
        new = FaultDevice(open_device(f"memory:{SIZE}"), name="new-inner")
        await new.write(0, b"\xee" * SIZE)
        read_before = bytes_read(src)
        await m.add(NoZeroes(new, "new"))
        await in_sync(m)
        assert await contents(new) == want
        assert new.counts["zero"] == 0 and new.counts["write"] > len(WRITTEN)
        # the holes still were not read from the source
        assert bytes_read(src) - read_before == sum(n for _, n in WRITTEN)
        await m.aclose()

    asyncio.run(main())


class NoExtents(Layer):
    """A source whose extents queries fail (a bug, a link that broke just then)."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.identity = inner.identity
        self.asked = 0

    async def extents(self, offset: int, length: int) -> list[Extent]:
        self.asked += 1
        raise IoError(errno.EIO, f"{self.name}: extents failed (injected)")


def test_a_source_that_cannot_say_is_copied_as_data(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        src, want = await sparse_source()
        source = NoExtents(src)
        m = await started([source])
        new = FaultDevice(open_device(f"memory:{SIZE}"), name="new")
        await new.write(0, b"\xee" * SIZE)
        read_before = bytes_read(src)
        await m.add(new)
        await in_sync(m)
        assert await contents(new) == want
        assert source.asked > 1 and bytes_read(src) - read_before == SIZE
        assert m.statistics()["errors"] == 0  # not an error of the device
        await m.aclose()

    with caplog.at_level(logging.INFO, logger="dst.mirror"):
        asyncio.run(main())
    assert caplog.text.count("no in-sync leg says which ranges read as zeroes") == 1
    assert "new: resync finished: 8 MiB copied, 0 B zeroed" in caplog.text


def test_an_added_asynchronous_leg_ends_sparse() -> None:
    async def main() -> None:
        src, want = await sparse_source()
        m = await started([src])
        far = FaultDevice(open_device(f"memory:{SIZE}"), name="far")
        await far.write(0, b"\xee" * SIZE)
        await m.add(far, asynchronous=True)
        await until(lambda: member(m, "far")["consistent"], what="the far leg to catch up")
        assert await contents(far) == want
        assert await zero_ranges(far) == holes_of(WRITTEN, SIZE)
        await m.aclose()

    asyncio.run(main())


def test_writes_zeroes_and_trims_during_a_sparse_full_resync_stay_correct() -> None:
    async def main() -> None:
        src, want = await sparse_source()
        other = fault_legs(1, "8M")[0]
        await other.write(0, want)  # a second in-sync leg, fully allocated
        # at 128 KiB/s its 1.4 MiB of data take 10 s or more: the changes below overlap it
        m = await started([src, other], resync_rate=128 * KIB)
        model = FlatModel(SIZE)
        model.write(0, want)
        new = FaultDevice(open_device(f"memory:{SIZE}"), name="new")
        await new.write(0, b"\xee" * SIZE)
        await m.add(new)
        rng = random.Random(23)
        for i in range(120):  # while the copy runs, change regions at random
            o = rng.randrange(0, SIZE - 200 * KIB, 512)
            n = rng.randrange(1, 400) * 512
            if i % 4 == 3:
                await m.write_zeroes(o, n)
                model.zero(o, n)
            elif i % 4 == 2:
                await m.trim(o, n)
                model.trim(o, n)
            else:
                data = rng.randbytes(n)
                await m.write(o, data)
                model.write(o, data)
            await asyncio.sleep(0.002)
        assert member(m, "new")["sync"] == "resyncing"  # the changes overlapped the copy
        await m.set_resync_rate(None)
        await in_sync(m)
        for x in (src, other, new):
            assert await contents(x) == bytes(model.data), x.name
        await m.aclose()

    asyncio.run(main())


class HeldExtents(Layer):
    """A source whose ``hold``-th extents answer, once made, waits for the test's go."""

    def __init__(self, inner: BlockDevice, hold: int) -> None:
        super().__init__(inner)
        self.identity = inner.identity
        self.hold = hold
        self.calls = 0
        self.asked = asyncio.Event()
        self.go = asyncio.Event()

    async def extents(self, offset: int, length: int) -> list[Extent]:
        answer = await self.inner.extents(offset, length)
        self.calls += 1
        if self.calls == self.hold:
            self.asked.set()
            await self.go.wait()  # the answer is on its way
        return answer


@pytest.mark.parametrize("hold", [1, 2])
def test_a_write_to_a_hole_while_a_step_asks_is_not_zeroed_away(hold: int) -> None:
    """A step first looks at the source's extents without the lock (to size the step),
    then, as it zeroes something, asks again under the region's lock.  A write to a hole
    while the first answer is on its way lands, and the second answer sees it (hold 1);
    one made while the second is on its way waits for the step (hold 2).  Either way the
    step's zeroing never lands over the write on the target."""

    async def main() -> None:
        src, _ = await sparse_source()
        source = HeldExtents(src, hold)
        m = await started([source])
        new = FaultDevice(open_device(f"memory:{SIZE}"), name="new")
        await m.add(new)
        await asyncio.wait_for(source.asked.wait(), 5)
        write = asyncio.ensure_future(m.write(2 * MIB, b"\x77" * 64 * KIB))  # into a hole
        if hold == 1:  # the first look holds no lock: the write lands meanwhile
            await asyncio.wait_for(write, 10)
        else:  # the second holds the lock: the write waits for the step
            await asyncio.sleep(0.05)
            assert not write.done()
        source.go.set()
        await write
        await in_sync(m)
        assert await contents(new) == await contents(src)
        assert (await new.inner.read(2 * MIB, 64 * KIB)) == b"\x77" * 64 * KIB
        await m.aclose()

    asyncio.run(main())


def test_a_dense_source_is_asked_once_not_at_every_step() -> None:
    """Where the source said data, later steps copy without asking again (asking may cost
    a walk of the store, as SEEK_HOLE on tmpfs does): one question for 8 steps of 1 MiB."""

    async def main() -> None:
        src = FaultDevice(open_device(f"memory:{SIZE}"), name="src")
        await src.write(0, random.Random(9).randbytes(SIZE))
        source = HeldExtents(src, hold=0)
        m = await started([source])
        new = FaultDevice(open_device(f"memory:{SIZE}"), name="new")
        await m.add(new)
        await in_sync(m)
        assert await contents(new) == await contents(src)
        assert new.counts["write"] == SIZE // MIB and source.calls == 1
        await m.aclose()

    asyncio.run(main())


def test_short_dirty_runs_are_copied_without_asking_and_zeroes_stay_holes() -> None:
    """A leg back from an outage with a few scattered dirty regions: each is read and
    written, not asked about (a question can cost more than the copy), and a region that
    reads as zeroes is still zeroed on the target, not written as data."""

    async def main() -> None:
        src, want = await sparse_source()
        source = HeldExtents(src, hold=0)
        back = FaultDevice(open_device(f"memory:{SIZE}"), name="back")
        for off, n in WRITTEN:  # the same data: a clean pair
            await back.write(off, want[off : off + n])
        m = await started([source, back])
        back.go_down(budget=0.0)
        await m.write(2 * MIB, b"d" * 4096)  # data in a hole
        await m.write(5 * MIB, b"e" * 8192)
        await m.write_zeroes(1 * MIB + 4096, 4096)  # zeroes amid data
        await until(lambda: member(m, "back")["state"] == "degraded", 5, "back to degrade")
        asked = source.calls
        zero_writes = back.counts["zero"]
        back.come_up()
        await in_sync(m)
        assert await contents(back) == await contents(src)
        assert source.calls == asked  # three short runs: no question about them
        assert back.counts["zero"] > zero_writes  # the zeroes went as zeroes
        assert (1 * MIB + 4096, 1 * MIB + 8192) in await zero_ranges(back)
        await m.aclose()

    asyncio.run(main())
