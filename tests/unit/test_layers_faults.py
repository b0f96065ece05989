"""The faults layer: error replies, outages with a resend budget, failure, held changes."""

from __future__ import annotations

import asyncio
import errno
import uuid

import pytest

from dst.backends import open_device
from dst.errors import IoError
from dst.layers import FaultDevice


def test_passes_through_and_keeps_identity() -> None:
    async def main() -> None:
        inner = open_device("memory:1M")
        f = FaultDevice(inner)
        assert f.identity == inner.identity and f.name == inner.name and f.size == inner.size
        await f.write(10, b"abc")
        assert await f.read(10, 3) == b"abc"
        await f.trim(0, 4096)
        await f.write_zeroes(0, 10)
        await f.flush()
        assert f.applied == {"read": 1, "write": 1, "flush": 1, "trim": 1, "zero": 1}
        other = uuid.uuid4()
        assert FaultDevice(inner, identity=other).identity == other
        assert FaultDevice(inner, identity=None).identity is None
        await f.aclose()

    asyncio.run(main())


def test_error_replies_by_count_kind_and_range() -> None:
    async def main() -> None:
        f = FaultDevice(open_device("memory:1M"), name="x")
        f.fail("write", err=errno.ENOSPC, count=2, offset=4096, length=4096)
        await f.write(0, b"a" * 100)  # outside the range
        await f.read(4096, 10)  # not a write
        for _ in range(2):
            with pytest.raises(IoError) as e:
                await f.write(4000, b"a" * 200)
            assert e.value.errno == errno.ENOSPC
        await f.write(4096, b"b")  # the rule is used up
        f.fail("any", count=None)
        for op in (f.read(0, 1), f.flush(), f.write_zeroes(0, 1)):
            with pytest.raises(IoError):
                await op
        assert f.state == "connected"  # an error reply is not a lost link
        f.heal()
        await f.flush()
        assert f.injected == 5
        with pytest.raises(ValueError, match="unknown operation"):
            f.fail("frobnicate")
        await f.aclose()

    asyncio.run(main())


def test_outage_fails_after_the_budget_or_waits_for_the_link() -> None:
    async def main() -> None:
        f = FaultDevice(open_device("memory:1M"))
        states: list[str] = []
        f.subscribe(lambda d, s: states.append(s))
        f.go_down(budget=0.05)
        assert f.down
        with pytest.raises(IoError, match="after all resends"):
            await f.write(0, b"x")
        f.go_down(budget=None)
        task = asyncio.create_task(f.write(0, b"y"))
        await asyncio.sleep(0.05)
        assert not task.done()
        f.come_up()
        await task
        assert await f.read(0, 1) == b"y"
        f.fail_permanently()
        with pytest.raises(IoError, match="has failed"):
            await f.read(0, 1)
        assert states == ["reconnecting", "connected", "failed"]
        await f.aclose()

    asyncio.run(main())


def test_held_changes_are_not_applied_until_released() -> None:
    async def main() -> None:
        f = FaultDevice(open_device("memory:1M"))
        f.hold_changes()
        task = asyncio.create_task(f.write(0, b"held"))
        await asyncio.sleep(0.02)
        assert await f.read(0, 4) == bytes(4) and not task.done()
        f.release_changes()
        await task
        assert await f.read(0, 4) == b"held"
        await f.aclose()

    asyncio.run(main())


def test_follows_the_inner_state_unless_forced() -> None:
    inner = open_device("memory:1M")
    f = FaultDevice(inner)
    inner.set_state("reconnecting")
    assert f.state == "reconnecting"
    f.fail_permanently()
    inner.set_state("connected")
    assert f.state == "failed"
