"""``mirror``: RAID1 over N legs with a dirty bitmap, an activity log and background resync.

Rules (docs/mirror.md says why):
- A write goes to every leg that is in sync or resyncing, in parallel, and is acked
  when all of them answered, or ``leg_timeout`` after the first in-sync leg answered.
  A leg degrades when a request to it *failed* (an error reply, or a transaction that
  failed after all its resends) or was not answered within that leg timeout; then its
  requests in flight are fenced (failed now, never resent, never landing after a later
  request) and its resync waits until they ended.  A short outage inside the leg
  timeout just delays writes.  The write succeeds if an in-sync leg took it.  When every
  in-sync leg failed it, the error goes to the caller and the first of them stays in
  sync (the last in-sync leg is never degraded), so the legs never disagree silently.
- While a leg is degraded, the regions written are marked in its bitmap, durably,
  before the write is acked.  While legs are in sync, the extents being written are
  recorded in the activity log before the writes are issued.
- Reads go to the in-sync leg with the fewest reads in flight.  A read that fails on
  a leg is served from another; if the failing leg answered with an error (it is
  connected) the region is rewritten on it from the good copy, as md does for bad
  sectors, and if that rewrite fails too the leg degrades; if the leg's link failed,
  it degrades at once (a rewrite would only wait out another transaction budget).
- Writes and resync/verify steps take byte-range locks, so overlapping writes are
  applied in the same order on every leg and a resync copy never overwrites new data.
- A FAST_ZERO zero is refused (ENOTSUP) before any leg is asked when a leg that takes
  writes cannot zero fast, or when every leg refused it; legs that refused while others
  zeroed zero again without it, so the legs never differ (a refusal degrades nothing).
- An asynchronous leg (``async_legs``) is never read from, never waited for and never
  counts as "the last in-sync leg": once the synchronous legs took a change, it is
  queued for it in order (``dst.layers.shipper``), FLUSH and FUA as barriers.  When it
  falls behind (congestion, a failure, its link down) its regions go to its bitmap and
  it catches up by resync, as a degraded leg does.

Code: :class:`MirrorCore` here holds start-up, the leg states (degrading, retrying,
scheduling resyncs) and shutdown; the write path (the fan-out to the legs, the leg
timeout, FAST_ZERO refusals, what a failure degrades and marks, flush) is
``dst.layers.writepath`` and the read path (the choice of reader, fail-over, rewriting a
bad region, allocation status) ``dst.layers.readpath``, mixins the core is made of.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

from dst.device import BlockDevice, Capabilities, IoCounters, Rule
from dst.errors import DstError, IoError, UsageError
from dst.layers.activity import ActivityLog
from dst.layers.bitmap import MAX_LEGS, Record
from dst.layers.linear import merge_capabilities
from dst.layers.readpath import ReadPath
from dst.layers.resync import (
    DEGRADED,
    IN_SYNC,
    RESYNCING,
    Foreground,
    Leg,
    RangeLocks,
    RateLimiter,
    Resync,
    VerifyState,
    event,
    refusal_of,
)
from dst.layers.shipper import DEFAULT_MAX_LAG, PULL_AHEAD, async_leg, check_async, drain, stop
from dst.layers.startup import LegView, plan_start, usable_size
from dst.layers.writepath import SPLIT_EXTENTS, LegTimeout, WritePath
from dst.units import format_size

log = logging.getLogger("dst.mirror")
T = TypeVar("T")

DEFAULT_GRANULARITY = 64 << 10
DEFAULT_LEG_TIMEOUT = 5.0  # seconds a write waits for a leg that has not acked it

AL_EXTENT = 4 << 20
AL_LIMIT = 512

__all__ = [
    "AL_EXTENT",
    "AL_LIMIT",
    "DEFAULT_GRANULARITY",
    "DEFAULT_LEG_TIMEOUT",
    "SPLIT_EXTENTS",
    "LegTimeout",
    "MirrorCore",
]


class MirrorCore(ReadPath, WritePath, BlockDevice):
    """RAID1 over arbitrary block devices (remote members in production): start-up, leg
    states and shutdown; the data path comes from :class:`ReadPath` and
    :class:`WritePath`.  :class:`dst.layers.stack.MirrorDevice` adds control (verify,
    detach, add, resync rate) and status."""

    kind = "mirror"

    def __init__(
        self,
        legs: Sequence[BlockDevice],
        *,
        bitmap: str | None = None,
        granularity: int = DEFAULT_GRANULARITY,
        resync_rate: int | None = None,
        al_extent: int = AL_EXTENT,
        al_limit: int = AL_LIMIT,
        assume_clean: bool = False,
        start_timeout: float = 0.0,
        leg_timeout: float = DEFAULT_LEG_TIMEOUT,
        async_legs: Sequence[BlockDevice] = (),
        async_max_lag: int = DEFAULT_MAX_LAG,
        async_on_congestion: str = PULL_AHEAD,
        name: str = "mirror",
    ) -> None:
        if not 1 <= len(legs) <= MAX_LEGS - len(async_legs):
            raise UsageError(f"a mirror needs 1 to {MAX_LEGS} legs, not {len(legs)}")
        check_async(len(async_legs), async_max_lag, async_on_congestion)
        if granularity < 512 or granularity & (granularity - 1):
            raise UsageError(
                f"invalid bitmap granularity {granularity}: give a power of two of at least 512, "
                "e.g. 64K"
            )
        if al_extent & (al_extent - 1):
            raise UsageError(f"invalid activity-log extent {al_extent}: give a power of two")
        self.name = name
        self.bitmap_path = bitmap
        self.granularity = granularity
        self.al_extent = max(al_extent, granularity)
        self.al_limit = al_limit
        self.assume_clean = assume_clean
        self.start_timeout = start_timeout
        if leg_timeout <= 0:
            raise UsageError(
                f"invalid leg timeout {leg_timeout:g} s: give a number above 0, e.g. 5"
            )
        self.leg_timeout = leg_timeout
        self.async_max_lag = async_max_lag
        self.async_on_congestion = async_on_congestion
        self.legs = [Leg(d, -1, DEGRADED) for d in legs]
        self.legs += [async_leg(self, d, -1) for d in async_legs]
        for leg in self.legs:
            leg.idle.set()
        self.size = 0
        self.capabilities = Capabilities()
        self.state = "connecting"
        self.record = Record(None, 0, granularity, self.al_extent)
        self.al = ActivityLog(self.record, al_limit)
        self.locks = RangeLocks()
        self.limiter = RateLimiter(resync_rate)
        self.verify_state: VerifyState | None = None
        self.retry_min = 5.0
        self.retry_max = 300.0
        self.counters: IoCounters = IoCounters()
        self.repairs = 0
        self.degrades = 0
        self.foreground = Foreground()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unflushed: set[int] = set()
        self._rr = 0
        self._started = False
        self._closed = False

    # ---- start-up -----------------------------------------------------------------------
    @staticmethod
    def _reachable(dev: BlockDevice) -> bool:
        return dev.state == "connected" and dev.size > 0

    async def start(self) -> None:
        """Decide from the bitmap which legs are current, then serve (degraded if need be)."""
        if self._started:
            return
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and any(
            leg.dev.state in ("connecting", "reconnecting") for leg in self.legs
        ):
            await asyncio.sleep(0.05)
        up = [leg for leg in self.legs if self._reachable(leg.dev)]
        if not up:
            states = ", ".join(f"{leg.name} {leg.dev.state}" for leg in self.legs)
            raise DstError(f"no leg of the mirror is reachable ({states}); start at least one")
        self.size = usable_size(self.name, [leg.dev for leg in up])
        self.capabilities = merge_capabilities([leg.dev.capabilities for leg in up])
        rec, why = Record.open(self.bitmap_path, self.size, self.granularity, self.al_extent)
        if why is None and not rec.leg_slots():  # its checkpoints are kept (in slots 8-15)
            why = f"the bitmap file {self.bitmap_path} records no mirror legs"
        try:
            views = [
                LegView(x.name, x.dev.identity, self._reachable(x.dev), x.asynchronous)
                for x in self.legs
            ]
            plans, _ = plan_start(
                rec,
                why,
                views,
                assume_clean=self.assume_clean,
                read_only=self.capabilities.read_only,
            )
            if self.capabilities.read_only:
                await rec.abandon()  # a read-only mirror changes nothing, the record included
            else:
                await rec.sync()
        except BaseException:
            await rec.abandon()
            raise
        if self.assume_clean and why is None:
            log.info(
                "%s: --assume-clean has no effect: the bitmap file %s already records the legs",
                self.name,
                self.bitmap_path,
            )
        elif self.assume_clean:
            log.warning(
                "%s: --assume-clean: the legs are taken as identical and not copied; "
                "`dst ctl verify` compares them",
                self.name,
            )
        self.record = rec
        self.al = ActivityLog(rec, self.al_limit)
        self.identity = rec.mirror_id if self.bitmap_path else None
        for leg, plan in zip(self.legs, plans, strict=True):
            leg.slot = plan.slot
            leg.status = IN_SYNC if plan.in_sync else DEGRADED
            leg.reason = plan.reason
            leg.check_identity = plan.check_identity
            if leg.shipper is not None and plan.in_sync:
                leg.shipper.start(caught_up=True)
            leg.dev.subscribe(self._leg_state)
        self._started = True
        self._update_state()
        log.info(
            "%s: %d legs, %s in sync, %s (%d bytes), bitmap %s, granularity %s",
            self.name,
            len(self.legs),
            ", ".join(x.name for x in self.in_sync_legs()),
            format_size(self.size),
            self.size,
            self.bitmap_path or "in memory only",
            format_size(self.granularity),
        )
        for leg in self.legs:
            if leg.status == DEGRADED:
                self._try_resync(leg)

    # ---- leg states ----------------------------------------------------------------------
    def in_sync_legs(self) -> list[Leg]:
        """The synchronous legs in sync: the ones read from and copied from."""
        return [x for x in self.legs if x.status == IN_SYNC and not x.asynchronous]

    def _update_state(self) -> None:
        if not self._started:
            return
        self.set_state(self._sync_name() if self._sync_name() != "in-sync" else "connected")

    def _sync_name(self) -> str:
        statuses = [x.status for x in self.legs]
        if not self.in_sync_legs():
            return "failed"
        if RESYNCING in statuses:
            return "resyncing"
        if DEGRADED in statuses:
            return "degraded"
        return "in-sync"

    def _leg_state(self, dev: BlockDevice, state: str) -> None:
        leg = next((x for x in self.legs if x.dev is dev), None)
        if leg is None or self._closed:
            return
        if state == "connected" and leg.status == DEGRADED:
            leg.retry_delay = 0.0
            self._try_resync(leg)
        elif leg.shipper is not None and state != "connected" and leg.status != DEGRADED:
            leg.shipper.fail(f"its link is {state}")
        elif (
            state == "failed"
            and leg.status != DEGRADED
            and self.degrade(leg, f"{leg.name} failed (refused on reconnect)")
        ):
            self._spawn(self._sync_quietly())
        self._update_state()

    def degrade(self, leg: Leg, why: str) -> bool:
        """Stop sending writes to ``leg``; record that it is behind.  The caller makes the
        record durable before acking anything that depends on it.  The last in-sync leg
        is never degraded: its errors go to the caller instead."""
        if leg.status == DEGRADED or leg.removed:
            return leg.status == DEGRADED
        if leg.status == IN_SYNC:
            if not leg.asynchronous and not [x for x in self.in_sync_legs() if x is not leg]:
                log.error("%s: %s; it is the last in-sync leg, so it stays in use", leg.name, why)
                return False
            rec = self.record
            rec.generation += 1
            for x in self.legs:
                if x.status == IN_SYNC and x is not leg:
                    slot = rec.slots[x.slot]
                    if slot is not None:
                        slot.generation = rec.generation
            rec.mark_meta()
        leg.status = DEGRADED
        leg.reason = why
        if leg.shipper is not None:
            leg.shipper.drop()  # its queued regions go to its bitmap
        self.degrades += 1
        r = leg.resync
        if r is not None and r.task is not None and r.task is not asyncio.current_task():
            r.task.cancel()
        others = ", ".join(x.name for x in self.in_sync_legs())
        log.warning(
            "%s: degraded: %s; writes go on to %s and the regions they change are recorded "
            "for its resync",
            leg.name,
            why,
            others,
        )
        event("degraded", leg=leg.name, why=why)
        self._schedule_retry(leg)  # an asynchronous leg that fell behind: retried later
        self._update_state()
        return True

    def _schedule_retry(self, leg: Leg) -> None:
        """A degraded leg that is still connected (it answered with errors) is retried with
        back-off; one whose link is down is retried when it reports ``connected``."""
        if self._closed or leg.removed or leg.dev.state != "connected":
            return
        if leg.retry is not None:
            leg.retry.cancel()
        leg.retry_delay = min(self.retry_max, max(self.retry_min, leg.retry_delay * 2))
        leg.retry = asyncio.get_running_loop().call_later(leg.retry_delay, self._retry_now, leg)

    def _retry_now(self, leg: Leg) -> None:
        leg.retry = None
        self._try_resync(leg)

    def _try_resync(self, leg: Leg) -> None:
        if self._closed or not self._started or leg.removed or leg.status != DEGRADED:
            return
        if leg.resync is not None or self.capabilities.read_only or leg.abandoned:
            return  # (a request given up on it is still running: it could land after a copy)
        if not self._reachable(leg.dev) or not self.in_sync_legs():
            return
        refusal = refusal_of(leg.dev, self.capabilities, self.size)
        if refusal != leg.refused:
            leg.refused = refusal
            if refusal:
                log.error("%s: cannot rejoin the mirror: %s", leg.name, refusal)
        if refusal:
            self._update_state()
            return
        if leg.retry is not None:
            leg.retry.cancel()
            leg.retry = None
        rec = self.record
        slot = rec.slots[leg.slot]
        bm = rec.bitmaps[leg.slot]
        assert slot is not None and bm is not None
        why = leg.reason or "it was degraded"
        cur, known = leg.dev.identity, slot.identity
        if leg.check_identity or (cur is not None and known is not None and cur != known):
            leg.check_identity = False
            if cur is None or known is None or cur != known:
                reason = (
                    f"its identity changed from {known} to {cur}: a blank or replaced store"
                    if cur is not None and known is not None
                    else "its identity is unknown, so nothing proves it holds what the bitmap records"
                )
                log.warning("%s: full resync: %s", leg.name, reason)
                bm.fill()
                slot.full, slot.generation, slot.identity = True, 0, cur
                rec.mark_meta()
                why = f"full resync: {reason}"
        leg.status = RESYNCING
        if leg.shipper is not None:
            leg.shipper.start()  # writes stream to it while its copies are queued too
        r = Resync(self, leg, why)
        leg.resync = r
        r.task = self._spawn(self._resync_task(leg, r))
        event("resync-start", leg=leg.name, why=why, bytes=r.progress.total)
        self._update_state()

    async def _resync_task(self, leg: Leg, r: Resync) -> bool:
        done = False
        try:
            await self.record.sync()  # a full-resync mark must be durable before the copy
            done = await r.run() and await self._resync_finished(leg, r)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            r.error = f"{type(exc).__name__}: {exc}"
            log.exception("%s: resync failed", leg.name)
        finally:
            if leg.resync is r:
                leg.resync = None
            if leg.status == RESYNCING:
                leg.status = DEGRADED
            if not done and not self._closed and not leg.removed:
                log.warning(
                    "%s: resync stopped at %s: %s",
                    leg.name,
                    r.progress.line(),
                    r.error or leg.reason,
                )
                if leg.status == DEGRADED and r.error:
                    self._schedule_retry(leg)
            self._update_state()
        return done

    async def _resync_finished(self, leg: Leg, r: Resync) -> bool:
        rec = self.record
        bm = rec.bitmaps[leg.slot]
        slot = rec.slots[leg.slot]
        if leg.status != RESYNCING or bm is None or slot is None or bm.next_set(0) is not None:
            return False
        leg.status = IN_SYNC
        leg.reason = ""
        leg.retry_delay = 0.0
        if leg.shipper is not None:
            leg.shipper.caught_up()  # its last commit flushed everything: consistent
        slot.generation, slot.full = rec.generation, False
        if leg.dev.identity is not None:
            slot.identity = leg.dev.identity
        rec.mark_meta()
        self._update_state()
        p = r.progress.as_dict()
        log.info(
            "%s: resync finished: %s copied, %s zeroed in %.1f s; %s",
            leg.name,
            format_size(p["bytes_done"] - p["bytes_zeroed"]),
            format_size(p["bytes_zeroed"]),
            p["seconds"],
            "caught up (asynchronous, consistent)" if leg.asynchronous else "in sync",
        )
        event(
            "resync-done",
            leg=leg.name,
            bytes=p["bytes_done"],
            zeroed=p["bytes_zeroed"],
            seconds=p["seconds"],
        )
        try:
            await rec.sync(force=True)
        except IoError as e:
            log.error("%s: %s", self.name, e)
        return True

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _sync_quietly(self) -> None:
        try:
            await self.record.sync()
        except IoError as e:
            log.error("%s: %s", self.name, e)

    # ---- helpers for the data path ---------------------------------------------------------
    def _running(self, op: str) -> None:
        if self._closed or not self._started:
            self.counters.errors += 1
            raise IoError(errno.EIO, f"{self.name}: {op} on a mirror that is not running")

    def check(self, rule: Rule, offset: int, length: int, *, split: bool = False) -> None:
        """A mirror that is not running refuses everything (EIO); then the one check."""
        self._running(rule.op)
        super().check(rule, offset, length, split=split)

    async def _on_leg(self, leg: Leg, aw: Awaitable[None]) -> None:
        leg.inflight += 1
        leg.idle.clear()
        try:
            await aw
        finally:
            leg.inflight -= 1
            if leg.inflight == 0:
                leg.idle.set()

    def _errors(self, op: str, results: list[tuple[Leg, BaseException]]) -> str:
        return "; ".join(f"{leg.name}: {e}" for leg, e in results) or op

    # ---- shutdown ------------------------------------------------------------------------------
    async def _stop_tasks(self, everything: bool) -> None:
        for leg in self.legs:
            if leg.retry is not None:
                leg.retry.cancel()
                leg.retry = None
            if leg.resync is not None and leg.resync.task is not None:
                leg.resync.task.cancel()
        if everything:
            for t in self._tasks:
                t.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Finish in-flight requests, record a clean stop (empty activity log), close legs."""
        if self._closed:
            return
        self._closed = True
        await drain(self)  # what the asynchronous legs still lack, or their bitmaps have it
        await self._stop_tasks(everything=False)
        try:
            await self.record.close()
        except (DstError, OSError) as e:
            log.error("%s: could not record a clean stop: %s", self.name, e)
        results = await asyncio.gather(*(x.dev.aclose() for x in self.legs), return_exceptions=True)
        for leg, r in zip(self.legs, results, strict=True):
            if isinstance(r, Exception):
                log.warning("%s: closing it failed: %s", leg.name, r)

    async def abandon(self) -> None:
        """Stop at once, as a crash of the client node would: nothing more reaches the legs
        or the bitmap file, which is left as it stands.  The legs stay open."""
        self._closed = True
        stop(self)
        await self._stop_tasks(everything=True)
        await self.record.abandon()
