"""Registry of named payload checksums.

A checksum protects a request's data against corruption that TCP's 16-bit sum
misses (bad NICs, bad RAM, a buggy proxy).  Each algorithm has a name used in
negotiation and on the command line, and a small stable ``wire_id`` for compact
encodings.  ``compute`` takes the payload in parts (a header and a memoryview
of the data, say) and hashes them incrementally, so a payload is never copied
just to be checksummed.

Digest byte order, fixed here because it is part of the wire format:

- ``crc32c``: the 32-bit CRC (Castagnoli) as 4 bytes **little-endian**, like the
  rest of the DST headers; ``crc32c(b"123456789")`` is ``0xE3069283`` and
  travels as ``83 92 06 e3``.
- ``xxh3``: XXH3-64 with seed 0 as the 8 bytes of ``xxhash.xxh3_64().digest()``,
  which is xxHash's canonical **big-endian** form (what ``xxhsum`` prints).
- ``blake2b``: BLAKE2b with a 32-byte digest, no key, no personalisation.
- ``sha256``: SHA-256.
- ``none``: an empty digest; nothing is checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import crc32c as _crc32c
import xxhash as _xxhash

from dst.errors import UsageError

Buf = bytes | bytearray | memoryview
KIB: Final = 1024


def _crc32c_parts(parts: tuple[Buf, ...]) -> bytes:
    value = 0
    for p in parts:
        # The default GIL mode releases the GIL for buffers of 32 KiB and more,
        # where a worker thread can run in parallel with the event loop.
        value = _crc32c.crc32c(p, value)
    return value.to_bytes(4, "little")


def _xxh3_parts(parts: tuple[Buf, ...]) -> bytes:
    h = _xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return h.digest()


def _blake2b_parts(parts: tuple[Buf, ...]) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for p in parts:
        h.update(p)
    return h.digest()


def _sha256_parts(parts: tuple[Buf, ...]) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def _none_parts(parts: tuple[Buf, ...]) -> bytes:
    return b""


#: ``inline_limit`` of an algorithm that does no work: never worth a hand-off.
ALWAYS_INLINE: Final = (1 << 63) - 1


@dataclass(frozen=True)
class Checksum:
    """One named checksum algorithm; a value object, safe to share between threads.

    ``releases_gil`` and ``inline_limit`` guide the asyncio shell: payloads of at
    most ``inline_limit`` bytes cost the event loop less when computed inline
    than when handed to a worker thread (measured, docs/crypto-measurements.md);
    larger ones go to the thread pool, where they run in parallel because the
    library releases the GIL.
    """

    name: str
    digest_size: int
    wire_id: int
    releases_gil: bool
    inline_limit: int
    _fn: Callable[[tuple[Buf, ...]], bytes] = field(repr=False, compare=False)

    def compute(self, *parts: Buf) -> bytes:
        """Digest of the concatenation of ``parts``, computed without concatenating them."""
        return self._fn(parts)

    def verify(self, digest: Buf, *parts: Buf) -> bool:
        """Whether ``digest`` is this algorithm's digest of ``parts``.

        A plain comparison: a checksum catches accidents, the AEAD catches attacks.
        """
        return self._fn(parts) == bytes(digest)


CHECKSUMS: Final[dict[str, Checksum]] = {
    c.name: c
    for c in (
        # crc32c and xxh3 (tens of GB/s) stay on the loop at every size: measured end to
        # end on 1 MiB requests, a hand-off to the pool cost the two processes about
        # 200 us more CPU per request than the checksum itself (docs/benchmarks.md).
        Checksum("crc32c", 4, 1, True, ALWAYS_INLINE, _crc32c_parts),
        Checksum("xxh3", 8, 2, True, ALWAYS_INLINE, _xxh3_parts),
        Checksum("blake2b", 32, 3, True, 8 * KIB, _blake2b_parts),
        Checksum("sha256", 32, 4, True, 16 * KIB, _sha256_parts),
        Checksum("none", 0, 0, True, ALWAYS_INLINE, _none_parts),
    )
}

#: Preference order: fast hardware CRC first, then faster-to-slower hashes.
CHECKSUM_ORDER: Final[tuple[str, ...]] = ("crc32c", "xxh3", "blake2b", "sha256", "none")

_BY_WIRE_ID: Final[dict[int, Checksum]] = {c.wire_id: c for c in CHECKSUMS.values()}


def get_checksum(name: str) -> Checksum:
    """The checksum called ``name``; a UsageError lists the valid names otherwise."""
    try:
        return CHECKSUMS[name]
    except KeyError:
        raise UsageError(
            f"unknown checksum {name!r}; choose one of {', '.join(CHECKSUM_ORDER)}"
        ) from None


def checksum_by_wire_id(wire_id: int) -> Checksum | None:
    """The checksum with this wire id, or None: the caller decides how to refuse it."""
    return _BY_WIRE_ID.get(wire_id)
