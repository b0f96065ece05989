"""Background copying and comparing for the mirror: resync of a leg, verify of the legs.

Both work region by region under a byte-range lock that foreground writes also
take, so a write to a region being copied waits for the copy (or the copy for the
write) and the copy never puts old data over new.  Both are rate-limited and give
way to foreground I/O: between steps they wait (briefly) for the foreground to
go idle, so an unlimited resync still leaves the device responsive.

A resync is sparse: under the region's lock it asks an in-sync leg which ranges read as
zeroes and zeroes them on the target instead of reading and writing them
(:func:`plan_copy` says which), so a sparse device stays sparse on the leg it is copied to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dst import trace
from dst.device import BlockDevice, Capabilities, Extent, ExtentFlags
from dst.errors import IoError
from dst.layers.bitmap import Record
from dst.layers.dirtybits import Bitmap
from dst.units import format_duration, format_rate, format_size

if TYPE_CHECKING:
    from dst.layers.shipper import Shipper

log = logging.getLogger("dst.mirror")


def event(what: str, **fields: Any) -> None:
    """A ``--debug=mirror`` JSON line (cheap when off)."""
    if trace.on.mirror:
        trace.emit("mirror", what, **fields)


IN_SYNC, DEGRADED, RESYNCING = "in-sync", "degraded", "resyncing"
BATCH = 1 << 20  # bytes copied per step (whole regions, so at least one)
FLUSH_BYTES = 64 << 20  # flush the target and clear bits at least this often ...
FLUSH_SECONDS = 1.0  # ... or this often
LOG_SECONDS = 5.0
ZERO_MIN = 64 << 10  # a range reading as zeroes shorter than this is copied as data
ZERO_BATCH = 64 << 20  # bytes a step may cover when the source reads them as zeroes
#: A dirty run shorter than this is read, not asked about: on a dense store the question
#: costs more than the read (SEEK_HOLE on tmpfs walks the pages to the next hole, about
#: 5 ms in a 1 GiB file, against 0.3 ms to copy 64 KiB), and zeroes read are zeroed on
#: the target all the same (:meth:`Resync._copy`).
ASK_MIN = 1 << 20
MAX_REPORTED_REGIONS = 1000


@dataclass(eq=False)
class Leg:
    """One mirror leg: the device, its slot in the record and its sync status."""

    dev: BlockDevice
    slot: int
    _status: str  # IN_SYNC, DEGRADED or RESYNCING: read and set as ``status``
    reason: str = ""
    refused: str = ""  # why it cannot join (too small, read-only, ...): shown as failed
    check_identity: bool = False  # compare with the record when it first connects
    inflight: int = 0
    reading: int = 0
    abandoned: int = 0  # requests the mirror stopped waiting for that have not ended yet
    removed: bool = False
    retry_delay: float = 0.0
    retry: asyncio.TimerHandle | None = None
    resync: Resync | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    asynchronous: bool = False  # gets the changes in the background (dst.layers.shipper)
    shipper: Shipper | None = None  # set for an asynchronous leg
    status_since: float = field(default_factory=time.time)  # Unix time of the last change

    @property
    def status(self) -> str:
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        """Note when the status changes, so status can say since when a leg is degraded."""
        if value != self._status:
            self._status = value
            self.status_since = time.time()

    @property
    def name(self) -> str:
        return self.dev.name


def refusal_of(dev: BlockDevice, mirror: Capabilities, size: int) -> str:
    """Why a device that (re)connects cannot be a leg of this mirror, or ''."""
    c = dev.capabilities
    if dev.size < size:
        return (
            f"it has {dev.size} bytes, fewer than the mirror's {size}; give it an "
            "export at least that large"
        )
    lacks = [
        what
        for what, need, has in (
            ("read-write access", not mirror.read_only, not c.read_only),
            ("trim", mirror.can_trim, c.can_trim),
            ("flush", mirror.can_flush, c.can_flush),
            ("FUA", mirror.can_fua, c.can_fua),
            ("zeroing", mirror.can_zero, c.can_zero),
        )
        if need and not has
    ]
    if c.min_block > mirror.min_block:
        lacks.append(f"a block size of {mirror.min_block}")
    if c.max_request < mirror.max_request:
        lacks.append(f"requests of {mirror.max_request} bytes")
    return f"it lacks {', '.join(lacks)}, which the mirror offers" if lacks else ""


class RangeLocks:
    """Exclusive byte-range locks, granted first come first served among overlapping ones."""

    def __init__(self) -> None:
        self._entries: list[tuple[int, int, asyncio.Future[None]]] = []

    @contextlib.asynccontextmanager
    async def lock(self, start: int, end: int) -> AsyncIterator[None]:
        ahead = [f for s, e, f in self._entries if s < end and start < e]
        me = (start, end, asyncio.get_running_loop().create_future())
        self._entries.append(me)
        try:
            for f in ahead:
                if not f.done():
                    await asyncio.shield(f)
            yield
        finally:
            self._entries.remove(me)
            me[2].set_result(None)

    def __len__(self) -> int:
        return len(self._entries)


class Foreground:
    """Foreground requests in flight, so that background copying can give way to them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.count += 1
        self._idle.clear()

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait(self) -> None:
        """Wait for the foreground to go idle, but never more than a moment (50 ms), so
        that a busy device still makes background progress."""
        if not self.count:
            await asyncio.sleep(0)
            return
        try:
            async with asyncio.timeout(0.05):
                await self._idle.wait()
        except TimeoutError:
            pass


