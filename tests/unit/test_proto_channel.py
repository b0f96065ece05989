"""The sealed channel on its own: record layout, pooled buffers and their release."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from dst.crypto.aead import Opener, Sealer, get_cipher
from dst.proto import channel as channel_mod
from dst.proto.channel import POOLED_MIN, Channel
from dst.proto.wire import REQ_HEADER

KEY = bytes(range(32))


def sealed_pair(inline_limit: int | None = None) -> tuple[Channel, Channel, list[bytes]]:
    cipher = get_cipher("aes-256-gcm")
    if inline_limit is not None:
        cipher = dataclasses.replace(cipher, inline_limit=inline_limit)
    chunks: list[bytes] = []
    tx = Channel(lambda c: None, max_record=64 << 20)
    rx = Channel(lambda c: chunks.append(bytes(c)), max_record=64 << 20)
    tx.start_sealing(Sealer(cipher, KEY), Opener(cipher, KEY))
    rx.start_sealing(Sealer(cipher, KEY), Opener(cipher, KEY))
    return tx, rx, chunks


def test_a_large_payload_is_a_record_of_its_own_and_its_buffer_returns_after_sending() -> None:
    tx, rx, chunks = sealed_pair()
    head, payload = bytes(REQ_HEADER.size), bytes(range(256)) * (POOLED_MIN // 256)
    pool = channel_mod._RECORDS.stats
    before = pool.outstanding
    tx.send([head, memoryview(payload)])
    wire = b"".join(bytes(b) for b in tx.data_to_send())
    lengths = [int.from_bytes(wire[:4], "little")]
    lengths.append(int.from_bytes(wire[4 + lengths[0] : 8 + lengths[0]], "little"))
    assert lengths == [len(head) + 16, len(payload) + 16]
    assert pool.outstanding == before + 1  # the payload's record, until the socket sent it
    for release in tx.take_handed():
        release()
    assert pool.outstanding == before
    target = memoryview(bytearray(len(payload)))
    rx.frames.expect(len(head))
    rx.feed(wire[: 4 + lengths[0]])
    assert chunks == [head]
    rx.frames.expect(len(payload), target)
    rx.feed(wire[4 + lengths[0] :])
    assert bytes(target) == payload
    assert rx.frames.direct_bytes == len(payload)  # opened straight into the target


def test_a_dropped_connection_keeps_a_record_buffer_until_its_sealing_job_ends() -> None:
    """Released while a worker still seals into it, the buffer could be handed to another
    record and overwritten under the worker's feet."""
    tx, _rx, _chunks = sealed_pair(inline_limit=4096)
    tx.offload = True
    pool = channel_mod._RECORDS.stats
    before = pool.outstanding
    tx.send([bytes(REQ_HEADER.size), memoryview(bytes(POOLED_MIN))])
    jobs = tx.take_jobs()
    assert len(jobs) == 1
    tx.discard_output()
    for release in tx.take_handed():
        release()
    assert pool.outstanding == before + 1  # still the worker's
    jobs[0].run()
    jobs[0].finish()
    assert pool.outstanding == before


class FrameSink:
    """A frame parser like the cores': an 8-byte header with the payload length, then the
    payload into a buffer of its own (so the channel may open payload records into it)."""

    def __init__(self, rx: Channel) -> None:
        self.rx = rx
        self.payloads: list[bytes] = []
        self._target: memoryview | None = None
        rx.frames.expect(8)

    def on_chunk(self, chunk: memoryview) -> None:
        if self._target is None:
            n = int.from_bytes(chunk, "little")
            if n:
                self._target = memoryview(bytearray(n))
                self.rx.frames.expect(n, self._target)
            else:
                self.payloads.append(b"")
                self.rx.frames.expect(8)
        else:
            self.payloads.append(bytes(chunk))
            self._target = None
            self.rx.frames.expect(8)


sizes = st.sampled_from([0, 1, 4096, POOLED_MIN - 1, POOLED_MIN, POOLED_MIN + 1, 300_000])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(sizes, min_size=1, max_size=6),
    st.lists(st.integers(1, 400_000), min_size=1, max_size=40),
    st.sampled_from(["aes-256-gcm", "chacha20-poly1305"]),
)
def test_frames_survive_any_cut_of_the_record_stream(
    frame_sizes: list[int], cuts: list[int], cipher_name: str
) -> None:
    """Whatever sizes the socket hands over, every payload arrives whole and in order,
    large ones opened in place."""
    cipher = get_cipher(cipher_name)
    tx = Channel(lambda c: None, max_record=64 << 20)
    sink: FrameSink | None = None
    rx = Channel(lambda c: sink.on_chunk(c) if sink else None, max_record=64 << 20)
    tx.start_sealing(Sealer(cipher, KEY), Opener(cipher, KEY))
    rx.start_sealing(Sealer(cipher, KEY), Opener(cipher, KEY))
    sink = FrameSink(rx)
    sent = [bytes([i + 1]) * n for i, n in enumerate(frame_sizes)]
    for p in sent:
        tx.send([len(p).to_bytes(8, "little"), memoryview(p)] if p else [bytes(8)])
    wire = memoryview(b"".join(bytes(b) for b in tx.data_to_send()))
    pos, i = 0, 0
    while pos < len(wire):  # like a socket: recv_into whatever buffer the channel offers
        buf = rx.get_buffer()
        n = min(len(buf), cuts[i % len(cuts)], len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        rx.buffer_updated(n)
        pos, i = pos + n, i + 1
    assert sink.payloads == sent
    if any(n >= POOLED_MIN for n in frame_sizes):
        assert rx.frames.direct_bytes >= POOLED_MIN


def test_a_record_opened_on_a_worker_never_writes_into_the_parsers_buffer() -> None:
    """The connection may drop while the worker runs; the destination may by then belong
    to the next connection's reply, so a worker only ever writes its own pooled buffer."""
    tx, rx, _chunks = sealed_pair(inline_limit=4096)
    rx.offload = True
    head, payload = bytes(REQ_HEADER.size), bytes([7]) * POOLED_MIN
    tx.send([head, memoryview(payload)])
    wire = b"".join(bytes(b) for b in tx.data_to_send())
    target = memoryview(bytearray(len(payload)))
    rx.frames.expect(len(head))
    header_record = 4 + int.from_bytes(wire[:4], "little")
    rx.feed(wire[:header_record])
    rx.frames.expect(len(payload), target)
    rx.feed(wire[header_record:])
    jobs = rx.take_jobs()
    assert len(jobs) == 1
    rx.stop()  # the connection dropped
    jobs[0].run()
    jobs[0].finish()
    assert bytes(target) == bytes(len(payload))  # untouched
