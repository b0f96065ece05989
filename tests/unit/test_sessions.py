"""The one-writer rules as tables (no sockets), and the probe ping between two cores."""

from __future__ import annotations

import pytest

from dst.crypto.checksums import get_checksum
from dst.proto import tlv
from dst.proto.client import ClientConfig, ClientCore
from dst.proto.events import Completed, ConnectionDead, ProbeAnswered, Ready
from dst.proto.handshake import F, Hello
from dst.proto.server import ServerConfig
from dst.proto.wire import Command, Refusal, RequestHeader
from dst.server.sessions import Decision, Session, SessionTable, probe_key
from tests.pair import Pair

A1, A2, B1 = b"a" * 16, b"A" * 16, b"b" * 16


def hello(
    client: str,
    session: bytes,
    generation: int = 1,
    takeover: bool = False,
    ping_timeout: float | None = 2.0,
) -> Hello:
    return Hello(
        "default", client, session, generation, takeover=takeover, ping_timeout=ping_timeout
    )


def admit(table: SessionTable, h: Hello, now: float = 0.0) -> Session:
    d = table.decide(h, False, now)
    assert d.session is not None and d.refusal is None and d.probe is None, d
    return table.install(d, h)


def test_reconnect_of_the_same_session_fences_its_older_connection() -> None:
    t = SessionTable("default", shared=False)
    s = admit(t, hello("alpha", A1))
    d = t.decide(hello("alpha", A1, generation=2), False, 1.0)
    assert d.session is s and d.fence == [s] and d.probe is None
    d = t.decide(hello("alpha", A1, generation=1), False, 1.0)
    assert d.refusal == Refusal.STALE_GENERATION


def test_new_session_of_a_live_client_id_is_probed_then_refused_if_it_answers() -> None:
    t = SessionTable("default", shared=False)
    old = admit(t, hello("alpha", A1))
    old.address = "192.0.2.7:5000"
    h = hello("alpha", A2)
    d = t.decide(h, False, 1.0)
    assert d.probe is old and d.session is None and d.refusal is None
    d = t.decide(h, False, 1.0, {probe_key(old): True})
    assert d.refusal == Refusal.BUSY
    assert "in use by client 'alpha' from 192.0.2.7:5000 since " in d.message
    assert "stop that client node or pass --takeover" in d.message
    assert t.writers == {A1: old}


def test_new_session_replaces_a_live_one_that_does_not_answer_the_probe() -> None:
    t = SessionTable("default", shared=False)
    old = admit(t, hello("alpha", A1))
    h = hello("alpha", A2)
    d = t.decide(h, False, 1.0, {probe_key(old): False})
    assert d.session is not None and d.fence == [old]
    t.install(d, h)
    assert list(t.writers) == [A2]
    later = t.decide(hello("alpha", A1, generation=2), False, 2.0)
    assert later.refusal == Refusal.REPLACED and "replaced by a newer session" in later.message


def test_probe_result_of_an_older_connection_does_not_count_after_a_reconnect() -> None:
    t = SessionTable("default", shared=False)
    old = admit(t, hello("alpha", A1))
    stale = {probe_key(old): False}
    t.install(t.decide(hello("alpha", A1, generation=2), False, 1.0), hello("alpha", A1, 2))
    assert t.decide(hello("alpha", A2), False, 1.0, stale).probe is old


def test_takeover_fences_a_live_session_without_probing() -> None:
    t = SessionTable("default", shared=False)
    old = admit(t, hello("alpha", A1))
    d = t.decide(hello("alpha", A2, takeover=True), False, 1.0)
    assert d.probe is None and d.fence == [old] and d.session is not None


def test_gone_connection_is_replaced_without_probe_or_takeover() -> None:
    t = SessionTable("default", shared=False)
    old = admit(t, hello("alpha", A1))
    t.disconnected(old, 1.0)
    d = t.decide(hello("alpha", A2), False, 1.5)
    assert d.probe is None and d.fence == [old] and d.session is not None


