"""The sans-IO NBD client core against exact bytes: handshake, requests, replies, timers."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

import pytest

from dst.nbd.client import (
    DIRECT_THRESHOLD,
    Completed,
    Connected,
    ConnectionDead,
    ExportRefused,
    NbdClientConfig,
    NbdClientCore,
    ServerViolation,
)
from dst.nbd.events import Event

MiB = 1 << 20
SIZE = 64 * MiB
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REP_MAGIC = bytes.fromhex("0003e889045565a9")
REQ_MAGIC = bytes.fromhex("25609513")
SIMPLE = bytes.fromhex("67446698")
STRUCT = bytes.fromhex("668e33ef")
ERR = 1 << 31
# transmission flags
HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_ZEROES = 1, 2, 4, 8, 32, 64
ALL = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_ZEROES
# commands and chunk types
READ, WRITE, DISC, FLUSH, TRIM, ZEROES = 0, 1, 2, 3, 4, 6
NONE, DATA, HOLE, ERROR, ERROR_OFFSET = 0, 1, 2, (1 << 15) + 1, (1 << 15) + 2


def greeting(flags: int = 3) -> bytes:
    return NBDMAGIC + IHAVEOPT + struct.pack(">H", flags)


def rep(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return REP_MAGIC + struct.pack(">III", opt, rtype, len(data)) + data


def info_export(size: int = SIZE, flags: int = ALL) -> bytes:
    return rep(7, 3, struct.pack(">HQH", 0, size, flags))


def info_blocks(lo: int, pref: int, hi: int) -> bytes:
    return rep(7, 3, struct.pack(">HIII", 3, lo, pref, hi))


def simple(handle: int, err: int = 0, data: bytes = b"") -> bytes:
    return SIMPLE + struct.pack(">IQ", err, handle) + data


def chunk(handle: int, ctype: int, payload: bytes, done: bool = True) -> bytes:
    return STRUCT + struct.pack(">HHQI", int(done), ctype, handle, len(payload)) + payload


def data_chunk(handle: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return chunk(handle, DATA, struct.pack(">Q", offset) + data, done)


def error_chunk(
    handle: int, err: int, msg: bytes = b"", offset: int | None = None, done: bool = True
) -> bytes:
    payload = struct.pack(">IH", err, len(msg)) + msg
    if offset is not None:
        return chunk(handle, ERROR_OFFSET, payload + struct.pack(">Q", offset), done)
    return chunk(handle, ERROR, payload, done)


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQ_MAGIC + struct.pack(">HHQQI", flags, cmd, handle, offset, length)


def sent(core: NbdClientCore) -> bytes:
    return b"".join(bytes(b) for b in core.data_to_send())


def events(core: NbdClientCore) -> list[Event]:
    out = []
    while (ev := core.next_event()) is not None:
        out.append(ev)
    return out


def connected(
    structured: bool = True, flags: int = ALL, size: int = SIZE, **cfg: object
) -> NbdClientCore:
    """A core through the GO handshake (structured replies when asked)."""
    core = NbdClientCore(NbdClientConfig(export="disk", **cfg))  # type: ignore[arg-type]
    core.connection_made(0.0)
    core.receive_data(greeting(), 0.0)
    core.receive_data(rep(8, 1) if structured else rep(8, ERR + 1), 0.0)
    core.receive_data(info_export(size, flags) + rep(7, 1), 0.0)
    sent(core)
    evs = events(core)
    assert isinstance(evs[-1], Connected)
    return core


def test_handshake_sends_structured_reply_then_go_with_exact_bytes() -> None:
    core = NbdClientCore(NbdClientConfig(export="disk"))
    core.connection_made(0.0)
    assert sent(core) == b""  # the server speaks first
    core.receive_data(greeting(), 0.0)
    assert sent(core) == struct.pack(">I", 3) + IHAVEOPT + struct.pack(">II", 8, 0)
    core.receive_data(rep(8, 1), 0.0)
    go = struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, 3)
    assert sent(core) == IHAVEOPT + struct.pack(">II", 7, len(go)) + go
    core.receive_data(info_export(SIZE, ALL | READ_ONLY) + info_blocks(512, 4096, MiB), 0.0)
    assert events(core) == []
    core.receive_data(rep(7, 3, struct.pack(">H", 99) + b"unknown info is ignored"), 0.0)
    core.receive_data(rep(7, 1), 0.0)
    [ev] = events(core)
    assert isinstance(ev, Connected) and not ev.reconnect and ev.generation == 1
    x = ev.export
    assert (x.size, x.structured, x.min_block, x.preferred_block, x.max_block) == (
        SIZE,
        True,
        512,
        4096,
        MiB,
    )
    assert x.flags & READ_ONLY and x.flags & SEND_TRIM
    assert core.ready and core.get_timer() is None


def test_go_unsupported_falls_back_to_export_name() -> None:
    core = NbdClientCore(NbdClientConfig(export="disk"))
    core.connection_made(0.0)
    core.receive_data(greeting(1) + rep(8, 1), 0.0)  # no NO_ZEROES offered
    sent(core)
    core.receive_data(rep(7, ERR + 1, b"GO? never heard of it"), 0.0)
    assert sent(core) == IHAVEOPT + struct.pack(">II", 1, 4) + b"disk"
    core.receive_data(struct.pack(">QH", SIZE, ALL) + bytes(123), 0.0)
    assert events(core) == []  # the 124 zero bytes are not complete yet
    core.receive_data(b"\0", 0.0)
    [ev] = events(core)
    assert isinstance(ev, Connected) and ev.export.size == SIZE and ev.export.structured


def test_old_newstyle_server_gets_export_name_at_once() -> None:
    core = NbdClientCore(NbdClientConfig(export=""))
    core.connection_made(0.0)
    core.receive_data(greeting(0), 0.0)
    assert sent(core) == struct.pack(">I", 0) + IHAVEOPT + struct.pack(">II", 1, 0)
    core.receive_data(struct.pack(">QH", MiB, HAS_FLAGS) + bytes(124), 0.0)
    [ev] = events(core)
    assert isinstance(ev, Connected) and not ev.export.structured


def test_structured_replies_refused_means_simple_replies_only() -> None:
    core = connected(structured=False)
    buf = bytearray(4)
    h = core.submit(READ, 0, 4, 0, 0.0, into=memoryview(buf))
    core.receive_data(chunk(h, NONE, b""), 0.0)
    [ev] = events(core)
    assert isinstance(ev, ServerViolation) and "magic" in ev.reason


@pytest.mark.parametrize(
    ("rtype", "text", "permanent"),
    [
        (ERR + 6, "the server has no export 'disk'", True),
        (ERR + 2, "policy", True),
        (ERR + 5, "requires TLS", True),
        (ERR + 7, "shutting down", False),
        (ERR + 3, "refused export 'disk'", True),
    ],
)
def test_go_errors_refuse_the_export_with_the_server_message(
    rtype: int, text: str, permanent: bool
) -> None:
    core = NbdClientCore(NbdClientConfig(export="disk"))
    core.connection_made(0.0)
    core.receive_data(greeting() + rep(8, 1), 0.0)
    sent(core)
    core.receive_data(rep(7, rtype, b"server says no"), 0.0)
    [ev] = events(core)
    assert isinstance(ev, ExportRefused) and ev.permanent is permanent
    assert text in ev.message and "server says no" in ev.message
    assert sent(core) == IHAVEOPT + struct.pack(">II", 2, 0)  # NBD_OPT_ABORT


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"NBDMAGIX" + IHAVEOPT + b"\0\3", ServerViolation),
        (NBDMAGIC + struct.pack(">Q", 0x00420281861253) + b"\0\0", ExportRefused),
        (NBDMAGIC + b"IHAVEOPX\0\3", ServerViolation),
    ],
)
def test_bad_greetings(data: bytes, what: type) -> None:
    core = NbdClientCore(NbdClientConfig())
    core.connection_made(0.0)
    core.receive_data(data, 0.0)
    [ev] = events(core)
    assert isinstance(ev, what)


@pytest.mark.parametrize(
    "reply",
    [
        b"\0" * 8 + struct.pack(">III", 8, 1, 0),  # bad option reply magic
        rep(7, 1),  # a reply to an option that was not sent
        rep(8, 3, b"x" * 4),  # INFO to STRUCTURED_REPLY
        rep(8, 1) + rep(7, 1),  # GO ended without INFO_EXPORT
        rep(8, 1) + rep(7, 3, b"\0\0" + b"x" * 3),  # short NBD_INFO_EXPORT
        rep(8, 1) + info_blocks(3, 4096, MiB),  # minimum block not a power of two
        REP_MAGIC + struct.pack(">III", 8, 1, 1 << 30),  # a huge option reply
    ],
)
def test_bad_option_replies_are_violations(reply: bytes) -> None:
    core = NbdClientCore(NbdClientConfig(export="disk"))
    core.connection_made(0.0)
    core.receive_data(greeting() + reply, 0.0)
    assert [type(e) for e in events(core)] == [ServerViolation]


def test_request_bytes_for_every_command() -> None:
    core = connected()
    data = memoryview(b"hello world!")
    buf = memoryview(bytearray(12))
    h1 = core.submit(READ, 4096, 12, 0, 0.0, into=buf)
    h2 = core.submit(WRITE, 8192, 12, 1, 0.0, payload=data)  # FUA
    h3 = core.submit(FLUSH, 0, 0, 0, 0.0)
    h4 = core.submit(TRIM, 0, MiB, 0, 0.0)
    h5 = core.submit(ZEROES, MiB, MiB, 3, 0.0)  # FUA | NO_HOLE
    assert len({h1, h2, h3, h4, h5}) == 5
    assert sent(core) == (
        request(READ, h1, 4096, 12)
        + request(WRITE, h2, 8192, 12, 1)
        + b"hello world!"
        + request(FLUSH, h3, 0, 0)
        + request(TRIM, h4, 0, MiB)
        + request(ZEROES, h5, MiB, MiB, 3)
    )
    core.close()
    assert sent(core)[:8] == REQ_MAGIC + struct.pack(">HH", 0, DISC)
    with pytest.raises(ValueError):
        core.submit(READ, 0, 1, 0, 0.0, into=buf[:1])


def test_simple_replies_in_any_order_fill_the_right_buffers() -> None:
    core = connected(structured=False)
    bufs = [bytearray(8) for _ in range(3)]
    hs = [core.submit(READ, i * 8, 8, 0, 0.0, into=memoryview(b)) for i, b in enumerate(bufs)]
    hw = core.submit(WRITE, 0, 3, 0, 0.0, payload=memoryview(b"abc"))
    sent(core)
    wire = simple(hw, 28) + simple(hs[2], 0, b"\2" * 8) + simple(hs[0], 0, b"\0" * 8)
    wire += simple(hs[1], 0, b"\1" * 8)
    for i in range(len(wire)):  # one byte at a time
        core.receive_data(wire[i : i + 1], 1.0)
    evs = events(core)
    assert [e.handle for e in evs if isinstance(e, Completed)] == [hw, hs[2], hs[0], hs[1]]
    assert isinstance(evs[0], Completed) and evs[0].error == errno.ENOSPC
    assert all(isinstance(e, Completed) and e.error == 0 for e in evs[1:])
    assert bufs == [b"\0" * 8, b"\1" * 8, b"\2" * 8]
    assert core.in_flight == 0 and core.stats.completed == 3 and core.stats.errors == 1


def test_structured_read_from_chunks_in_any_order_with_a_hole() -> None:
    core = connected()
    buf = bytearray(b"\xff" * 32)
    h = core.submit(READ, 1000, 32, 0, 0.0, into=memoryview(buf))
    sent(core)
    core.receive_data(data_chunk(h, 1024, b"C" * 8), 0.0)
    core.receive_data(chunk(h, HOLE, struct.pack(">QI", 1008, 16), done=False), 0.0)
    core.receive_data(data_chunk(h, 1000, b"A" * 8), 0.0)
    assert events(core) == []
    core.receive_data(chunk(h, NONE, b""), 0.0)
    [ev] = events(core)
    assert isinstance(ev, Completed) and ev.error == 0
    assert buf == b"A" * 8 + bytes(16) + b"C" * 8


def test_a_final_data_chunk_ends_the_reply() -> None:
    core = connected()
    buf = bytearray(4)
    h = core.submit(READ, 0, 4, 0, 0.0, into=memoryview(buf))
    core.receive_data(data_chunk(h, 0, b"abcd", done=True), 0.0)
    assert [(type(e), getattr(e, "error", None)) for e in events(core)] == [(Completed, 0)]
    assert buf == b"abcd"


def test_large_read_data_is_received_in_place() -> None:
    core = connected()
    n = 4 * DIRECT_THRESHOLD
    buf = bytearray(n)
    h = core.submit(READ, 0, n, 0, 0.0, into=memoryview(buf))
    payload = bytes(range(256)) * (n // 256)
    core.receive_data(STRUCT + struct.pack(">HHQIQ", 1, DATA, h, n + 8, 0), 0.0)
    view = core.get_buffer()
    assert view.obj is buf and view.nbytes == n  # the caller's buffer itself
    view[:100] = payload[:100]
    core.buffer_updated(100, 0.0)
    core.receive_data(payload[100:], 0.0)
    [ev] = events(core)
    assert isinstance(ev, Completed) and ev.error == 0 and buf == payload


@pytest.mark.parametrize(
    ("make", "err", "text"),
    [
        (lambda h: error_chunk(h, 5, b"disk on fire"), errno.EIO, "disk on fire"),
        (lambda h: error_chunk(h, 28, b"", offset=10), errno.ENOSPC, "ENOSPC"),
        (lambda h: error_chunk(h, 1234, b"odd"), errno.EIO, "odd"),  # unknown: EIO
        (lambda h: chunk(h, (1 << 15) + 77, struct.pack(">IH", 1, 2) + b"no"), errno.EPERM, "no"),
        (lambda h: simple(h, 1), errno.EPERM, "EPERM"),
    ],
)
def test_error_replies_are_answers(make: Callable[[int], bytes], err: int, text: str) -> None:
    core = connected()
    h = core.submit(WRITE, 8, 4, 0, 0.0, payload=memoryview(b"abcd"))
    core.receive_data(make(h), 0.0)
    [ev] = events(core)
    assert isinstance(ev, Completed) and ev.error == err and text in ev.message
    assert not ev.timed_out and core.stats.errors == 1


def test_errors_mid_read_end_it_with_the_first_error() -> None:
    core = connected()
    buf = bytearray(8)
    h = core.submit(READ, 0, 8, 0, 0.0, into=memoryview(buf))
    core.receive_data(data_chunk(h, 0, b"abcd"), 0.0)
    core.receive_data(error_chunk(h, 5, b"bad sector", 4, done=False), 0.0)
    core.receive_data(error_chunk(h, 28, b"second error", 5, done=False), 0.0)
    core.receive_data(chunk(h, NONE, b""), 0.0)
    [ev] = events(core)
    assert isinstance(ev, Completed) and ev.error == errno.EIO and "bad sector" in ev.message


@pytest.mark.parametrize(
    "make",
    [
        lambda h: simple(h + 99),  # unknown handle
        lambda h: chunk(h + 99, NONE, b""),  # unknown handle, structured
        lambda h: b"\xde\xad\xbe\xef" + bytes(12),  # bad reply magic
        lambda h: data_chunk(h, 4, b"x" * 8, True),  # data beyond what was asked
        lambda h: data_chunk(h, 0, b"x" * 4) + data_chunk(h, 2, b"y" * 4, True),  # overlap
        lambda h: data_chunk(h, 0, b"x" * 4, True),  # success without all the data
        lambda h: chunk(h, NONE, b"", done=False),  # NONE without DONE
        lambda h: chunk(h, NONE, b"x"),  # NONE with a payload
        lambda h: chunk(h, HOLE, struct.pack(">QI", 0, 0)),  # an empty hole
        lambda h: chunk(h, HOLE, struct.pack(">QI", 0, 9)),  # a hole beyond the request
        lambda h: chunk(h, 5, b"\0" * 12),  # a chunk type never asked for
        lambda h: chunk(h, ERROR, struct.pack(">IH", 5, 10) + b"short"),  # message too long
        lambda h: chunk(h, ERROR, struct.pack(">IH", 0, 0)),  # error 0
        lambda h: error_chunk(h, 5, b"", offset=99),  # error offset outside the request
        lambda h: data_chunk(h, 0, b"x" * 4) + simple(h),  # simple inside a structured reply
    ],
)
def test_server_violations_are_events_never_exceptions(make: Callable[[int], bytes]) -> None:
    core = connected()
    buf = bytearray(8)
    h = core.submit(READ, 0, 8, 0, 0.0, into=memoryview(buf))
    core.receive_data(make(h), 0.0)
    evs = events(core)
    assert [type(e) for e in evs] == [ServerViolation], evs
    assert core.stats.violations == 1
    core.receive_data(b"more bytes after the violation are ignored", 0.0)
    assert events(core) == []


def test_data_chunk_for_a_write_is_a_violation() -> None:
    core = connected()
    h = core.submit(WRITE, 0, 4, 0, 0.0, payload=memoryview(b"abcd"))
    core.receive_data(data_chunk(h, 0, b"abcd", True), 0.0)
    assert [type(e) for e in events(core)] == [ServerViolation]


def reconnect(core: NbdClientCore, now: float, size: int = SIZE) -> list[Event]:
    core.connection_lost(now)
    core.connection_made(now)
    core.receive_data(greeting() + rep(8, 1) + info_export(size) + rep(7, 1), now)
    return events(core)


def test_stall_reconnect_and_resend_with_the_same_handles() -> None:
    core = connected(resend_timeout=5.0, resends=3)
    buf = bytearray(4)
    h1 = core.submit(READ, 0, 4, 0, 10.0, into=memoryview(buf))
    h2 = core.submit(WRITE, 4, 2, 0, 10.0, payload=memoryview(b"xy"))
    sent(core)
    assert core.get_timer() == 15.0  # nothing received for resend_timeout: the link is dead
    core.handle_timer(14.9)
    assert events(core) == []
    core.handle_timer(15.0)
    [dead] = events(core)
    assert isinstance(dead, ConnectionDead) and "no reply for 5 s" in dead.reason
    assert core.stats.timeouts == 1
    evs = reconnect(core, 16.0)
    assert isinstance(evs[0], Connected) and evs[0].reconnect and evs[0].generation == 2
    assert sent(core).endswith(request(READ, h1, 0, 4) + request(WRITE, h2, 4, 2) + b"xy")
    core.receive_data(simple(h2) + chunk(h1, DATA, struct.pack(">Q", 0) + b"data"), 17.0)
    evs = events(core)
    assert all(isinstance(e, Completed) and e.attempts == 2 for e in evs) and len(evs) == 2
    assert buf == b"data" and core.stats.resends == 2


def test_budget_fails_a_request_with_eio_and_a_late_reply_is_dropped() -> None:
    core = connected(resend_timeout=1.0, resends=2)
    buf = bytearray(b"....")
    h = core.submit(READ, 0, 4, 0, 0.0, into=memoryview(buf))
    sent(core)
    for t in (0.5, 0.9, 1.5, 2.0, 2.5):  # other replies keep arriving: the link is alive
        other = core.submit(FLUSH, 0, 0, 0, t)
        core.receive_data(simple(other), t)
        core.handle_timer(t)
    assert [e.handle for e in events(core) if isinstance(e, Completed)] == list(range(2, 7))
    assert core.get_timer() == pytest.approx(3.0)
    core.handle_timer(3.0)
    [ev] = events(core)
    assert isinstance(ev, Completed) and ev.error == errno.EIO and ev.timed_out
    assert "--resends 2" in ev.message and core.stats.failed == 1
    core.receive_data(chunk(h, DATA, struct.pack(">Q", 0) + b"late"), 3.1)
    assert events(core) == [] and buf == b"...."  # dropped, not written, not a violation


def test_budget_runs_while_disconnected() -> None:
    core = NbdClientCore(NbdClientConfig(resends=1, resend_timeout=2.0))
    h = core.submit(FLUSH, 0, 0, 0, 0.0)
    assert sent(core) == b"" and core.get_timer() == 4.0
    core.handle_timer(4.0)
    [ev] = events(core)
    assert isinstance(ev, Completed) and ev.handle == h and "never sent" in ev.message


def test_at_most_resends_plus_one_sends() -> None:
    core = connected(resends=1, resend_timeout=100.0)
    core.submit(FLUSH, 0, 0, 0, 0.0)
    reconnect(core, 1.0)
    evs = reconnect(core, 2.0)
    assert isinstance(evs[-1], Completed) and evs[-1].error == errno.EIO
    assert "sent 2 time(s)" in evs[-1].message


def test_handshake_timeout_and_close_during_handshake() -> None:
    core = NbdClientCore(NbdClientConfig(handshake_timeout=3.0))
    core.connection_made(1.0)
    assert core.get_timer() == 4.0
    core.handle_timer(4.0)
    [ev] = events(core)
    assert isinstance(ev, ConnectionDead) and "handshake" in ev.reason
    core.connection_lost(4.0)
    core.connection_made(5.0)
    core.receive_data(greeting(0), 5.0)
    core.connection_lost(5.5)
    [ev] = events(core)
    assert isinstance(ev, ConnectionDead) and "export name" in ev.reason


def test_a_different_size_after_reconnect_is_refused() -> None:
    core = connected()
    core.submit(WRITE, 0, 1, 0, 0.0, payload=memoryview(b"x"))
    sent(core)
    [ev] = reconnect(core, 1.0, size=SIZE * 2)
    assert isinstance(ev, ExportRefused) and ev.permanent and "size changed" in ev.message
    assert sent(core).startswith(struct.pack(">I", 3))  # the handshake only: no write went out
    core.shutdown(errno.EIO, "failed")
    [ev] = events(core)
    assert isinstance(ev, Completed) and ev.error == errno.EIO


def test_queue_depth_limits_requests_on_the_wire() -> None:
    core = connected(queue_depth=2)
    hs = [core.submit(FLUSH, 0, 0, 0, 0.0) for _ in range(4)]
    assert sent(core) == request(FLUSH, hs[0], 0, 0) + request(FLUSH, hs[1], 0, 0)
    core.receive_data(simple(hs[1]), 0.0)
    assert sent(core) == request(FLUSH, hs[2], 0, 0)


def test_eshutdown_reply_reconnects_and_resends() -> None:
    core = connected()
    h = core.submit(FLUSH, 0, 0, 0, 0.0)
    sent(core)
    core.receive_data(simple(h, 108), 0.0)
    [ev] = events(core)
    assert isinstance(ev, ConnectionDead) and "shutting down" in ev.reason
    reconnect(core, 1.0)
    assert sent(core).endswith(b"disk" + struct.pack(">HH", 1, 3) + request(FLUSH, h, 0, 0))


def test_nothing_follows_disc() -> None:
    core = connected(queue_depth=1)
    h1, h2 = core.submit(FLUSH, 0, 0, 0, 0.0), core.submit(FLUSH, 0, 0, 0, 0.0)
    assert sent(core) == request(FLUSH, h1, 0, 0)
    core.close()
    assert sent(core) == request(DISC, h2 + 1, 0, 0)
    core.receive_data(simple(h1), 0.0)
    assert sent(core) == b""  # h2 stays unsent; shutdown() fails it
    core.shutdown()
    assert [(e.handle, e.error) for e in events(core) if isinstance(e, Completed)] == [
        (h1, 0),
        (h2, errno.ESHUTDOWN),
    ]


def test_shutdown_fails_everything_pending() -> None:
    core = connected()
    hs = {core.submit(FLUSH, 0, 0, 0, 0.0) for _ in range(3)}
    core.shutdown()
    evs = events(core)
    assert {e.handle for e in evs if isinstance(e, Completed)} == hs
    assert all(isinstance(e, Completed) and e.error == errno.ESHUTDOWN for e in evs)
    with pytest.raises(ValueError):
        core.submit(FLUSH, 0, 0, 0, 0.0)


SEND_CACHE, SEND_FAST_ZERO, CACHE, FAST_ZERO = 1 << 10, 1 << 11, 5, 0x10


def test_cache_and_fast_zero_go_to_a_server_that_advertises_them() -> None:
    core = connected(flags=ALL | SEND_CACHE | SEND_FAST_ZERO)
    h1 = core.submit(CACHE, 0, MiB, 0, 0.0)
    h2 = core.submit(ZEROES, MiB, MiB, FAST_ZERO, 0.0)
    assert sent(core) == request(CACHE, h1, 0, MiB) + request(ZEROES, h2, MiB, MiB, FAST_ZERO)
    core.receive_data(simple(h1) + error_chunk(h2, 95, b"no fast zero"), 1.0)
    done = {e.handle: e.error for e in events(core) if isinstance(e, Completed)}
    assert done == {h1: 0, h2: errno.EOPNOTSUPP}


def test_without_them_cache_is_done_and_fast_zero_refused_unsent() -> None:
    core = connected()  # no SEND_CACHE, no SEND_FAST_ZERO
    h1 = core.submit(CACHE, 0, MiB, 0, 0.0)
    h2 = core.submit(ZEROES, MiB, MiB, FAST_ZERO, 0.0)
    h3 = core.submit(ZEROES, MiB, MiB, 0, 0.0)
    assert sent(core) == request(ZEROES, h3, MiB, MiB)
    done = {e.handle: e.error for e in events(core) if isinstance(e, Completed)}
    assert done == {h1: 0, h2: errno.EOPNOTSUPP}
    assert core.in_flight == 1


def test_a_resend_obeys_the_server_of_the_new_connection() -> None:
    core = connected(flags=ALL | SEND_CACHE | SEND_FAST_ZERO)
    h1 = core.submit(CACHE, 0, MiB, 0, 0.0)
    h2 = core.submit(ZEROES, 0, MiB, FAST_ZERO, 0.0)
    sent(core)
    evs = reconnect(core, 1.0)  # the server that answers now advertises neither
    assert isinstance(evs[0], Connected) and evs[0].reconnect
    done = {e.handle: e.error for e in evs if isinstance(e, Completed)}
    assert done == {h1: 0, h2: errno.EOPNOTSUPP}
    assert REQ_MAGIC not in sent(core)
