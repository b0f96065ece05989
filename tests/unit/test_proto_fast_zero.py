"""FAST_ZERO (request flag 0x8) and CACHE (command 9) of the DST node protocol.

An export node announces FAST_ZERO in the WELCOME's FLAGS and offers CACHE with bit 9
of COMMANDS. A client sends either only to an export node that announced it, checked
at every send: against one that did not (an older version, before or after a
reconnect) it refuses a fast zero itself with ENOTSUP and takes a cache as done.
"""

from __future__ import annotations

import struct

from dst.proto.events import Completed, HelloReceived, Rejected, Request
from dst.proto.handshake import Welcome
from dst.proto.server import ExportTerms
from dst.proto.wire import (
    ALL_COMMANDS,
    ALL_REQ_FLAGS,
    BASE_REQ_FLAGS,
    DATA_REPLY_COMMANDS,
    QUERY_COMMANDS,
    REQ_HEADER,
    WRITE_COMMANDS,
    Command,
    ReqFlags,
    RequestHeader,
    Status,
    reply_carries_payload,
)
from tests.pair import IDENTITY, FakeExport, Pair

MiB = 1 << 20
OLD_COMMANDS = frozenset(ALL_COMMANDS - {Command.CACHE})


def test_wire_values() -> None:
    assert int(ReqFlags.FAST_ZERO) == 8 and int(Command.CACHE) == 9
    assert int(ALL_REQ_FLAGS) == 0xF and int(BASE_REQ_FLAGS) == 0x7
    head = RequestHeader(Command.WRITE_ZEROES, ReqFlags.FAST_ZERO | ReqFlags.NO_HOLE, 7, 1, 512, 0)
    assert head.pack() == b"DSTQ" + struct.pack("<HHQIIQ", 5, 0xC, 7, 1, 512, 0)
    assert REQ_HEADER.unpack(head.pack())[2] == 0xC
    cache = RequestHeader(Command.CACHE, 0, 8, 1, 1 << 31, 4096).pack()
    assert cache[4:8] == struct.pack("<HH", 9, 0)
    # a query: never replayed, answered without a payload
    assert Command.CACHE in QUERY_COMMANDS and Command.CACHE not in DATA_REPLY_COMMANDS
    assert Command.CACHE not in WRITE_COMMANDS
    assert not reply_carries_payload(Command.CACHE, Status.OK)
    assert reply_carries_payload(Command.READ, Status.OK)


def test_welcome_carries_the_flags_and_the_cache_bit() -> None:
    w = Welcome(
        version=1,
        size=MiB,
        read_only=False,
        identity=IDENTITY,
        commands=(1 << Command.CACHE) | (1 << Command.WRITE_ZEROES),
        flags=int(ALL_REQ_FLAGS),
    )
    back, _ = Welcome.decode(w.encode_unproven())
    assert back.flags == 0xF and back.commands & (1 << 9)
    old, _ = Welcome.decode(Welcome(1, MiB, False, IDENTITY, flags=7).encode_unproven())
    assert old.flags == 7 and not old.flags & ReqFlags.FAST_ZERO


class TermsPair(Pair):
    """A pair whose export node grants these terms (changeable between connections)."""

    def __init__(self, commands: frozenset[int], flags: int, read_only: bool = False) -> None:
        super().__init__(auto_reply=False, export=FakeExport(read_only=read_only))
        self.commands, self.flags = commands, flags

    def _server_events(self) -> None:
        assert self.server is not None
        while (ev := self.server.next_event()) is not None:
            self.server_events.append(ev)
            if isinstance(ev, HelloReceived):
                terms = ExportTerms(
                    self.export.size,
                    self.export.read_only,
                    IDENTITY,
                    commands=self.commands,
                    flags=self.flags,
                )
                self.server.accept(terms)
            elif isinstance(ev, Request):
                self.held.append(ev)


def ready(
    commands: frozenset[int] = ALL_COMMANDS, flags: int = int(ALL_REQ_FLAGS), **kw: bool
) -> TermsPair:
    p = TermsPair(commands, flags, **kw)
    p.connect()
    p.take_events()
    return p


def completed(p: Pair) -> list[Completed]:
    return [e for e in p.take_events() if isinstance(e, Completed)]


def requests_seen(p: TermsPair) -> int:
    assert p.server is not None
    return p.server.stats.requests + p.server.stats.rejected