def test_a_client_that_cannot_be_probed_counts_as_alive() -> None:
    t = SessionTable("default", shared=False)
    admit(t, hello("alpha", A1, ping_timeout=None))  # an older client node
    d = t.decide(hello("alpha", A2), False, 1.0)
    assert d.probe is None and d.refusal == Refusal.BUSY and "--takeover" in d.message


def test_clean_detach_releases_the_claim_at_once_an_unclean_loss_keeps_it() -> None:
    t = SessionTable("default", shared=False, linger=120.0)
    s = admit(t, hello("alpha", A1))
    t.disconnected(s, 10.0, clean=True)
    assert t.writers == {}
    admit(t, hello("beta", B1), now=10.1)

    t = SessionTable("default", shared=False, linger=120.0)
    s = admit(t, hello("alpha", A1))
    t.disconnected(s, 10.0)
    d = t.decide(hello("beta", B1), False, 41.0)
    assert d.refusal == Refusal.BUSY
    assert "lost its connection 31 s ago" in d.message and "expires in 89 s" in d.message
    assert "--takeover" in d.message
    desc = s.describe(41.0, 120.0)
    assert desc["connected"] is False and desc["claim_expires_in"] == 89.0
    assert desc["claim_expires_at"] == 130.0 and desc["disconnected_at"] == 10.0
    assert t.decide(hello("beta", B1), False, 130.5).fence == [s]  # expired
    d = t.decide(hello("beta", B1, takeover=True), False, 41.0)
    assert d.fence == [s] and d.session is not None


def test_another_live_client_id_is_busy_even_with_takeover_unless_shared() -> None:
    t = SessionTable("default", shared=False)
    alpha = admit(t, hello("alpha", A1))
    for take in (False, True):
        h = hello("beta", B1, takeover=take)
        assert t.decide(h, False, 1.0).probe is alpha
        d = t.decide(h, False, 1.0, {probe_key(alpha): True})
        assert (
            d.refusal == Refusal.BUSY and "client 'alpha'" in d.message and "--shared" in d.message
        )
        assert d.drop == []
    shared = SessionTable("default", shared=True)
    a = admit(shared, hello("alpha", A1))
    admit(shared, hello("beta", B1))
    assert shared.decide(hello("alpha", A2), False, 1.0).probe is a  # the client-id rule holds


def test_another_client_id_that_fails_the_probe_is_closed_as_lost() -> None:
    t = SessionTable("default", shared=False, linger=120.0)
    alpha = admit(t, hello("alpha", A1))
    silent = {probe_key(alpha): False}
    d = t.decide(hello("beta", B1), False, 1.0, silent)
    assert d.refusal == Refusal.BUSY and d.drop == [alpha] and d.session is None
    assert "did not answer a probe ping" in d.message and "expires in 120 s" in d.message
    assert "--takeover" in d.message
    d = t.decide(hello("beta", B1, takeover=True), False, 1.0, silent)
    assert d.refusal is None and d.fence == [alpha] and d.session is not None
    # a lost session that comes back is its own reconnect, not refused
    t.disconnected(alpha, 1.0)
    back = t.decide(hello("alpha", A1, generation=2), False, 2.0)
    assert back.session is alpha and back.refusal is None


def test_read_only_sessions_are_not_limited() -> None:
    t = SessionTable("default", shared=False)
    admit(t, hello("alpha", A1))
    d: Decision = t.decide(hello("alpha", A2), True, 1.0)
    assert d.session is not None and d.session.read_only and not d.fence


def test_connected_session_shows_no_claim_expiry() -> None:
    t = SessionTable("default", shared=False)
    d = admit(t, hello("alpha", A1)).describe(5.0)
    assert d["connected"] is True and "claim_expires_in" not in d


# ---- the wire: HELLO fields and the probe ping ------------------------------------------


def test_hello_fields_round_trip_and_are_optional() -> None:
    h = hello("alpha", A1, takeover=True, ping_timeout=1.5)
    back = Hello.decode(h.encode())
    assert back.takeover is True and back.ping_timeout == 1.5
    old = Hello("default", "alpha", A1, 1)  # as an older client node sends it
    body = old.encode()
    assert F.TAKEOVER not in [t for t, _ in tlv.decode(body)]
    back = Hello.decode(body)
    assert back.takeover is False and back.ping_timeout is None


