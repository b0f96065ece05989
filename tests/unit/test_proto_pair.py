"""Client and export-node cores back to back with virtual time: the transaction engine."""

from __future__ import annotations

import errno
from collections.abc import Sequence

import pytest

from dst.proto.client import ClientConfig
from dst.proto.events import (
    ChecksumMismatch,
    Completed,
    ConnectionDead,
    Ready,
    Refused,
    Resent,
)
from dst.proto.server import ServerConfig
from dst.proto.wire import REP_HEADER, Command, Refusal, ReplyHeader, Status
from tests.pair import IDENTITY, FakeExport, Pair


def completed(events: Sequence[object]) -> dict[int, Completed]:
    return {e.txn: e for e in events if isinstance(e, Completed)}


def ready_pair(**kw: object) -> Pair:
    p = Pair(**kw)  # type: ignore[arg-type]
    p.connect()
    evs = p.take_events()
    assert any(isinstance(e, Ready) for e in evs), evs
    return p


def test_handshake_negotiates_terms() -> None:
    p = ready_pair()
    w = p.client.welcome
    assert w is not None
    assert w.size == 1 << 20 and w.identity == IDENTITY and not w.read_only
    assert w.checksum == "crc32c" and w.cipher == "none"
    assert w.queue_depth == 128 and w.max_request == 32 << 20
    assert p.client.generation == 1


def test_write_then_read_round_trip() -> None:
    p = ready_pair()
    data = memoryview(bytes(range(256)) * 16)
    w = p.client.submit(Command.WRITE, 4096, len(data), 0, p.now, payload=data)
    p.run()
    buf = bytearray(len(data))
    r = p.client.submit(Command.READ, 4096, len(data), 0, p.now, into=memoryview(buf))
    p.run()
    done = completed(p.take_events())
    assert done[w].status == 0 and done[r].status == 0
    assert bytes(buf) == bytes(data)
    assert bytes(p.export.data[4096 : 4096 + len(data)]) == bytes(data)


def test_many_in_flight_replies_out_of_order() -> None:
    p = ready_pair(auto_reply=False)
    bufs = [bytearray(512) for _ in range(20)]
    p.export.data[:] = bytes(i % 251 for i in range(len(p.export.data)))
    ids = [
        p.client.submit(Command.READ, i * 512, 512, 0, p.now, into=memoryview(bufs[i]))
        for i in range(20)
    ]
    p.run()
    assert len(p.held) == 20
    for req in reversed(p.held):
        p.execute(req)
    p.held.clear()
    p.run()
    done = completed(p.take_events())
    assert set(done) == set(ids)
    for i, b in enumerate(bufs):
        assert bytes(b) == bytes(p.export.data[i * 512 : (i + 1) * 512])


def test_timeout_resends_same_id_with_higher_attempt() -> None:
    p = ready_pair(auto_reply=False)
    data = memoryview(b"x" * 100)
    tid = p.client.submit(Command.WRITE, 0, 100, 0, p.now, payload=data)
    p.run()
    assert [r.txn for r in p.held] == [tid] and p.held[0].attempt == 1
    p.advance(1.01)
    resent = [e for e in p.take_events() if isinstance(e, Resent)]
    assert resent and resent[0].txn == tid and resent[0].attempt == 2
    assert [(r.txn, r.attempt) for r in p.held] == [(tid, 1), (tid, 2)]
    # both attempts are answered: applied once (replay cache), completed once
    first, second = p.held
    p.held.clear()
    p.execute(first)
    p.execute(second)
    p.run()
    done = [e for e in p.take_events() if isinstance(e, Completed)]
    assert [d.txn for d in done] == [tid] and done[0].status == 0
    assert p.export.applied == [(tid, Command.WRITE)]
    assert p.client.stats.late_replies == 1


def test_failure_only_after_all_resends_within_budget() -> None:
    cfg = ClientConfig(checksums=("crc32c",), resends=3, resend_timeout=1.0)
    p = ready_pair(client_config=cfg, auto_reply=False)
    tid = p.client.submit(Command.FLUSH, 0, 0, 0, p.now)
    p.run()
    p.advance(3.9)
    assert not completed(p.take_events())
    p.advance(0.2)
    done = completed(p.take_events())
    assert done[tid].status == errno.EIO and done[tid].timed_out
    assert done[tid].attempts == 4  # 1 + 3 resends
    assert p.client.stats.failed == 1


