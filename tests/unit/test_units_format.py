"""The one style of sizes, rates and durations that logs, status and `dst ctl` share."""

from __future__ import annotations

import pytest

from dst.units import format_bytes, format_duration, format_rate, format_size


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1000, "1000 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (65536, "64 KiB"),
        (1740800, "1.7 MiB"),  # 1700 KiB: the largest unit below 1024, not "1700 KiB"
        (186151731, "177.5 MiB"),  # not "181788.8 KiB"
        (16 << 20, "16 MiB"),
        (3 << 40, "3 TiB"),
    ],
)
def test_bytes_use_the_largest_binary_unit_and_one_decimal(n: int, text: str) -> None:
    assert format_bytes(n) == text == format_size(n)


def test_rates_are_sizes_per_second() -> None:
    assert format_rate(186151731.4) == "177.5 MiB/s"
    assert format_rate(0) == "0 B/s"


@pytest.mark.parametrize(
    ("s", "text"),
    [
        (0.00004, "40 µs"),
        (0.0041, "4.1 ms"),
        (0.35, "350 ms"),
        (12.34, "12.3 s"),
        (200, "3 min 20 s"),
        (8000, "2 h 13 min"),
        (500000, "5 d 18 h"),
    ],
)
def test_durations(s: float, text: str) -> None:
    assert format_duration(s) == text