class RateLimiter:
    """Bytes per second, or unlimited with ``rate`` None; a new rate applies at once, also
    to a caller already waiting."""

    def __init__(self, rate: int | None) -> None:
        self._rate = rate or None
        self._credit = 0.0
        self._last = time.monotonic()
        self._changed = asyncio.Event()

    @property
    def rate(self) -> int | None:
        return self._rate

    @rate.setter
    def rate(self, value: int | None) -> None:
        self._rate = value or None
        self._credit = max(self._credit, 0.0)
        self._last = time.monotonic()
        self._changed.set()

    def step(self, most: int, unit: int) -> int:
        """How much to move at once: at most a tenth of a second's worth, whole units."""
        if not self._rate:
            return most
        return max(unit, min(most, self._rate // 10 // unit * unit))

    def give_back(self, n: int) -> None:
        """Return credit taken for bytes that were not moved after all (a resync step that
        zeroed them), so the next step goes at once; negative for a step that moved a
        little more than it took."""
        if self._rate:
            self._credit += n

    async def take(self, n: int) -> None:
        while self._rate:
            rate = self._rate
            now = time.monotonic()
            self._credit = min(self._credit + (now - self._last) * rate, max(rate * 0.25, n))
            self._last = now
            if self._credit >= n:
                self._credit -= n
                return
            self._changed.clear()
            try:
                async with asyncio.timeout((n - self._credit) / rate):
                    await self._changed.wait()
            except TimeoutError:
                pass


class Progress:
    """Bytes done of a total, with a rate over the last few seconds and the time left.

    ``zeroed`` is the part of ``done`` that a resync made zero on the target without
    reading it (the source read zeroes there); the rest was copied."""

    WINDOW = 10.0

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.zeroed = 0
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])

    def add(self, n: int, zeroed: int = 0) -> None:
        self.done += n
        self.zeroed += zeroed
        now = time.monotonic()
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.WINDOW:
            self._samples.popleft()

    @property
    def rate(self) -> float:
        t0, d0 = self._samples[0]
        dt = time.monotonic() - t0
        return (self.done - d0) / dt if dt > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        total = max(self.total, self.done)
        rate = self.rate
        left = total - self.done
        return {
            "percent": round(100.0 * self.done / total, 1) if total else 100.0,
            "rate": round(rate, 1),
            "eta": round(left / rate, 1) if rate > 0 else None,
            "bytes_done": self.done,
            "bytes_zeroed": self.zeroed,
            "bytes_total": total,
            "seconds": round(time.monotonic() - self.started, 3),
        }

    def line(self) -> str:
        d = self.as_dict()
        eta = f"{format_duration(d['eta'])} left" if d["eta"] is not None else "time left unknown"
        return (
            f"{d['percent']:.1f}% ({format_size(self.done)} of {format_size(d['bytes_total'])}), "
            f"{format_rate(d['rate'])}, {eta}"
        )


