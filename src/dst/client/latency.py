"""A small latency recorder: recent samples for percentiles, totals for rates."""

from __future__ import annotations

from collections import deque

from mypy_extensions import mypyc_attr

WINDOW = 2048


# compiled (dst.compiled); dst.metrics subclasses it with histogram buckets
@mypyc_attr(allow_interpreted_subclasses=True)
class Latency:
    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=WINDOW)
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self.count += 1
        self.total += seconds

    def percentile(self, p: float) -> float | None:
        if not self._samples:
            return None
        s = sorted(self._samples)
        i = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
        return s[i]

    def summary(self) -> dict[str, float | None]:
        return {"p50": self.percentile(50), "p99": self.percentile(99), "count": self.count}
