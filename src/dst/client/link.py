"""The asyncio shell shared by every network member: connect, reconnect, pump, timer.

A member (a DST export or an NBD server) is a sans-IO client core that lives for the
whole session, plus this shell: it connects with back-off and hands each connection to
the core's :class:`CoreDriver` (which feeds the core, sends what it wants sent and keeps
its timer, also while disconnected: the resend clock runs on), and lets the subclass
handle the core's events.  The first
handshake can be awaited (``connect``) or left to happen in the background
(``launch``, for a mirror leg that may be down when the client node starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from mypy_extensions import mypyc_attr

from dst import trace
from dst.aio.driver import Core, CoreDriver
from dst.aio.listen import connect
from dst.client.latency import Latency
from dst.device import BlockDevice, Capabilities
from dst.errors import DstError
from dst.uri import MemberUri

log = logging.getLogger("dst.member")


@dataclass
class LinkOptions:
    connect_timeout: float = 10.0
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0


class LinkCore(Core[object], Protocol):
    """What the shell needs of a client core (DST or NBD), beyond every core's verbs."""

    generation: int
    config: Any  # has ``resend_timeout``

    @property
    def in_flight(self) -> int: ...

    def abandon(self, error: int, message: str) -> int: ...


@mypyc_attr(allow_interpreted_subclasses=True)
class LinkedDevice(BlockDevice):
    """A BlockDevice whose data lives behind one stream connection, kept up by this shell."""

    core: LinkCore
    # class attributes (a subclass sets its own), not per-instance slots of the compiled class
    what: ClassVar[str] = "member"  # for messages: "cannot reach <what> <uri>"
    op_names: ClassVar[tuple[str, ...]] = ("read", "write", "flush", "trim", "zero")
    # transaction id -> (waiter, command, offset, length, monotonic submit time)
    _pending: dict[int, tuple[Any, int, int, int, float]]

    def __init__(self, uri: MemberUri, options: LinkOptions | None, core: LinkCore) -> None:
        self.core = core
        self.driver: CoreDriver[object] = CoreDriver(
            core, self._on_event, name=uri.text, on_lost=self._on_lost
        )
        self.uri = uri
        self.name = uri.text
        self.options = options or LinkOptions()
        self.state = "connecting"
        self.state_since = time.time()
        self.size = 0
        self.capabilities = Capabilities()
        self._last_error = ""
        self.last_error_at: float | None = None
        self.reconnects = 0
        self._lost: asyncio.Event | None = None
        self._ready: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._kick: asyncio.Event | None = None
        self._closing = False
        self._was_ready = False
        self.latency = {op: Latency() for op in self.op_names}
        self.counts = dict.fromkeys(self.op_names, 0)
        self.bytes = {"read": 0, "write": 0}

    # ---- what a subclass provides -------------------------------------------------------
    @abstractmethod
    def _on_event(self, ev: Any) -> None:
        """Handle one event of the core."""

    @property
    @abstractmethod
    def _ever_connected(self) -> bool:
        """True once a first handshake succeeded (later losses are reconnects)."""

    @property
    def last_error(self) -> str:
        """The last thing that went wrong on the link (a lost connection, a refusal...)."""
        return self._last_error

    @last_error.setter
    def last_error(self, message: str) -> None:
        self._last_error = message
        if message:
            self.last_error_at = time.time()

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state_since = time.time()
        super().set_state(state)

    def waiting(self) -> tuple[int, float]:
        """Requests unanswered for longer than one resend timeout (their first attempt
        went unacknowledged), and how long the oldest of them has waited, in seconds."""
        limit = float(getattr(self.core.config, "resend_timeout", 0.0) or 0.0)
        now = time.monotonic()
        ages = [now - entry[4] for entry in getattr(self, "_pending", {}).values()]
        late = [a for a in ages if a > limit]
        return len(late), max(late, default=0.0)

    def link_state(self, waiting: int | None = None) -> str:
        """The member's state, except that a connection whose requests wait past their
        first resend timeout is ``stalled``: connected, but not answering in time."""
        if waiting is None:
            waiting = self.waiting()[0]
        return "stalled" if self.state == "connected" and waiting else self.state

    def _link_statistics(self) -> dict[str, Any]:
        """What every member reports; a subclass adds its protocol's own counters."""
        waiting, oldest = self.waiting()
        return {
            "uri": self.uri.text,
            "state": self.state,
            "state_since": round(self.state_since, 3),
            "link_state": self.link_state(waiting),
            "waiting": waiting,
            "waiting_seconds": round(oldest, 3),
            "generation": self.core.generation,
            "identity": str(self.identity or ""),
            "size": self.size,
            "in_flight": self.core.in_flight,
            "reconnects": self.reconnects,
            "requests": dict(self.counts),
            "bytes_read": self.bytes["read"],
            "bytes_written": self.bytes["write"],
            "latency": {op: lat.summary() for op, lat in self.latency.items() if lat.count},
            "last_error": self.last_error,
            "last_error_at": round(self.last_error_at, 3) if self.last_error_at else None,
        }

    # ---- lifecycle ----------------------------------------------------------------------
    def launch(self) -> None:
        """Start connecting in the background and return at once (a mirror leg that may be
        down at start); ``connect`` waits for the first handshake instead."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._ready.add_done_callback(_retrieve)
        self._lost = asyncio.Event()
        self._kick = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"{self.what} {self.uri}")

    async def wait_ready(self, timeout: float) -> bool:
        """True once connected; False if not within ``timeout``; DstError if refused."""
        assert self._ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            return False
        return True

    async def connect(self) -> None:
        """Connect and handshake, retrying within --connect-timeout; raise DstError if
        refused or unreachable."""
        self.launch()
        assert self._ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.options.connect_timeout)
        except TimeoutError:
            why = self.last_error or "no answer"
            await self.aclose()
            raise DstError(
                f"cannot reach {self.what} {self.uri} within --connect-timeout "
                f"{self.options.connect_timeout:g} s: {why}; check that it is running and "
                "that the address and export name are right"
            ) from None
        except BaseException as exc:
            await self.aclose()
            raise exc  # named, not bare: see dst.compiled

    def _ready_now(self) -> None:
        """The subclass saw a successful handshake."""
        self._was_ready = True
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def _refused_at_start(self, exc: BaseException) -> bool:
        """Fail a pending ``connect``; False if the device was already up."""
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc)
            return True
        return False

    async def _run(self) -> None:
        delay = self.options.reconnect_min
        while not self._closing and self.state != "failed":
            try:
                sock = await connect(self.uri.address, self.options.connect_timeout)
            except (OSError, TimeoutError) as exc:
                code = getattr(exc, "errno", None)
                self.last_error = os.strerror(code) if code else str(exc) or "connect timed out"
                if trace.on.proto:
                    trace.emit("proto", "connect-failed", member=self.name, error=self.last_error)
            else:
                assert self._lost is not None
                self._lost.clear()
                self.driver.attach(sock)
                self.driver.start()
                await self._lost.wait()
                if self._closing or self.state == "failed":
                    break
                if self._ever_connected:
                    if self.state == "connected":
                        self._log_lost()
                    self.set_state("reconnecting")
                if self._was_ready:
                    delay = self.options.reconnect_min
                self._was_ready = False
            await self._sleep(delay)
            delay = min(delay * 2, self.options.reconnect_max)

    def _log_lost(self) -> None:
        log.warning("%s: connection lost; reconnecting", self.name)

    async def _sleep(self, delay: float) -> None:
        assert self._kick is not None
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._kick.wait(), delay)

    def fence(self, reason: str) -> bool:
        """Fail every request in flight and drop the connection; the link reconnects with
        a new generation (see :meth:`BlockDevice.fence`)."""
        if self._closing or self.state == "failed":
            return True
        n = self.core.abandon(errno.ECANCELED, f"given up: {reason}")
        if n:
            log.warning("%s: %d request(s) given up: %s", self.name, n, reason)
        if trace.on.proto:
            trace.emit("proto", "fenced", member=self.name, requests=n, why=reason)
        if self.driver.stream is not None:
            self.driver.stream.abort()  # nothing queued for this connection is sent any more
        self.driver.pump()  # the callers see their requests fail
        return True

    # ---- the driver's connection ------------------------------------------------------
    def _on_lost(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.last_error = str(exc)
        if self._lost is not None:
            self._lost.set()

    @property
    def _connected(self) -> bool:
        return self.driver.connected

    def _close_stream(self) -> None:
        self.driver.close()

    async def _stop_link(self) -> None:
        """Cancel the timer and the connect loop (the subclass closed the session)."""
        if self.driver.stream is not None:
            self.driver.stream.close()
        await self.driver.aclose()
        if self._kick is not None:
            self._kick.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a background start's refusal as seen (the state and the log report it)."""
    if not fut.cancelled():
        fut.exception()