class Host(Protocol):
    """What the mirror offers to its resync and verify."""

    record: Record
    size: int
    capabilities: Capabilities
    locks: RangeLocks
    limiter: RateLimiter
    foreground: Foreground
    verify_state: VerifyState | None

    async def read_source(self, offset: int, view: memoryview, target: Leg) -> None: ...

    async def source_extents(self, offset: int, length: int) -> list[Extent]: ...

    def degrade(self, leg: Leg, why: str) -> bool: ...

    def in_sync_legs(self) -> list[Leg]: ...


def dirty_bytes(record: Record, slot: int) -> int:
    bm = record.bitmaps[slot]
    if bm is None:
        return 0
    n = bm.count() * record.granularity
    if bm.nbits and bm.test(bm.nbits - 1):
        n -= bm.nbits * record.granularity - record.size
    return n


def plan_copy(
    offset: int, length: int, extents: Sequence[Extent], block: int
) -> list[tuple[int, int, bool]]:
    """Split a region to resync into ``(offset, length, zero)`` runs: zero where the
    source reads zeroes, copy the rest.

    A run is zeroed where the extents have the ZERO bit, rounded inward to ``block`` (the
    mirror's request unit) and if at least ZERO_MIN long: shorter ones cost less to read
    with their neighbours than as requests of their own.  Everything else is copied: data,
    a HOLE without ZERO (unallocated but reading something else, e.g. a backing image
    below), and whatever the extents do not cover (the source could not say)."""
    zeros: list[tuple[int, int]] = []  # runs with the ZERO bit, touching ones joined
    end = offset + length
    for e in extents:
        s, t = max(e.offset, offset), min(e.end, end)
        if t <= s or not e.flags & ExtentFlags.ZERO:
            continue
        if zeros and zeros[-1][1] == s:
            zeros[-1] = (zeros[-1][0], t)
        else:
            zeros.append((s, t))
    out: list[tuple[int, int, bool]] = []
    pos = offset
    for s, t in zeros:
        s, t = -(-s // block) * block, t // block * block
        if s < pos or t - s < ZERO_MIN:
            continue
        if s > pos:
            out.append((pos, s - pos, False))
        out.append((s, t - s, True))
        pos = t
    if pos < end:
        out.append((pos, end - pos, False))
    return out


def within(
    plan: list[tuple[int, int, bool]], budget: int, unit: int, *, zero_costs: bool
) -> list[tuple[int, int, bool]]:
    """The start of ``plan`` whose payload (copies; zeroes too when ``zero_costs``, for a
    target that is sent zero buffers) fits ``budget``: the run that passes it is cut at the
    next multiple of ``unit`` (counted from the plan's start, a region boundary), and
    nothing after it is kept.  At least one unit (or the whole plan) is kept."""
    out: list[tuple[int, int, bool]] = []
    start, cost = plan[0][0], 0
    for o, k, zero in plan:
        c = k if zero_costs or not zero else 0
        if cost + c <= budget:
            out.append((o, k, zero))
            cost += c
            continue
        cut = start + -(-(o + max(budget - cost, 0) - start) // unit) * unit
        if cut > o:
            out.append((o, min(cut, o + k) - o, zero))
        break
    return out


class Resync:
    """Copy one leg's dirty regions from in-sync legs; ``run`` says whether it got to the end."""

    def __init__(self, host: Host, leg: Leg, why: str) -> None:
        self.host = host
        self.leg = leg
        self.why = why
        self.progress = Progress(dirty_bytes(host.record, leg.slot))
        self.task: asyncio.Task[bool] | None = None
        self.error = ""
        self.extents_failed = 0  # source extents queries that failed (logged once)
        self.data = (0, 0)  # a range after the last step that the source said is data

    async def run(self) -> bool:
        host, leg, rec = self.host, self.leg, self.host.record
        bm = rec.bitmaps[leg.slot]
        if bm is None:
            return False
        g = rec.granularity
        log.info(
            "%s: resync started (%s): %s to copy from %s%s",
            leg.name,
            self.why,
            format_size(self.progress.total),
            ", ".join(x.name for x in host.in_sync_legs()),
            f" at up to {format_rate(host.limiter.rate)}" if host.limiter.rate else "",
        )
        cursor = 0
        pending: list[tuple[int, int]] = []
        pending_bytes = 0
        last_flush = last_log = time.monotonic()
        while True:
            first = bm.next_set(cursor)
            if first is None:
                if pending and not await self._commit(pending):
                    return False
                pending, pending_bytes = [], 0
                if bm.next_set(0) is None:
                    return True
                cursor = 0
                continue
            budget = host.limiter.step(BATCH, g)  # payload per step
            # a step goes further where the source reads zeroes, unless the target gets
            # zero buffers, or a queue (an asynchronous leg's copies are queued, not waited)
            wide = leg.dev.capabilities.can_zero and leg.shipper is None
            span = ZERO_BATCH if wide else budget
            end = bm.run_end(first, first + span // g)
            off = first * g
            span = min(end * g, host.size) - off
            await host.foreground.wait()
            await host.limiter.take(min(budget, span))
            done = await self._copy(off, span, budget)
            if done is None:
                return False
            n, sent, zeroed = done
            host.limiter.give_back(min(budget, span) - sent)  # the rate is of payload
            cursor = first + -(-n // g)
            pending.append((first, cursor))
            pending_bytes += n
            self.progress.add(n, zeroed)
            now = time.monotonic()
            if pending_bytes >= FLUSH_BYTES or now - last_flush >= FLUSH_SECONDS:
                if not await self._commit(pending):
                    return False
                pending, pending_bytes, last_flush = [], 0, now
            if now - last_log >= LOG_SECONDS:
                log.info("%s: resync %s", leg.name, self.progress.line())
                last_log = now

    async def _copy(self, offset: int, span: int, budget: int) -> tuple[int, int, int] | None:
        """Bring the target up to date from ``offset``, as far as ``span`` and ``budget``
        bytes of payload go: zero what the source reads as zeroes, read and write the rest
        (:meth:`_plan`).  Returns the bytes done, of them those with a payload (read, or
        zero buffers sent) and those zeroed without being read; or None when the step
        failed (``error`` or the leg's reason says why).

        The step is planned twice.  A first look, without the lock, only sizes it, so the
        lock covers what the step does (a step of data locks a budget's worth, not the
        span).  Only a plan that zeroes something is asked again under the lock: a write
        can turn a hole into data until then, and zeroing from the older answer would
        destroy it on the target; copying is right whatever the answer was.

        A range the source reads as zeroes is always zeroed, never skipped, even on a leg
        added blank: nothing proves a target holds zeroes there (a reused file, an old disk
        may hold anything), asking it would cost one more query per step, and zeroing a
        range that already is a hole costs about as much as that query (no payload, a
        punch of a hole is metadata only).  So the target needs no trust at all."""
        host, leg = self.host, self.leg
        sink = leg.shipper
        if sink is not None:
            try:
                await sink.room(min(span, budget))
            except IoError:
                return None  # it fell behind again: the reason is its own
        can_zero = leg.dev.capabilities.can_zero
        sent = zeroed = 0
        plan = await self._plan(offset, span, budget)
        end = plan[-1][0] + plan[-1][1]
        async with host.locks.lock(offset, end):
            if leg.status != RESYNCING:
                return None
            if any(zero for _, _, zero in plan):
                plan = await self._plan(offset, end - offset, budget)
            for o, k, zero in plan:
                data: bytearray | None = None
                if zero:
                    zeroed += k
                    if not can_zero:
                        data = bytearray(k)  # a target that cannot zero gets zero buffers
                else:
                    data = bytearray(k)
                    try:
                        await host.read_source(o, memoryview(data), leg)
                    except IoError as e:
                        self.error = f"cannot read [{o}, +{k}) from any in-sync leg: {e}"
                        return None
                    sent += k
                    if can_zero and data == bytes(k):
                        data = None
                if zero and data is not None:
                    sent += k
                if not await self._put(o, k, data):
                    return None
        last = plan[-1]
        return last[0] + last[1] - offset, sent, zeroed

    async def _plan(self, offset: int, span: int, budget: int) -> list[tuple[int, int, bool]]:
        """What a step from ``offset`` zeroes and copies (:func:`plan_copy`, :func:`within`).

        Where the source last said data, the step copies without asking again: copying is
        right whatever changed since, and asking costs what the source's store makes it
        (SEEK_HOLE on tmpfs walks the pages up to the next hole). A run shorter than
        ``ASK_MIN`` is copied without asking at all."""
        host, g = self.host, self.host.record.granularity
        zero_costs = not self.leg.dev.capabilities.can_zero
        if self.data[0] <= offset < self.data[1]:
            known = [(offset, min(span, self.data[1] - offset), False)]
            return within(known, budget, g, zero_costs=zero_costs)
        if span < ASK_MIN:
            return within([(offset, span, False)], budget, g, zero_costs=zero_costs)
        ranges = await self._source_map(offset, span, budget)
        plan = plan_copy(offset, span, ranges, host.capabilities.min_block)
        plan = within(plan, budget, g, zero_costs=zero_costs)
        known_to = end = plan[-1][0] + plan[-1][1]
        for e in ranges:  # the data the next step starts in, up to the next zeroes
            if e.end <= known_to:
                continue
            if e.offset > known_to or e.flags & ExtentFlags.ZERO:
                break
            known_to = e.end
        if known_to > end:
            self.data = (end, known_to)
        return plan

    async def _source_map(self, offset: int, n: int, budget: int) -> list[Extent]:
        """What an in-sync leg says of the region, as far as ``budget`` bytes of data (a step
        copies no more); where it cannot say, the region is copied."""
        out: list[Extent] = []
        pos, end, data = offset, offset + n, 0
        while pos < end and data < budget:  # every answer covers a byte or more (checked)
            try:
                got = await self.host.source_extents(pos, end - pos)
            except IoError as e:
                if not self.extents_failed:
                    log.warning(
                        "%s: resync: no in-sync leg says which ranges read as zeroes (%s); "
                        "copying them as data instead (correct, but the leg is not kept "
                        "sparse); check the in-sync legs' links",
                        self.leg.name,
                        e,
                    )
                self.extents_failed += 1
                break
            if not got:
                break
            out.extend(got)
            pos = got[-1].end
            data += sum(e.length for e in got if not e.flags & ExtentFlags.ZERO)
        return out

    async def _put(self, offset: int, n: int, data: bytearray | None) -> bool:
        """Write ``data`` to the target, or zero the range (``data`` None), holes allowed.
        An asynchronous leg gets it queued, under the caller's lock: in order with writes."""
        leg = self.leg
        if leg.shipper is not None:
            return leg.shipper.copy(
                offset, data if data is not None else bytearray(n), data is None
            )
        try:
            if data is None:
                await leg.dev.write_zeroes(offset, n)
            else:
                await leg.dev.write(offset, data)
        except IoError as e:
            what = "write" if data is not None else "zeroing"
            self.host.degrade(leg, f"a resync {what} at {offset}+{n} failed: {e}")
            return False
        return True

    async def _commit(self, pending: list[tuple[int, int]]) -> bool:
        """Flush the target, then clear the bits of what was copied (persisted lazily)."""
        leg = self.leg
        try:
            if leg.shipper is not None:
                await leg.shipper.commit()
            elif leg.dev.capabilities.can_flush:
                await leg.dev.flush()
        except IoError as e:
            self.host.degrade(leg, f"a flush during resync failed: {e}")
            return False
        bm = self.host.record.bitmaps[leg.slot]
        if leg.status != RESYNCING or bm is None:
            return False  # it degraded meanwhile: its bits may have been set again
        for first, end in pending:
            bm.clear(first, end)
        return True


@dataclass
class VerifyState:
    progress: Progress
    rate: int | None


async def verify(
    host: Host, rate: int | None, window: int = 1 << 20
) -> tuple[dict[str, Any], dict[Leg, Bitmap]]:
    """Compare the in-sync legs region by region by checksum; report where they differ.

    The report lists at most MAX_REPORTED_REGIONS regions; the second value holds every
    differing region of every leg that differs from the first (the reference), for repair.
    """
    g = host.record.granularity
    window = max(g, window // g * g)
    legs = host.in_sync_legs()
    started = time.monotonic()
    report: dict[str, Any] = {
        "legs": [x.name for x in legs],
        "size": host.size,
        "bytes_checked": 0,
        "granularity": g,
        "regions": [],
        "regions_truncated": False,
        "differing_bytes": 0,
        "errors": [],
    }
    found: dict[Leg, Bitmap] = {}
    if len(legs) < 2:
        report["note"] = "fewer than two in-sync legs: nothing to compare"
        return report, found
    limiter = RateLimiter(rate)
    progress = Progress(host.size)
    host.verify_state = VerifyState(progress, rate)
    regions: list[dict[str, Any]] = report["regions"]
    try:
        for off in range(0, host.size, window):
            n = min(window, host.size - off)
            await host.foreground.wait()
            await limiter.take(n)
            async with host.locks.lock(off, off + n):
                cur = [x for x in legs if x.status == IN_SYNC and not x.removed]
                bufs = [bytearray(n) for _ in cur]
                results = await asyncio.gather(
                    *(x.dev.read_into(off, memoryview(b)) for x, b in zip(cur, bufs, strict=True)),
                    return_exceptions=True,
                )
            ok = []
            for x, b, r in zip(cur, bufs, results, strict=True):
                if isinstance(r, BaseException):
                    report["errors"].append(f"{x.name}: read at {off}+{n}: {r}")
                else:
                    ok.append((x, b))
            progress.add(n)
            report["bytes_checked"] += n
            if len(ok) < 2:
                continue
            sums = {hashlib.blake2b(b, digest_size=16).digest() for _, b in ok}
            if len(sums) == 1:
                continue
            _, ref = ok[0]
            for sub in range(0, n, g):
                m = min(g, n - sub)
                bad = [x for x, b in ok[1:] if b[sub : sub + m] != ref[sub : sub + m]]
                if not bad:
                    continue
                for x in bad:
                    found.setdefault(x, Bitmap(host.record.nbits)).set(
                        *host.record.bits_for(off + sub, m)
                    )
                diff = sorted(x.name for x in bad)
                report["differing_bytes"] += m
                last = regions[-1] if regions else None
                if last and last["offset"] + last["length"] == off + sub and last["legs"] == diff:
                    last["length"] += m
                elif len(regions) < MAX_REPORTED_REGIONS:
                    regions.append({"offset": off + sub, "length": m, "legs": diff})
                else:
                    report["regions_truncated"] = True
    finally:
        host.verify_state = None
    report["reference"] = legs[0].name
    report["seconds"] = round(time.monotonic() - started, 3)
    return report, found