def test_clock_runs_while_disconnected_then_resend_on_reconnect() -> None:
    p = ready_pair(auto_reply=False)
    data = memoryview(b"a" * 10)
    tid = p.client.submit(Command.WRITE, 0, 10, 0, p.now, payload=data)
    p.run()
    p.held.clear()  # lost with the connection
    p.disconnect()
    p.advance(1.5)  # one expiry while disconnected
    assert not completed(p.take_events())
    p.auto_reply = True
    p.connect()
    evs = p.take_events()
    assert any(isinstance(e, Ready) and e.reconnect and e.generation == 2 for e in evs)
    done = completed(evs)
    assert done[tid].status == 0
    assert bytes(p.export.data[:10]) == b"a" * 10


def test_io_while_disconnected_waits_and_fails_at_budget() -> None:
    cfg = ClientConfig(checksums=("crc32c",), resends=2, resend_timeout=1.0)
    p = ready_pair(client_config=cfg)
    p.disconnect()
    tid = p.client.submit(Command.FLUSH, 0, 0, 0, p.now)
    p.advance(2.9)
    assert not completed(p.take_events())
    p.advance(0.2)
    assert completed(p.take_events())[tid].timed_out


def test_reply_for_unknown_id_is_a_protocol_error() -> None:
    p = ready_pair()
    bogus = ReplyHeader(Command.FLUSH, 0, 999, 1, 0).pack()
    from dst.crypto.checksums import get_checksum

    p.client.receive_data(bogus + get_checksum("crc32c").compute(bogus), p.now)
    evs = []
    while (e := p.client.next_event()) is not None:
        evs.append(e)
    assert any(isinstance(e, ConnectionDead) and "never sent" in e.reason for e in evs)


def test_corrupt_request_is_answered_checksum_and_resent_at_once() -> None:
    p = ready_pair()
    data = memoryview(b"z" * 64)
    tid = p.client.submit(Command.WRITE, 128, 64, 0, p.now, payload=data)
    out = bytearray(b"".join(bytes(x) for x in p.client.data_to_send()))
    out[40] ^= 0xFF  # a payload byte
    assert p.server is not None
    p.server.receive_data(bytes(out), 0.0)
    p.run()
    evs = p.take_events()
    assert any(isinstance(e, ChecksumMismatch) for e in evs)
    assert any(isinstance(e, Resent) and e.txn == tid for e in evs)
    assert completed(evs)[tid].status == 0
    assert bytes(p.export.data[128:192]) == b"z" * 64
    assert p.now == 0.0  # no timeout was needed


def test_corrupt_read_reply_is_dropped_and_resent() -> None:
    p = ready_pair(auto_reply=False)
    p.export.data[0:32] = b"q" * 32
    buf = bytearray(32)
    tid = p.client.submit(Command.READ, 0, 32, 0, p.now, into=memoryview(buf))
    p.run()
    req = p.held.pop()
    assert p.server is not None
    p.server.reply(req, 0, memoryview(bytes(p.export.data[0:32])))
    wire = bytearray(b"".join(bytes(x) for x in p.server.data_to_send()))
    wire[REP_HEADER.size + 3] ^= 1
    p.client.receive_data(bytes(wire), p.now)
    p.auto_reply = True
    p.run()
    for r in p.held:
        p.execute(r)
    p.run()
    evs = p.take_events()
    assert any(isinstance(e, ChecksumMismatch) and e.where == "reply" for e in evs)
    assert completed(evs)[tid].status == 0 and bytes(buf) == b"q" * 32


def test_error_reply_is_an_answer_not_resent() -> None:
    p = ready_pair()
    tid = p.client.submit(
        Command.READ, (1 << 20) - 10, 20, 0, p.now, into=memoryview(bytearray(20))
    )
    p.run()
    done = completed(p.take_events())
    assert done[tid].status == Status.EINVAL and not done[tid].timed_out
    assert p.client.stats.resends == 0


def test_idle_ping_keeps_connection_and_silence_kills_it() -> None:
    p = ready_pair()
    p.advance(5.01)
    assert p.client.stats.pings == 1
    assert p.client.connected
    p.cut = True  # the peer silently stopped answering
    p.advance(5.0)
    p.advance(2.1)
    evs = p.take_events()
    assert any(isinstance(e, ConnectionDead) and "ping" in e.reason for e in evs)


def test_read_only_export_refuses_writes_with_eperm() -> None:
    p = ready_pair(export=FakeExport(read_only=True))
    assert p.client.welcome is not None and p.client.welcome.read_only
    tid = p.client.submit(Command.WRITE, 0, 4, 0, p.now, payload=memoryview(b"abcd"))
    p.run()
    assert completed(p.take_events())[tid].status == Status.EPERM
    assert p.export.data[:4] == bytes(4)


def test_no_common_checksum_is_refused_with_both_lists() -> None:
    p = Pair(
        client_config=ClientConfig(checksums=("sha256",)),
        server_config=ServerConfig(checksums=("crc32c",)),
    )
    p.connect()
    ref = [e for e in p.take_events() if isinstance(e, Refused)]
    assert ref and ref[0].reason == Refusal.NO_COMMON_CHECKSUM and ref[0].permanent
    assert "crc32c" in ref[0].message and "sha256" in ref[0].message


