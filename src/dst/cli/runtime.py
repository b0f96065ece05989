"""Running a long-lived command: the event loop choice and clean stops on signals."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop unless DST_LOOP=asyncio (both are supported; uvloop is faster here)."""
    if os.environ.get("DST_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Callable[[], Awaitable[int]]) -> int:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main())  # type: ignore[arg-type]


class Stopper:
    """Turns SIGINT/SIGTERM into an event; counts them (a second one may force things)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0
        self.on_signal: Callable[[int], Any] | None = None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._fire, sig)

    def _fire(self, sig: int) -> None:
        self.count += 1
        if self.on_signal is not None:
            self.on_signal(self.count)
        else:
            self.event.set()

    async def wait(self) -> None:
        await self.event.wait()

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
