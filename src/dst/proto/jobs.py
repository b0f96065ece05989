"""CPU work that a core hands to its shell, and ordered continuations.

Sealing, opening and checksumming large payloads should not stall the event
loop.  A core cannot run threads (it is sans-IO), so it wraps such work in a
:class:`Job`; the shell runs ``job.run()`` on a worker pool and then calls the
core's ``job_done(job, now)`` on the loop thread.  :class:`InOrder` makes the
results take effect in the order the frames arrived, whichever job finishes first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any


class Job:
    """One piece of pure CPU work; ``run`` may execute on any thread."""

    __slots__ = ("done", "error", "fn", "result", "then")

    def __init__(self, fn: Callable[[], Any], then: Callable[[Job], None] | None = None) -> None:
        self.fn = fn
        self.then = then
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed back to the loop thread as a value
            self.error = exc

    def finish(self) -> None:
        """Mark done and run the continuation (on the loop thread)."""
        self.done = True
        if self.then is not None:
            self.then(self)


class InOrder:
    """Continuations that run in arrival order even when some wait for a job."""

    def __init__(self) -> None:
        self._q: deque[tuple[Job | None, Callable[[], None]]] = deque()

    def add(self, job: Job | None, fn: Callable[[], None]) -> None:
        if job is None and not self._q:
            fn()
            return
        self._q.append((job, fn))
        self.drain()

    def drain(self) -> None:
        q = self._q
        while q and (q[0][0] is None or q[0][0].done):
            _, fn = q.popleft()
            fn()

    def clear(self) -> None:
        self._q.clear()

    def __len__(self) -> int:
        return len(self._q)
