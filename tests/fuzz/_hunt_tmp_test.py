"""Mirror, stripe and linear stacks against a flat reference model.

Random programs of reads, writes, trims, zeroes and flushes, mixed with injected
leg failures (lost links, error replies, short outages) and recoveries.  Every
read must agree with the model where the model knows the bytes (a change that
failed leaves its range unknown); an operation may fail only when the rules allow
it; after every recovery and resync the legs are identical to each other and to
the model.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dst.backends import open_device
from dst.device import BlockDevice, IoFlags
from dst.errors import IoError
from dst.layers import FaultDevice, LinearDevice, MirrorDevice, StripeDevice
from dst.layers.resync import IN_SYNC, Leg
from tests.model import FlatModel, contents, until

KIB = 1 << 10
SIZE = 256 * KIB
FLAGS = [IoFlags.NONE, IoFlags.FUA, IoFlags.PREFLUSH]
KINDS = {"write": "write", "trim": "trim", "zero": "zero", "flush": "flush", "read": "read"}
SETTINGS = settings(
    max_examples=800,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def spans(draw: st.DrawFn, size: int = SIZE) -> tuple[int, int]:
    offset = draw(st.integers(0, size - 1))
    return offset, draw(st.integers(1, min(size - offset, 48 * KIB)))


def programs(legs: int) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    leg = st.integers(0, legs - 1)
    seed = st.integers(0, 1 << 16)
    return st.lists(
        st.one_of(
            st.tuples(st.just("write"), spans(), seed, st.sampled_from(FLAGS)),
            st.tuples(st.just("write"), spans(), seed, st.sampled_from(FLAGS)),
            st.tuples(st.just("read"), spans()),
            st.tuples(st.just("trim"), spans()),
            st.tuples(st.just("zero"), spans()),
            st.tuples(st.just("flush")),
            st.tuples(st.just("fail"), leg),
            st.tuples(st.just("error"), leg, st.sampled_from(["read", "write", "flush", "change"])),
            st.tuples(st.just("recover"), leg),
            st.tuples(st.just("blip"), leg, spans(), seed),
        ),
        max_size=30,
    )


def data_for(seed: int, n: int) -> bytes:
    return (seed.to_bytes(3, "little") * (n // 3 + 1))[:n]


def pending(dev: FaultDevice, kind: str) -> bool:
    return dev.down or any(kind in r.ops for r in dev.rules)


async def apply(dev: BlockDevice, op: tuple[Any, ...]) -> bytes | None:
    """Run one I/O operation; return what a read read."""
    kind = op[0]
    if kind == "write":
        (o, n), seed, flags = op[1], op[2], op[3]
        await dev.write(o, data_for(seed, n), flags)
    elif kind == "read":
        o, n = op[1]
        return await dev.read(o, n)
    elif kind == "trim":
        await dev.trim(*op[1])
    elif kind == "zero":
        await dev.write_zeroes(*op[1])
    elif kind == "flush":
        await dev.flush()
    return None


def remember(model: FlatModel, op: tuple[Any, ...], ok: bool) -> None:
    kind = op[0]
    if kind in ("write", "trim", "zero", "blip"):
        (o, n) = op[1] if kind != "blip" else op[2]
        if not ok:
            model.forget(o, n)
        elif kind in ("write", "blip"):
            model.write(o, data_for(op[2] if kind == "write" else op[3], n))
        else:
            model.zero(o, n)


# ---------------------------------------------------------------- mirror


def fault(leg: Leg) -> FaultDevice:
    assert isinstance(leg.dev, FaultDevice)
    return leg.dev


async def check_mirror_legs(m: MirrorDevice, model: FlatModel) -> None:
    """Wait until every reachable leg is in sync; then they equal each other and the model."""
    if not any(x.status == IN_SYNC and not fault(x).down for x in m.legs):
        return
    await until(
        lambda: all(x.status == IN_SYNC for x in m.legs if not fault(x).down),
        10.0,
        "the reachable legs to be in sync",
    )
    held = [(await contents(x.dev))[: m.size] for x in m.legs if not fault(x).down]
    assert all(h == held[0] for h in held), "in-sync legs differ"
    bad = model.first_difference(0, held[0])
    assert bad is None, f"legs differ from the model at byte {bad}"
    model.learn(0, held[0])


async def run_mirror(program: list[tuple[Any, ...]], bitmap: bool, granularity: int) -> None:
    legs = [
        FaultDevice(open_device(f"memory:{SIZE + extra}"), name=f"leg{i}")
        for i, extra in enumerate((0, 64 * KIB, 0))
    ]
    # tmpfs when there is one: the model is about logic, not about the disk's fsync speed
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="dst-model-", dir=shm) as d:
        m = MirrorDevice(
            list(legs),
            bitmap=str(Path(d) / "bitmap") if bitmap else None,
            granularity=granularity,
            al_extent=16 * KIB,
            al_limit=4,
            assume_clean=True,
        )
        m.retry_min, m.retry_max = 0.01, 0.1
        await m.start()
        assert m.size == SIZE
        model = FlatModel(SIZE)
        for op in program:
            kind = op[0]
            if kind in KINDS:
                need = "write" if kind == "write" else KINDS[kind]
                healthy = [x for x in m.legs if x.status == IN_SYNC and not pending(fault(x), need)]
                try:
                    got = await apply(m, op)
                except IoError:
                    assert not healthy, f"{op} failed although {healthy[0].name} was healthy"
                    remember(model, op, False)
                    continue
                remember(model, op, True)
                if got is not None:
                    bad = model.first_difference(op[1][0], got)
                    assert bad is None, f"{op}: read differs from the model at byte {bad}"
            elif kind == "fail":
                legs[op[1]].go_down(budget=0.001)
            elif kind == "error":
                legs[op[1]].fail(op[2])
            elif kind == "recover":
                legs[op[1]].heal()
                if legs[op[1]].down:
                    legs[op[1]].come_up()
                await check_mirror_legs(m, model)
            elif kind == "blip":  # a short outage during a write: it only waits
                dev = legs[op[1]]
                if dev.down:
                    continue
                was = m.legs[op[1]].status
                quiet = not dev.rules
                others = [
                    x
                    for x in m.legs
                    if x.dev is not dev and x.status == IN_SYNC and not pending(fault(x), "write")
                ]
                dev.go_down(budget=None)
                task = asyncio.ensure_future(m.write(op[2][0], data_for(op[3], op[2][1])))
                await asyncio.sleep(0.002)
                dev.come_up()
                try:
                    await task
                except IoError:
                    assert not others and not (was == IN_SYNC and quiet), f"{op} failed"
                    remember(model, op, False)
                    continue
                remember(model, op, True)
                if was == IN_SYNC and quiet:
                    assert m.legs[op[1]].status == IN_SYNC, "a short outage degraded a leg"
        for dev in legs:
            dev.heal()
            if dev.down:
                dev.come_up()
        await check_mirror_legs(m, model)
        assert m.statistics()["sync"] == "in-sync"
        assert (await m.verify())["regions"] == []
        whole = await m.read(0, SIZE)
        assert model.first_difference(0, whole) is None
        await m.aclose()


@SETTINGS
@given(programs(3), st.booleans(), st.sampled_from([512, 4096, 16 * KIB]))
def test_mirror_against_the_model(
    program: list[tuple[Any, ...]], bitmap: bool, granularity: int
) -> None:
    asyncio.run(asyncio.wait_for(run_mirror(program, bitmap, granularity), 20))


# ---------------------------------------------------------------- stripe and linear


def touched(dev: StripeDevice | LinearDevice, op: tuple[Any, ...]) -> set[int]:
    kind = op[0]
    if kind == "flush" or (kind == "write" and op[3] & IoFlags.PREFLUSH):
        return set(range(len(dev.members)))
    o, n = op[1]
    if isinstance(dev, StripeDevice):
        return set(dev._split(o, n))
    return {dev.members.index(m) for m, _, _, _ in dev._pieces(o, n)}


async def run_striped(program: list[tuple[Any, ...]], mode: str, chunk: int) -> None:
    sizes = (96, 96, 100) if mode == "stripe" else (64, 100, 92)
    members = [FaultDevice(open_device(f"memory:{k}K"), name=f"m{i}") for i, k in enumerate(sizes)]
    dev: StripeDevice | LinearDevice = (
        StripeDevice(list(members), chunk) if mode == "stripe" else LinearDevice(list(members))
    )
    await dev.start()
    assert dev.size == (3 * (96 * KIB // chunk * chunk) if mode == "stripe" else SIZE)
    model = FlatModel(dev.size)
    for op in program:
        kind = op[0]
        if kind in KINDS:
            if kind != "flush" and op[1][0] + op[1][1] > dev.size:
                continue
            need = KINDS[kind]
            risky = any(
                pending(members[i], need) or pending(members[i], "flush") for i in touched(dev, op)
            )
            try:
                got = await apply(dev, op)
            except IoError:
                assert risky, f"{op} failed with healthy members"
                remember(model, op, False)
                continue
            remember(model, op, True)
            if got is not None:
                bad = model.first_difference(op[1][0], got)
                assert bad is None, f"{op}: read differs from the model at byte {bad}"
        elif kind == "fail":
            members[op[1]].go_down(budget=0.001)
        elif kind == "error":
            members[op[1]].fail(op[2])
        elif kind == "recover":
            members[op[1]].heal()
            if members[op[1]].down:
                members[op[1]].come_up()
        elif kind == "blip":
            m = members[op[1]]
            o, n = op[2]
            if m.down or m.rules or o + n > dev.size or any(x.down or x.rules for x in members):
                continue
            m.go_down(budget=None)
            task = asyncio.ensure_future(dev.write(o, data_for(op[3], n)))
            await asyncio.sleep(0.002)
            m.come_up()
            await task  # a short outage of a member only delays the write
            remember(model, op, True)
    for m in members:
        m.heal()
        if m.down:
            m.come_up()
    whole = await dev.read(0, dev.size)
    bad = model.first_difference(0, whole)
    assert bad is None, f"the device differs from the model at byte {bad}"
    await dev.aclose()


@SETTINGS
@given(programs(3), st.sampled_from([4 * KIB, 16 * KIB, 36 * KIB]))
def test_stripe_against_the_model(program: list[tuple[Any, ...]], chunk: int) -> None:
    asyncio.run(asyncio.wait_for(run_striped(program, "stripe", chunk), 20))


@SETTINGS
@given(programs(3))
def test_linear_against_the_model(program: list[tuple[Any, ...]]) -> None:
    asyncio.run(asyncio.wait_for(run_striped(program, "linear", 4096), 20))


# ---------------------------------------------------------------- crashes of the client node


def crash_programs(legs: int) -> st.SearchStrategy[tuple[Any, ...]]:
    leg = st.integers(0, legs - 1)
    seed = st.integers(0, 1 << 16)
    before = st.lists(
        st.one_of(
            st.tuples(st.just("write"), spans(), seed),
            st.tuples(st.just("write"), spans(), seed),
            st.tuples(st.just("down"), leg),
            st.tuples(st.just("up"), leg),
        ),
        max_size=15,
    )
    inflight = st.lists(st.tuples(spans(), seed), min_size=1, max_size=4)
    return st.tuples(before, inflight, st.sets(leg, max_size=legs))


async def run_crash(before: list[tuple[Any, ...]], inflight: list[Any], held: set[int]) -> None:
    inners = [open_device(f"memory:{SIZE}") for _ in range(3)]
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="dst-crash-", dir=shm) as d:
        path = str(Path(d) / "bitmap")

        def mirror(clean: bool) -> MirrorDevice:
            legs = [FaultDevice(x, name=f"leg{i}") for i, x in enumerate(inners)]
            m = MirrorDevice(
                list(legs),
                bitmap=path,
                granularity=4096,
                al_extent=16 * KIB,
                al_limit=3,
                assume_clean=clean,
            )
            m.retry_min, m.retry_max = 0.01, 0.1
            return m

        m = mirror(True)
        await m.start()
        faults = [fault(x) for x in m.legs]
        model = FlatModel(SIZE)
        for op in before:
            if op[0] == "write":
                (o, n), seed = op[1], op[2]
                try:
                    await m.write(o, data_for(seed, n))
                    model.write(o, data_for(seed, n))
                except IoError:
                    model.forget(o, n)
            elif op[0] == "down" and sum(not f.down for f in faults) > 1:
                faults[op[1]].go_down(budget=0.001)
            elif op[0] == "up" and faults[op[1]].down:
                faults[op[1]].come_up()
        for i in held:
            faults[i].hold_changes()
        tasks = [asyncio.ensure_future(m.write(o, data_for(s, n))) for (o, n), s in inflight]
        await asyncio.sleep(0.005)
        await m.abandon()  # the crash: some legs have the in-flight writes, some not
        for t, ((o, n), s) in zip(tasks, inflight, strict=True):
            try:
                await t
                model.write(o, data_for(s, n))  # acked before the crash: it must survive
            except (IoError, asyncio.CancelledError):
                model.forget(o, n)

        m = mirror(False)
        await m.start()
        await until(lambda: m.statistics()["sync"] == "in-sync", 10.0, "resync after the crash")
        held_data = [await contents(x) for x in inners]
        assert all(h == held_data[0] for h in held_data), "legs differ after the crash"
        bad = model.first_difference(0, held_data[0])
        assert bad is None, f"an acknowledged write was lost at byte {bad}"
        await m.aclose()


@SETTINGS
@given(crash_programs(3))
def test_crash_of_the_client_node_never_leaves_legs_different(program: tuple[Any, ...]) -> None:
    asyncio.run(asyncio.wait_for(run_crash(*program), 20))
