"""One timer at a sans-IO core's deadline, for the asyncio shells around the cores.

The cores say when they next need ``handle_timer`` (``get_timer()``, a monotonic time or
None).  Re-creating a TimerHandle on every pump cost measurable time per request, so the
timer is moved only when the deadline comes earlier; one that fires early (the deadline
moved later meanwhile) finds nothing due, and the shell arms it again for the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class CoreTimer:
    """Keeps at most one loop timer, at or before the deadline it was last given."""

    def __init__(self, fire: Callable[[], None]) -> None:
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def arm(self, when: float | None) -> None:
        """Fire at ``when`` (a ``time.monotonic()`` value); None: no timer."""
        handle = self._handle
        if when is None:
            self.cancel()
            return
        if handle is not None:
            if when >= self._at:
                return
            handle.cancel()
        loop = asyncio.get_running_loop()
        self._at = when
        self._handle = loop.call_at(loop.time() + max(0.0, when - time.monotonic()), self._run)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def _run(self) -> None:
        self._handle = None
        self._fire()
