"""Assembling the device ``dst attach`` serves, and controlling a running mirror.

``build_stack`` builds one member, a mirror, a stripe or a linear device and starts
it; with a ``bitmap`` and any layout but a mirror (which keeps its own record) a
:class:`~dst.layers.tracker.ChangeTracker` goes on top for the checkpoints.  The stack
owns the devices it is given: closing it closes them, and so does a failed start.  :class:`MirrorDevice` is the mirror core (``dst.layers.mirror``) plus
what the control socket and status use on a running mirror: ``verify``, ``detach``,
``add``, ``set_resync_rate`` and ``statistics``; ``mirror_of`` finds it.  Asynchronous
legs (``async_legs``, ``add(..., asynchronous=True)``) are in ``dst.layers.shipper``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dst.device import BlockDevice
from dst.errors import DstError, UsageError
from dst.layers.bitmap import MAX_LEGS
from dst.layers.dirtybits import Bitmap
from dst.layers.linear import LinearDevice, member_summary
from dst.layers.mirror import DEFAULT_GRANULARITY, DEFAULT_LEG_TIMEOUT, MirrorCore
from dst.layers.resync import (
    DEGRADED,
    IN_SYNC,
    RESYNCING,
    Leg,
    Progress,
    dirty_bytes,
    event,
    log,
    refusal_of,
)
from dst.layers.resync import verify as verify_legs
from dst.layers.shipper import DEFAULT_MAX_LAG, PULL_AHEAD, async_leg
from dst.layers.stripe import StripeDevice
from dst.layers.tracker import track_changes
from dst.units import format_rate, format_size

MODES = ("mirror", "stripe", "linear")


def _refuse(mode: str | None, **given: object) -> None:
    wrong = [k.replace("_", "-") for k, v in given.items() if v is not None]
    if wrong:
        opts = " and ".join(f"--{w}" for w in wrong)
        raise UsageError(
            f"{opts} {'applies' if len(wrong) == 1 else 'apply'} to "
            f"{'--stripe' if 'chunk' in given else '--mirror'} only, not to "
            f"{'--' + mode if mode else 'a single member'}"
        )


async def build_stack(
    mode: str | None,
    legs: list[BlockDevice],
    *,
    chunk: int | None = None,
    bitmap: str | None = None,
    granularity: int = DEFAULT_GRANULARITY,
    resync_rate: int | None = None,
    start_timeout: float = 0.0,
    leg_timeout: float = DEFAULT_LEG_TIMEOUT,
    assume_clean: bool = False,
    async_legs: list[BlockDevice] | None = None,
    async_max_lag: int = DEFAULT_MAX_LAG,
    async_on_congestion: str = PULL_AHEAD,
) -> BlockDevice:
    """Build and start the stack over ``legs`` (``mode`` None: exactly one member, served as
    it is, or under a change tracker with ``bitmap``; ``async_legs`` are a mirror's
    asynchronous legs, owned like the others).  Raises UsageError for a wrong combination,
    DstError when it cannot start."""
    if mode is not None and mode not in MODES:
        raise UsageError(f"unknown stack mode {mode!r}: use one of {', '.join(MODES)}")
    if not legs:
        raise UsageError("no member given: name at least one")
    if mode != "stripe":
        _refuse(mode, chunk=chunk)
    if mode != "mirror":
        _refuse(
            mode,
            resync_rate=resync_rate,
            assume_clean=assume_clean or None,
            async_leg=async_legs or None,
        )
    dev: MirrorDevice | StripeDevice | LinearDevice
    if mode is None:
        if len(legs) > 1:
            raise UsageError(
                f"{len(legs)} members need --mirror, --stripe CHUNK or --linear to say how to "
                "combine them"
            )
        return await track_changes(legs[0], bitmap, granularity)
    if mode == "mirror":
        dev = MirrorDevice(
            legs,
            bitmap=bitmap,
            granularity=granularity,
            resync_rate=resync_rate or None,
            start_timeout=start_timeout,
            leg_timeout=leg_timeout,
            assume_clean=assume_clean,
            async_legs=async_legs or (),
            async_max_lag=async_max_lag,
            async_on_congestion=async_on_congestion,
        )
    elif mode == "stripe":
        if chunk is None:
            raise UsageError("--stripe needs a chunk size, e.g. --stripe 64K")
        dev = StripeDevice(legs, chunk)
    else:
        dev = LinearDevice(legs)
    try:
        await dev.start()
    except BaseException:
        await dev.aclose()
        raise
    return dev if mode == "mirror" else await track_changes(dev, bitmap, granularity)


def mirror_of(dev: BlockDevice) -> MirrorDevice | None:
    """The mirror behind ``dev`` for control commands, or None when it is not one."""
    return dev if isinstance(dev, MirrorDevice) else None


class MirrorDevice(MirrorCore):
    """The mirror as ``dst attach`` runs it: the core plus control and status."""

    def _find(self, uri: str) -> Leg:
        for leg in self.legs:
            if uri in (leg.name, str(getattr(leg.dev, "uri", ""))):
                return leg
        raise DstError(
            f"{uri} is not a leg of this mirror; its legs are "
            f"{', '.join(x.name for x in self.legs)}"
        )

    def _require_running(self, what: str) -> None:
        if self._closed or not self._started:
            raise DstError(f"cannot {what}: the mirror is not running")

    async def verify(self, rate: int | None = None, repair: bool = False) -> dict[str, Any]:
        """Compare the in-sync legs online; with ``repair``, resync where they differ from the
        first in-sync leg (the reference)."""
        self._require_running("verify")
        if self.verify_state is not None:
            raise DstError("a verify is already running; wait for it to finish")
        log.info(
            "%s: verify started%s",
            self.name,
            f" at up to {format_rate(rate)}" if rate else "",
        )
        report, found = await verify_legs(self, rate)
        log.info(
            "%s: verify finished: %d differing region(s), %s, in %.1f s",
            self.name,
            len(report["regions"]),
            format_size(report["differing_bytes"]),
            report.get("seconds", 0.0),
        )
        marked: list[str] = []
        if repair:
            for leg, bits in found.items():
                if await self._resync_regions(
                    leg, bits, f"verify found it differs from {report['reference']}"
                ):
                    marked.append(leg.name)
        report["repair"] = repair
        report["marked_for_resync"] = marked
        return report

    async def _resync_regions(self, leg: Leg, bits: Bitmap, why: str) -> bool:
        if leg.removed or leg.status != IN_SYNC or not self.degrade(leg, why):
            return False
        bm = self.record.bitmaps[leg.slot]
        assert bm is not None
        bm.merge(bits)
        g = self.record.granularity
        for first, end in bits.runs():  # reads there may have come from this leg until now
            self.record.mark_changed(first * g, (end - first) * g)
        self.record.mark_meta()
        await self.record.sync()
        self._try_resync(leg)
        return True

    async def detach(self, uri: str) -> dict[str, Any]:
        """Remove a leg for good (its slot in the bitmap is freed) and close it."""
        self._require_running("detach a leg")
        leg = self._find(uri)
        if not leg.asynchronous and sum(not x.asynchronous for x in self.legs) == 1:
            only = "leg" if len(self.legs) == 1 else "synchronous leg"
            raise DstError(f"cannot detach {uri}: it is the mirror's only {only}")
        if not leg.asynchronous and leg.status == IN_SYNC and len(self.in_sync_legs()) == 1:
            raise DstError(
                f"cannot detach {uri}: it is the only in-sync leg, so the mirror's data would go "
                "with it; wait for a resync to finish first"
            )
        leg.removed = True
        self.legs.remove(leg)
        if leg.shipper is not None:
            leg.shipper.drop()  # what it had queued goes with it
        if leg.retry is not None:
            leg.retry.cancel()
        r = leg.resync
        if r is not None and r.task is not None:
            r.task.cancel()
            await asyncio.gather(r.task, return_exceptions=True)
        await leg.idle.wait()
        rec = self.record
        if leg.status == IN_SYNC:
            rec.generation += 1
            for x in self.legs:
                slot = rec.slots[x.slot] if x.status == IN_SYNC else None
                if slot is not None:
                    slot.generation = rec.generation
        rec.free_slot(leg.slot)
        await rec.sync()
        self._update_state()
        log.info("%s: detached; the mirror has %d leg(s) now", leg.name, len(self.legs))
        event("detached", leg=leg.name)
        try:
            await leg.dev.aclose()
        except Exception as e:
            log.warning("%s: closing it failed: %s", leg.name, e)
        return {"detached": leg.name, "members": [x.name for x in self.legs]}

    async def add(self, device: BlockDevice, asynchronous: bool = False) -> dict[str, Any]:
        """Add a leg (a blank or replacement node); it is fully synced in the background.
        An ``asynchronous`` one then gets the writes in the background (--async-leg)."""
        self._require_running("add a leg")
        if self.capabilities.read_only:
            raise DstError(f"cannot add {device.name}: the mirror is read-only")
        if any(x.name == device.name for x in self.legs):
            raise DstError(f"{device.name} is already a leg of this mirror")
        rec = self.record
        slot = rec.free_index()
        if slot is None:
            raise DstError(f"cannot add {device.name}: a mirror has at most {MAX_LEGS} legs")
        if asynchronous:
            leg = async_leg(self, device, slot, "added: full resync")
        else:
            leg = Leg(device, slot, DEGRADED, reason="added: full resync")
            leg.idle.set()
        if self._reachable(device):
            refusal = refusal_of(device, self.capabilities, self.size)
            if refusal:
                raise DstError(f"cannot add {device.name}: {refusal}")
        rec.add_slot(slot, device.name, device.identity, full=True)
        try:
            await rec.sync()
        except BaseException:
            rec.free_slot(slot)  # the caller still owns the device and closes it
            raise
        self.legs.append(leg)
        device.subscribe(self._leg_state)
        log.info(
            "%s: added%s; a full resync (%s) from %s follows",
            device.name,
            " as an asynchronous leg" if asynchronous else "",
            format_size(self.size),
            ", ".join(x.name for x in self.in_sync_legs()),
        )
        event("added", leg=device.name)
        self._try_resync(leg)
        self._update_state()
        return {
            "added": device.name,
            "mode": "async" if asynchronous else "sync",
            "resync_bytes": self.size,
            "members": [x.name for x in self.legs],
        }

    async def set_resync_rate(self, rate: int | None) -> None:
        """Change the resync rate limit live (``None`` or 0: unlimited)."""
        self.limiter.rate = rate or None
        log.info(
            "%s: resync rate %s",
            self.name,
            f"limited to {format_rate(rate)}" if rate else "unlimited",
        )

    async def set_leg_timeout(self, seconds: float) -> None:
        """Change live how long a write waits for a leg that has not acked it."""
        if seconds <= 0:
            raise UsageError(f"invalid leg-timeout {seconds:g}: give seconds greater than 0")
        self.leg_timeout = float(seconds)
        log.info("%s: leg timeout %g s", self.name, seconds)

    def _member_state(self, leg: Leg) -> str:
        if leg.refused:
            return "failed"
        if leg.status == RESYNCING:
            return "resyncing"
        if leg.status == DEGRADED:
            return "failed" if leg.dev.state == "failed" else "degraded"
        return leg.dev.state

    def statistics(self) -> dict[str, Any]:
        rec = self.record
        members = []
        for leg in self.legs:
            m = member_summary(leg.dev)
            s = leg.shipper
            m.update(
                state=self._member_state(leg),
                link_state=m.get("link_state", leg.dev.state),
                sync=leg.status,
                sync_since=round(leg.status_since, 3),
                dirty_bytes=dirty_bytes(rec, leg.slot) if leg.slot >= 0 else 0,
                reason=leg.reason or None,
                refused=leg.refused or None,
                resync=leg.resync.progress.as_dict() if leg.resync else None,
                mode="async" if leg.asynchronous else "sync",
                consistent=leg.status == IN_SYNC,
                lag_bytes=s.lag if s is not None else 0,
                lag_seconds=round(s.lag_seconds(), 3) if s is not None else 0.0,
            )
            if s is not None:
                m["async"] = s.statistics()
            members.append(m)
        in_sync = len(self.in_sync_legs())
        stats: dict[str, Any] = {
            "mode": "mirror",
            "size": self.size,
            "state": self.state,
            "sync": self._sync_name(),
            "legs": len(self.legs),
            "legs_in_sync": in_sync,
            "redundancy": max(0, in_sync - 1),  # in-sync copies beyond the first
            "generation": rec.generation,
            "identity": str(self.identity) if self.identity else None,
            "bitmap": {
                "file": self.bitmap_path,
                "granularity": self.granularity,
                "al_extent": self.al_extent,
                "al_extents": len(self.al.lru),
            },
            "members": members,
            "resync": self._resync_summary(),
            "resync_rate": self.limiter.rate,
            "leg_timeout": self.leg_timeout,
            "async_max_lag": self.async_max_lag,
            "async_on_congestion": self.async_on_congestion,
            "verify": self.verify_state.progress.as_dict() if self.verify_state else None,
            "repairs": self.repairs,
            "degrades": self.degrades,
        }
        stats.update(self.counters.as_dict())
        return stats

    def _resync_summary(self) -> dict[str, Any] | None:
        running = [x for x in self.legs if x.resync is not None]
        if not running:
            return None
        parts = [x.resync.progress for x in running if x.resync is not None]
        total = Progress(sum(max(p.total, p.done) for p in parts))
        total.done = sum(p.done for p in parts)
        total.zeroed = sum(p.zeroed for p in parts)
        out = total.as_dict()
        rate = sum(p.rate for p in parts)
        out["rate"] = round(rate, 1)
        out["eta"] = round((out["bytes_total"] - total.done) / rate, 1) if rate > 0 else None
        out["seconds"] = round(max(time.monotonic() - p.started for p in parts), 3)
        out["legs"] = [x.name for x in running]
        out["limit"] = self.limiter.rate
        return out
