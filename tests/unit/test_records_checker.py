"""The crash-consistency checker (tests/records.py) accepts exactly the images a barrier
stream can leave, and rejects the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.records import BLOCK, check, record

RUN = 77
EVERY = 4


def image(tmp: Path, present: list[int], size: int = 32, junk: int | None = None) -> str:
    data = bytearray(size * BLOCK)
    for i in present:
        data[i * BLOCK : (i + 1) * BLOCK] = record(RUN, i)
    if junk is not None:
        data[junk * BLOCK + 100] = 0x55
    path = tmp / "img"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    "present",
    [
        [],  # nothing yet
        [0, 2],  # part of the first epoch
        list(range(8)),  # two whole epochs
        [*range(8), 9, 11],  # two epochs, part of the third
        [*range(9), 11],
    ],
)
def test_a_crash_consistent_image_passes(tmp_path: Path, present: list[int]) -> None:
    ok, why = check(image(tmp_path, present), RUN, EVERY)
    assert ok, why


@pytest.mark.parametrize(
    "present",
    [
        [0, 1, 2, 4],  # record 4 is after barrier 1 while record 3 (before it) is missing
        [*range(8), 12],  # record 12 is past the barrier after the third epoch
        [1, 2, 3, 5],
    ],
)
def test_a_record_past_the_next_barrier_fails(tmp_path: Path, present: list[int]) -> None:
    ok, why = check(image(tmp_path, present), RUN, EVERY)
    assert not ok and "past barrier" in why, why


def test_a_damaged_or_foreign_block_fails(tmp_path: Path) -> None:
    ok, why = check(image(tmp_path, [0, 1], junk=1), RUN, EVERY)
    assert not ok and "neither zeroes nor their record" in why
    path = tmp_path / "other"
    path.write_bytes(record(RUN + 1, 0) + bytes(BLOCK))
    assert not check(str(path), RUN, EVERY)[0]
