"""The receive buffer every core reads through: chunks, payloads in place, skips, drops."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dst.proto.reader import ChunkReader


class Owner:
    """A tiny protocol: 4-byte header (kind, n), then n bytes; kind 0 keeps them in a
    target buffer, kind 1 skips them, kind 2 keeps them but drops them after the first
    byte arrived (the owner gave the buffer up)."""

    def __init__(self, direct_min: int) -> None:
        self.rx = ChunkReader(self.on_header, staging_size=64, direct_min=direct_min)
        self.rx.expect(4)
        self.got: list[tuple[int, bytes]] = []
        self.target = bytearray()

    def on_header(self, head: memoryview) -> None:
        kind, n = head[0], int.from_bytes(head[1:4], "big")
        if kind == 1:
            self.rx.skip(n, lambda: self.ended(1, b""))
            return
        self.target = bytearray(n)
        self.rx.expect(n, memoryview(self.target), lambda v: self.ended(kind, bytes(v)))

    def ended(self, kind: int, data: bytes) -> None:
        self.got.append((kind, data))
        self.rx.expect(4)

    def feed(self, wire: bytes, sizes: list[int]) -> None:
        at, steps = 0, iter(sizes)
        while at < len(wire):
            buf = self.rx.get_buffer()
            assert buf.nbytes > 0
            n = min(buf.nbytes, next(steps, 7), len(wire) - at)
            buf[:n] = wire[at : at + n]
            self.rx.buffer_updated(n)
            at += n


def message(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + len(payload).to_bytes(3, "big") + payload


@given(
    msgs=st.lists(st.tuples(st.sampled_from([0, 1]), st.binary(min_size=1, max_size=300))),
    sizes=st.lists(st.integers(1, 100)),
    direct_min=st.sampled_from([1, 16, 1 << 20]),
)
def test_payloads_and_skips_in_any_chunking(
    msgs: list[tuple[int, bytes]], sizes: list[int], direct_min: int
) -> None:
    owner = Owner(direct_min)
    owner.feed(b"".join(message(k, p) for k, p in msgs), sizes)
    assert owner.got == [(k, p if k == 0 else b"") for k, p in msgs]


def test_a_dropped_target_gets_no_more_bytes_and_the_stream_goes_on() -> None:
    owner = Owner(direct_min=1)
    payload = bytes(range(1, 101))
    wire = message(0, payload) + message(0, b"next")
    owner.feed(wire[:14], [14])  # the header and the first 10 payload bytes
    target = owner.target
    assert target[:10] == payload[:10]
    owner.rx.drop_target()  # e.g. the request timed out: its buffer is the caller's again
    owner.feed(wire[14:], [5, 50, 200])
    assert target[10:] == bytes(90), "bytes were written into a dropped target"
    assert owner.got == [(0, b""), (0, b"next")]


def test_after_stop_nothing_is_delivered() -> None:
    owner = Owner(direct_min=1)
    owner.feed(message(0, b"abc"), [100])
    owner.rx.stop()
    owner.feed(message(0, b"def"), [100])
    assert owner.got == [(0, b"abc")]
