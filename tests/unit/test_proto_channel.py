"""The sealed channel on its own: record layout, pooled buffers and their release."""

from __future__ import annotations

import dataclasses

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
