"""The sans-IO NBD server core against exact bytes: handshake, requests, replies, refusals."""

from __future__ import annotations

import ast
import errno
import struct
from pathlib import Path

import pytest

import dst.nbd
from dst.buffers import BufferPool, PooledBuffer
from dst.device import IoFlags
from dst.nbd import (
    Command,
    Disconnect,
    ExportChosen,
    ExportInfo,
    NbdServerConnection,
    ProtocolViolation,
    Request,
    nbd_error,
)
from dst.nbd.server import DIRECT_THRESHOLD

MiB = 1 << 20
SIZE = 64 * MiB
IHAVEOPT = b"IHAVEOPT"
REP_MAGIC = bytes.fromhex("0003e889045565a9")
REQ_MAGIC = 0x25609513
ERR = 1 << 31

# transmission flags
HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA = 1, 2, 4, 8
SEND_TRIM, SEND_WRITE_ZEROES, SEND_DF, CAN_MULTI_CONN = 32, 64, 128, 256


class RecordingPool(BufferPool):
    """A pool that remembers every length it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    def get(self, length: int) -> PooledBuffer:
        self.asked.append(length)
        return super().get(length)


def option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def rep(opt: int, kind: int, data: bytes = b"") -> bytes:
    return REP_MAGIC + struct.pack(">III", opt, kind, len(data)) + data


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, handle, offset, length)


def out(core: NbdServerConnection) -> bytes:
    return b"".join(bytes(b) for b in core.data_to_send())


def events(core: NbdServerConnection) -> list[object]:
    evs = []
    while (ev := core.next_event()) is not None:
        evs.append(ev)
    return evs


def make_core(
    export: ExportInfo | None = None, pool: BufferPool | None = None, **more: ExportInfo
) -> NbdServerConnection:
    exports = {"default": export or ExportInfo(size=SIZE, can_trim=True, description="ram disk")}
    exports.update(more)
    return NbdServerConnection(exports, pool=pool)


def connected(
    export: ExportInfo | None = None, structured: bool = False, pool: BufferPool | None = None
) -> NbdServerConnection:
    """A core in transmission phase (via NBD_OPT_GO), output and events drained."""
    core = make_core(export, pool)
    data = struct.pack(">I", 3)
    if structured:
        data += option(8)
    core.receive_data(data + option(7, go_data("")), 0.0)
    out(core)
    (chosen,) = [e for e in events(core) if isinstance(e, ExportChosen)]
    assert chosen.structured is structured
    if isinstance(pool, RecordingPool):
        pool.asked.clear()  # the handshake's option data came from the pool too
    return core


# ---- handshake -------------------------------------------------------------
def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    assert out(make_core()) == b"NBDMAGIC" + IHAVEOPT + b"\x00\x03"


def test_export_name_reply_with_and_without_padding() -> None:
    flags = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN
    for client_flags, tail in ((1, bytes(124)), (3, b"")):
        core = make_core()
        out(core)
        core.receive_data(struct.pack(">I", client_flags) + option(1, b"default"), 0.0)
        assert out(core) == struct.pack(">QH", SIZE, flags) + tail
        (ev,) = events(core)
        assert isinstance(ev, ExportChosen) and ev.name == "default" and not ev.structured


def test_export_name_empty_is_default_and_unknown_hangs_up() -> None:
    core = make_core()
    core.receive_data(struct.pack(">I", 3) + option(1), 0.0)
    assert isinstance(events(core)[0], ExportChosen)
    core = make_core()
    out(core)
    core.receive_data(struct.pack(">I", 3) + option(1, b"nope"), 0.0)
    assert out(core) == b""
    (ev,) = events(core)
    assert (
        isinstance(ev, ProtocolViolation) and "'nope'" in ev.message and "'default'" in ev.message
    )


def test_unknown_client_flags_are_a_violation() -> None:
    core = make_core()
    core.receive_data(struct.pack(">I", 4), 0.0)
    (ev,) = events(core)
    assert isinstance(ev, ProtocolViolation) and "client flags" in ev.message


def test_go_sends_export_block_size_and_ack() -> None:
    core = make_core()
    out(core)
    core.receive_data(struct.pack(">I", 1) + option(7, go_data("")), 0.0)
    flags = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN
    assert out(core) == (
        rep(7, 3, struct.pack(">HQH", 0, SIZE, flags))
        + rep(7, 3, struct.pack(">HIII", 3, 1, 4096, 32 * MiB))
        + rep(7, 1)
    )
    (ev,) = events(core)
    assert isinstance(ev, ExportChosen) and ev.name == "default"


def test_info_with_name_and_description_then_go() -> None:
    core = make_core()
    out(core)
    core.receive_data(struct.pack(">I", 1) + option(6, go_data("default", (1, 2, 3, 99))), 0.0)
    flags = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN
    assert out(core) == (
        rep(6, 3, struct.pack(">HQH", 0, SIZE, flags))
        + rep(6, 3, b"\x00\x01default")
        + rep(6, 3, b"\x00\x02ram disk")
        + rep(6, 3, struct.pack(">HIII", 3, 1, 4096, 32 * MiB))
        + rep(6, 1)
    )
    assert events(core) == [] and not core.in_transmission
    core.receive_data(option(7, go_data("default")), 0.0)
    assert out(core).endswith(rep(7, 1))
    assert core.in_transmission


def test_go_unknown_export_names_the_exports() -> None:
    core = make_core(other=ExportInfo(size=4096))
    out(core)
    core.receive_data(struct.pack(">I", 1) + option(7, go_data("missing")), 0.0)
    reply = out(core)
    assert reply[:20] == REP_MAGIC + struct.pack(">III", 7, ERR + 6, len(reply) - 20)
    message = reply[20:].decode()
    assert "'missing'" in message and "'default'" in message and "'other'" in message
    assert events(core) == [] and not core.in_transmission


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x10abc\x00\x00",  # name longer than the data
        go_data("default") + b"\x00",  # trailing byte
        go_data("default", (1,))[:-1],  # info list cut short
        b"\x00\x00\x00\x02\xff\xfe\x00\x00",  # name not UTF-8
    ],
)
def test_go_malformed_is_err_invalid(data: bytes) -> None:
    core = make_core()
    out(core)
    core.receive_data(struct.pack(">I", 1) + option(7, data), 0.0)
    reply = out(core)
    assert reply[8:16] == struct.pack(">II", 7, ERR + 3)
    assert not core.in_transmission


def test_list_and_list_with_data() -> None:
    core = make_core(other=ExportInfo(size=4096))
    out(core)
    core.receive_data(struct.pack(">I", 1) + option(3), 0.0)
    assert out(core) == (
        rep(3, 2, b"\x00\x00\x00\x07defaultram disk")
        + rep(3, 2, b"\x00\x00\x00\x05other")
        + rep(3, 1)
    )
    core.receive_data(option(3, b"x"), 0.0)
    assert out(core)[8:16] == struct.pack(">II", 3, ERR + 3)


def test_abort_acks_and_disconnects() -> None:
    core = make_core()
    out(core)
    core.receive_data(struct.pack(">I", 1) + option(2), 0.0)
    assert out(core) == rep(2, 1)
    (ev,) = events(core)
    assert isinstance(ev, Disconnect)
    core.receive_data(b"anything after abort is ignored", 0.0)
    assert events(core) == [] and out(core) == b""


def test_structured_reply_negotiation_adds_send_df() -> None:
    core = make_core()
    out(core)
    core.receive_data(struct.pack(">I", 1) + option(8, b"x") + option(8), 0.0)
    assert out(core) == rep(8, ERR + 3, b"NBD_OPT_STRUCTURED_REPLY takes no data") + rep(8, 1)
    core.receive_data(option(7, go_data("")), 0.0)
    flags = struct.unpack(">H", out(core)[30:32])[0]
    assert flags & SEND_DF
    assert core.structured


def test_unknown_options_and_starttls_are_unsupported() -> None:
    core = make_core()
    out(core)
    core.receive_data(struct.pack(">I", 1) + option(5) + option(11) + option(999), 0.0)
    reply = out(core)
    kinds = []
    while reply:
        length = struct.unpack(">I", reply[16:20])[0]
        kinds.append(struct.unpack(">II", reply[8:16]))
        reply = reply[20 + length :]
    assert kinds == [(5, ERR + 1), (11, ERR + 1), (999, ERR + 1)]  # 11: extended headers


def test_oversized_option_is_skipped_without_allocating() -> None:
    pool = RecordingPool()
    core = make_core(pool=pool)
    out(core)
    big = 1 << 20
    core.receive_data(struct.pack(">I", 1) + IHAVEOPT + struct.pack(">II", 7, big), 0.0)
    core.receive_data(bytes(big), 0.0)
    core.receive_data(option(3), 0.0)
    reply = out(core)
    assert reply[8:16] == struct.pack(">II", 7, ERR + 9)
    assert reply.endswith(rep(3, 1))
    assert all(n <= 64 << 10 for n in pool.asked)


def test_oversized_export_name_is_a_violation() -> None:
    core = make_core()
    core.receive_data(struct.pack(">I", 1) + IHAVEOPT + struct.pack(">II", 1, 1 << 20), 0.0)
    assert isinstance(events(core)[0], ProtocolViolation)


def test_bad_option_magic_is_a_violation() -> None:
    core = make_core()
    core.receive_data(struct.pack(">I", 1) + b"IHAVEOPX" + struct.pack(">II", 3, 0), 0.0)
    (ev,) = events(core)
    assert isinstance(ev, ProtocolViolation) and "magic" in ev.message


def test_shutdown_refuses_options() -> None:
    core = make_core()
    out(core)
    core.start_shutdown()
    core.receive_data(struct.pack(">I", 1) + option(7, go_data("")) + option(2), 0.0)
    assert out(core) == rep(7, ERR + 7, b"the server is shutting down") + rep(2, 1)


def test_read_only_export_flags() -> None:
    core = make_core(ExportInfo(size=4096, read_only=True, can_trim=True))
    out(core)
    core.receive_data(struct.pack(">I", 1) + option(7, go_data("")), 0.0)
    flags = struct.unpack(">H", out(core)[30:32])[0]
    assert flags == HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN


# ---- transmission ----------------------------------------------------------
def test_read_simple_reply_sends_the_same_view() -> None:
    core = connected()
    core.receive_data(request(0, 0xABCDEF, 4096, 8), 0.0)
    (ev,) = events(core)
    assert isinstance(ev, Request) and ev.payload is None
    assert (ev.handle, ev.command, ev.flags, ev.offset, ev.length) == (
        0xABCDEF,
        Command.READ,
        IoFlags.NONE,
        4096,
        8,
    )
    data = memoryview(bytearray(b"12345678"))
    core.reply_read(0xABCDEF, data)
    bufs = core.data_to_send()
    assert bytes(bufs[0]) == struct.pack(">IIQ", 0x67446698, 0, 0xABCDEF)
    assert bufs[1] is data  # no copy, no join


def test_read_structured_reply_is_one_final_offset_data_chunk() -> None:
    core = connected(structured=True)
    core.receive_data(request(0, 7, 4096, 8, flags=4), 0.0)  # DF is accepted
    (ev,) = events(core)
    assert isinstance(ev, Request) and ev.flags == IoFlags.NONE
    core.reply_read(7, memoryview(b"abcdefgh"))
    assert out(core) == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 7, 16, 4096) + b"abcdefgh"


def test_write_carries_its_payload_in_any_chunking() -> None:
    payload = bytes(range(256)) * 16
    wire = request(1, 9, 512, len(payload), flags=1) + payload + request(3, 10, 0, 0)
    for step in (1, 7, 28, 1000, len(wire)):
        pool = RecordingPool()
        core = connected(pool=pool)
        for i in range(0, len(wire), step):
            core.receive_data(wire[i : i + step], 0.0)
        write, flush = events(core)
        assert isinstance(write, Request) and write.command == Command.WRITE
        assert write.flags == IoFlags.FUA and write.offset == 512
        assert write.payload is not None and bytes(write.payload.view) == payload
        assert isinstance(flush, Request) and flush.command == Command.FLUSH
        write.payload.release()
        core.reply_ok(9)
        core.reply_ok(10)  # any order
        assert out(core) == struct.pack(">IIQ", 0x67446698, 0, 9) + struct.pack(
            ">IIQ", 0x67446698, 0, 10
        )
        assert pool.asked == [len(payload)]


def test_large_write_payload_is_received_in_place() -> None:
    pool = RecordingPool()
    core = connected(pool=pool)
    length = 4 * DIRECT_THRESHOLD
    core.receive_data(request(1, 1, 0, length), 0.0)
    buf = core.get_buffer()
    assert buf.nbytes == length  # the payload buffer itself, not the staging buffer
    buf[:] = b"\x5a" * length
    core.buffer_updated(length, 0.0)
    (ev,) = events(core)
    assert isinstance(ev, Request) and ev.payload is not None
    assert ev.payload.view.obj is buf.obj and bytes(ev.payload.view) == b"\x5a" * length


def test_trim_zeroes_flush_and_flags() -> None:
    core = connected()
    core.receive_data(
        request(4, 1, 0, 4096, flags=1) + request(6, 2, 8192, 4096, flags=3) + request(3, 3, 0, 0),
        0.0,
    )
    trim, zero, flush = events(core)
    assert isinstance(trim, Request) and trim.command == Command.TRIM and trim.flags == IoFlags.FUA
    assert isinstance(zero, Request) and zero.command == Command.WRITE_ZEROES
    assert zero.flags == IoFlags.FUA | IoFlags.NO_HOLE
    assert isinstance(flush, Request) and flush.command == Command.FLUSH


def test_disc_is_a_clean_disconnect() -> None:
    core = connected()
    core.receive_data(request(0, 1, 0, 512) + request(2, 2, 0, 0) + request(0, 3, 0, 512), 0.0)
    read, disc = events(core)
    assert isinstance(read, Request) and isinstance(disc, Disconnect)
    core.reply_read(1, memoryview(bytes(512)))  # in-flight replies are still sent
    assert len(out(core)) == 16 + 512


def simple_error(handle: int, code: int) -> bytes:
    return struct.pack(">IIQ", 0x67446698, code, handle)


@pytest.mark.parametrize(
    ("req", "code"),
    [
        (request(0, 5, SIZE - 512, 1024), errno.EINVAL),  # read past the end
        (request(4, 5, SIZE, 1), errno.EINVAL),  # trim past the end
        (request(6, 5, SIZE, 4096), errno.ENOSPC),  # zeroes past the end
        (request(0, 5, 0, 32 * MiB + 1), errno.EINVAL),  # read above max block
        (request(5, 5, 0, 4096), errno.EINVAL),  # CACHE is not served
        (request(7, 5, 0, 4096), errno.EINVAL),  # BLOCK_STATUS without contexts
        (request(99, 5, 0, 0), errno.EINVAL),  # unknown command
        (request(0, 5, 0, 512, flags=4), errno.EINVAL),  # DF needs structured replies
        (request(0, 5, 0, 512, flags=0x40), errno.EINVAL),  # unknown flag
        (request(6, 5, 0, 512, flags=0x10), errno.EINVAL),  # FAST_ZERO is not advertised
        (request(1 << 8 | 1, 5, 0, 0), errno.EINVAL),  # command numbers are 16 bits
    ],
    ids=[
        "read-past-end",
        "trim-past-end",
        "zeroes-past-end",
        "read-above-max",
        "cache",
        "block-status",
        "unknown-command",
        "df-without-structured",
        "unknown-flag",
        "fast-zero",
        "command-257",
    ],
)
def test_invalid_requests_are_refused_by_the_core(req: bytes, code: int) -> None:
    core = connected()
    core.receive_data(req, 0.0)
    assert events(core) == []
    assert out(core) == simple_error(5, code)
    assert core.requests_rejected == 1


def test_refused_writes_consume_their_payload() -> None:
    pool = RecordingPool()
    ro = connected(ExportInfo(size=SIZE, read_only=True), pool=pool)
    ro.receive_data(request(1, 1, 0, 4096) + bytes(4096) + request(0, 2, 0, 512), 0.0)
    (ev,) = events(ro)
    assert isinstance(ev, Request) and ev.handle == 2  # the payload was not parsed as a header
    assert out(ro) == simple_error(1, errno.EPERM)
    ro.receive_data(request(4, 3, 0, 4096) + request(6, 4, 0, 4096), 0.0)
    assert out(ro) == simple_error(3, errno.EPERM) + simple_error(4, errno.EPERM)
    rw = connected(pool=pool)
    rw.receive_data(request(1, 5, SIZE - 512, 1024) + bytes(1024) + request(3, 6, 0, 0), 0.0)
    assert out(rw) == simple_error(5, errno.ENOSPC)
    big = 32 * MiB + 4096
    rw.receive_data(request(1, 7, 0, big), 0.0)
    rw.receive_data(bytes(big), 0.0)
    rw.receive_data(request(3, 8, 0, 0), 0.0)
    assert out(rw) == simple_error(7, errno.EINVAL)
    assert [e.handle for e in events(rw) if isinstance(e, Request)] == [6, 8]
    assert pool.asked == []  # nothing was allocated for refused payloads


@pytest.mark.parametrize(
    "export",
    [ExportInfo(size=SIZE, read_only=True), ExportInfo(size=SIZE, max_block=MiB)],
    ids=["read-only", "over-max"],
)
@pytest.mark.parametrize("structured", [False, True])
def test_a_refused_write_is_answered_after_its_payload(
    export: ExportInfo, structured: bool
) -> None:
    core = connected(export, structured=structured)
    n = 8 * MiB
    core.receive_data(request(1, 1, 0, n) + bytes(n // 2), 0.0)
    assert out(core) == b""  # the client is still sending: no reply yet
    core.receive_data(bytes(n // 2 - 1), 0.0)
    assert out(core) == b""
    core.receive_data(bytes(1) + request(0, 2, 0, 512), 0.0)
    reply = out(core)
    assert struct.unpack(">Q", reply[8:16])[0] == 1  # the handle, in either reply form
    code = reply[20:24] if structured else reply[4:8]
    assert struct.unpack(">I", code)[0] == (errno.EPERM if export.read_only else errno.EINVAL)
    assert [e.handle for e in events(core) if isinstance(e, Request)] == [2]


def test_structured_error_carries_the_message() -> None:
    core = connected(structured=True)
    core.receive_data(request(0, 5, SIZE, 512), 0.0)
    reply = out(core)
    magic, flags, kind, handle, length, code, mlen = struct.unpack(">IHHQIIH", reply[:26])
    assert (magic, flags, kind, handle, code) == (0x668E33EF, 1, 0x8001, 5, errno.EINVAL)
    assert length == 6 + mlen and b"beyond the end" in reply[26:]


def test_fua_and_trim_are_refused_when_not_advertised() -> None:
    core = connected(ExportInfo(size=SIZE, can_fua=False, can_trim=False, can_zero=False))
    core.receive_data(
        request(1, 1, 0, 4, flags=1) + b"abcd" + request(4, 2, 0, 4096) + request(6, 3, 0, 4096),
        0.0,
    )
    assert out(core) == b"".join(simple_error(h, errno.EINVAL) for h in (1, 2, 3))


SEND_CACHE, SEND_FAST_ZERO = 1 << 10, 1 << 11


def test_fast_zero_and_cache_when_advertised() -> None:
    export = ExportInfo(size=SIZE, can_fast_zero=True, can_cache=True)
    core = make_core(export)
    out(core)
    core.receive_data(struct.pack(">I", 1) + option(7, go_data("")), 0.0)
    flags = struct.unpack(">H", out(core)[30:32])[0]
    assert flags & SEND_FAST_ZERO and flags & SEND_CACHE and flags & SEND_WRITE_ZEROES
    assert [type(e) for e in events(core)] == [ExportChosen]
    core.receive_data(
        request(6, 1, 0, 4096, flags=0x10)  # FAST_ZERO
        + request(6, 2, 0, 4096, flags=0x12)  # with NO_HOLE
        + request(5, 3, SIZE - 4096, 4096)  # CACHE, up to the end
        + request(5, 4, 0, 64 * MiB, flags=1)  # the whole export (FUA is ignored)
        + request(5, 5, SIZE - 4096, 8192)  # past the end
        + request(5, 6, 0, 0),  # nothing to do
        0.0,
    )
    reqs = [e for e in events(core) if isinstance(e, Request)]
    assert [(r.handle, r.command, r.flags) for r in reqs] == [
        (1, Command.WRITE_ZEROES, IoFlags.FAST_ZERO),
        (2, Command.WRITE_ZEROES, IoFlags.FAST_ZERO | IoFlags.NO_HOLE),
        (3, Command.CACHE, IoFlags.NONE),
        (4, Command.CACHE, IoFlags.FUA),
    ]
    assert out(core) == simple_error(5, errno.EINVAL) + simple_error(6, 0)
    core.reply_error(1, errno.EOPNOTSUPP, "no fast zeroing here")
    core.reply_ok(3)
    assert out(core) == simple_error(1, 95) + simple_error(3, 0)


def test_fast_zero_is_not_advertised_for_a_read_only_export() -> None:
    export = ExportInfo(size=SIZE, read_only=True, can_fast_zero=True, can_cache=True)
    flags = int(export.transmission_flags(structured=True))
    assert not flags & SEND_FAST_ZERO and not flags & SEND_WRITE_ZEROES and flags & SEND_CACHE
    no_zero = ExportInfo(size=SIZE, can_zero=False, can_fast_zero=True)
    assert not int(no_zero.transmission_flags(structured=True)) & SEND_FAST_ZERO


def test_alignment_to_the_minimum_block_size() -> None:
    core = connected(ExportInfo(size=SIZE, min_block=512))
    core.receive_data(
        request(0, 1, 100, 512) + request(0, 2, 512, 100) + request(0, 3, 512, 512), 0.0
    )
    assert out(core) == simple_error(1, errno.EINVAL) + simple_error(2, errno.EINVAL)
    assert [e.handle for e in events(core) if isinstance(e, Request)] == [3]


def test_zero_length_requests_are_answered_at_once() -> None:
    core = connected()
    core.receive_data(request(0, 1, 0, 0) + request(1, 2, 0, 0), 0.0)
    assert events(core) == []
    assert out(core) == simple_error(1, 0) + simple_error(2, 0)
    core = connected(structured=True)
    core.receive_data(request(0, 1, 0, 0), 0.0)
    assert out(core) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 1, 0)


def test_bad_request_magic_is_a_violation() -> None:
    core = connected()
    core.receive_data(b"\x00" * 28 + request(0, 1, 0, 512), 0.0)
    (ev,) = events(core)
    assert isinstance(ev, ProtocolViolation) and "magic" in ev.message


def test_reply_error_maps_errno_to_the_nbd_set() -> None:
    core = connected()
    core.receive_data(b"".join(request(3, h, 0, 0) for h in range(1, 6)), 0.0)
    assert len(events(core)) == 5
    for h, err in enumerate((errno.ENOENT, errno.EDQUOT, errno.EROFS, errno.EIO, 0), start=1):
        core.reply_error(h, err, "boom")
    assert out(core) == b"".join(
        simple_error(h, c) for h, c in enumerate((5, 28, 1, 5, 5), start=1)
    )
    assert nbd_error(errno.EOPNOTSUPP) == 95 and nbd_error(errno.ESHUTDOWN) == 108


def test_replies_check_the_handle_and_kind() -> None:
    core = connected()
    core.receive_data(request(0, 1, 0, 8), 0.0)
    events(core)
    with pytest.raises(ValueError):
        core.reply_ok(1)  # a READ needs data
    core.reply_read(1, memoryview(bytes(8)))
    with pytest.raises(ValueError):
        core.reply_ok(1)  # already answered


def test_shutdown_refuses_requests_and_discards_payloads() -> None:
    core = connected()
    core.start_shutdown()
    core.receive_data(request(1, 1, 0, 16) + bytes(16) + request(0, 2, 0, 8), 0.0)
    assert out(core) == simple_error(1, 108) + simple_error(2, 108)
    assert events(core) == []


def test_connection_lost_returns_a_partial_payload() -> None:
    pool = BufferPool()
    core = connected(pool=pool)
    core.receive_data(request(1, 1, 0, MiB) + bytes(1000), 0.0)
    assert pool.stats.outstanding == 1
    core.connection_lost(0.0)
    assert pool.stats.outstanding == 0
    core.reply_ok(1)  # answering after the loss is silently dropped
    assert core.data_to_send() == []


def test_export_info_validates_block_sizes() -> None:
    with pytest.raises(ValueError):
        ExportInfo(size=1, min_block=3)
    with pytest.raises(ValueError):
        ExportInfo(size=1, preferred_block=256)
    with pytest.raises(ValueError):
        ExportInfo(size=1, max_block=1 << 32)


def test_nbd_uris_follow_the_uri_specification() -> None:
    from dst.frontends.nbd import nbd_uri
    from dst.units import Address

    assert nbd_uri(Address(path="/run/dst x.sock")) == "nbd+unix:///?socket=/run/dst%20x.sock"
    assert nbd_uri(Address(host="127.0.0.1", port=10809)) == "nbd://127.0.0.1:10809/"
    assert nbd_uri(Address(host="::1", port=5), "a b") == "nbd://[::1]:5/a%20b"


def test_the_nbd_package_is_sans_io() -> None:
    forbidden = {"asyncio", "socket", "selectors", "threading", "subprocess", "time"}
    for path in Path(dst.nbd.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
