"""Background copying and comparing for the mirror: resync of a leg, verify of the legs.

Both work region by region under a byte-range lock that foreground writes also
take, so a write to a region being copied waits for the copy (or the copy for the
write) and the copy never puts old data over new.  Both are rate-limited and give
way to foreground I/O: between steps they wait (briefly) for the foreground to
go idle, so an unlimited resync still leaves the device responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dst import trace
from dst.device import BlockDevice, Capabilities
from dst.errors import DstError, IoError
from dst.layers.bitmap import MAX_LEGS, Record, Slot
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
    """Bytes done of a total, with a rate over the last few seconds and the time left."""

    WINDOW = 10.0

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])

    def add(self, n: int) -> None:
        self.done += n
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
    locks: RangeLocks
    limiter: RateLimiter
    foreground: Foreground
    verify_state: VerifyState | None

    async def read_source(self, offset: int, view: memoryview, target: Leg) -> None: ...

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


class Resync:
    """Copy one leg's dirty regions from in-sync legs; ``run`` says whether it got to the end."""

    def __init__(self, host: Host, leg: Leg, why: str) -> None:
        self.host = host
        self.leg = leg
        self.why = why
        self.progress = Progress(dirty_bytes(host.record, leg.slot))
        self.task: asyncio.Task[bool] | None = None
        self.error = ""

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
            end = bm.run_end(first, first + host.limiter.step(BATCH, g) // g)
            cursor = end
            off = first * g
            n = min(end * g, host.size) - off
            await host.foreground.wait()
            await host.limiter.take(n)
            if not await self._copy(off, n):
                return False
            pending.append((first, end))
            pending_bytes += n
            self.progress.add(n)
            now = time.monotonic()
            if pending_bytes >= FLUSH_BYTES or now - last_flush >= FLUSH_SECONDS:
                if not await self._commit(pending):
                    return False
                pending, pending_bytes, last_flush = [], 0, now
            if now - last_log >= LOG_SECONDS:
                log.info("%s: resync %s", leg.name, self.progress.line())
                last_log = now

    async def _copy(self, offset: int, n: int) -> bool:
        host, leg = self.host, self.leg
        sink = leg.shipper
        if sink is not None:
            try:
                await sink.room(n)
            except IoError:
                return False  # it fell behind again: the reason is its own
        buf = bytearray(n)
        async with host.locks.lock(offset, offset + n):
            if leg.status != RESYNCING:
                return False
            try:
                await host.read_source(offset, memoryview(buf), leg)
            except IoError as e:
                self.error = f"cannot read [{offset}, +{n}) from any in-sync leg: {e}"
                return False
            if sink is not None:  # queued under the lock: in order with the writes
                return sink.copy(offset, buf, buf == bytes(n) and leg.dev.capabilities.can_zero)
            try:
                if buf == bytes(n) and leg.dev.capabilities.can_zero:
                    await leg.dev.write_zeroes(offset, n)
                else:
                    await leg.dev.write(offset, buf)
            except IoError as e:
                host.degrade(leg, f"a resync write at {offset}+{n} failed: {e}")
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


# ---------------------------------------------------------------- start-up


def usable_size(name: str, up: list[BlockDevice]) -> int:
    """The mirror's size from the reachable legs (the smallest, said so when they differ);
    refuse the same store given twice."""
    by_identity: dict[uuid.UUID, BlockDevice] = {}
    for dev in up:
        if dev.identity is None:
            continue
        other = by_identity.setdefault(dev.identity, dev)
        if other is not dev:
            raise DstError(
                f"{other.name} and {dev.name} are the same store (identity {dev.identity}); "
                "give each leg of a mirror its own export"
            )
    size = min(dev.size for dev in up)
    if any(dev.size != size for dev in up):
        log.warning(
            "%s: legs differ in size; the mirror uses the smallest, %s (%d bytes) of %s; "
            "unused: %s",
            name,
            format_size(size),
            size,
            next(dev.name for dev in up if dev.size == size),
            ", ".join(f"{format_size(d.size - size)} on {d.name}" for d in up if d.size > size),
        )
    return size


@dataclass
class LegView:
    """What start-up knows about a leg."""

    name: str
    identity: uuid.UUID | None
    reachable: bool
    asynchronous: bool = False  # never the source while a synchronous leg is current


@dataclass
class LegPlan:
    """What start-up decided for a leg."""

    slot: int
    in_sync: bool = False
    full: str = ""  # why it needs a full resync
    check_identity: bool = False  # unreachable now: compare identities when it connects
    reason: str = ""


def _name64(name: str) -> str:
    return name.encode("utf-8")[:64].decode("utf-8", "ignore")


def _match_slots(rec: Record, legs: list[LegView]) -> list[int | None]:
    """Legs to recorded slots: by identity first (it survives a new address), then by name."""
    slot_of: list[int | None] = [None] * len(legs)
    taken: set[int] = set()
    for by_identity in (True, False):
        for k, leg in enumerate(legs):
            if slot_of[k] is not None or (by_identity and leg.identity is None):
                continue
            for i, s in enumerate(rec.slots):
                if s is None or s.checkpoint or i in taken:
                    continue
                if (s.identity == leg.identity) if by_identity else (s.name == _name64(leg.name)):
                    slot_of[k] = i
                    taken.add(i)
                    break
    return slot_of


def plan_start(
    rec: Record,
    why: str | None,
    legs: list[LegView],
    *,
    assume_clean: bool = False,
    read_only: bool = False,
) -> tuple[list[LegPlan], int]:
    """Decide from the record which legs are current, which are behind (dirty regions only)
    and which need a full resync; update the record to match.  Returns the plans and the
    index of the source leg.  Raises DstError when no current leg is reachable."""
    where = rec.path or "memory"
    loaded = why is None
    g0 = rec.generation
    slot_of: list[int | None] = _match_slots(rec, legs) if loaded else [None] * len(legs)
    known = [i is not None for i in slot_of]
    for i, s in enumerate(rec.slots):
        if s is not None and not s.checkpoint and i not in slot_of:
            log.warning(
                "bitmap %s: leg %s (identity %s) is recorded but not given: forgotten; if it "
                "is added again it gets a full resync",
                where,
                s.name,
                s.identity,
            )
            rec.free_slot(i)
    for k, leg in enumerate(legs):
        if slot_of[k] is None:
            free = rec.free_index()
            if free is None:
                raise DstError(f"a mirror has at most {MAX_LEGS} legs")
            rec.add_slot(free, leg.name, leg.identity, full=False).generation = g0
            slot_of[k] = free
    plans = [LegPlan(slot=i) for i in slot_of if i is not None]
    slots = [rec.slots[p.slot] for p in plans]
    current: list[int] = []
    verified: set[int] = set()
    for k, (leg, s, p) in enumerate(zip(legs, slots, plans, strict=True)):
        assert s is not None
        if not loaded:
            if assume_clean:
                current.append(k)
                if leg.reachable:
                    verified.add(k)
            continue
        if not known[k]:
            p.full = f"it is not recorded in the bitmap file {where}"
        elif s.full:
            p.full = "its earlier full resync did not finish"
        elif (
            leg.reachable and None not in (leg.identity, s.identity) and leg.identity != s.identity
        ):
            p.full = f"its identity changed from {s.identity} to {leg.identity}: a blank or replaced store"
        elif s.generation == g0:
            current.append(k)
        if leg.reachable and leg.identity is not None and leg.identity == s.identity:
            verified.add(k)
    reachable = [k for k, leg in enumerate(legs) if legs[k].reachable]
    if not loaded and not assume_clean:
        if not reachable:
            raise DstError("no leg of the mirror is reachable; start at least one of them")
        sync_up = [k for k in reachable if not legs[k].asynchronous]
        if not sync_up:
            raise DstError(
                f"no synchronous leg of the mirror is reachable and {why}, so nothing says "
                "which data is current; start a synchronous leg (an asynchronous one may "
                "lack the last writes)"
            )
        source = sync_up[0]
        for k in range(len(legs)):
            if k != source:
                plans[k].full = (
                    f"{why}, so nothing records that the legs hold the same data "
                    f"({legs[source].name} is copied to it)"
                )
    else:
        first = [k for k in current if k in verified] + [k for k in current if k in reachable]
        if any(not legs[k].asynchronous for k in current):
            # an asynchronous leg may lack the last acknowledged writes
            first = [k for k in first if not legs[k].asynchronous]
        if not first:
            raise DstError(_nobody_current(rec, legs, slots, current, where))
        source = first[0]
        if legs[source].asynchronous:
            log.warning(
                "%s: no synchronous leg is current, so the mirror starts from this asynchronous "
                "leg; writes it had not received when the others were lost are not on it",
                legs[source].name,
            )
        if source not in verified:
            log.warning(
                "%s: no identity proves it is the store recorded in %s; trusting it by its name",
                legs[source].name,
                where,
            )
    in_sync = {source}
    for k in reachable:
        if k == source or plans[k].full:
            continue
        if k not in verified and loaded:
            plans[k].full = "it has no identity, so nothing proves it holds what the bitmap records"
        elif k in current and not rec.al:
            in_sync.add(k)
    changed = not loaded
    for k, (leg, s, p) in enumerate(zip(legs, slots, plans, strict=True)):
        assert s is not None
        if k in in_sync:
            p.in_sync = True
            continue
        changed = changed or s.generation == g0
        if p.full:
            rec.bitmaps[p.slot].fill()  # type: ignore[union-attr]
            s.full, s.generation = True, 0
            p.reason = f"full resync: {p.full}"
            if read_only:
                log.warning(
                    "%s: not read from (a read-only mirror cannot resync): %s", leg.name, p.full
                )
            else:
                log.warning("%s: full resync: %s", leg.name, p.full)
            continue
        for e in rec.al:
            rec.mark(p.slot, e * rec.al_extent, rec.al_extent)
        p.check_identity = loaded and not leg.reachable
        p.reason = "not reachable at start" if not leg.reachable else "writes in flight at a crash"
        if s.generation != g0:
            p.reason = f"behind: last in sync at generation {s.generation} of {g0}"
        what = "it is not read from" if read_only else "only its dirty regions are resynced"
        log.info("%s: %s; %s", leg.name, p.reason, what)
    if rec.al:
        log.warning(
            "activity log: the client node stopped with writes in flight in %d extents of %d "
            "bytes; they are copied from %s to the other legs",
            len(rec.al),
            rec.al_extent,
            legs[source].name,
        )
    if changed:
        rec.generation += 1
    for k, (leg, s) in enumerate(zip(legs, slots, strict=True)):
        assert s is not None
        s.name = _name64(leg.name)
        if leg.identity is not None and (leg.reachable or s.identity is None):
            s.identity = leg.identity
        if k in in_sync:
            s.generation = rec.generation
    rec.al = []
    rec.clean = False
    rec.mark_meta()
    return plans, source


def _nobody_current(
    rec: Record, legs: list[LegView], slots: list[Slot | None], current: list[int], where: str
) -> str:
    parts = []
    for k, (leg, s) in enumerate(zip(legs, slots, strict=True)):
        assert s is not None
        if k in current and leg.asynchronous and leg.reachable:
            parts.append(f"{leg.name} is asynchronous, so not the source while another is current")
        elif k in current:
            parts.append(f"{leg.name} is current but not reachable")
        elif s.full:
            parts.append(f"{leg.name} needs a full resync")
        else:
            parts.append(f"{leg.name} is behind (generation {s.generation} of {rec.generation})")
    return (
        f"no current leg of the mirror is reachable: {'; '.join(parts)}; bring a current leg "
        f"back, or remove {where} to start over from the first reachable leg (its data may be "
        "older)"
    )
