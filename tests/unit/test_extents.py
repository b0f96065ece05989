"""Extents (allocation status) of backends and layers against a page model.

Memory members track allocation per 4 KiB page and the writes here are page
aligned, so every layout's answer is exact and can be compared with a flat model of
page states; the file backend is compared with what SEEK_DATA/SEEK_HOLE must see.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dst.backends import memory as memory_backend
from dst.backends import open_device
from dst.backends.base import MAX_SEEK_EXTENTS
from dst.device import (
    HOLE_ZERO,
    BlockDevice,
    Extent,
    ExtentFlags,
    IoFlags,
    Layer,
    all_extents,
    checked_extents,
    merge_extents,
)
from dst.errors import IoError
from dst.layers import build_stack
from dst.layers.stack import MirrorDevice
from tests.integration.ramdev import RamDevice
from tests.model import started

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
DATA, ZERO = ExtentFlags.DATA, ExtentFlags.ZERO


def run(coro: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await coro()

    asyncio.run(bounded())


def ext(*runs: tuple[int, int, int]) -> list[Extent]:
    return [Extent(o, n, ExtentFlags(f)) for o, n, f in runs]


# ---- the contract helpers ------------------------------------------------------------------
def test_merge_joins_touching_neighbours_with_the_same_flags() -> None:
    got = merge_extents(ext((0, 10, 3), (10, 5, 3), (15, 5, 0), (20, 0, 0), (20, 1, 0)))
    assert got == ext((0, 15, 3), (15, 6, 0))


@pytest.mark.parametrize(
    "answer",
    [[], ext((1, 9, 0)), ext((0, 5, 0), (6, 4, 0)), ext((0, 11, 0)), ext((0, 0, 0))],
    ids=["nothing", "late-start", "gap", "past-the-end", "empty"],
)
def test_a_broken_answer_is_an_io_error(answer: list[Extent]) -> None:
    with pytest.raises(IoError) as e:
        checked_extents("dev", 0, 10, answer)
    assert e.value.errno == errno.EIO and "dev" in str(e.value)


class Stingy(Layer):
    """Answers one extent of at most ``step`` bytes per call (a short prefix)."""

    def __init__(self, inner: BlockDevice, step: int) -> None:
        super().__init__(inner)
        self.step, self.calls = step, 0

    async def extents(self, offset: int, length: int) -> list[Extent]:
        self.calls += 1
        return (await self.inner.extents(offset, min(length, self.step)))[:1]


def test_all_extents_asks_again_where_an_answer_stopped() -> None:
    async def main() -> None:
        dev = Stingy(open_device("memory:1M"), 64 * KiB)
        await dev.write(128 * KiB, b"x" * PAGE)
        got = await all_extents(dev, 0, MiB)
        assert got == ext((0, 128 * KiB, 3), (128 * KiB, PAGE, 0), (132 * KiB, MiB - 132 * KiB, 3))
        assert dev.calls == 17  # one per 64 KiB window, and one more where the data page ends

    run(main)


def test_a_device_that_cannot_tell_reports_all_data() -> None:
    async def main() -> None:
        dev = RamDevice(MiB)
        assert await dev.extents(4096, 100) == ext((4096, 100, 0))
        assert await dev.extents(MiB, 0) == []
        with pytest.raises(IoError):
            await dev.extents(MiB - 1, 2)

    run(main)


# ---- backends ------------------------------------------------------------------------------
def test_file_holes_data_and_a_shortened_file(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "f.img"
        dev = open_device(f"file:{path}", size=16 * MiB)
        await dev.write(MiB, b"a" * 8192)
        await dev.write(9 * MiB, b"b" * MiB)
        assert await dev.extents(0, 16 * MiB) == ext(
            (0, MiB, 3), (MiB, 8192, 0), (MiB + 8192, 8 * MiB - 8192, 3), (9 * MiB, MiB, 0),
            (10 * MiB, 6 * MiB, 3),
        )  # fmt: skip
        assert await dev.extents(MiB + 4096, 4096) == ext((MiB + 4096, 4096, 0))
        await dev.trim(9 * MiB, MiB)
        assert (await dev.extents(8 * MiB, 2 * MiB)) == ext((8 * MiB, 2 * MiB, 3))
        os.truncate(path, 4 * MiB)  # someone shortened it: beyond its end reads zeroes
        assert await dev.extents(3 * MiB, 2 * MiB) == ext((3 * MiB, 2 * MiB, 3))
        assert await dev.read(4 * MiB, 16) == bytes(16)
        await dev.aclose()

    run(main)


def test_a_fragmented_file_is_answered_in_bounded_pieces(tmp_path: Path) -> None:
    async def main() -> None:
        blocks = MAX_SEEK_EXTENTS + 100
        dev = open_device(f"file:{tmp_path}/frag.img", size=2 * blocks * PAGE)
        for i in range(blocks):
            await dev.write(2 * i * PAGE, b"d" * PAGE)
        first = await dev.extents(0, dev.size)
        assert len(first) == MAX_SEEK_EXTENTS and first[-1].end < dev.size  # a prefix
        whole = await all_extents(dev, 0, dev.size)
        assert len(whole) == 2 * blocks
        assert whole[::2] == [Extent(2 * i * PAGE, PAGE, DATA) for i in range(blocks)]
        await dev.aclose()

    run(main)


def test_a_filesystem_without_seek_hole_answers_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        dev = open_device(f"file:{tmp_path}/n.img", size=MiB)

        def no_seek(fd: int, pos: int, how: int) -> int:
            raise OSError(errno.EOPNOTSUPP, "no SEEK_DATA here")

        monkeypatch.setattr(os, "lseek", no_seek)
        assert await dev.extents(0, MiB) == ext((0, MiB, 0))
        monkeypatch.undo()
        assert await dev.extents(0, MiB) == ext((0, MiB, 0))  # not asked again
        await dev.aclose()

    run(main)


def test_memory_map_of_writes_zeroes_and_trims() -> None:
    async def main() -> None:
        dev = open_device("memory:1M")
        assert await dev.extents(0, MiB) == ext((0, MiB, 3))
        await dev.write(100, b"x")  # touches page 0
        await dev.write_zeroes(64 * KiB, 64 * KiB, IoFlags.NO_HOLE)  # allocated zeroes
        await dev.write_zeroes(256 * KiB, 64 * KiB)  # may punch: a hole
        await dev.write(512 * KiB, b"y" * 3 * PAGE)
        await dev.trim(512 * KiB + 100, 2 * PAGE)  # only whole pages become holes
        assert await dev.extents(0, MiB) == ext(
            (0, PAGE, 0), (PAGE, 60 * KiB, 3), (64 * KiB, 64 * KiB, 2), (128 * KiB, 384 * KiB, 3),
            (512 * KiB, PAGE, 0), (512 * KiB + PAGE, PAGE, 3), (512 * KiB + 2 * PAGE, PAGE, 0),
            (512 * KiB + 3 * PAGE, MiB - 512 * KiB - 3 * PAGE, 3),
        )  # fmt: skip
        for e in await dev.extents(0, MiB):
            if e.flags & ZERO:
                assert await dev.read(e.offset, e.length) == bytes(e.length)

    run(main)


def test_memory_granules_grow_on_huge_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_backend, "MAX_GRANULES", 16)

    async def main() -> None:
        dev = open_device("memory:1M")
        backend: Any = dev.backend
        assert backend.granule == 64 * KiB
        await dev.write(70 * KiB, b"z")
        await dev.trim(0, 200 * KiB)  # granules 0..2 are whole inside: the written one too
        assert await dev.extents(0, 256 * KiB) == ext((0, 256 * KiB, 3))
        await dev.write(300 * KiB, b"z")  # granule 4
        await dev.trim(260 * KiB, 100 * KiB)  # no granule whole inside: granule 4 stays data
        assert await dev.extents(256 * KiB, 128 * KiB) == ext(
            (256 * KiB, 64 * KiB, 0), (320 * KiB, 64 * KiB, 3)
        )
        assert await dev.read(300 * KiB, 1) == b"\0"  # trimmed all the same

    run(main)


def test_null_is_one_hole_that_reads_zeroes() -> None:
    async def main() -> None:
        dev = open_device("null:1G")
        await dev.write(0, b"gone")
        assert await dev.extents(4096, GiB - 4096) == [Extent(4096, GiB - 4096, HOLE_ZERO)]

    run(main)


# ---- layers against a page model -----------------------------------------------------------
Op = tuple[str, int, int]  # ("write" | "trim" | "zero", first page, pages)


def ops_strategy(pages: int) -> st.SearchStrategy[list[Op]]:
    op = st.tuples(
        st.sampled_from(["write", "write", "trim", "zero"]),
        st.integers(0, pages - 1),
        st.integers(1, 40),
    ).map(lambda t: (t[0], t[1], min(t[2], pages - t[1])))
    return st.lists(op, max_size=12)


def model_map(pages: int, ops: list[Op]) -> list[Extent]:
    state = [HOLE_ZERO] * pages
    for kind, first, n in ops:
        flags = DATA if kind == "write" else HOLE_ZERO
        state[first : first + n] = [flags] * n
    return merge_extents(Extent(i * PAGE, PAGE, f) for i, f in enumerate(state))


async def apply(dev: BlockDevice, ops: list[Op]) -> None:
    for kind, first, n in ops:
        if kind == "write":
            await dev.write(first * PAGE, b"\xa5" * (n * PAGE))
        elif kind == "trim":
            await dev.trim(first * PAGE, n * PAGE)
        else:
            await dev.write_zeroes(first * PAGE, n * PAGE)


LAYOUTS: dict[str, Callable[[], Awaitable[BlockDevice]]] = {
    "stripe-3x16K": lambda: build_stack(
        "stripe", [open_device("memory:256K") for _ in range(3)], chunk=16 * KiB
    ),
    "stripe-2x4K": lambda: build_stack(
        "stripe", [open_device("memory:384K") for _ in range(2)], chunk=PAGE
    ),
    "linear": lambda: build_stack("linear", [open_device(f"memory:{n}K") for n in (128, 320, 320)]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_layers_merge_their_members_exactly(layout: str, data: st.DataObject) -> None:
    async def main() -> None:
        dev = await LAYOUTS[layout]()
        pages = dev.size // PAGE
        ops = data.draw(ops_strategy(pages), label="ops")
        await apply(dev, ops)
        want = model_map(pages, ops)
        assert await all_extents(dev, 0, dev.size) == want
        start = data.draw(st.integers(0, dev.size - 1), label="start")
        length = data.draw(st.integers(1, dev.size - start), label="length")
        got = await dev.extents(start, length)
        checked_extents(dev.name, start, length, got)
        for e in got:  # each extent agrees with the model wherever it lies
            assert {m.flags for m in want if m.offset < e.end and e.offset < m.end} == {e.flags}
        await dev.aclose()

    run(main)


def test_a_hole_over_many_stripe_rows_is_one_extent() -> None:
    async def main() -> None:
        members: list[BlockDevice] = [open_device("null:4G") for _ in range(4)]
        dev = await build_stack("stripe", members, chunk=PAGE)  # 4 Mi chunks
        assert await dev.extents(0, dev.size) == [Extent(0, 16 * GiB, HOLE_ZERO)]
        assert await dev.extents(PAGE + 1, 8 * GiB) == [Extent(PAGE + 1, 8 * GiB, HOLE_ZERO)]

    run(main)


class Failing(Layer):
    """A leg whose extents query fails (an answered error, as a broken store gives)."""

    async def extents(self, offset: int, length: int) -> list[Extent]:
        raise IoError(errno.EIO, f"{self.name}: extents failed")


def test_the_mirror_answers_from_an_in_sync_leg() -> None:
    async def main() -> None:
        a, b = open_device("memory:1M", name="a"), open_device("memory:1M", name="b")
        m: MirrorDevice = await started([a, b])
        await m.write(PAGE, b"q" * PAGE)
        want = ext((0, PAGE, 3), (PAGE, PAGE, 0), (2 * PAGE, MiB - 2 * PAGE, 3))
        for _ in range(4):  # whichever leg is picked
            assert await m.extents(0, MiB) == want
        # a leg that is behind never answers: the other one does, even with all data
        await b.write(0, b"only on b" * 1000)
        m.degrade(m.legs[1], "test: behind")
        for _ in range(4):
            assert await m.extents(0, MiB) == want
        await m.aclose()

    run(main)


def test_a_failing_leg_is_passed_over_and_all_failing_is_an_error() -> None:
    async def main() -> None:
        good = open_device("memory:1M", name="good")
        m: MirrorDevice = await started([Failing(open_device("memory:1M")), good])
        for _ in range(4):
            assert await m.extents(0, MiB) == ext((0, MiB, 3))
        m2: MirrorDevice = await started([Failing(open_device("memory:1M")) for _ in range(2)])
        with pytest.raises(IoError) as e:
            await m2.extents(0, MiB)
        assert e.value.errno == errno.EIO and "every in-sync leg" in str(e.value)
        await m.aclose()
        await m2.aclose()

    run(main)
