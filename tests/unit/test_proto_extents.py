"""The EXTENTS command of the DST node protocol: bytes, negotiation, validation, both cores.

EXTENTS is offered by bit 8 of the WELCOME's COMMANDS: an export node that does not
set it (an older one) never sees the command, and a client that does not know it
never sends it; either way the member reports all data.
"""

from __future__ import annotations

import struct

import pytest

from dst.device import Extent, ExtentFlags
from dst.errors import ProtocolError
from dst.proto.events import Completed, ConnectionDead, HelloReceived, Request
from dst.proto.server import ExportTerms
from dst.proto.wire import (
    ALL_COMMANDS,
    MAX_EXTENTS,
    Command,
    Status,
    pack_extents,
    unpack_extents,
)
from tests.pair import IDENTITY, Pair

MiB = 1 << 20
HOLE_ZERO = ExtentFlags.HOLE | ExtentFlags.ZERO


def test_descriptors_are_little_endian_length_and_flags() -> None:
    exts = [Extent(100, 50, HOLE_ZERO), Extent(150, 1000, ExtentFlags.DATA)]
    payload = pack_extents(100, 500, exts)  # the last one is cut at the end of the request
    assert payload == struct.pack("<IIII", 50, 3, 450, 0)
    assert unpack_extents(100, 500, payload) == [
        Extent(100, 50, HOLE_ZERO),
        Extent(150, 450, ExtentFlags.DATA),
    ]
    many = [Extent(i, 1, ExtentFlags(i % 2)) for i in range(MAX_EXTENTS + 5)]
    assert len(pack_extents(0, len(many), many)) == 8 * MAX_EXTENTS
    # unknown flag bits are dropped, not fatal
    assert unpack_extents(0, 10, struct.pack("<II", 10, 0xF6)) == [Extent(0, 10, ExtentFlags.ZERO)]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00" * 7,
        struct.pack("<II", 0, 0),  # an empty descriptor
        struct.pack("<IIII", 8, 0, 3, 0),  # 11 bytes for a 10-byte request
        struct.pack("<II", 1, 0) * (MAX_EXTENTS + 1),
    ],
    ids=["empty", "partial", "zero-length", "too-long", "too-many"],
)
def test_broken_replies_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack_extents(0, 10 if len(payload) < 100 else 1 << 30, payload)


class TermsPair(Pair):
    """A pair whose export node offers exactly ``commands`` (an older one lacks EXTENTS)."""

    def __init__(self, commands: frozenset[int], **kw: object) -> None:
        super().__init__(auto_reply=False, **kw)  # type: ignore[arg-type]
        self.commands = commands

    def _server_events(self) -> None:
        assert self.server is not None
        while (ev := self.server.next_event()) is not None:
            self.server_events.append(ev)
            if isinstance(ev, HelloReceived):
                terms = ExportTerms(self.export.size, False, IDENTITY, commands=self.commands)
                self.server.accept(terms)
            elif isinstance(ev, Request):
                self.held.append(ev)


def ready(commands: frozenset[int] = ALL_COMMANDS) -> TermsPair:
    p = TermsPair(commands)
    p.connect()
    p.take_events()
    return p


def test_extents_round_trip_with_a_checksum() -> None:
    p = ready()
    w = p.client.welcome
    assert w is not None and w.commands & (1 << Command.EXTENTS) and w.checksum == "crc32c"
    half = MiB // 2
    tid = p.client.submit(Command.EXTENTS, 4096, half, 0, p.now)
    p.run()
    (req,) = p.held
    assert (req.command, req.offset, req.length) == (Command.EXTENTS, 4096, half)
    answer = [Extent(4096, 8192, ExtentFlags.DATA), Extent(12288, 4 * MiB, HOLE_ZERO)]
    assert p.server is not None
    p.server.reply(req, Status.OK, memoryview(pack_extents(4096, half, answer)))
    p.run()
    (done,) = [e for e in p.take_events() if isinstance(e, Completed)]
    assert done.txn == tid and done.status == 0
    assert done.extents == (
        Extent(4096, 8192, ExtentFlags.DATA),
        Extent(12288, half - 8192, HOLE_ZERO),
    )


def test_an_older_export_node_answers_enotsup() -> None:
    p = ready(frozenset(ALL_COMMANDS - {Command.EXTENTS}))
    w = p.client.welcome
    assert w is not None and not w.commands & (1 << Command.EXTENTS)
    tid = p.client.submit(Command.EXTENTS, 0, 4096, 0, p.now)
    p.run()
    assert p.held == []  # refused by the core, never handed to the node
    (done,) = [e for e in p.take_events() if isinstance(e, Completed)]
    assert done.txn == tid and done.status == Status.ENOTSUP and done.extents == ()


@pytest.mark.parametrize(
    ("offset", "length"), [(0, 0), ((1 << 20) - 4096, 8192)], ids=["empty", "past-the-end"]
)
def test_invalid_extents_requests_are_refused(offset: int, length: int) -> None:
    p = ready()
    tid = p.client.submit(Command.EXTENTS, offset, length, 0, p.now)
    p.run()
    assert p.held == []
    (done,) = [e for e in p.take_events() if isinstance(e, Completed)]
    assert done.txn == tid and done.status == Status.EINVAL


def test_a_reply_claiming_more_than_asked_kills_the_connection_not_the_request() -> None:
    p = ready()
    tid = p.client.submit(Command.EXTENTS, 0, 4096, 0, p.now)
    p.run()
    (req,) = p.held
    assert p.server is not None
    p.server.reply(req, Status.OK, memoryview(struct.pack("<II", 8192, 0)))
    p.run()
    evs = p.take_events()
    assert any(isinstance(e, ConnectionDead) and "EXTENTS" in e.reason for e in evs), evs
    assert not any(isinstance(e, Completed) for e in evs)
    p.disconnect()
    p.held.clear()
    p.connect()  # resent on the next connection, where a good answer completes it
    (again,) = p.held
    assert again.txn == tid and again.attempt == 2
    p.server.reply(again, Status.OK, memoryview(pack_extents(0, 4096, [Extent(0, 4096)])))
    p.run()
    (done,) = [e for e in p.take_events() if isinstance(e, Completed)]
    assert done.txn == tid and done.extents == (Extent(0, 4096),)
