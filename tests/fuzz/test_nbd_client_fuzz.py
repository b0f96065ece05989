"""Random server bytes in random chunkings through the NBD client core.

Whatever the server sends, the core yields events (a ServerViolation at worst), never
an exception; no request completes twice; read data never lands outside the
caller's buffer; nothing but timeouts follows the end of a connection.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dst.nbd.client import (
    Completed,
    Connected,
    ConnectionDead,
    ExportRefused,
    NbdClientConfig,
    NbdClientCore,
)

GUARD = 64
READS = [(0, 16), (100, 5000), (4096, 40000)]  # (offset, length) of the reads submitted
HANDLES = list(range(1, 7))  # three reads, a write, a flush, a trim
REP = bytes.fromhex("0003e889045565a9")


def rep(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return REP + struct.pack(">III", opt, rtype, len(data)) + data


GREETING = b"NBDMAGICIHAVEOPT\x00\x03"
INFO = rep(7, 3, struct.pack(">HQH", 0, 1 << 20, 0x16D))
STRUCTURED = GREETING + rep(8, 1) + INFO + rep(7, 1)
SIMPLE = GREETING + rep(8, 0x80000001) + INFO + rep(7, 1)
preludes = st.one_of(
    st.sampled_from([STRUCTURED, STRUCTURED, SIMPLE, GREETING, GREETING + rep(8, 1)]),
    st.binary(max_size=64),
    st.builds(
        lambda a, b: STRUCTURED[:a] + b, st.integers(0, len(STRUCTURED)), st.binary(max_size=8)
    ),
)
handles = st.one_of(st.sampled_from(HANDLES), st.integers(0, 2**64 - 1))
u32 = st.one_of(st.integers(0, 70000), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.integers(0, 50000), st.integers(0, 2**64 - 1))


@st.composite
def chunks(draw: st.DrawFn) -> bytes:
    """A structured chunk: mostly plausible (a known handle, an offset near a read), some not."""
    handle = draw(handles)
    done = draw(st.sampled_from([0, 1, 1, 2, 3]))
    kind = draw(st.sampled_from(["data", "data", "hole", "error", "error_offset", "none", "any"]))
    base, length = draw(st.sampled_from(READS))
    offset = draw(st.one_of(st.integers(base, base + length), u64))
    if kind == "data":
        n = draw(st.one_of(st.integers(1, 2 * length), st.integers(0, 4)))
        ctype, payload = 1, struct.pack(">Q", offset) + bytes(n)
    elif kind == "hole":
        ctype, payload = 2, struct.pack(">QI", offset, draw(u32))
    elif kind in ("error", "error_offset"):
        msg = draw(st.binary(max_size=20))
        mlen = draw(st.one_of(st.just(len(msg)), st.integers(0, 2**16 - 1)))
        ctype = 0x8001 if kind == "error" else 0x8002
        payload = struct.pack(">IH", draw(st.sampled_from([0, 1, 5, 28, 108, 999])), mlen) + msg
        if kind == "error_offset":
            payload += struct.pack(">Q", offset)
    elif kind == "none":
        ctype, payload = 0, b""
    else:
        ctype, payload = draw(st.integers(0, 2**16 - 1)), draw(st.binary(max_size=32))
    length_field = draw(st.one_of(st.just(len(payload)), u32))
    head = struct.pack(">IHHQI", 0x668E33EF, done, ctype, handle, length_field)
    return head + payload


@st.composite
def simples(draw: st.DrawFn) -> bytes:
    handle = draw(handles)
    err = draw(st.sampled_from([0, 0, 1, 5, 108, 12345]))
    data = bytes(draw(st.sampled_from([0, 16, 5000, 40000, 3])))
    return struct.pack(">IIQ", 0x67446698, err, handle) + data


@st.composite
def valid_replies(draw: st.DrawFn) -> bytes:
    """A correct structured reply to a known request: a read in pieces, in any order."""
    handle = draw(st.sampled_from(HANDLES))
    if handle > len(READS):
        err = draw(st.sampled_from([0, 0, 5]))
        return struct.pack(">IIQ", 0x67446698, err, handle)
    base, length = READS[handle - 1]
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=6)))
    pieces = list(zip([0, *cuts], [*cuts, length], strict=True))
    order = draw(st.permutations(pieces))
    out = b""
    for a, b in order:
        if draw(st.booleans()):
            out += struct.pack(">IHHQIQ", 0x668E33EF, 0, 1, handle, 8 + b - a, base + a)
            out += bytes(range(b - a)) if b - a < 256 else bytes(b - a)
        else:
            out += struct.pack(">IHHQIQI", 0x668E33EF, 0, 2, handle, 12, base + a, b - a)
    return out + struct.pack(">IHHQI", 0x668E33EF, 1, 0, handle, 0)


messages = st.one_of(chunks(), simples(), st.binary(max_size=48), valid_replies())


def drive(wire: bytes, sizes: list[int], zero_copy: bool, times: list[float]) -> None:
    core = NbdClientCore(NbdClientConfig(export="", resends=2, resend_timeout=1.0))
    arena = bytearray(b"\xaa" * (sum(n for _, n in READS) + GUARD * (len(READS) + 1)))
    view = memoryview(arena)
    pos = GUARD
    for offset, n in READS:
        core.submit(0, offset, n, 0, 0.0, into=view[pos : pos + n])
        pos += n + GUARD
    core.submit(1, 0, 3, 1, 0.0, payload=memoryview(b"abc"))
    core.submit(3, 0, 0, 0, 0.0)
    core.submit(4, 0, 4096, 0, 0.0)
    core.connection_made(0.0)
    done: set[int] = set()
    ended = False
    clock = iter(times)
    steps = iter(sizes)
    at = 0
    while at < len(wire):
        step = next(steps, 4096)
        now = next(clock, 0.5)
        if zero_copy:
            buf = core.get_buffer()
            assert buf.nbytes > 0
            n = min(buf.nbytes, step, len(wire) - at)
            buf[:n] = wire[at : at + n]
            core.buffer_updated(n, now)
        else:
            n = min(step, len(wire) - at)
            core.receive_data(wire[at : at + n], now)
        at += n
        if now > 0.9:
            core.handle_timer(now)
        core.data_to_send()
        while (ev := core.next_event()) is not None:
            event(type(ev).__name__)
            if isinstance(ev, Completed):
                assert ev.handle in HANDLES and ev.handle not in done
                assert not ended or ev.timed_out
                done.add(ev.handle)
            else:
                assert not ended, f"{ev} after the connection ended"
                assert isinstance(ev, Connected | ConnectionDead | ExportRefused)
                ended = not isinstance(ev, Connected)
    core.handle_timer(100.0)  # every budget is spent: everything has an answer now
    core.connection_lost(100.0)
    while (ev := core.next_event()) is not None:
        if isinstance(ev, Completed):
            assert ev.handle not in done
            done.add(ev.handle)
    assert done == set(HANDLES)
    pos = 0
    for _, n in READS:  # the guard bytes around every read buffer are untouched
        assert arena[pos : pos + GUARD] == b"\xaa" * GUARD
        pos += GUARD + n
    assert arena[pos:] == b"\xaa" * GUARD


common = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@common
@given(
    prelude=preludes,
    body=st.lists(st.one_of(valid_replies(), messages), max_size=12),
    sizes=st.lists(st.integers(1, 50000), max_size=40),
    zero_copy=st.booleans(),
    times=st.lists(st.floats(0.0, 5.0), max_size=10),
)
def test_replies_in_any_chunking_give_only_events(
    prelude: bytes, body: list[bytes], sizes: list[int], zero_copy: bool, times: list[float]
) -> None:
    drive(prelude + b"".join(body), sizes, zero_copy, sorted(times))


@common
@given(data=st.binary(max_size=4096), sizes=st.lists(st.integers(1, 512), max_size=20))
def test_random_bytes_give_only_events(data: bytes, sizes: list[int]) -> None:
    drive(data, sizes, False, [])
    drive(STRUCTURED + data, sizes, True, [])


@common
@given(
    body=st.lists(valid_replies(), min_size=1, max_size=8),
    tail=st.one_of(st.just(b""), messages),
    sizes=st.lists(st.integers(1, 50000), max_size=40),
    zero_copy=st.booleans(),
)
def test_valid_replies_then_anything(
    body: list[bytes], tail: bytes, sizes: list[int], zero_copy: bool
) -> None:
    drive(STRUCTURED + b"".join(body) + tail, sizes, zero_copy, [])
