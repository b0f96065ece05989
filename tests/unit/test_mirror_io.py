"""Mirror data path: parallel writes, degrade rules, outages, reads spread and repaired."""

from __future__ import annotations

import asyncio
import errno
import logging
import random

import pytest

from dst.backends import open_device
from dst.device import BlockDevice, IoFlags
from dst.errors import IoError
from dst.layers import FaultDevice, MirrorDevice
from tests.model import contents, fault_legs, in_sync, member, started, until

KIB = 1 << 10


def test_writes_go_to_every_leg_in_parallel() -> None:
    async def main() -> None:
        legs = fault_legs(3)
        m = await started(legs)
        for x in legs:
            x.delay = 0.2
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await m.write(1000, b"p" * 5000, IoFlags.FUA)
        assert loop.time() - t0 < 0.35
        for x in legs:
            x.delay = 0
            assert (await contents(x))[1000:6000] == b"p" * 5000
        await m.flush()
        assert [x.applied["flush"] for x in legs] == [1, 1, 1]
        assert m.state == "connected" and m.statistics()["sync"] == "in-sync"
        await m.aclose()

    asyncio.run(main())


def test_a_short_outage_only_delays_writes() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        legs[1].go_down(budget=None)
        task = asyncio.create_task(m.write(0, b"late" * 1000))
        await asyncio.sleep(0.05)
        assert not task.done() and member(m, "leg1")["state"] == "reconnecting"
        legs[1].come_up()
        await task
        assert m.degrades == 0 and m.state == "connected"
        assert await contents(legs[0]) == await contents(legs[1])
        await m.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("how", ["link", "reply"])
