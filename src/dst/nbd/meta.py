"""Metadata contexts and block status (NBD_OPT_*_META_CONTEXT, NBD_CMD_BLOCK_STATUS), sans-IO.

A context is a name, ``namespace:leaf``; an export offers a tuple of names
(``ExportInfo.contexts``), so more contexts (say, one per checkpoint under ``x-dst:``)
are added by offering more names and answering them in the shell; nothing here
changes. The rules, from the NBD specification:

- queries are parsed strictly (a length that overruns the option data, or a query
  without a namespace, is NBD_REP_ERR_INVALID); queries in an unknown namespace are
  ignored;
- LIST with no query lists every context; a query ending in ``:`` lists all contexts
  under that prefix (``base:`` lists ``base:allocation``); otherwise names match
  exactly;
- SET selects exact names only (``base:`` selects nothing), at most once each, and
  numbers them from 1 in the order selected.

Block status replies are normalised here, whatever the device answered: clipped to
the request (never past it, so no descriptor can overflow 32 bits), aligned to the
minimum block size, merged, capped in count, one descriptor only with REQ_ONE, and at
least one descriptor always.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dst.device import Extent, ExtentFlags

BASE_ALLOCATION = "base:allocation"
MAX_DESCRIPTORS = 1 << 16  # per context in one reply: a 512 KiB chunk at most
MAX_QUERIES = 1024  # per option; more is NBD_REP_ERR_TOO_BIG
MAX_NAME = 4096  # the specification's string limit

_U32 = struct.Struct(">I")
_KNOWN = int(ExtentFlags.HOLE | ExtentFlags.ZERO)


class MetaInvalid(Exception):
    """The option's data does not parse; answered with NBD_REP_ERR_INVALID."""


class MetaTooBig(Exception):
    """More queries than this server handles in one option; NBD_REP_ERR_TOO_BIG."""


