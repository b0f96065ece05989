"""An asynchronous mirror leg: the mirror's changes shipped in order, barrier by barrier.

A write to a mirror is acknowledged once its synchronous legs have it; for each
asynchronous leg its change (with a copy of the data) is then appended to that leg's
queue, in the order the mirror applied it (the range lock is still held), and FLUSH and
FUA become *barriers* in the queue.  The queue is shipped epoch by epoch: the changes
between two barriers go out with many in flight (a far link needs the pipelining), a
change that overlaps one still in flight waits for it, and nothing after a barrier is
sent before every change before it completed and the leg's flush completed.  So the
leg always holds every change before some barrier plus some of those before the next
one: a crash-consistent image of the device.  Barriers are also added on their own
(every quarter of ``max_lag`` bytes, every second, and when the queue runs empty), which
only makes the points finer and lets the lag drain to zero.

While a change is queued, the activity-log extents it touches stay referenced, so a
crash of the client node, which loses the queue, resyncs those extents to the leg.

The lag (bytes queued or not yet flushed on the leg) is bounded by ``max_lag``; so is
the memory holding it.  When a change would pass it (or the queue holds too many
activity-log extents): ``pull-ahead`` marks every queued region in the leg's bitmap,
drops the queue and makes the leg *behind* (``degraded``; later writes are marked, and
a resync from the bitmap catches it up later); ``block`` makes the writer wait for room.
A failed change, a leg that answers nothing within ``--leg-timeout`` or a link that
goes down makes it behind whatever the policy, so a dead leg never slows the writer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

from dst.buffers import BufferPool, PooledBuffer
from dst.device import BlockDevice, IoFlags, run_in_task
from dst.errors import IoError, UsageError
from dst.layers.activity import ActivityLog
from dst.layers.bitmap import Record
from dst.layers.resync import DEGRADED, Leg
from dst.units import format_size

log = logging.getLogger("dst.mirror")

PULL_AHEAD, BLOCK = "pull-ahead", "block"
POLICIES = (PULL_AHEAD, BLOCK)
DEFAULT_MAX_LAG = 64 << 20

WRITE, TRIM, ZERO, BARRIER = "write", "trim", "zero", "barrier"
MAX_OPS_IN_FLIGHT = 256  # a 60 ms link needs many 4 KiB writes in flight to keep up
MAX_BYTES_IN_FLIGHT = 16 << 20
BARRIER_SECONDS = 1.0  # a barrier at least this often while changes arrive
SMALL_EPOCH = 4  # an epoch of at most this many changes sends them with FUA, and no flush
OP_COST = 4096  # what a change without payload counts for in the count limit


@dataclass(eq=False, slots=True)
class Op:
    """One queued change, or a barrier (with whoever waits for it)."""

    kind: str
    offset: int = 0
    length: int = 0
    flags: IoFlags = IoFlags.NONE
    data: memoryview | None = None
    pooled: PooledBuffer | None = None
    since: float = 0.0
    held: bool = False  # holds activity-log references
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def payload(self) -> int:
        return self.length if self.kind == WRITE else 0

    def release(self) -> None:
        if self.pooled is not None:
            self.pooled.release()
        self.pooled = None
        self.data = None


class ShipHost(Protocol):
    """What the mirror offers to its shippers."""

    record: Record
    al: ActivityLog
    leg_timeout: float
    legs: list[Leg]
    async_max_lag: int
    async_on_congestion: str
    _closed: bool

    def degrade(self, leg: Leg, why: str) -> bool: ...

    def _try_resync(self, leg: Leg) -> None: ...

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...

    async def _sync_quietly(self) -> None: ...


def check_async(legs: int, max_lag: int, policy: str) -> None:
    if max_lag <= 0:
        raise UsageError("--async-max-lag must be greater than 0, e.g. 64M")
    if policy not in POLICIES:
        raise UsageError(f"invalid --async-on-congestion {policy!r}: use {' or '.join(POLICIES)}")


def async_leg(host: ShipHost, dev: BlockDevice, slot: int, reason: str = "") -> Leg:
    """A new asynchronous leg (behind until start-up or a resync says otherwise)."""
    leg = Leg(dev, slot, DEGRADED, reason=reason, asynchronous=True)
    leg.shipper = Shipper(host, leg, host.async_max_lag, host.async_on_congestion)
    leg.idle.set()
    return leg


def _shippers(host: ShipHost) -> list[Shipper]:
    return [x.shipper for x in host.legs if x.shipper is not None]


async def reserve(host: ShipHost, n: int) -> list[tuple[Shipper, int]]:
    """With ``block``: wait (before the range lock) until a write of ``n`` bytes fits in
    every streaming queue; hand the result back to :meth:`Shipper.unreserve`."""
    if host.async_on_congestion != BLOCK:
        return []
    return [(s, await s.reserve(n)) for s in _shippers(host) if s.on]


async def ship(
    host: ShipHost,
    op: str,
    offset: int,
    length: int,
    data: memoryview | None,
    flags: IoFlags,
    err: IoError | None,
) -> None:
    """Queue a change the synchronous legs took for each asynchronous leg (the caller holds
    the range lock, so the order is the order it was applied); a leg that is behind, or
    falls behind now, gets the range marked instead, durably before the ack."""
    kind = {"write": WRITE, "trim": TRIM}.get(op, ZERO)
    rec = host.record
    for leg in host.legs:
        s = leg.shipper
        if s is None or leg.removed:
            continue
        if err is not None and s.on:  # the legs it is copied from hold something else there
            host.degrade(leg, f"a {op} failed on every in-sync leg")
        if not s.put(kind, offset, length, data, flags):
            rec.mark(leg.slot, offset, length)
    if rec.pending:
        await rec.sync()


def barrier(host: ShipHost) -> None:
    """A FLUSH of the mirror: a barrier in every queue."""
    for s in _shippers(host):
        s.barrier()


async def drain(host: ShipHost) -> None:
    """A clean stop: each queue goes out and is flushed, or its regions go to the bitmap
    (the leg is then behind at the next start)."""
    for s in _shippers(host):
        if s.on and not await s.drain(host.leg_timeout):
            host.degrade(s.leg, f"its queue was not on it {host.leg_timeout:g} s after the stop")


def stop(host: ShipHost) -> None:
    """A crash: the queues are lost (the activity log covers them)."""
    for s in _shippers(host):
        s.close()


class Shipper:
    """The queue of one asynchronous leg and the state of its shipping."""

    def __init__(self, host: ShipHost, leg: Leg, max_lag: int, policy: str) -> None:
        self.host = host
        self.leg = leg
        self.max_lag = max_lag
        self.policy = policy
        self.on = False  # streaming (the leg is in sync or resyncing)
        self.waiting: deque[Op] = deque()  # not sent yet, in order
        self.issued: deque[Op] = deque()  # sent since the last completed barrier
        self.inflight: list[Op] = []
        self.flushing: Op | None = None
        self.lag = 0  # payload bytes in waiting + issued
        self.reserved = 0  # room promised to blocked writers
        self.extents: Counter[int] = Counter()  # activity-log extents the queue holds
        self.pool = BufferPool(min(max_lag, 16 << 20))
        self.gen = 0  # bumped when the queue is dropped: older callbacks are orphans
        self.behind_since: float | None = time.monotonic()
        self.last_progress = 0.0
        self.shipped_bytes = 0
        self.barriers = 0
        self.pull_aheads = 0
        self._inflight_bytes = 0
        self._epoch_bytes = 0
        self._epoch_sent = 0  # changes sent in the current epoch
        self._epoch_plain = False  # one of them went without FUA: the barrier flushes
        self._since_barrier = 0
        self._barrier_t = 0.0
        self._room = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._pumping = False
        self._again = False
        self._kicked = False

    # ---- limits ------------------------------------------------------------------------
    @property
    def _ops(self) -> int:
        return len(self.waiting) + len(self.issued)

    @property
    def max_ops(self) -> int:
        return max(1024, self.max_lag // OP_COST)

    def _al_cap(self) -> int:
        return max(1, self.host.al.limit // 2)

    def _fits(self, n: int, limit: int) -> bool:
        if not self.on or (self.lag + self.reserved == 0 and not self._ops):
            return True
        al = self.host.al
        return (
            self.lag + self.reserved + n <= limit
            and self._ops < self.max_ops
            and (not al.enabled or len(self.extents) < self._al_cap())
        )

    def _congested(self, offset: int, length: int, n: int) -> str:
        """Why this change would pass a limit ('' when it fits)."""
        if not self._ops:
            return ""
        if self.lag + n > self.max_lag:
            return (
                f"its lag would pass --async-max-lag {format_size(self.max_lag)} "
                f"({format_size(self.lag)} queued)"
            )
        if self._ops >= self.max_ops:
            return f"{self._ops} changes are queued for it"
        al = self.host.al
        if al.enabled:
            new = sum(1 for e in al.extents(offset, length) if e not in self.extents)
            if new and len(self.extents) + new > self._al_cap():
                return (
                    f"its queue holds {len(self.extents)} activity-log extents, half the "
                    "activity log"
                )
        return ""

    # ---- what the mirror calls ---------------------------------------------------------
    def start(self, caught_up: bool = False) -> None:
        """Stream from now on (the leg just became in sync, or started resyncing)."""
        self.on = True
        self._barrier_t = time.monotonic()
        if caught_up:
            self.caught_up()

    def caught_up(self) -> None:
        """The resync finished: the leg holds everything, in order, from here on."""
        self.behind_since = None

    def fail(self, why: str) -> None:
        """A change failed, the leg went silent or its link went down: it is behind, and
        what it still has in flight is fenced (it can never land after its resync)."""
        leg, host = self.leg, self.host
        if leg.status == DEGRADED or leg.removed:
            return
        if host.degrade(leg, why):
            leg.dev.fence(why)
            host._spawn(host._sync_quietly())

    def _resume(self) -> None:
        """Every request given up on the leg ended: it may resync now, unless a retry is
        scheduled (a leg that fell behind waits out its back-off)."""
        if self.leg.retry is None and not self.host._closed:
            self.host._try_resync(self.leg)

    async def reserve(self, n: int) -> int:
        """With ``block``, wait until a change of ``n`` bytes fits; returns what was reserved
        (hand it to :meth:`put` or :meth:`unreserve`)."""
        if self.policy != BLOCK:
            return 0
        while not self._fits(n, self.max_lag):
            self._room.clear()
            await self._room.wait()
        if not self.on:
            return 0
        self.reserved += n
        return n

    def unreserve(self, n: int) -> None:
        self.reserved = max(0, self.reserved - n)
        if n:
            self._room.set()

    def put(
        self, kind: str, offset: int, length: int, data: memoryview | None, flags: IoFlags
    ) -> bool:
        """Queue an acknowledged change; False when the leg is (or just fell) behind, and
        the caller marks the range in the leg's bitmap instead."""
        if not self.on:
            return False
        n = length if kind == WRITE else 0
        if self.policy == PULL_AHEAD:
            why = self._congested(offset, length, n)
            if why:
                self.pull_aheads += 1
                self.host.degrade(self.leg, f"it fell behind: {why}")
                return False
        if flags & IoFlags.PREFLUSH:
            self._barrier()
        op = Op(kind, offset, length, flags & IoFlags.NO_HOLE, since=time.monotonic())
        if data is not None:
            op.pooled = self.pool.get(n)
            op.pooled.view[:] = data
            op.data = op.pooled.view
        al = self.host.al
        if al.enabled:
            al.retain(offset, length)
            op.held = True
            for e in al.extents(offset, length):
                self.extents[e] += 1
        self._append(op)
        if flags & IoFlags.FUA:
            self._barrier()
        self._kick()
        return True

    def barrier(self) -> None:
        """A FLUSH of the mirror: a barrier in the queue."""
        if self.on:
            self._barrier()
            self._kick()

    async def room(self, n: int) -> None:
        """For a resync copy: wait until half the lag limit has room, so the writes
        streamed meanwhile keep the other half."""
        while self.on and not self._fits(n, self.max_lag // 2):
            self._room.clear()
            await self._room.wait()
        if not self.on:
            raise IoError(errno.ECANCELED, f"{self.leg.name} fell behind")

    def copy(self, offset: int, data: bytearray, zero: bool) -> bool:
        if not self.on:
            return False
        if zero:
            op = Op(ZERO, offset, len(data), since=time.monotonic())
        else:
            op = Op(WRITE, offset, len(data), data=memoryview(data), since=time.monotonic())
        self._append(op)
        self._kick()
        return True

    async def commit(self) -> None:
        """Wait for a barrier after everything queued so far (IoError when dropped)."""
        if not self.on:
            raise IoError(errno.ECANCELED, f"{self.leg.name} fell behind")
        if not self._ops and self.flushing is None:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barrier(fut)
        self._pump()
        await fut

    async def drain(self, timeout: float) -> bool:
        """Ship and flush everything queued (a clean stop); False if it did not finish."""
        if not self.on:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self.commit()
        except (TimeoutError, IoError):
            return False
        return True

    def drop(self) -> None:
        """The leg fell behind: mark every queued region in its bitmap, forget the queue and
        its memory.  Changes still in flight run to their end (the resync waits for them:
        ``Leg.abandoned``); the activity-log references go once the marks are durable."""
        if not self.on:
            return
        self.on = False
        self.gen += 1
        rec, leg = self.host.record, self.leg
        ops = [*self.issued, *self.waiting]
        for op in ops:
            if op.kind != BARRIER and not leg.removed:
                rec.mark(leg.slot, op.offset, op.length)
        oldest = min((op.since for op in ops if op.kind != BARRIER), default=time.monotonic())
        self.behind_since = min(self.behind_since or oldest, oldest)
        leg.abandoned += len(self.inflight) + (self.flushing is not None)
        for op in (*self.waiting, *([self.flushing] if self.flushing else [])):
            op.release()
            for w in op.waiters:
                if not w.done():
                    w.set_exception(IoError(errno.ECANCELED, f"{leg.name} fell behind"))
                    w.exception()  # whoever waits gets it; nobody waiting is no error
        held = [(op.offset, op.length) for op in ops if op.held]
        self.waiting.clear()
        self.issued.clear()
        self.inflight.clear()
        self.flushing = None
        self.lag = self._inflight_bytes = self._epoch_bytes = self._epoch_sent = 0
        self._epoch_plain = False
        self.extents.clear()
        self._room.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if held:
            self.host._spawn(self._release_after_sync(held))

    async def _release_after_sync(self, held: list[tuple[int, int]]) -> None:
        """Let the activity log forget the dropped changes only once the bitmap has them."""
        try:
            await self.host.record.sync()
        except IoError as e:
            log.error("%s: %s", self.leg.name, e)
            return
        al = self.host.al
        for offset, length in held:
            al.end(offset, length)

    def close(self) -> None:
        """Stop at once, as a crash would (nothing marked, nothing released)."""
        if self.on:
            self.leg.abandoned += len(self.inflight) + (self.flushing is not None)
        self.on = False
        self.gen += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- the queue -----------------------------------------------------------------------
    def _append(self, op: Op) -> None:
        self.waiting.append(op)
        self.lag += op.payload
        self._since_barrier += max(op.payload, OP_COST)
        if (
            self._since_barrier >= max(1 << 20, self.max_lag // 4)
            or op.since - self._barrier_t >= BARRIER_SECONDS
        ):
            self._barrier()

    def _barrier(self, waiter: asyncio.Future[None] | None = None) -> None:
        self._since_barrier = 0
        self._barrier_t = time.monotonic()
        last = self.waiting[-1] if self.waiting else None
        if last is None or last.kind != BARRIER:
            last = Op(BARRIER)
            self.waiting.append(last)
        if waiter is not None:
            last.waiters.append(waiter)

    def _kick(self) -> None:
        """Send soon, after the writer got its ack: the changes queued meanwhile go out in
        one pass (and the writer does not pay for the far leg's framing)."""
        if not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._kicked_pump)

    def _kicked_pump(self) -> None:
        self._kicked = False
        self._pump()

    def _pump(self) -> None:
        """Send what may go now: the changes of the current epoch that overlap nothing in
        flight, or the barrier once the epoch is complete.  Not re-entered: a member may
        complete a request inside the call that sends the next one, and that completion
        only asks the running pass for another."""
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again and self.on:
                self._again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        waiting = self.waiting
        while waiting and self.flushing is None:
            op = waiting[0]
            if op.kind == BARRIER:
                if self.inflight:
                    break
                waiting.popleft()
                if self._epoch_plain:
                    self._send_flush(op)
                    break
                self._epoch_done(op)  # its changes went with FUA (or there were none)
                continue
            if self.inflight and (
                len(self.inflight) >= MAX_OPS_IN_FLIGHT
                or self._inflight_bytes + op.payload > MAX_BYTES_IN_FLIGHT
                or any(
                    x.offset < op.offset + op.length and op.offset < x.offset + x.length
                    for x in self.inflight
                )
            ):
                break
            fua = (
                not self._epoch_plain
                and self._epoch_sent < SMALL_EPOCH
                and self.leg.dev.capabilities.can_fua
                and any(
                    x.kind == BARRIER
                    for x in islice(waiting, 1, SMALL_EPOCH + 1 - self._epoch_sent)
                )
            )
            self._epoch_plain = self._epoch_plain or not fua
            self._epoch_sent += 1
            waiting.popleft()
            self._send(op, IoFlags.FUA if fua else IoFlags.NONE)
        if not waiting and not self.inflight and self.flushing is None and self.issued:
            self._barrier()  # idle: flush what was sent, so the lag drains to zero
            self._again = True
            return
        self._arm_watchdog()

    def _started(self) -> Callable[[BaseException | None, Op | None], None]:
        """Book one request to the leg; the callback for its end."""
        leg = self.leg
        if not self.inflight and self.flushing is None:
            self.last_progress = time.monotonic()
        leg.inflight += 1
        leg.idle.clear()
        gen = self.gen

        def ended(exc: BaseException | None, op: Op | None) -> None:
            leg.inflight -= 1
            if leg.inflight == 0:
                leg.idle.set()
            if gen != self.gen:  # dropped meanwhile: an orphan, waited for by the resync
                leg.abandoned -= 1
                if leg.abandoned == 0:
                    self._resume()
                return
            self.last_progress = time.monotonic()
            if exc is not None:
                what = f"a queued {op.kind} at {op.offset}+{op.length}" if op else "a flush"
                self.fail(f"{what} failed: {exc}")

        return ended

    def _send(self, op: Op, fua: IoFlags) -> None:
        ended = self._started()
        self.inflight.append(op)
        self.issued.append(op)
        self._inflight_bytes += op.payload
        self._epoch_bytes += op.payload
        gen = self.gen

        def done(exc: BaseException | None) -> None:
            op.release()
            if gen == self.gen:
                self.inflight.remove(op)
                self._inflight_bytes -= op.payload
                if exc is None:
                    self.shipped_bytes += op.payload
            ended(exc, op)
            if exc is None and gen == self.gen:
                self._pump()

        dev = self.leg.dev
        if op.kind == WRITE:
            assert op.data is not None
            dev.start_write(op.offset, op.data, fua, done)
        elif op.kind == ZERO:
            run_in_task(dev.write_zeroes(op.offset, op.length, op.flags | fua), done)
        else:
            run_in_task(dev.trim(op.offset, op.length, fua), done)

    def _send_flush(self, op: Op) -> None:
        self.flushing = op
        ended = self._started()
        gen = self.gen

        def done(exc: BaseException | None) -> None:
            if gen == self.gen:
                self.flushing = None
            ended(exc, None)
            if exc is None and gen == self.gen:
                self._epoch_done(op)
                self._pump()

        dev = self.leg.dev
        run_in_task(dev.flush() if dev.capabilities.can_flush else _nothing(), done)

    def _epoch_done(self, barrier: Op) -> None:
        """Every change before ``barrier`` is on the leg and flushed: let them go."""
        al = self.host.al
        for op in self.issued:
            if op.held:
                al.end(op.offset, op.length)
                for e in al.extents(op.offset, op.length):
                    self.extents[e] -= 1
                    if self.extents[e] <= 0:
                        del self.extents[e]
        self.issued.clear()
        self.lag -= self._epoch_bytes
        self._epoch_bytes = self._epoch_sent = 0
        self._epoch_plain = False
        self.barriers += 1
        for w in barrier.waiters:
            if not w.done():
                w.set_result(None)
        self._room.set()

    # ---- a leg that answers nothing --------------------------------------------------------
    def _arm_watchdog(self) -> None:
        if self._timer is not None or not (self.inflight or self.flushing is not None):
            return
        at = self.last_progress + self.host.leg_timeout - time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(max(at, 0.01), self._watchdog)

    def _watchdog(self) -> None:
        self._timer = None
        if not self.on or not (self.inflight or self.flushing is not None):
            return
        timeout = self.host.leg_timeout
        if time.monotonic() - self.last_progress >= timeout:
            self.fail(
                f"no answer to its queued changes within --leg-timeout {timeout:g} s "
                f"(its link is {self.leg.dev.state})",
            )
            return
        self._arm_watchdog()

    # ---- status ------------------------------------------------------------------------------
    def lag_seconds(self) -> float:
        """Age of the oldest acknowledged change not yet on the leg (flushed)."""
        oldest = self.behind_since
        first = (
            self.issued[0]
            if self.issued
            else next((op for op in self.waiting if op.kind != BARRIER), None)
        )
        if first is not None:
            oldest = first.since if oldest is None else min(oldest, first.since)
        return max(0.0, time.monotonic() - oldest) if oldest is not None else 0.0

    def statistics(self) -> dict[str, Any]:
        return {
            "queued": sum(1 for op in self.waiting if op.kind != BARRIER),
            "in_flight": len(self.inflight),
            "shipped_bytes": self.shipped_bytes,
            "barriers": self.barriers,
            "pull_aheads": self.pull_aheads,
            "al_extents": len(self.extents),
            "max_lag": self.max_lag,
            "on_congestion": self.policy,
        }


async def _nothing() -> None:
    """A barrier on a leg that has no flush: waiting for the epoch's changes is all."""
