"""What the mirror decides at start: its size, and from the bitmap record which legs are
current, which are behind (dirty regions only) and which need a full resync."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from dst.device import BlockDevice
from dst.errors import DstError
from dst.layers.bitmap import MAX_LEGS, Record, Slot
from dst.units import format_size

log = logging.getLogger("dst.mirror")


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
