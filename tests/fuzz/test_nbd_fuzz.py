"""Random bytes in random chunkings through the NBD server core.

Whatever arrives, the core yields events or a ProtocolViolation, never another
exception; it never asks the pool for more than its caps allow; and every buffer
it lent is back in the pool once the connection is gone.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dst.buffers import BufferPool, PooledBuffer
from dst.nbd import (
    Command,
    Disconnect,
    ExportChosen,
    ExportInfo,
    NbdServerConnection,
    ProtocolViolation,
    Request,
)
from dst.nbd.options import MAX_OPTION_LENGTH

SIZE = 1 << 20
MAX_BLOCK = 256 << 10
CAP = max(MAX_BLOCK, MAX_OPTION_LENGTH)
SERVED = {Command.READ, Command.WRITE, Command.FLUSH, Command.TRIM, Command.WRITE_ZEROES}


class CappedPool(BufferPool):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def get(self, length: int) -> PooledBuffer:
        self.largest = max(self.largest, length)
        assert length <= CAP, f"the core asked for {length} bytes"
        return super().get(length)


def option(opt: int, data: bytes) -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", opt, len(data)) + data


def go(name: bytes = b"") -> bytes:
    return option(7, struct.pack(">I", len(name)) + name + b"\x00\x01\x00\x03")


def request(cmd: int, flags: int, handle: int, offset: int, length: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length) + payload


u32 = st.integers(0, 2**32 - 1)
lengths = st.one_of(st.integers(0, 8192), st.integers(MAX_BLOCK - 4, MAX_BLOCK + 4), u32)
offsets = st.one_of(
    st.integers(0, SIZE), st.integers(SIZE - 8192, SIZE + 8192), st.integers(0, 2**64 - 1)
)

messages = st.one_of(
    st.binary(max_size=64),
    st.builds(
        option,
        st.one_of(st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11]), u32),
        st.binary(max_size=48),
    ),
    st.builds(lambda o, n: b"IHAVEOPT" + struct.pack(">II", o, n), u32, u32),
    st.builds(go, st.sampled_from([b"", b"default", b"other", b"\xff"])),
    st.builds(
        request,
        st.one_of(st.integers(0, 9), st.integers(0, 2**16 - 1)),
        st.one_of(st.sampled_from([0, 1, 2, 3, 4]), st.integers(0, 2**16 - 1)),
        st.integers(0, 2**64 - 1),
        offsets,
        lengths,
        st.binary(max_size=2048),
    ),
)


@st.composite
def plausible_requests(draw: st.DrawFn) -> bytes:
    """Mostly well-formed requests (WRITE followed by its payload), some out of bounds."""
    cmd = draw(st.sampled_from([0, 0, 1, 1, 3, 4, 6, 2, 5, 7, 42]))
    flags = draw(st.sampled_from([0, 0, 1, 2, 3, 4, 0x10, 0x80]))
    offset = draw(st.one_of(st.integers(0, SIZE - 1), offsets))
    length = draw(st.one_of(st.integers(0, 64 << 10), st.integers(MAX_BLOCK - 1, MAX_BLOCK + 1)))
    payload = bytes(length) if cmd == 1 and length < (1 << 20) else b""
    handle = draw(st.integers(0, 2**64 - 1))
    return request(cmd, flags, handle, offset, length, payload)


preludes = st.sampled_from(
    [
        b"",
        struct.pack(">I", 3),
        struct.pack(">I", 1) + go(),
        struct.pack(">I", 3) + option(8, b"") + go(),
    ]
)


def drive(wire: bytes, chunks: list[int], zero_copy: bool) -> None:
    pool = CappedPool()
    core = NbdServerConnection(
        {"default": ExportInfo(size=SIZE, can_trim=True, max_block=MAX_BLOCK)}, pool=pool
    )
    violated = False
    pos = 0
    sizes = iter(chunks)
    while pos < len(wire):
        step = next(sizes, 4096)
        if zero_copy:
            buf = core.get_buffer()
            assert buf.nbytes > 0
            n = min(buf.nbytes, step, len(wire) - pos)
            buf[:n] = wire[pos : pos + n]
            core.buffer_updated(n, 0.0)
        else:
            n = min(step, len(wire) - pos)
            core.receive_data(wire[pos : pos + n], 0.0)
        pos += n
        while (ev := core.next_event()) is not None:
            assert not violated, "an event after a protocol violation"
            event(type(ev).__name__)
            if isinstance(ev, ProtocolViolation):
                violated = True
            elif isinstance(ev, Request):
                export = core.export
                assert export is not None and ev.command in SERVED
                assert ev.offset + ev.length <= export.size
                if ev.command in (Command.READ, Command.WRITE):
                    assert ev.length <= export.max_block
                if ev.command == Command.WRITE:
                    assert ev.payload is not None and ev.payload.view.nbytes == ev.length
                    ev.payload.release()
                    core.reply_ok(ev.handle)
                elif ev.command == Command.READ:
                    core.reply_read(ev.handle, memoryview(bytes(ev.length)))
                else:
                    core.reply_error(ev.handle, 5, "fuzz")
            else:
                assert isinstance(ev, ExportChosen | Disconnect)
        core.data_to_send()
    core.connection_lost(0.0)
    assert pool.stats.outstanding == 0
    assert pool.largest <= CAP


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prelude=preludes,
    body=st.lists(messages, max_size=12),
    chunks=st.lists(st.integers(1, 3000), max_size=40),
    zero_copy=st.booleans(),
)
def test_random_messages_give_only_events(
    prelude: bytes, body: list[bytes], chunks: list[int], zero_copy: bool
) -> None:
    drive(prelude + b"".join(body), chunks, zero_copy)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    structured=st.booleans(),
    body=st.lists(plausible_requests(), min_size=1, max_size=16),
    tail=st.one_of(st.just(b""), messages),
    chunks=st.lists(st.integers(1, 70000), max_size=40),
    zero_copy=st.booleans(),
)
def test_random_requests_after_go(
    structured: bool, body: list[bytes], tail: bytes, chunks: list[int], zero_copy: bool
) -> None:
    prelude = struct.pack(">I", 3) + (option(8, b"") if structured else b"") + go()
    drive(prelude + b"".join(body) + tail, chunks, zero_copy)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=4096), chunks=st.lists(st.integers(1, 512), max_size=20))
def test_random_bytes_give_only_events(data: bytes, chunks: list[int]) -> None:
    drive(data, chunks, zero_copy=False)
    drive(struct.pack(">I", 1) + go() + data, chunks, zero_copy=True)
