"""One driver for every sans-IO core: feed it, act on its events, send, keep its timer.

Every core (the DST client and export-node cores, the NBD server and client cores) has
the same verbs with the same signatures (:class:`Core`), so the shells around them (the
export node's connection, the client node's link to a member, the NBD front end's
connection) keep only their policy, what an event means, and this driver is the mechanism:

- **receive**: the stream's ``recv_into`` fills ``core.get_buffer()``, then
  ``buffer_updated(n, now)`` and one pump. Every request of that receive is handled in
  the pump (most complete in their device callback before it ends), so their replies
  leave together, at once, in one ``sendmsg``.
- **pump**: each event goes to the policy's handler; jobs the core hands out (checksums,
  ciphers on large buffers) go to the worker pool; what the core wants sent is written; the
  timer is moved only when the core's deadline comes earlier (:class:`CoreTimer`).
- **wake**: something finished outside a pump (a request on the thread pool, a task):
  one pump later in this loop iteration, so completions of one iteration leave together.
  A policy that queued a large reply or request says so (:meth:`queued`): that one is
  sent at once, so that the next process starts on it while this one works through the
  rest of the batch (eight 1 MiB reads of one receive otherwise left only after the
  eighth was read, and the two processes took turns instead of overlapping).
- **requests in flight**: a policy counts what it started on a device (``begin`` /
  ``end``) or as a task (``spawn``); ``settled`` waits for all of it. A task's error is
  logged here, never dropped, and ``aclose`` cancels and awaits what is left.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

from dst.aio import workers
from dst.aio.stream import SocketStream
from dst.aio.timer import CoreTimer
from dst.proto.jobs import Job

log = logging.getLogger("dst.net")

#: Output queued outside a pump of at least this many bytes is sent at once (:meth:`queued`);
#: smaller leaves with the rest of the loop iteration's, in one ``sendmsg``.
SEND_AT_ONCE = 128 << 10

E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)


class Core(Protocol[E_co]):
    """The verbs every sans-IO core has; ``now`` is ``time.monotonic()`` at the call."""

    def connection_made(self, now: float) -> None: ...
    def connection_lost(self, now: float) -> None: ...
    def get_buffer(self) -> memoryview: ...
    def buffer_updated(self, nbytes: int, now: float) -> None: ...
    def next_event(self) -> E_co | None: ...
    def data_to_send(self) -> list[Any]: ...
    def take_handed(self) -> list[Callable[[], None]]: ...
    def take_jobs(self) -> list[Job]: ...
    def job_done(self, job: Job, now: float) -> None: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...


class CoreDriver(Generic[E]):
    """Drives one core over the stream of its current connection (one at a time)."""

    def __init__(
        self,
        core: Core[E],
        on_event: Callable[[E], None],
        *,
        name: str,
        after_pump: Callable[[], None] | None = None,
        on_lost: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.core = core
        self.name = name
        self._on_event = on_event
        self._after_pump = after_pump
        self._on_lost = on_lost
        self.stream: SocketStream | None = None
        self._timer = CoreTimer(self._fire)
        self.timer_enabled = True
        self._pumping = False
        self._wake_scheduled = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.started = 0  # requests started on a device and not called back yet
        self._quiet: list[asyncio.Future[None]] = []
        # taken at the first wake: asyncio.get_running_loop() costs a getpid on each call
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- the connection ----------------------------------------------------------------
    def attach(self, sock: socket.socket) -> SocketStream:
        """Take ``sock`` as the connection (not read yet: :meth:`start`)."""
        self.stream = SocketStream(sock, self)
        return self.stream

    def start(self) -> None:
        """The connection is up: tell the core, start reading, send what it has."""
        assert self.stream is not None
        self.core.connection_made(time.monotonic())
        self.stream.start()
        self.pump()

    @property
    def connected(self) -> bool:
        return self.stream is not None and not self.stream.closed

    def close(self) -> None:
        """Send what is queued (as far as the socket takes it now), then close."""
        if self.stream is not None:
            self.send()
            self.stream.close()

    # ---- Receiver of the stream -----------------------------------------------------------
    def get_buffer(self) -> memoryview:
        return self.core.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.core.buffer_updated(nbytes, time.monotonic())
        self.pump(now=True)

    def connection_lost(self, exc: BaseException | None) -> None:
        core = self.core
        core.connection_lost(time.monotonic())
        for release in core.take_handed():
            release()
        if self._on_lost is not None:
            self._on_lost(exc)
        self.pump()

    # ---- the pump -------------------------------------------------------------------
    def pump(self, now: bool = False) -> None:
        """Handle every event, then send and re-arm (``now``: send at once, not later in
        this loop iteration)."""
        core = self.core
        on_event = self._on_event
        was, self._pumping = self._pumping, True
        try:
            while (ev := core.next_event()) is not None:
                on_event(ev)
            if self._after_pump is not None:
                self._after_pump()
        finally:
            self._pumping = was
        self._send_and_arm(now)

    def wake(self) -> None:
        """Pump once later in this loop iteration (nothing to do during a pump: its end
        sends what was queued)."""
        if self._pumping or self._wake_scheduled:
            return
        self._wake_scheduled = True
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        loop.call_soon(self._woken)

    def queued(self, nbytes: int) -> None:
        """The policy queued ``nbytes`` of output on the core outside a pump: send it at
        once when large, else with the others of this loop iteration (:meth:`wake`)."""
        if nbytes >= SEND_AT_ONCE:
            self._send_and_arm(True)
        else:
            self.wake()

    def _send_and_arm(self, now: bool) -> None:
        """The end of a pump: send what the core queued, move the timer to its deadline."""
        self.send(now)
        self._timer.arm(self.core.get_timer() if self.timer_enabled else None)

    def _woken(self) -> None:
        self._wake_scheduled = False
        self.pump(now=True)

    def send(self, now: bool = False) -> None:
        """Start the core's jobs; hand what it queued to the socket; its buffers go back
        once the socket sent them."""
        core = self.core
        jobs = core.take_jobs()
        if jobs:
            workers.run_jobs(jobs, self._job_done)
        out = core.data_to_send()
        stream = self.stream
        if stream is None:
            for release in core.take_handed():
                release()
            return
        if out:
            stream.write(out, now)
        for release in core.take_handed():
            stream.after_sent(release)

    def _job_done(self, job: Job) -> None:
        self.core.job_done(job, time.monotonic())
        self.pump()

    def _fire(self) -> None:
        self.core.handle_timer(time.monotonic())
        self.pump()

    # ---- what is in flight --------------------------------------------------------------
    def begin(self) -> None:
        """A request was started on a device; :meth:`end` when it called back."""
        self.started += 1

    def end(self) -> None:
        self.started -= 1
        if not self.started and self._quiet:
            self._wake_quiet()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task this driver owns (see the module docstring)."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}: {name}")
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: %s failed unexpectedly", self.name, task.get_name(), exc_info=exc)
        self.wake()

    @property
    def busy(self) -> int:
        """Requests in flight: tasks, and requests started on a device."""
        return len(self.tasks) + self.started

    async def settled(self, but: asyncio.Task[Any] | None = None) -> None:
        """Wait until every task (other than ``but``) and every started request ended."""
        while True:
            tasks = [t for t in self.tasks if t is not but]
            if tasks:
                await asyncio.wait(tasks)
                continue
            if not self.started:
                return
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._quiet.append(fut)
            await fut

    def _wake_quiet(self) -> None:
        waiters, self._quiet = self._quiet, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def aclose(self) -> None:
        """Stop the timer; cancel and await the tasks left."""
        self.timer_enabled = False
        self._timer.cancel()
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
