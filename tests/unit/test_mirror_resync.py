"""Mirror resync, verify and leg management: what comes back is made identical again."""

from __future__ import annotations

import asyncio
import errno
import logging
import random

import pytest

from dst.backends import open_device
from dst.errors import DstError, IoError
from dst.layers import FaultDevice
from dst.layers import resync as resync_mod
from tests.model import FlatModel, contents, fault_legs, in_sync, member, started, until

KIB = 1 << 10
MIB = 1 << 20


async def identical(legs: list[FaultDevice]) -> bool:
    first = await contents(legs[0])
    return all([await contents(x) == first for x in legs[1:]])


def test_a_returning_leg_gets_only_its_dirty_regions(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        legs = fault_legs(2, "4M")
        m = await started(legs, resync_rate=1 * MIB)
        legs[1].go_down(budget=0.01)
        for i in range(8):
            await m.write(i * 256 * KIB, b"\xaa" * 64 * KIB)
        assert member(m, "leg1")["dirty_bytes"] == 8 * 64 * KIB
        legs[1].come_up()
        await until(lambda: m.statistics()["resync"] is not None, what="resync to start")
        await asyncio.sleep(0.15)
        stats = m.statistics()
        progress = stats["resync"]
        assert stats["state"] == "resyncing" and member(m, "leg1")["state"] == "resyncing"
        assert progress["bytes_total"] == 8 * 64 * KIB
        assert 0 < progress["bytes_done"] < progress["bytes_total"]
        assert 0 < progress["percent"] < 100 and progress["rate"] > 0
        assert progress["eta"] is not None and progress["legs"] == ["leg1"]
        assert progress["limit"] == MIB
        await in_sync(m)
        assert await identical(legs)
        assert member(m, "leg1")["dirty_bytes"] == 0 and m.state == "connected"
        await m.aclose()

    with caplog.at_level(logging.INFO, logger="dst.mirror"):
        asyncio.run(main())
    assert "leg1: resync started" in caplog.text and "512 KiB to copy from leg0" in caplog.text
    assert "leg1: resync finished: 512 KiB copied" in caplog.text


def test_rate_limit_and_live_change() -> None:
    async def main() -> None:
        legs = fault_legs(2, "4M")
        m = await started(legs, resync_rate=256 * KIB)
        legs[1].go_down(budget=0.01)
        await m.write(0, b"\x01" * MIB)
        legs[1].come_up()
        await asyncio.sleep(0.5)
        done = m.statistics()["resync"]["bytes_done"]
        assert 0 < done <= 256 * KIB * 0.5 + 64 * KIB  # the rate plus a quarter second burst
        await m.set_resync_rate(None)
        await in_sync(m, 3.0)
        assert await identical(legs)
        await m.aclose()

    asyncio.run(main())


def test_progress_is_logged_while_resyncing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(resync_mod, "LOG_SECONDS", 0.0)

    async def main() -> None:
        legs = fault_legs(2, "2M")
        m = await started(legs)
        legs[1].go_down(budget=0.01)
        await m.write(0, b"\x01" * 2 * MIB)
        legs[1].come_up()
        await in_sync(m)
        await m.aclose()

    with caplog.at_level(logging.INFO, logger="dst.mirror"):
        asyncio.run(main())
    assert "leg1: resync 50.0% (1 MiB of 2 MiB)" in caplog.text


def test_writes_during_resync_stay_correct() -> None:
    async def main() -> None:
        legs = fault_legs(3, "2M")
        m = await started(legs, resync_rate=2 * MIB)
        model = FlatModel(m.size)
        rng = random.Random(11)
        legs[2].go_down(budget=0.01)
        for _ in range(20):
            o, n = rng.randrange(m.size - 70000), rng.randrange(1, 70000)
            data = rng.randbytes(n)
            await m.write(o, data)
            model.write(o, data)
        legs[2].come_up()
        for _ in range(60):  # while the copy runs, overwrite regions at random
            o, n = rng.randrange(m.size - 70000), rng.randrange(1, 70000)
            data = rng.randbytes(n)
            await asyncio.gather(m.write(o, data), asyncio.sleep(0.005))
            model.write(o, data)
        await m.set_resync_rate(None)
        await in_sync(m)
        for x in legs:
            assert await contents(x) == bytes(model.data)
        await m.aclose()

    asyncio.run(main())


def test_a_degraded_leg_that_stays_connected_is_retried() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        legs[1].fail("write", count=2)  # the write and the first resync attempt fail
        await m.write(0, b"e" * 4096)
        assert member(m, "leg1")["sync"] in ("degraded", "resyncing")
        await in_sync(m)
        assert await identical(legs)
        assert legs[1].injected == 2
        await m.aclose()

    asyncio.run(main())


def test_a_leg_unreachable_at_start_joins_when_it_comes_up() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        legs[1].go_down(budget=None)
        m = await started(legs)
        assert member(m, "leg1")["state"] == "degraded" and m.state == "degraded"
        await m.write(0, b"u" * 100)
        legs[1].come_up()
        await in_sync(m)
        assert await identical(legs)
        await m.aclose()

    asyncio.run(main())


def test_a_returning_leg_that_is_too_small_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        small = FaultDevice(open_device("memory:512K"), name="small")
        legs = [*fault_legs(1), small]
        small.go_down(budget=None)
        m = await started(legs)
        small.come_up()
        assert member(m, "small")["state"] == "failed"
        assert "fewer than the mirror's" in member(m, "small")["refused"]
        await m.aclose()

    with caplog.at_level(logging.ERROR, logger="dst.mirror"):
        asyncio.run(main())
    assert "small: cannot rejoin the mirror" in caplog.text


def test_verify_reports_differences_and_repairs_them() -> None:
    async def main() -> None:
        legs = fault_legs(3, "2M")
        m = await started(legs)
        await m.write(0, random.Random(1).randbytes(2 * MIB))
        # change two legs behind the mirror's back
        await legs[1].inner.write(5000, b"\x00" * 3000)
        await legs[2].inner.write(MIB + 4096, b"\xff" * 4096)
        report = await m.verify(rate=16 * MIB)
        assert report["legs"] == ["leg0", "leg1", "leg2"] and report["reference"] == "leg0"
        assert report["bytes_checked"] == 2 * MIB
        assert report["regions"] == [
            {"offset": 4096, "length": 4096, "legs": ["leg1"]},
            {"offset": MIB + 4096, "length": 4096, "legs": ["leg2"]},
        ]
        assert report["marked_for_resync"] == [] and not report["repair"]
        report = await m.verify(repair=True)
        assert report["marked_for_resync"] == ["leg1", "leg2"]
        await in_sync(m)
        assert await identical(legs)
        assert (await m.verify())["regions"] == []
        await m.aclose()

    asyncio.run(main())


def test_verify_needs_two_in_sync_legs() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        legs[1].fail_permanently()
        report = await m.verify()
        assert "nothing to compare" in report["note"]
        await m.aclose()

    asyncio.run(main())


def test_detach_removes_a_leg_and_refuses_the_last_in_sync_one() -> None:
    async def main() -> None:
        legs = fault_legs(3)
        m = await started(legs)
        with pytest.raises(DstError, match="not a leg of this mirror"):
            await m.detach("leg9")
        result = await m.detach("leg1")
        assert result == {"detached": "leg1", "members": ["leg0", "leg2"]}
        with pytest.raises(IoError):
            await legs[1].inner.read(0, 1)  # detached legs are closed
        legs[2].fail_permanently()
        with pytest.raises(DstError, match="only in-sync leg"):
            await m.detach("leg0")
        await m.detach("leg2")
        with pytest.raises(DstError, match="only leg"):
            await m.detach("leg0")
        await m.write(0, b"still")
        assert m.statistics()["sync"] == "in-sync"
        await m.aclose()

    asyncio.run(main())


def test_add_fully_syncs_a_blank_leg() -> None:
    async def main() -> None:
        legs = fault_legs(2, "2M")
        m = await started(legs)
        data = random.Random(3).randbytes(2 * MIB)
        await m.write(0, data)
        new = FaultDevice(open_device("memory:3M"), name="new")
        result = await m.add(new)
        assert result["added"] == "new" and result["resync_bytes"] == 2 * MIB
        assert result["members"] == ["leg0", "leg1", "new"]
        await in_sync(m)
        assert (await contents(new))[: 2 * MIB] == data
        with pytest.raises(DstError, match="already a leg"):
            await m.add(FaultDevice(open_device("memory:2M"), name="new"))
        with pytest.raises(DstError, match="fewer than the mirror's"):
            await m.add(FaultDevice(open_device("memory:1M"), name="tiny"))
        await m.aclose()

    asyncio.run(main())


def test_an_added_leg_that_is_down_syncs_when_it_comes_up() -> None:
    async def main() -> None:
        legs = fault_legs(1)
        m = await started(legs)
        await m.write(0, b"z" * 4096)
        new = FaultDevice(open_device("memory:1M"), name="late")
        new.go_down(budget=None)
        await m.add(new)
        assert member(m, "late")["state"] == "degraded"
        new.come_up()
        await in_sync(m)
        assert await contents(new) == await contents(legs[0])
        await m.aclose()

    asyncio.run(main())


def test_a_resync_that_cannot_write_degrades_again_and_retries() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        legs[1].go_down(budget=0.01)
        await m.write(0, b"\x07" * 8192)
        legs[1].fail("zero", err=errno.EIO)
        legs[1].fail("write", err=errno.EIO)
        legs[1].come_up()
        await in_sync(m)
        assert await identical(legs)
        assert m.degrades >= 2
        await m.aclose()

    asyncio.run(main())


def test_status_shape() -> None:
    async def main() -> None:
        legs = fault_legs(2)
        m = await started(legs)
        s = m.statistics()
        assert s["mode"] == "mirror" and s["state"] == "connected" and s["sync"] == "in-sync"
        assert s["size"] == MIB and s["resync"] is None and s["verify"] is None
        assert s["bitmap"]["granularity"] == 4096 and s["bitmap"]["file"] is None
        for x, leg in zip(s["members"], legs, strict=True):
            assert x["uri"] == leg.name and x["state"] == "connected"
            assert x["identity"] == str(leg.identity) and x["sync"] == "in-sync"
            assert x["dirty_bytes"] == 0 and x["resync"] is None
        await m.aclose()

    asyncio.run(main())