def test_identity_change_on_reconnect_is_refused_by_client() -> None:
    p = ready_pair()
    p.disconnect()
    import uuid

    import tests.pair as pair_mod

    old = pair_mod.IDENTITY
    pair_mod.IDENTITY = uuid.uuid4()
    try:
        p.connect()
    finally:
        pair_mod.IDENTITY = old
    ref = [e for e in p.take_events() if isinstance(e, Refused)]
    assert ref and ref[0].reason == Refusal.IDENTITY_CHANGED and not ref[0].by_peer


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305", "none"])
def test_authenticated_and_sealed_round_trip(cipher: str) -> None:
    key = bytes(range(32))
    p = ready_pair(
        client_config=ClientConfig(key=key, checksums=("none",)),
        server_config=ServerConfig(key=key, ciphers=(cipher,), checksums=("none",)),
    )
    assert p.client.welcome is not None and p.client.welcome.cipher == cipher
    data = memoryview(b"secret!!" * 512)
    w = p.client.submit(Command.WRITE, 0, len(data), 0, p.now, payload=data)
    buf = bytearray(len(data))
    r = p.client.submit(Command.READ, 0, len(data), 0, p.now, into=memoryview(buf))
    p.run()
    done = completed(p.take_events())
    assert done[w].status == 0 and done[r].status == 0 and buf == data


def test_wrong_key_is_refused_on_both_sides() -> None:
    p = Pair(
        client_config=ClientConfig(key=b"\x01" * 32),
        server_config=ServerConfig(key=b"\x02" * 32, ciphers=("aes-256-gcm",)),
    )
    p.connect()
    ref = [e for e in p.take_events() if isinstance(e, Refused)]
    assert ref and ref[0].reason == Refusal.AUTH_FAILED and ref[0].by_peer
    assert "key differs" in ref[0].message