def test_fast_zero_reaches_an_export_node_that_announces_it() -> None:
    p = ready()
    w = p.client.welcome
    assert w is not None and w.flags & ReqFlags.FAST_ZERO
    flags = int(ReqFlags.FAST_ZERO | ReqFlags.NO_HOLE)
    tid = p.client.submit(Command.WRITE_ZEROES, 4096, MiB // 2, flags, p.now)
    p.run()
    (req,) = p.held
    assert (req.command, req.flags, req.txn) == (Command.WRITE_ZEROES, flags, tid)
    assert p.server is not None
    p.server.reply(req, Status.ENOTSUP)  # the storage would have written zeroes
    p.run()
    (done,) = completed(p)
    assert done.txn == tid and done.status == Status.ENOTSUP and done.attempts == 1


def test_against_an_older_export_node_the_client_refuses_without_sending() -> None:
    p = ready(OLD_COMMANDS, int(BASE_REQ_FLAGS))
    tid = p.client.submit(Command.WRITE_ZEROES, 0, 4096, int(ReqFlags.FAST_ZERO), p.now)
    p.run()
    (done,) = completed(p)
    assert done.txn == tid and done.status == Status.ENOTSUP and done.attempts == 0
    assert "FAST_ZERO" in done.message
    assert p.held == [] and requests_seen(p) == 0  # never on the wire
    # without the flag it is sent and served
    tid = p.client.submit(Command.WRITE_ZEROES, 0, 4096, int(ReqFlags.NO_HOLE), p.now)
    p.run()
    (req,) = p.held
    assert req.txn == tid and req.flags == int(ReqFlags.NO_HOLE)


def test_a_resend_after_a_reconnect_to_an_older_node_is_refused_there() -> None:
    p = ready()
    p.cut = True  # the request is lost on the way
    tid = p.client.submit(Command.WRITE_ZEROES, 0, 4096, int(ReqFlags.FAST_ZERO), p.now)
    cached = p.client.submit(Command.CACHE, 0, MiB, 0, p.now)
    p.run()
    assert p.held == [] and completed(p) == []
    p.disconnect()
    p.commands, p.flags = OLD_COMMANDS, int(BASE_REQ_FLAGS)  # the node came back older
    p.connect()
    done = {c.txn: c for c in completed(p)}
    assert done[tid].status == Status.ENOTSUP and done[cached].status == Status.OK
    assert p.held == [] and requests_seen(p) == 0


def test_an_export_node_refuses_flags_it_did_not_announce() -> None:
    p = ready(flags=int(BASE_REQ_FLAGS))
    p.client._unhonoured = 0  # a client that ignores the WELCOME's FLAGS
    p.client.submit(Command.WRITE_ZEROES, 0, 4096, int(ReqFlags.FAST_ZERO), p.now)
    p.client.submit(Command.WRITE, 0, 1, int(ReqFlags.FAST_ZERO), p.now, memoryview(b"x"))
    p.run()
    assert p.held == []
    assert [c.status for c in completed(p)] == [Status.EINVAL, Status.EINVAL]
    rejected = [e for e in p.server_events if isinstance(e, Rejected)]
    assert all("did not announce" in e.message for e in rejected) and len(rejected) == 2


def test_cache_is_sent_when_offered_and_validated_like_a_read() -> None:
    p = ready(read_only=True)  # allowed on a read-only grant
    w = p.client.welcome
    assert w is not None and w.read_only and w.commands & (1 << Command.CACHE)
    tid = p.client.submit(Command.CACHE, 8192, MiB - 8192, 0, p.now)
    bad = p.client.submit(Command.CACHE, MiB - 4096, 8192, 0, p.now)
    p.run()
    (req,) = p.held
    assert (req.command, req.offset, req.length, req.txn) == (Command.CACHE, 8192, MiB - 8192, tid)
    assert req.payload is None
    assert p.server is not None
    p.server.reply(req, Status.OK)
    p.run()
    done = {c.txn: c.status for c in completed(p)}
    assert done == {tid: Status.OK, bad: Status.EINVAL}


def test_cache_is_done_at_once_against_an_export_node_without_it() -> None:
    p = ready(OLD_COMMANDS)
    tid = p.client.submit(Command.CACHE, 0, MiB, 0, p.now)
    p.run()
    (done,) = completed(p)
    assert done.txn == tid and done.status == Status.OK and done.attempts == 0
    assert p.held == [] and requests_seen(p) == 0