@dataclass(frozen=True)
class MetaRequest:
    """The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""

    export: str
    queries: tuple[str, ...]


def _string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos + 4 > len(data):
        raise MetaInvalid(f"the option data ends inside the length of the {what}")
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if n > len(data) - pos:
        raise MetaInvalid(f"the {what} of {n} bytes overruns the option data")
    if n > MAX_NAME:
        raise MetaInvalid(f"the {what} of {n} bytes is longer than {MAX_NAME}")
    try:
        return data[pos : pos + n].decode("utf-8"), pos + n
    except UnicodeDecodeError:
        raise MetaInvalid(f"the {what} is not valid UTF-8") from None


def parse_meta_request(data: bytes) -> MetaRequest:
    """Export name, number of queries, the queries; exactly that and nothing more."""
    export, pos = _string(data, 0, "export name")
    if pos + 4 > len(data):
        raise MetaInvalid("the option data ends before the number of queries")
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > MAX_QUERIES:
        raise MetaTooBig(f"{count} queries in one option; this server takes {MAX_QUERIES}")
    queries = []
    for _ in range(count):
        query, pos = _string(data, pos, "query")
        namespace, colon, _leaf = query.partition(":")
        if not colon or not namespace:
            raise MetaInvalid(f"query {query!r} has no namespace (e.g. base:allocation)")
        queries.append(query)
    if pos != len(data):
        raise MetaInvalid(f"{len(data) - pos} bytes follow the last query")
    return MetaRequest(export, tuple(queries))


def list_contexts(offered: Sequence[str], queries: Sequence[str]) -> list[str]:
    """What NBD_OPT_LIST_META_CONTEXT answers: every context without queries, else those
    a query names or (ending in ``:``) prefixes."""
    if not queries:
        return list(offered)
    return [
        name
        for name in offered
        if any(name == q or (q.endswith(":") and name.startswith(q)) for q in queries)
    ]


def select_contexts(offered: Sequence[str], queries: Sequence[str]) -> tuple[str, ...]:
    """What NBD_OPT_SET_META_CONTEXT selects: offered names given exactly, once each, in the
    order of the queries; context id ``i + 1`` is the ``i``-th."""
    chosen: list[str] = []
    for q in queries:
        if q in offered and q not in chosen:
            chosen.append(q)
    return tuple(chosen)


def block_status_descriptors(
    offset: int,
    length: int,
    extents: Iterable[Extent],
    *,
    min_block: int = 1,
    req_one: bool = False,
) -> list[tuple[int, int]]:
    """(length, flags) descriptors for a BLOCK_STATUS of ``[offset, offset + length)``.

    Uses the extents that are consecutive from ``offset`` and stops at the first gap or
    at the end of the request: descriptors never reach past the request, so none is
    empty or longer than the request's 32-bit length. A boundary that is not a multiple
    of ``min_block`` is moved down to one, and the block it cuts gets the flags both sides
    share (a hole only if both are holes). No usable extent at all is data over the whole
    request, an answer shorter than one block is that block as data: both always true.
    Neighbours with the same flags are merged; REQ_ONE keeps the first descriptor.
    """
    out: list[tuple[int, int]] = []

    def emit(size: int, flags: int) -> None:
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + size, flags)
        else:
            out.append((size, flags))

    block = max(min_block, 1)
    pos = 0  # end of what was emitted, relative to offset (always a block boundary)
    carry: int | None = None  # flags shared by the piece [pos, covered) of a cut block
    covered = 0
    for e in extents:
        rel, rel_end = e.offset - offset, min(e.end - offset, length)
        if rel != covered or rel_end <= rel:
            break  # a gap, an overlap or nothing new: keep the consecutive prefix
        covered = rel_end
        flags = int(e.flags) & _KNOWN
        aligned = rel_end - rel_end % block
        if carry is not None:
            if aligned <= pos:  # this extent ends inside the same cut block
                carry &= flags
                continue
            emit(block, carry & flags)  # the cut block, then the rest of this extent
            pos += block
            carry = None
        if aligned > pos:
            emit(aligned - pos, flags)
            pos = aligned
        if aligned < rel_end:
            carry = flags
        if covered >= length or len(out) >= MAX_DESCRIPTORS:
            break
    if not out:  # nothing usable: all data; or less than a block: that block as data
        out.append((length if covered == 0 else min(block, length), 0))
    if req_one:
        del out[1:]
    return out[:MAX_DESCRIPTORS]


def parse_block_status(
    payload: bytes | memoryview, offset: int, length: int, req_one: bool
) -> tuple[int, list[Extent]] | str:
    """The context id and extents of an NBD_REPLY_TYPE_BLOCK_STATUS chunk for a request of
    ``[offset, offset + length)``, clipped to it; or what is wrong with the chunk.

    The rules a server must keep: 4 + 8n bytes with n >= 1, no empty descriptor, the
    first n - 1 inside the request (the last may reach past it), one only with REQ_ONE,
    and then not longer than the request."""
    n, rest = divmod(len(payload) - 4, 8)
    if len(payload) < 12 or rest:
        return f"a block status chunk of {len(payload)} bytes (4 + 8n, n >= 1, expected)"
    (context,) = _U32.unpack_from(payload, 0)
    if req_one and n != 1:
        return f"{n} descriptors answered a request with REQ_ONE"
    values = struct.unpack_from(f">{2 * n}I", payload, 4)
    out: list[Extent] = []
    pos, end = offset, offset + length
    for i in range(n):
        size, flags = values[2 * i], values[2 * i + 1]
        if size == 0:
            return f"an empty descriptor at {pos}"
        if pos >= end:
            return f"descriptor {i + 1} of {n} starts at {pos}, past the request's end {end}"
        if req_one and size > length:
            return f"a REQ_ONE descriptor of {size} bytes for a {length}-byte request"
        out.append(Extent(pos, min(size, end - pos), ExtentFlags(flags & _KNOWN)))
        pos += size
    return context, out