def test_a_failed_write_degrades_the_leg_and_marks_its_bitmap(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        if how == "link":
            legs[1].go_down(budget=0.02)
        else:
            legs[1].fail("write", err=errno.EIO)
        await m.write(8192, b"d" * 6000)  # the write succeeds: leg0 took it
        info = member(m, "leg1")
        assert info["state"] == "degraded" and info["sync"] == "degraded"
        assert info["dirty_bytes"] == 8192  # 8192..14191 touches two 4 KiB regions
        assert m.state == "degraded" and m.degrades == 1
        writes_before = legs[1].counts["write"]
        await m.write(100 * KIB, b"e" * 10)  # goes on to leg0 only, marked for leg1
        assert legs[1].counts["write"] == writes_before
        assert member(m, "leg1")["dirty_bytes"] == 3 * 4096
        await m.aclose()

    with caplog.at_level(logging.WARNING, logger="dst.mirror"):
        asyncio.run(main())
    assert "leg1: degraded: write failed" in caplog.text


def test_a_write_every_leg_fails_is_an_error_and_keeps_the_first_leg() -> None:
    async def main() -> None:
        legs = fault_legs(3)
        m = await started(legs)
        for x in legs:
            x.fail("write", err=errno.ENOSPC)
        with pytest.raises(IoError) as e:
            await m.write(0, b"x" * 100)
        assert e.value.errno == errno.ENOSPC
        assert [x["sync"] for x in m.statistics()["members"]] == ["in-sync", "degraded", "degraded"]
        assert m.state == "degraded"
        # the last in-sync leg is never degraded: its errors go to the caller
        legs[0].fail("write", count=None)
        with pytest.raises(IoError):
            await m.write(0, b"y")
        assert member(m, "leg0")["sync"] == "in-sync"
        legs[0].heal()
        await m.write(0, b"z" * 100)
        await until(lambda: m.statistics()["sync"] == "in-sync", what="resync")
        assert await contents(legs[0]) == await contents(legs[1]) == await contents(legs[2])
        await m.aclose()

    asyncio.run(main())


def test_reads_are_spread_across_in_sync_legs() -> None:
    async def main() -> None:
        legs = fault_legs(3)
        m = await started(legs)
        await asyncio.gather(*(m.read(i * 4096, 4096) for i in range(30)))
        for i in range(30):
            await m.read(i * 4096, 4096)
        assert all(x.applied["read"] >= 10 for x in legs), [x.applied for x in legs]
        await m.aclose()

    asyncio.run(main())


def test_a_read_error_reply_is_served_elsewhere_and_rewritten() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        data = random.Random(5).randbytes(8192)
        await m.write(4096, data)
        legs[0].fail("read", count=1)
        writes = legs[0].applied["write"]
        for _ in range(4):  # reads alternate, so leg0 is picked within two
            assert await m.read(4096, 8192) == data
        assert legs[0].injected == 1 and m.repairs == 1
        assert legs[0].applied["write"] == writes + 1  # the region was rewritten on leg0
        assert m.statistics()["sync"] == "in-sync"
        await m.aclose()

    asyncio.run(main())


def test_a_read_error_whose_rewrite_fails_degrades_the_leg() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        await m.write(0, b"r" * 4096)
        legs[0].fail("read", count=None)
        legs[0].fail("write", count=None)
        for _ in range(4):
            assert await m.read(0, 4096) == b"r" * 4096
        assert member(m, "leg0")["sync"] == "degraded"
        assert member(m, "leg0")["dirty_bytes"] == 4096
        assert m.repairs == 1
        await m.aclose()

    asyncio.run(main())


def test_a_read_on_a_lost_link_degrades_the_leg_at_once() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        await m.write(0, b"q" * 512)
        legs[0].go_down(budget=0.02)  # its transactions fail after the budget
        legs[1].go_down(budget=None)  # a short outage: requests wait for it
        reads = asyncio.gather(*(m.read(0, 512) for _ in range(4)))
        await asyncio.sleep(0.1)
        legs[1].come_up()
        assert all(g == b"q" * 512 for g in await reads)
        assert legs[0].counts["read"] > 0
        assert member(m, "leg0")["sync"] == "degraded" and m.repairs == 0
        await m.aclose()

    asyncio.run(main())


def test_a_read_fails_only_when_every_in_sync_leg_fails() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        for x in legs:
            x.fail("read", count=None)
        with pytest.raises(IoError, match="failed on every in-sync leg"):
            await m.read(0, 10)
        await m.aclose()

    asyncio.run(main())


def test_a_write_that_fails_on_every_leg_is_counted_like_a_failed_read() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        for x in legs:
            x.fail("write", count=None)
        with pytest.raises(IoError, match="failed on every in-sync leg"):
            await m.write(0, b"x" * 10)
        assert m.statistics()["errors"] == 1
        for x in legs:
            x.fail("read", count=None)
        with pytest.raises(IoError):
            await m.read(0, 10)
        assert m.statistics()["errors"] == 2
        await m.aclose()

    asyncio.run(main())


def test_a_failed_flush_degrades_the_leg_and_marks_unflushed_extents() -> None:
    async def main() -> None:
        legs = fault_legs(2, "4M")
        m = await started(legs, al_extent=64 * KIB)
        await m.write(0, b"w" * 100)
        await m.write(3 << 20, b"w" * 100)
        legs[1].fail("flush")
        await m.flush()
        info = member(m, "leg1")
        assert info["sync"] == "degraded"
        assert info["dirty_bytes"] == 2 * 64 * KIB
        await m.aclose()

    asyncio.run(main())


def test_overlapping_concurrent_writes_land_in_the_same_order_everywhere() -> None:
    async def main() -> None:
        legs = fault_legs(3)
        m = await started(legs)
        rng = random.Random(9)

        async def jittered(dev: FaultDevice) -> None:
            dev.delay = rng.random() * 0.01

        for _ in range(5):
            for x in legs:
                await jittered(x)
            await asyncio.gather(
                *(m.write(rng.randrange(0, 8192), bytes([i]) * 5000) for i in range(1, 12))
            )
        c = [await contents(x) for x in legs]
        assert c[0] == c[1] == c[2]
        await m.aclose()

    asyncio.run(main())


def test_a_cancelled_write_still_reaches_every_leg() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        legs[1].delay = 0.1
        task = asyncio.create_task(m.write(0, b"c" * 4096))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await contents(legs[0]) == await contents(legs[1])
        assert (await contents(legs[1]))[:4096] == b"c" * 4096
        await m.aclose()

    asyncio.run(main())


def test_trims_and_zeroes_over_many_extents() -> None:
    async def main() -> None:
        legs = fault_legs(2, "4M")
        m = await started(legs, al_extent=16 * KIB, al_limit=4)
        await m.write(0, b"\x01" * (1 << 20))
        await m.trim(100, (4 << 20) - 200)
        await m.write_zeroes(0, 3 << 20, IoFlags.FUA)
        want = bytes(4 << 20)
        assert await m.read(0, 1 << 20) == want[: 1 << 20]
        assert await contents(legs[0]) == await contents(legs[1])
        await m.aclose()

    asyncio.run(main())


def test_a_leg_that_fails_for_good_degrades_at_once() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        legs[1].fail_permanently()
        assert member(m, "leg1")["state"] == "failed"
        assert member(m, "leg1")["sync"] == "degraded"
        await m.write(0, b"1")
        await m.aclose()

    asyncio.run(main())


def test_smallest_leg_decides_the_size(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        legs: list[BlockDevice] = [open_device("memory:2M"), open_device("memory:1M")]
        m = await started(legs)
        assert m.size == 1 << 20
        await m.aclose()

    with caplog.at_level(logging.WARNING, logger="dst.mirror"):
        asyncio.run(main())
    assert "the mirror uses the smallest" in caplog.text and "1 MiB on memory:2M" in caplog.text


def test_read_only_mirror_refuses_changes() -> None:
    async def main() -> None:
        legs: list[BlockDevice] = [open_device("memory:1M", read_only=True) for _ in range(2)]
        m = await started(legs, assume_clean=False)
        assert m.capabilities.read_only
        with pytest.raises(IoError) as e:
            await m.write(0, b"x")
        assert e.value.errno == errno.EPERM
        assert await m.read(0, 10) == bytes(10)
        await m.aclose()

    asyncio.run(main())


def test_the_same_store_twice_is_refused() -> None:
    async def main() -> None:
        inner = open_device("memory:1M")
        m = MirrorDevice([FaultDevice(inner, name="a"), FaultDevice(inner, name="b")])
        with pytest.raises(Exception, match="same store"):
            await m.start()
        await m.aclose()

    asyncio.run(main())


def test_a_preflush_read_flushes_every_leg() -> None:
    async def main() -> None:
        legs = fault_legs(3)
        m = await started(legs)
        await m.write(0, b"p" * 10)
        assert await m.read(0, 10, IoFlags.PREFLUSH) == b"p" * 10
        assert [x.applied["flush"] for x in legs] == [1, 1, 1]
        assert sum(x.applied["read"] for x in legs) == 1
        await m.aclose()

    asyncio.run(main())


def test_a_leg_silent_past_the_leg_timeout_is_degraded_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The write completes on the leg that acked once --leg-timeout passed; the silent
    leg is degraded with the region marked, later writes do not wait for it, and its
    resync starts only after the request given up on it ended (so that request, landing
    late, cannot overwrite what the resync copies)."""

    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs, leg_timeout=0.2)
        loop = asyncio.get_running_loop()
        legs[1].go_down(budget=None)  # holds its requests until it comes up
        t0 = loop.time()
        await m.write(0, b"a" * 4096)
        assert 0.2 <= loop.time() - t0 < 0.5
        info = member(m, "leg1")
        assert info["state"] == "degraded" and info["dirty_bytes"] == 4096
        t0 = loop.time()
        await m.write(0, b"b" * 4096)  # the same block again, only on leg0
        await m.write(64 * KIB, b"c" * 4096)
        assert loop.time() - t0 < 0.1
        legs[1].come_up()  # the old "a" write lands on leg1 now, then the resync copies "b"
        await in_sync(m)
        assert (await contents(legs[1]))[:4096] == b"b" * 4096
        assert await contents(legs[0]) == await contents(legs[1])
        await m.aclose()

    with caplog.at_level(logging.WARNING, logger="dst.mirror"):
        asyncio.run(main())
    assert "leg1: degraded: no ack for a write within --leg-timeout 0.2 s" in caplog.text


def test_the_leg_timeout_never_degrades_the_last_in_sync_leg() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs, leg_timeout=0.05)
        for x in legs:
            x.go_down(budget=None)
        task = asyncio.create_task(m.write(0, b"x" * 512))
        await asyncio.sleep(0.3)  # no leg acked: every leg is waited for
        assert not task.done() and m.degrades == 0
        for x in legs:
            x.come_up()
        await task
        assert m.state == "connected" and m.degrades == 0
        await m.aclose()

    asyncio.run(main())


class Fenceable(FaultDevice):
    """A leg that can give up its requests, as a network member does: a silent read
    waits until it is fenced, then fails."""

    def __init__(self, inner: BlockDevice, name: str) -> None:
        super().__init__(inner, name=name)
        self.silent = False
        self.fenced: list[str] = []
        self._wake = asyncio.Event()

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        if self.silent:
            await self._wake.wait()
            raise IoError(errno.ECANCELED, f"{self.name}: given up")
        await super().read_into(offset, buf, flags)

    def fence(self, reason: str) -> bool:
        self.fenced.append(reason)
        self._wake.set()
        return True


def test_a_read_moves_off_a_silent_leg_only_if_it_can_be_fenced() -> None:
    """A local leg cannot give up a read (it would land in the caller's buffer later):
    the read waits for it.  A fenceable one is degraded and the read served elsewhere."""

    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs, leg_timeout=0.1)
        await m.write(0, b"r" * 4096)
        for x in legs:
            x.go_down(budget=None)
        task = asyncio.create_task(m.read(0, 4096))
        await asyncio.sleep(0.3)
        assert not task.done() and m.degrades == 0
        for x in legs:
            x.come_up()
        assert await task == b"r" * 4096
        await m.aclose()

        f = [Fenceable(open_device("memory:1M"), f"f{i}") for i in range(2)]
        m = await started(f, leg_timeout=0.1)
        await m.write(0, b"s" * 4096)
        f[0].silent = True
        for _ in range(2):  # reads alternate between the legs: one of them meets f0
            assert await asyncio.wait_for(m.read(0, 4096), 2.0) == b"s" * 4096
        assert f[0].fenced and "no answer to a read within --leg-timeout 0.1 s" in f[0].fenced[0]
        assert member(m, "f0")["state"] == "degraded" and member(m, "f1")["sync"] == "in-sync"
        await m.aclose()

    asyncio.run(main())
