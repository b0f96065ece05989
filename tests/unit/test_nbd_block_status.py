"""Metadata contexts and BLOCK_STATUS in the sans-IO NBD cores, against exact bytes.

Server: LIST/SET_META_CONTEXT rules, the selection entering the transmission phase,
request validation, and replies normalised from whatever a device answered, at the
32-bit edges (CVE-2025-47711: the maximum length; CVE-2025-47712: extents longer
than 32 bits). Client: asking for base:allocation and checking every reply.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.device import Extent, ExtentFlags
from dst.nbd import ExportChosen, ExportInfo, NbdServerConnection, Request
from dst.nbd.client import Completed, Connected, NbdClientConfig, NbdClientCore, ServerViolation
from dst.nbd.constants import Command
from dst.nbd.meta import BASE_ALLOCATION, MAX_DESCRIPTORS, MAX_QUERIES, block_status_descriptors
from tests.unit.test_nbd_client_core import greeting, info_export
from tests.unit.test_nbd_client_core import rep as crep
from tests.unit.test_nbd_client_core import sent as csent
from tests.unit.test_nbd_core import go_data, option, out, rep, request

MiB, GiB = 1 << 20, 1 << 30
SIZE = 64 * MiB
ERR = 1 << 31
LIST, SET, GO, STRUCTURED = 9, 10, 7, 8
ACK, META_CONTEXT = 1, 4
INVALID, UNKNOWN, TOO_BIG = ERR + 3, ERR + 6, ERR + 9
BLOCK_STATUS, REQ_ONE = 7, 8
STATUS_CHUNK = 5
HOLE_ZERO = ExtentFlags.HOLE | ExtentFlags.ZERO


def meta_data(export: str, *queries: str) -> bytes:
    raw = export.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    return data + b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in queries)


def context_rep(opt: int, ident: int, name: str) -> bytes:
    return rep(opt, META_CONTEXT, struct.pack(">I", ident) + name.encode())


def server(export: ExportInfo | None = None, **more: ExportInfo) -> NbdServerConnection:
    exports = {"default": export or ExportInfo(size=SIZE, contexts=(BASE_ALLOCATION,))}
    exports.update(more)
    core = NbdServerConnection(exports)
    core.receive_data(struct.pack(">I", 3), 0.0)
    out(core)
    return core


def drain(core: NbdServerConnection) -> list[object]:
    evs = []
    while (ev := core.next_event()) is not None:
        evs.append(ev)
    return evs


def transmitting(
    export: ExportInfo | None = None, queries: tuple[str, ...] = (BASE_ALLOCATION,)
) -> NbdServerConnection:
    core = server(export)
    core.receive_data(option(STRUCTURED) + option(SET, meta_data("", *queries)), 0.0)
    core.receive_data(option(GO, go_data("")), 0.0)
    out(core)
    drain(core)
    return core


def status_chunk(handle: int, ident: int, pairs: list[tuple[int, int]], done: bool = True) -> bytes:
    flat = [v for p in pairs for v in p]
    head = struct.pack(
        ">IHHQII", 0x668E33EF, int(done), STATUS_CHUNK, handle, 4 + 8 * len(pairs), ident
    )
    return head + struct.pack(f">{len(flat)}I", *flat)


# ---- negotiation --------------------------------------------------------------------------
def test_list_answers_every_context_or_the_queried_ones() -> None:
    core = server()
    core.receive_data(option(STRUCTURED), 0.0)
    out(core)
    for queries, names in [
        ((), [BASE_ALLOCATION]),
        (("base:",), [BASE_ALLOCATION]),  # the namespace wildcard
        ((BASE_ALLOCATION,), [BASE_ALLOCATION]),
        (("base:other", "x-unknown:thing"), []),  # an unknown leaf or namespace: ignored
    ]:
        core.receive_data(option(LIST, meta_data("default", *queries)), 0.0)
        want = b"".join(context_rep(LIST, 0, n) for n in names) + rep(LIST, ACK)
        assert out(core) == want, queries


def test_set_selects_and_numbers_contexts_for_the_chosen_export() -> None:
    core = server()
    core.receive_data(
        option(STRUCTURED) + option(SET, meta_data("", "base:", BASE_ALLOCATION)), 0.0
    )
    assert out(core) == rep(STRUCTURED, ACK) + context_rep(SET, 1, BASE_ALLOCATION) + rep(SET, ACK)
    core.receive_data(option(GO, go_data("")), 0.0)
    (chosen,) = [e for e in drain(core) if isinstance(e, ExportChosen)]
    assert chosen.contexts == (BASE_ALLOCATION,) and core.contexts == (BASE_ALLOCATION,)


def test_contexts_need_structured_replies_first() -> None:
    core = server()
    core.receive_data(
        option(SET, meta_data("", BASE_ALLOCATION)) + option(LIST, meta_data("")), 0.0
    )
    reply = out(core)
    assert struct.unpack(">II", reply[8:16]) == (SET, INVALID)
    assert b"NBD_OPT_STRUCTURED_REPLY first" in reply


def test_a_selection_for_another_export_or_a_later_empty_one_selects_nothing() -> None:
    other = ExportInfo(size=SIZE, contexts=(BASE_ALLOCATION,))
    core = server(other=other)
    core.receive_data(option(STRUCTURED) + option(SET, meta_data("other", BASE_ALLOCATION)), 0.0)
    core.receive_data(option(GO, go_data("default")), 0.0)
    out(core)
    assert core.contexts == ()  # the spec: the last SET must name the export of GO
    core = server()
    core.receive_data(option(STRUCTURED) + option(SET, meta_data("", BASE_ALLOCATION)), 0.0)
    core.receive_data(option(SET, meta_data("", "base:")) + option(GO, go_data("")), 0.0)
    out(core)
    assert core.contexts == ()  # each SET replaces the one before
    core.receive_data(request(BLOCK_STATUS, 9, 0, 4096), 0.0)
    assert struct.unpack(">I", out(core)[20:24])[0] == errno.EINVAL


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (meta_data("", BASE_ALLOCATION)[:-3], INVALID),  # the query overruns the option
        (meta_data("", BASE_ALLOCATION) + b"\x00", INVALID),  # bytes after the last query
        (meta_data("", "allocation"), INVALID),  # no namespace
        (meta_data("", ":allocation"), INVALID),  # an empty namespace
        (b"\x00\x00", INVALID),  # shorter than a length
        (meta_data("nope", BASE_ALLOCATION), UNKNOWN),
        (struct.pack(">II", 0, MAX_QUERIES + 1), TOO_BIG),
    ],
    ids=["overrun", "trailing", "no-namespace", "empty-namespace", "short", "unknown", "too-big"],
)
def test_malformed_context_options_are_refused(data: bytes, kind: int) -> None:
    for opt in (LIST, SET):
        core = server()
        core.receive_data(option(STRUCTURED) + option(opt, data), 0.0)
        reply = out(core)[20:]  # after the ACK of structured replies
        assert struct.unpack(">II", reply[8:16]) == (opt, kind), reply
    core.receive_data(option(GO, go_data("")), 0.0)
    out(core)
    assert core.contexts == ()  # a failed SET selects nothing


def test_exports_without_contexts_list_none() -> None:
    core = server(ExportInfo(size=SIZE))
    core.receive_data(option(STRUCTURED) + option(LIST, meta_data("")), 0.0)
    assert out(core).endswith(rep(STRUCTURED, ACK) + rep(LIST, ACK))


# ---- requests and replies -------------------------------------------------------------------
def test_block_status_becomes_a_request_and_its_reply_one_final_chunk() -> None:
    core = transmitting()
    core.receive_data(request(BLOCK_STATUS, 5, MiB, 4 * MiB), 0.0)
    (ev,) = drain(core)
    assert isinstance(ev, Request) and ev.command == Command.BLOCK_STATUS
    assert (ev.offset, ev.length) == (MiB, 4 * MiB)
    exts = [Extent(MiB, MiB, HOLE_ZERO), Extent(2 * MiB, 8 * MiB, ExtentFlags.DATA)]
    core.reply_block_status(5, {BASE_ALLOCATION: exts})  # the last one reaches past the request
    assert out(core) == status_chunk(5, 1, [(MiB, 3), (3 * MiB, 0)])


def test_req_one_keeps_one_descriptor_no_longer_than_the_request() -> None:
    core = transmitting()
    core.receive_data(request(BLOCK_STATUS, 6, 0, MiB, flags=REQ_ONE), 0.0)
    drain(core)
    core.reply_block_status(6, {BASE_ALLOCATION: [Extent(0, 2 * MiB, HOLE_ZERO)]})
    assert out(core) == status_chunk(6, 1, [(MiB, 3)])


def test_the_largest_request_over_extents_longer_than_32_bits() -> None:
    export = ExportInfo(size=9 * GiB, contexts=(BASE_ALLOCATION,))
    top = 0xFFFFFFFF
    for flags in (0, REQ_ONE):
        core = transmitting(export)
        core.receive_data(request(BLOCK_STATUS, 7, 0, top, flags=flags), 0.0)
        drain(core)
        # 4 GiB exactly would wrap to 0 in a 32-bit field; 5 GiB would wrap to 1 GiB
        core.reply_block_status(7, {BASE_ALLOCATION: [Extent(0, 4 * GiB, HOLE_ZERO)]})
        assert out(core) == status_chunk(7, 1, [(top, 3)])
    core = transmitting(export)
    core.receive_data(request(BLOCK_STATUS, 8, 9 * GiB - top, top), 0.0)
    drain(core)
    start = 9 * GiB - top
    exts = [Extent(start, GiB, ExtentFlags.DATA), Extent(start + GiB, 5 * GiB, HOLE_ZERO)]
    core.reply_block_status(8, {BASE_ALLOCATION: exts})
    assert out(core) == status_chunk(8, 1, [(GiB, 0), (top - GiB, 3)])


def test_unaligned_answers_are_aligned_to_the_minimum_block() -> None:
    core = transmitting(ExportInfo(size=SIZE, min_block=512, contexts=(BASE_ALLOCATION,)))
    core.receive_data(request(BLOCK_STATUS, 1, 0, 4096), 0.0)
    drain(core)
    exts = [
        Extent(0, 100, ExtentFlags.DATA),  # the first block is partly data: data
        Extent(100, 1948, HOLE_ZERO),
        Extent(2048, 2048, HOLE_ZERO),
    ]
    core.reply_block_status(1, {BASE_ALLOCATION: exts})
    assert out(core) == status_chunk(1, 1, [(512, 0), (3584, 3)])


def test_answers_of_nothing_or_less_than_a_block_are_data() -> None:
    core = transmitting(ExportInfo(size=SIZE, min_block=4096, contexts=(BASE_ALLOCATION,)))
    core.receive_data(request(BLOCK_STATUS, 1, 0, 8192) + request(BLOCK_STATUS, 2, 0, 8192), 0.0)
    drain(core)
    core.reply_block_status(1, {})
    core.reply_block_status(2, {BASE_ALLOCATION: [Extent(0, 100, HOLE_ZERO)]})
    assert out(core) == status_chunk(1, 1, [(8192, 0)]) + status_chunk(2, 1, [(4096, 0)])


@pytest.mark.parametrize(
    ("req", "why"),
    [
        (request(BLOCK_STATUS, 3, 0, 0), "0 bytes"),
        (request(BLOCK_STATUS, 3, SIZE - 4096, 8192), "beyond the end"),
        (request(BLOCK_STATUS, 3, 0, 4096, flags=4), "flags"),  # DF is for reads
        (request(BLOCK_STATUS, 3, 0, 4096, flags=0x40), "flags"),
    ],
    ids=["zero-length", "past-the-end", "df", "unknown-flag"],
)
def test_invalid_block_status_is_refused_by_the_core(req: bytes, why: str) -> None:
    core = transmitting()
    core.receive_data(req, 0.0)
    reply = out(core)
    assert drain(core) == []
    assert struct.unpack(">HHQ", reply[4:16]) == (1, 0x8001, 3)
    assert struct.unpack(">I", reply[20:24])[0] == errno.EINVAL and why.encode() in reply


def test_block_status_without_structured_replies_or_a_context_is_refused() -> None:
    core = server()
    core.receive_data(option(GO, go_data("")), 0.0)  # simple replies only
    out(core)
    core.receive_data(request(BLOCK_STATUS, 4, 0, 4096), 0.0)
    assert out(core) == struct.pack(">IIQ", 0x67446698, errno.EINVAL, 4)


def test_replies_must_fit_the_request() -> None:
    core = transmitting()
    core.receive_data(request(BLOCK_STATUS, 1, 0, 4096) + request(0, 2, 0, 4096), 0.0)
    drain(core)
    with pytest.raises(ValueError):
        core.reply_ok(1)
    with pytest.raises(ValueError):
        core.reply_block_status(2, {})
    core.reply_error(1, errno.EIO, "broken")
    assert struct.unpack(">I", out(core)[20:24])[0] == errno.EIO


@st.composite
def answers(draw: st.DrawFn) -> tuple[int, int, list[Extent], int, bool]:
    block = draw(st.sampled_from([1, 512, 4096]))
    offset = draw(st.integers(0, 1 << 40)) // block * block
    length = draw(st.integers(1, 0xFFFFFFFF // block)) * block
    exts, pos = [], offset
    for _ in range(draw(st.integers(0, 8))):
        n = draw(st.integers(1, 6 << 30))
        exts.append(Extent(pos, n, ExtentFlags(draw(st.integers(0, 3)))))
        pos += n
    return offset, length, exts, block, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(answers())
def test_descriptors_are_always_valid_and_never_claim_too_much(
    case: tuple[int, int, list[Extent], int, bool],
) -> None:
    offset, length, exts, block, req_one = case
    got = block_status_descriptors(offset, length, exts, min_block=block, req_one=req_one)
    assert 1 <= len(got) <= (1 if req_one else MAX_DESCRIPTORS)
    assert sum(n for n, _ in got) <= length
    pos = offset
    for n, flags in got:
        assert 0 < n <= 0xFFFFFFFF and n % block == 0
        under = {int(e.flags) for e in exts if e.offset < pos + n and pos < e.end}
        assert all(flags & ~f == 0 for f in under), (n, flags, under)  # no bit unless all agree
        assert under or flags == 0  # beyond the answer: only data
        pos += n


# ---- the client ---------------------------------------------------------------------------
def client(*server_replies: bytes) -> NbdClientCore:
    core = NbdClientCore(NbdClientConfig(export="disk", contexts=(BASE_ALLOCATION,)))
    core.connection_made(0.0)
    core.receive_data(greeting(), 0.0)
    core.receive_data(crep(STRUCTURED, ACK), 0.0)
    for r in server_replies:
        core.receive_data(r, 0.0)
    return core


def connected_client(ident: int = 5) -> NbdClientCore:
    core = client(
        crep(SET, META_CONTEXT, struct.pack(">I", ident) + BASE_ALLOCATION.encode())
        + crep(SET, ACK)
        + info_export()
        + crep(GO, ACK)
    )
    csent(core)
    evs = drain_client(core)
    assert isinstance(evs[-1], Connected)
    return core


def drain_client(core: NbdClientCore) -> list[object]:
    evs = []
    while (ev := core.next_event()) is not None:
        evs.append(ev)
    return evs


def test_the_client_asks_for_base_allocation_before_go() -> None:
    core = client()
    name = b"disk"
    want = struct.pack(">I", 4) + name + struct.pack(">II", 1, len(BASE_ALLOCATION))
    want += BASE_ALLOCATION.encode()
    sent = csent(core)
    assert sent.endswith(b"IHAVEOPT" + struct.pack(">II", SET, len(want)) + want)
    core.receive_data(crep(SET, META_CONTEXT, struct.pack(">I", 5) + BASE_ALLOCATION.encode()), 0)
    assert csent(core) == b""  # still the list
    core.receive_data(crep(SET, ACK) + info_export() + crep(GO, ACK), 0)
    (ev,) = [e for e in drain_client(core) if isinstance(e, Connected)]
    assert ev.export.contexts == ((BASE_ALLOCATION, 5),)
    assert ev.export.context_id(BASE_ALLOCATION) == 5


def test_a_server_that_refuses_contexts_still_connects_without_them() -> None:
    core = client(crep(SET, ERR + 1) + info_export() + crep(GO, ACK))
    (ev,) = [e for e in drain_client(core) if isinstance(e, Connected)]
    assert ev.export.contexts == ()
    csent(core)
    h = core.submit(BLOCK_STATUS, 0, 4096, 0, 0.0)
    assert csent(core) == b""  # never sent on this connection
    (done,) = drain_client(core)
    assert isinstance(done, Completed) and done.handle == h and done.error == errno.EOPNOTSUPP


def test_block_status_replies_become_clipped_extents() -> None:
    core = connected_client()
    h = core.submit(BLOCK_STATUS, MiB, 2 * MiB, 0, 0.0)
    assert csent(core) == struct.pack(">IHHQQI", 0x25609513, 0, BLOCK_STATUS, h, MiB, 2 * MiB)
    core.receive_data(status_chunk(h, 5, [(MiB, 3), (8 * MiB, 0)]), 0.0)
    (done,) = drain_client(core)
    assert isinstance(done, Completed) and done.error == 0
    assert done.extents == (Extent(MiB, MiB, HOLE_ZERO), Extent(2 * MiB, MiB, ExtentFlags.DATA))


@pytest.mark.parametrize(
    ("flags", "reply"),
    [
        (0, lambda h: status_chunk(h, 6, [(4096, 0)])),  # a context id never given
        (0, lambda h: status_chunk(h, 5, [(0, 0)])),  # an empty descriptor
        (0, lambda h: status_chunk(h, 5, [(8192, 0), (4096, 3)])),  # starts past the end
        (REQ_ONE, lambda h: status_chunk(h, 5, [(1024, 0), (1024, 3)])),
        (REQ_ONE, lambda h: status_chunk(h, 5, [(8192, 0)])),  # longer than asked
        (0, lambda h: struct.pack(">IIQ", 0x67446698, 0, h)),  # success, but simple
        (0, lambda h: struct.pack(">IHHQI", 0x668E33EF, 1, 0, h, 0)),  # DONE, no status
        (0, lambda h: struct.pack(">IHHQI", 0x668E33EF, 1, STATUS_CHUNK, h, 8) + bytes(8)),
        (0, lambda h: status_chunk(h, 5, [(4096, 0)], done=False) + status_chunk(h, 5, [(1, 0)])),
    ],
    ids=[
        "unknown-id",
        "empty",
        "past-the-end",
        "req-one-two",
        "req-one-long",
        "simple",
        "none-only",
        "short-chunk",
        "twice",
    ],
)
def test_broken_block_status_replies_are_violations(flags: int, reply: object) -> None:
    core = connected_client()
    h = core.submit(BLOCK_STATUS, 0, 4096, flags, 0.0)
    csent(core)
    core.receive_data(reply(h), 0.0)  # type: ignore[operator]
    evs = drain_client(core)
    assert any(isinstance(e, ServerViolation) for e in evs), evs


def test_an_error_chunk_is_an_error_for_the_caller() -> None:
    core = connected_client()
    h = core.submit(BLOCK_STATUS, 0, 4096, 0, 0.0)
    csent(core)
    payload = struct.pack(">IH", errno.EIO, 4) + b"oops"
    core.receive_data(struct.pack(">IHHQI", 0x668E33EF, 1, 0x8001, h, len(payload)) + payload, 0)
    (done,) = drain_client(core)
    assert isinstance(done, Completed) and done.error == errno.EIO and done.extents == ()