def test_an_older_export_node_ignores_the_new_hello_fields() -> None:
    """What an export node of before these fields does: skip types it does not know."""
    body = hello("alpha", A1, takeover=True, ping_timeout=2.0).encode()
    known = {int(f) for f in F if f not in (F.TAKEOVER, F.PING_TIMEOUT)}
    seen = [t for t, _ in tlv.decode(body)]
    new = [t for t in seen if t not in known]
    assert new == [F.TAKEOVER, F.PING_TIMEOUT]
    assert all(not t & tlv.CRITICAL for t in new)


def probed_pair(**kw: object) -> Pair:
    p = Pair(**kw)  # type: ignore[arg-type]
    p.connect()
    assert any(isinstance(e, Ready) for e in p.take_events())
    return p


@pytest.mark.parametrize("key", [None, b"k" * 32])
def test_probe_ping_is_answered_by_the_client_between_transactions(key: bytes | None) -> None:
    cfg = ClientConfig(checksums=("crc32c",), key=key)
    scfg = ServerConfig(checksums=("crc32c",), key=key, ciphers=("aes-256-gcm",))
    p = probed_pair(client_config=cfg, server_config=scfg, auto_reply=False)
    assert p.server is not None and p.server.hello is not None
    assert p.server.hello.ping_timeout == cfg.ping_timeout
    data = memoryview(b"x" * 4096)
    tid = p.client.submit(Command.WRITE, 0, 4096, 0, p.now, payload=data)
    p.run()
    n = p.server.probe()
    assert n == 1
    p.run()
    answers = [e for e in p.server_events if isinstance(e, ProbeAnswered)]
    assert answers == [ProbeAnswered(1)]
    assert p.client.stats.probes == 1 and p.client.connected
    assert p.server.stats.pings == 0  # the answer is not itself answered
    for req in p.held:
        p.execute(req)
    p.run()
    done = [e for e in p.take_events() if isinstance(e, Completed)]
    assert [(e.txn, e.status) for e in done] == [(tid, 0)]
    assert not any(isinstance(e, ConnectionDead) for e in p.client_events)


def test_a_silent_client_does_not_answer_the_probe() -> None:
    p = probed_pair()
    assert p.server is not None
    p.cut = True
    assert p.server.probe() == 1
    p.run()
    assert not [e for e in p.server_events if isinstance(e, ProbeAnswered)]


def test_an_answer_to_a_probe_never_sent_is_ignored() -> None:
    p = probed_pair()
    assert p.server is not None
    frame = RequestHeader(Command.PING, 0, 0, 7, 0, 0).pack()
    p.server.receive_data(frame + get_checksum("crc32c").compute(frame), 0.0)
    assert p.server.next_event() is None and not p.server.dead
    assert p.server.data_to_send() == []  # and not answered either


def test_a_client_without_the_ping_timeout_field_is_not_probed() -> None:
    p = probed_pair()
    assert p.server is not None and p.server.hello is not None
    object.__setattr__(p.server.hello, "ping_timeout", None)  # as an older client's HELLO
    assert p.server.probe() is None


def test_takeover_is_asked_only_until_the_session_was_first_welcomed() -> None:
    cfg = ClientConfig(checksums=("crc32c",), takeover=True)
    p = probed_pair(client_config=cfg)
    assert p.server is not None and p.server.hello is not None
    assert p.server.hello.takeover is True
    p.disconnect()
    p.connect()
    assert p.server is not None and p.server.hello is not None
    assert p.server.hello.takeover is False and p.server.hello.generation == 2


def test_client_core_without_takeover_never_asks() -> None:
    c = ClientCore(ClientConfig())
    c.connection_made(0.0)
    out = b"".join(bytes(b) for b in c.data_to_send())
    h = Hello.decode(out[12:])
    assert h.takeover is False and h.ping_timeout == 2.0