@pytest.mark.parametrize("cipher", ["chacha20-poly1305", "aes-256-gcm", "none"])
@pytest.mark.parametrize("checksum", ["sha256", "crc32c", "none"])
def test_offloaded_jobs_keep_frame_order(
    cipher: str, checksum: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large payloads sealed/checksummed as jobs finishing out of order: bytes stay in order.

    Both AEADs run inline by measurement on the machines here; ChaCha20 gets a 32 KiB
    inline limit for this test so the records' worker path (a bigger machine's) is run."""
    import dataclasses

    from dst.crypto import aead

    chacha = aead.CIPHERS["chacha20-poly1305"]
    monkeypatch.setitem(
        aead.CIPHERS, chacha.name, dataclasses.replace(chacha, inline_limit=32 << 10)
    )
    key = bytes(range(32)) if cipher != "none" else None
    p = Pair(
        client_config=ClientConfig(key=key, checksums=(checksum,), offload=True),
        server_config=ServerConfig(key=key, ciphers=(cipher,), checksums=(checksum,), offload=True),
        export=FakeExport(size=4 << 20),
    )
    p.reverse_jobs = True
    p.connect()
    assert any(isinstance(e, Ready) for e in p.take_events())
    blocks = [bytes([i]) * (512 << 10) for i in range(6)]
    ids = [
        p.client.submit(Command.WRITE, i * len(b), len(b), 0, p.now, payload=memoryview(b))
        for i, b in enumerate(blocks)
    ]
    bufs = [bytearray(len(b)) for b in blocks]
    rids = [
        p.client.submit(Command.READ, i * len(b), len(b), 0, p.now, into=memoryview(bufs[i]))
        for i, b in enumerate(blocks)
    ]
    p.run()
    done = completed(p.take_events())
    assert all(done[t].status == 0 for t in ids + rids), done
    assert [bytes(b) for b in bufs] == blocks
    if cipher == "chacha20-poly1305" or checksum == "sha256":
        assert p.jobs_run > 0


def test_reply_buffers_are_released_only_after_their_frame_is_handed_over() -> None:
    """A read buffer may be reused only once its whole frame (data and the trailer computed
    by a job) left the core: released earlier, another read could overwrite data that is
    still to be sent, and its checksum would be computed over the wrong bytes."""
    from dst.proto.events import Request

    p = Pair(
        client_config=ClientConfig(checksums=("sha256",), offload=True),
        server_config=ServerConfig(checksums=("sha256",), offload=True),
        export=FakeExport(size=4 << 20),
        auto_reply=False,
    )
    p.connect()
    bufs = [bytearray(512 << 10) for _ in range(2)]
    for i in range(2):
        p.client.submit(Command.READ, i << 20, 512 << 10, 0, p.now, into=memoryview(bufs[i]))
    p.run()
    a, b = p.held
    assert isinstance(a, Request) and isinstance(b, Request)
    srv = p.server
    assert srv is not None
    released: list[str] = []
    data = [bytearray(b"A" * (512 << 10)), bytearray(b"B" * (512 << 10))]
    srv.reply(a, 0, memoryview(data[0]), lambda: released.append("a"))
    srv.reply(b, 0, memoryview(data[1]), lambda: released.append("b"))
    jobs = srv.take_jobs()
    assert len(jobs) == 2
    first = srv.data_to_send()
    assert sum(len(x) for x in first) == 24 + (512 << 10)  # A's header and data, no trailer yet
    assert srv.take_handed() == []
    jobs[1].run()
    srv.job_done(jobs[1], 0.0)
    assert srv.data_to_send() == [] and srv.take_handed() == []  # B waits behind A's trailer
    jobs[0].run()
    srv.job_done(jobs[0], 0.0)
    rest = srv.data_to_send()
    assert len(rest) == 4  # A's trailer, B's header, data and trailer
    assert [f() for f in srv.take_handed()] == [None, None] and released == ["a", "b"]


def records(stream: bytes) -> list[int]:
    """The sealed lengths of the records in ``stream`` (u32 length, then that many bytes)."""
    out, pos = [], 0
    while pos < len(stream):
        n = int.from_bytes(stream[pos : pos + 4], "little")
        out.append(n)
        pos += 4 + n
    assert pos == len(stream)
    return out


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305"])
def test_large_payloads_travel_in_records_of_their_own_opened_in_place(cipher: str) -> None:
    """A 256 KiB READ reply is a small header record and a payload record; the client
    opens the payload record straight into the reader's buffer (no copy), and a tampered
    payload record completes nothing: the read is resent on the next connection."""
    key = bytes(range(32))
    p = ready_pair(
        client_config=ClientConfig(key=key, checksums=("none",)),
        server_config=ServerConfig(key=key, ciphers=(cipher,), checksums=("none",)),
        export=FakeExport(size=1 << 20),
    )
    p.export.data[: 256 << 10] = bytes(range(256)) * 1024
    buf = bytearray(256 << 10)
    r = p.client.submit(Command.READ, 0, len(buf), 0, p.now, into=memoryview(buf))
    assert p.server is not None
    p.run(deliver=False)
    p.server.receive_data(bytes(p.c2s), 0.0)
    p.c2s.clear()
    p._server_events()
    reply = bytearray(b"".join(bytes(b) for b in p.server.data_to_send()))
    assert records(bytes(reply)) == [REP_HEADER.size + 16, (256 << 10) + 16]
    reply[4 + REP_HEADER.size + 16 + 4 + 1000] ^= 0x20  # one payload ciphertext bit
    p.client.receive_data(bytes(reply), p.now)
    evs = []
    while (ev := p.client.next_event()) is not None:
        evs.append(ev)
    assert r not in completed(evs)
    dead = [e for e in evs if isinstance(e, ConnectionDead)]
    assert dead and "AEAD tag check failed" in dead[0].reason
    p.disconnect()
    p.connect()
    p.run()
    done = completed(p.take_events())
    assert done[r].status == 0 and bytes(buf) == bytes(p.export.data[: 256 << 10])
    assert p.client._channel.frames.direct_bytes >= 256 << 10  # opened where it belongs


def test_abandoned_transactions_fail_at_once_and_are_never_resent() -> None:
    """What a mirror does to a leg it stopped waiting for: every pending transaction
    fails now (sent or not), nothing more is read on that connection, and the next
    connection resends none of them."""
    p = ready_pair(auto_reply=False)
    sent = p.client.submit(Command.WRITE, 0, 4, 0, p.now, payload=memoryview(b"old!"))
    p.run()
    assert [r.txn for r in p.held] == [sent]
    p.held.clear()  # still in the network
    p.disconnect()
    unsent = p.client.submit(Command.WRITE, 8, 4, 0, p.now, payload=memoryview(b"also"))
    p.connect()
    p.take_events()
    p.held.clear()
    assert p.client.abandon(errno.ECANCELED, "given up: test") == 2
    p.run()
    done = completed(p.take_events())
    assert {t: e.status for t, e in done.items()} == {
        sent: errno.ECANCELED,
        unsent: errno.ECANCELED,
    }
    assert p.client.in_flight == 0
    p.disconnect()
    p.auto_reply = True
    p.connect()
    p.advance(30.0)  # far past every resend timeout
    assert not completed(p.take_events())
    assert p.export.applied == [] and bytes(p.export.data[:12]) == bytes(12)
