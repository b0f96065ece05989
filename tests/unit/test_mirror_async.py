"""Asynchronous mirror legs on in-process devices: order, barriers, lag, falling behind.

The async leg is a memory device behind a fault layer; holding its changes
(``hold_changes``) freezes what is in flight, so a test can see exactly which requests
the shipper sent and which it keeps back.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from dst.device import BlockDevice, Buffer, Capabilities, Done, IoFlags
from dst.errors import DstError, IoError
from dst.layers import FaultDevice, MirrorDevice
from dst.layers.bitmap import Record
from dst.layers.startup import LegView, plan_start
from tests.model import contents, fault_legs, member, until

KIB = 1 << 10


async def async_mirror(
    n_sync: int = 2, **kw: object
) -> tuple[MirrorDevice, list[FaultDevice], FaultDevice]:
    legs = fault_legs(n_sync + 1)
    kw.setdefault("granularity", 4096)
    kw.setdefault("assume_clean", True)
    m = MirrorDevice(legs[:n_sync], async_legs=[legs[n_sync]], **kw)  # type: ignore[arg-type]
    m.retry_min = 0.05
    await m.start()
    return m, legs[:n_sync], legs[n_sync]


def leg_info(m: MirrorDevice, dev: BlockDevice) -> dict[str, object]:
    return member(m, dev.name)


async def drained(m: MirrorDevice, dev: BlockDevice, timeout: float = 5.0) -> None:
    await until(
        lambda: (
            leg_info(m, dev)["lag_bytes"] == 0
            and leg_info(m, dev)["consistent"]
            and leg_info(m, dev)["async"]["queued"] == 0
        ),  # type: ignore[index]
        timeout,
        "the async leg to catch up",
    )


def test_writes_do_not_wait_for_the_async_leg_and_reach_it_in_order() -> None:
    async def main() -> None:
        m, sync, far = await async_mirror()
        far.delay = 0.05
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(20):
            await m.write(0, bytes([i + 1]) * 4096)  # the same block: order matters
            await m.write((i + 1) * 4096, bytes([i + 1]) * 4096)
        await m.flush()
        took = loop.time() - t0
        # waiting for the async leg would cost 41 x 50 ms
        assert took < 1.0, f"{took:.2f} s: the writes waited for the async leg"
        info = leg_info(m, far)
        assert info["mode"] == "async" and info["state"] == "connected"
        assert info["lag_bytes"] > 0 and info["lag_seconds"] >= 0
        assert leg_info(m, sync[0])["mode"] == "sync" and leg_info(m, sync[0])["lag_bytes"] == 0
        await drained(m, far)
        assert await contents(far) == await contents(sync[0])
        assert far.applied["read"] == 0 and far.counts["flush"] >= 1
        await m.aclose()

    asyncio.run(main())


def test_nothing_after_a_barrier_goes_before_the_epoch_is_complete_and_flushed() -> None:
    async def main() -> None:
        m, _, far = await async_mirror()
        far.hold_changes()
        await m.write(0, b"a" * 4096)
        await m.write(8192, b"b" * 4096)
        await m.flush()  # a barrier
        await m.write(16384, b"c" * 4096)
        await m.write(0, b"d" * 4096, IoFlags.FUA)  # a barrier after it
        await m.write(32768, b"e" * 4096)
        await asyncio.sleep(0.05)
        assert far.counts["write"] == 2 and far.counts["flush"] == 0  # epoch 1 in flight
        far.release_changes()
        await drained(m, far)
        # epoch 1 (a, b; sent before its barrier was known), flush; epoch 2 (c, d: small and
        # whole in the queue, so sent with FUA and no flush after it); epoch 3 (e), flush
        assert far.counts["write"] == 5 and far.counts["flush"] == 2
        data = await contents(far)
        assert data[:4096] == b"d" * 4096 and data[32768:36864] == b"e" * 4096
        await m.aclose()

    asyncio.run(main())


def test_an_overlapping_write_waits_for_the_one_in_flight() -> None:
    async def main() -> None:
        m, sync, far = await async_mirror()
        far.hold_changes()
        await m.write(0, b"1" * 8192)
        await m.write(4096, b"2" * 4096)  # overlaps the first
        await m.write(65536, b"3" * 4096)  # behind it in the queue: waits too
        await asyncio.sleep(0.05)
        assert far.counts["write"] == 1
        far.release_changes()
        await drained(m, far)
        assert await contents(far) == await contents(sync[0])
        await m.aclose()

    asyncio.run(main())


def test_pull_ahead_marks_the_queue_and_catches_up_later() -> None:
    async def main() -> None:
        m, sync, far = await async_mirror(async_max_lag=16 * KIB)
        far.hold_changes()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(16):
            await m.write(i * 4096, bytes([i + 1]) * 4096)
        assert loop.time() - t0 < 1.0  # the writer never waited
        info = leg_info(m, far)
        assert info["state"] == "degraded" and info["consistent"] is False
        assert info["lag_bytes"] == 0 and info["async"]["pull_aheads"] == 1  # type: ignore[index]
        assert info["dirty_bytes"] == 16 * 4096  # the queued ones and the later ones
        assert "fell behind" in str(info["reason"]) and "--async-max-lag" in str(info["reason"])
        assert m.statistics()["sync"] == "degraded"
        far.release_changes()  # what was in flight ends; then the resync from the bitmap
        await drained(m, far)
        assert await contents(far) == await contents(sync[0])
        await m.aclose()

    asyncio.run(main())


def test_block_makes_the_writer_wait_for_room() -> None:
    async def main() -> None:
        m, sync, far = await async_mirror(async_max_lag=16 * KIB, async_on_congestion="block")
        far.hold_changes()
        writer = asyncio.create_task(_write_many(m, 12))
        await asyncio.sleep(0.2)
        assert not writer.done(), "the writer did not wait for the lagging leg"
        s = leg_info(m, far)
        assert s["state"] == "connected" and s["lag_bytes"] <= 16 * KIB  # type: ignore[operator]
        far.release_changes()
        await asyncio.wait_for(writer, 5)
        await drained(m, far)
        assert leg_info(m, far)["async"]["pull_aheads"] == 0  # type: ignore[index]
        assert await contents(far) == await contents(sync[0])
        await m.aclose()

    asyncio.run(main())


async def _write_many(m: MirrorDevice, n: int) -> None:
    for i in range(n):
        await m.write(i * 4096, bytes([i + 7]) * 4096)


@pytest.mark.parametrize("policy", ["pull-ahead", "block"])
def test_a_dead_async_leg_never_slows_the_writer(policy: str) -> None:
    async def main() -> None:
        m, sync, far = await async_mirror(async_on_congestion=policy)
        far.go_down(budget=None)  # its link is down; requests would wait forever
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(8):
            await m.write(i * 8192, b"x" * 4096)
        await m.flush()
        assert loop.time() - t0 < 1.0
        info = leg_info(m, far)
        assert info["state"] == "degraded" and info["dirty_bytes"] == 8 * 4096
        far.come_up()  # back: only the dirty regions are copied
        await drained(m, far)
        assert await contents(far) == await contents(sync[0])
        await m.aclose()

    asyncio.run(main())


def test_a_failed_change_on_the_async_leg_puts_it_behind() -> None:
    async def main() -> None:
        m, sync, far = await async_mirror()
        far.fail("write", err=errno.EIO)
        await m.write(4096, b"q" * 4096)  # fine for the writer
        await until(lambda: leg_info(m, far)["state"] == "degraded", 2)
        assert "failed" in str(leg_info(m, far)["reason"])
        await drained(m, far)  # retried after its back-off (it stays connected)
        assert await contents(far) == await contents(sync[0])
        await m.aclose()

    asyncio.run(main())


def test_the_async_leg_is_never_read_and_never_the_last_in_sync_leg() -> None:
    async def main() -> None:
        m, sync, far = await async_mirror(n_sync=1)
        await m.write(0, b"r" * 4096)
        for _ in range(10):
            assert await m.read(0, 4096) == b"r" * 4096
        assert far.applied["read"] == 0
        sync[0].fail("write", err=errno.EIO)
        with pytest.raises(IoError):
            await m.write(0, b"s" * 4096)  # the only synchronous leg failed it
        assert leg_info(m, sync[0])["state"] == "connected"  # kept: the last in-sync leg
        assert leg_info(m, far)["state"] != "connected"  # what it is copied from differs
        await m.aclose()

    asyncio.run(main())


def test_writes_while_the_async_leg_catches_up_stay_correct() -> None:
    async def main() -> None:
        m, sync, far = await async_mirror()
        far.go_down(budget=None)
        for i in range(64):
            await m.write(i * 4096, bytes([i + 1]) * 4096)
        far.delay = 0.01
        far.come_up()
        for i in range(200):  # while it resyncs, over the regions being copied
            await m.write((i * 7 % 64) * 4096 + 512, bytes([200 - i]) * 1024)
        await m.flush()
        await drained(m, far, timeout=10)
        assert await contents(far) == await contents(sync[0])
        await m.aclose()

    asyncio.run(main())


def test_activity_log_pressure_is_congestion() -> None:
    async def main(tmp: Path) -> None:
        m, sync, far = await async_mirror(
            bitmap=str(tmp / "bm"), al_extent=8192, al_limit=4, assume_clean=False
        )
        await until(lambda: leg_info(m, far)["consistent"] is True, 5)
        far.hold_changes()
        for i in range(4):  # one extent each: the queue may hold two (half the log)
            await m.write(i * 8192, b"w" * 4096)
        info = leg_info(m, far)
        assert info["state"] == "degraded" and "activity-log" in str(info["reason"])
        far.release_changes()
        await drained(m, far)
        assert await contents(far) == await contents(sync[0])
        await m.aclose()

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(main(Path(d)))


def test_a_crash_loses_the_queue_but_the_activity_log_resyncs_it(tmp_path: Path) -> None:
    async def main() -> None:
        legs = fault_legs(3)
        bm = str(tmp_path / "bm")
        m = MirrorDevice(legs[:2], async_legs=[legs[2]], granularity=4096, bitmap=bm)
        m.retry_min = 0.05
        await m.start()
        await until(lambda: leg_info(m, legs[2])["consistent"] is True, 5)
        legs[2].hold_changes()
        await m.write(1 << 19, b"k" * 4096)  # queued (in flight) for the async leg only
        await m.abandon()  # the client node dies; the queue is gone
        legs[2].release_changes()
        await asyncio.sleep(0.05)
        legs[2].fail("write", count=None, offset=1 << 19, length=4096)  # it never landed
        m2 = MirrorDevice(legs[:2], async_legs=[legs[2]], granularity=4096, bitmap=bm)
        await m2.start()
        legs[2].heal()
        assert leg_info(m2, legs[2])["consistent"] is False
        await until(lambda: leg_info(m2, legs[2])["consistent"] is True, 5)
        await drained(m2, legs[2])
        assert await contents(legs[2]) == await contents(legs[0])
        await m2.aclose()

    asyncio.run(main())


def test_an_async_leg_added_online_is_synced_then_streamed() -> None:
    async def main() -> None:
        legs = fault_legs(3)
        m = MirrorDevice(legs[:2], granularity=4096, assume_clean=True)
        await m.start()
        await m.write(0, b"o" * 65536)
        result = await m.add(legs[2], asynchronous=True)
        assert result["mode"] == "async"
        await drained(m, legs[2])
        await m.write(65536, b"p" * 4096)
        await drained(m, legs[2])
        assert await contents(legs[2]) == await contents(legs[0])
        await m.detach(legs[2].name)  # an async leg goes without touching the others
        assert m.statistics()["sync"] == "in-sync"
        await m.aclose()

    asyncio.run(main())


def test_an_async_leg_is_no_source_at_start_while_a_synchronous_one_is_current() -> None:
    rec = Record(None, 1 << 20, 4096, 1 << 20)
    far = LegView("far", None, True, asynchronous=True)
    _, source = plan_start(
        rec, "no --bitmap file", [far, LegView("a", None, True)], assume_clean=True
    )
    assert source == 1  # listed first, but asynchronous
    # both recorded as current; the synchronous one is away: refuse rather than lose writes
    with pytest.raises(DstError, match="far is asynchronous, so not the source"):
        plan_start(rec, None, [far, LegView("a", None, False)])
    with pytest.raises(DstError, match="no synchronous leg"):
        plan_start(
            Record(None, 1 << 20, 4096, 1 << 20),
            "the bitmap file is new",
            [LegView("a", None, False), far],
        )


class InlineDevice(BlockDevice):
    """Memory that completes a started write before ``start_write`` returns, as a network
    member may when the reply is already there."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.capabilities = Capabilities()
        self.name = "inline"
        self.data = bytearray(size)
        self.flush_delay = 0.0

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        buf[:] = self.data[offset : offset + len(buf)]

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        self.data[offset : offset + len(memoryview(data))] = data

    async def flush(self) -> None:
        await asyncio.sleep(self.flush_delay)

    def start_write(self, offset: int, data: memoryview, flags: IoFlags, done: Done) -> None:
        self.data[offset : offset + len(data)] = data
        done(None)


def test_a_leg_that_completes_inline_is_shipped_to_without_recursion() -> None:
    """3000 changes wait behind a slow flush; then each one sent completes at once, inside
    the call that sent it, which must not nest one call per change."""

    async def main() -> None:
        legs = fault_legs(2)
        far = InlineDevice(1 << 20)
        m = MirrorDevice(legs, async_legs=[far], granularity=4096, assume_clean=True)
        await m.start()
        await m.write(0, b"0" * 4096)
        far.flush_delay = 0.2
        await m.flush()  # a barrier: what follows waits for the far leg's slow flush
        for i in range(3000):
            await m.write(i % 256 * 4096, bytes([i % 251 + 1]) * 4096)
        await drained(m, far, timeout=10)
        assert bytes(far.data) == await contents(legs[0])
        await m.aclose()

    asyncio.run(main())
