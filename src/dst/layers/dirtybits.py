"""The dirty bits of one mirror leg or checkpoint: a sparse bitmap.

Bits live in 4 KiB pages (one block of the bitmap file each) that exist only where a bit
is set, and every bit from ``full_from`` on is set without being stored, so that the
metadata of a mirror grows with what is dirty, not with the device.  The file layout that
stores these pages is in :mod:`dst.layers.bitmap` (docs/mirror.md, "Bitmap file format").
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator

BLOCK = 4096  # bytes per page, and per block of the bitmap file

_NONZERO = re.compile(rb"[^\x00]")
_NOTFULL = re.compile(rb"[^\xff]")


def _popcount(b: bytes | bytearray) -> int:
    return int.from_bytes(b, "little").bit_count()


PAGE_BITS = BLOCK * 8  # bits per bitmap page: one 4 KiB block of the file


def _first_set(page: bytearray, lo: int) -> int | None:
    """The first set bit at or after bit ``lo`` of a page."""
    byte = lo // 8
    if byte >= BLOCK:
        return None
    v = page[byte] >> (lo % 8)
    if v:
        return lo + (v & -v).bit_length() - 1
    m = _NONZERO.search(page, byte + 1)
    if m is None:
        return None
    v = page[m.start()]
    return m.start() * 8 + (v & -v).bit_length() - 1


def _first_clear(page: bytearray, lo: int) -> int | None:
    """The first clear bit at or after bit ``lo`` of a page."""
    byte = lo // 8
    if byte >= BLOCK:
        return None
    v = (~page[byte] & 0xFF) >> (lo % 8)
    if v:
        return lo + (v & -v).bit_length() - 1
    m = _NOTFULL.search(page, byte + 1)
    if m is None:
        return None
    v = ~page[m.start()] & 0xFF
    return m.start() * 8 + (v & -v).bit_length() - 1


def _mask(page: bytearray, lo: int, hi: int, value: bool) -> int:
    """Set or clear bits ``[lo, hi)`` of a page in place; the change in set bits."""
    if hi <= lo:
        return 0
    a, b = lo // 8, (hi - 1) // 8
    before = _popcount(page[a : b + 1])
    head = (0xFF << (lo % 8)) & 0xFF
    tail = (1 << (hi - b * 8)) - 1
    if a == b:
        masks = [(a, head & tail)]
    else:
        masks = [(a, head), (b, tail)]
        page[a + 1 : b] = (b"\xff" if value else b"\x00") * (b - a - 1)
    for i, m in masks:
        page[i] = page[i] | m if value else page[i] & ~m
    return _popcount(page[a : b + 1]) - before


class Bitmap:
    """The dirty bits of one leg: bit ``i`` covers bytes ``[i*g, (i+1)*g)``.

    Sparse, so that metadata grows with what is dirty, not with the device: bits live in
    4 KiB pages that exist only where a bit below ``full_from`` is set, and every bit from
    ``full_from`` on is set without being stored (a leg that needs a full resync of a
    petabyte costs nothing until it is copied; the copy, going up from the start, moves
    ``full_from`` up).  ``dirty_pages`` are the pages to write at the next sync and
    ``punch`` the page ranges that became all clear (holes in the file)."""

    def __init__(self, nbits: int) -> None:
        self.nbits = nbits
        self.full_from = nbits
        self.pages: dict[int, bytearray] = {}
        self._keys: list[int] = []  # page numbers, sorted
        self._set = 0  # set bits stored in pages
        self.dirty_pages: set[int] = set()
        self.punch: list[tuple[int, int]] = []
        self.meta_changed = False  # full_from moved down (must reach the metadata block)
        self.disk_full_from = nbits  # full_from as the file's metadata records it

    # ---- pages ------------------------------------------------------------------------
    def _page(self, p: int) -> bytearray:
        page = self.pages.get(p)
        if page is None:
            page = self.pages[p] = bytearray(BLOCK)
            bisect.insort(self._keys, p)
        return page

    def _drop_from(self, first_bit: int) -> None:
        """Forget stored bits at or after ``first_bit`` (they are now covered by full_from)."""
        p0 = first_bit // PAGE_BITS
        for p in [k for k in self._keys if k >= p0]:
            page = self.pages[p]
            lo = max(first_bit - p * PAGE_BITS, 0)
            if lo == 0:
                self._set -= _popcount(page)
                del self.pages[p]
                self._keys.remove(p)
                self.dirty_pages.discard(p)
            else:
                self._apply_page(p, lo, PAGE_BITS, False)

    def _apply_page(self, p: int, lo: int, hi: int, value: bool) -> int:
        """Set or clear bits ``[lo, hi)`` of page ``p``; the number of bits changed."""
        page = self.pages.get(p) if not value else self._page(p)
        if page is None:
            return 0
        delta = _mask(page, lo, hi, value)
        if delta:
            self._set += delta
            self.dirty_pages.add(p)
            if not value and not _NONZERO.search(page):
                del self.pages[p]  # all clear: a hole in the file
                self._keys.remove(p)
        return abs(delta)

    def _apply_stored(self, first: int, end: int, value: bool) -> int:
        changed = 0
        while first < end:
            p = first // PAGE_BITS
            base = p * PAGE_BITS
            hi = min(end - base, PAGE_BITS)
            changed += self._apply_page(p, first - base, hi, value)
            first = base + hi
        return changed

    # ---- the bitmap -----------------------------------------------------------------
    def set(self, first: int, end: int) -> int:
        """Set bits ``[first, end)``; return how many were newly set."""
        first, end = max(first, 0), min(end, self.nbits)
        if first >= end:
            return 0
        ff = self.full_from
        if end >= ff and first < ff:
            # reaching the stored-as-set tail: grow the tail down instead of storing pages
            # (a trim of a whole degraded petabyte leg stays one number)
            newly = ff - first - self._stored_count(first, ff)
            self._drop_from(first)
            self.full_from = first
            self.meta_changed = True
            return newly
        return self._apply_stored(first, min(end, ff), True)

    def clear(self, first: int, end: int) -> int:
        """Clear bits ``[first, end)``; return how many were newly cleared."""
        first, end = max(first, 0), min(end, self.nbits)
        if first >= end:
            return 0
        ff = self.full_from
        changed = self._apply_stored(first, min(end, ff), False)
        if end > ff:
            if first > ff:  # a hole in the middle of the tail: store the bits before it
                self._apply_stored(ff, first, True)
            start = max(first, ff)
            changed += end - start
            p_lo = -(-start // PAGE_BITS)  # whole pages now clear: holes on disk
            p_hi = end // PAGE_BITS if end < self.nbits else -(-self.nbits // PAGE_BITS)
            if p_hi > p_lo:
                self.punch.append((p_lo, p_hi))
            for p in range(start // PAGE_BITS, p_lo):
                self.dirty_pages.add(p)  # a partial page at the start of the range
            if end < self.nbits and end % PAGE_BITS:
                # bits of the page holding ``end`` that stay set are stored from now on
                self.full_from = end
                self.dirty_pages.add(end // PAGE_BITS)
            else:
                self.full_from = self.nbits if end >= self.nbits else end
        return changed

    def _stored_count(self, first: int, end: int) -> int:
        n = 0
        i = bisect.bisect_left(self._keys, first // PAGE_BITS)
        while i < len(self._keys) and self._keys[i] * PAGE_BITS < end:
            p = self._keys[i]
            base = p * PAGE_BITS
            lo, hi = max(first - base, 0), min(end - base, PAGE_BITS)
            page = self.pages[p]
            a, b = lo // 8, (hi - 1) // 8
            chunk = int.from_bytes(page[a : b + 1], "little") >> (lo % 8)
            n += (chunk & ((1 << (hi - lo)) - 1)).bit_count()
            i += 1
        return n

    def fill(self) -> None:
        """Every bit set (a full resync): nothing stored, the whole tail."""
        self.pages.clear()
        self._keys.clear()
        self._set = 0
        self.dirty_pages.clear()
        self.punch = [(0, -(-self.nbits // PAGE_BITS))]
        self.full_from = 0
        self.meta_changed = True

    def test(self, i: int) -> bool:
        if i >= self.full_from:
            return i < self.nbits
        page = self.pages.get(i // PAGE_BITS)
        if page is None:
            return False
        j = i % PAGE_BITS
        return bool(page[j // 8] >> (j % 8) & 1)

    def next_set(self, start: int) -> int | None:
        """The first set bit at or after ``start``."""
        start = max(start, 0)
        if start >= self.nbits:
            return None
        ff = self.full_from
        if start >= ff:
            return start
        keys = self._keys
        i = bisect.bisect_left(keys, start // PAGE_BITS)
        while i < len(keys):
            p = keys[i]
            base = p * PAGE_BITS
            b = _first_set(self.pages[p], max(start - base, 0))
            if b is not None:
                return min(base + b, ff)
            i += 1
        return ff if ff < self.nbits else None

    def run_end(self, start: int, limit: int) -> int:
        """The end of the run of set bits that begins at ``start``, at most ``limit``."""
        limit = min(limit, self.nbits)
        i = start
        while i < limit:
            if i >= self.full_from:
                return limit
            p = i // PAGE_BITS
            page = self.pages.get(p)
            if page is None:
                return i
            base = p * PAGE_BITS
            z = _first_clear(page, i - base)
            if z is not None and base + z < self.full_from:
                return min(base + z, limit)
            i = self.full_from if z is not None else base + PAGE_BITS
        return min(i, limit)

    def count(self) -> int:
        return self._set + (self.nbits - self.full_from)

    def runs(self) -> Iterator[tuple[int, int]]:
        """Every run of set bits, as ``(first, end)``."""
        i = self.next_set(0)
        while i is not None:
            j = self.run_end(i, self.nbits)
            yield i, j
            i = self.next_set(j)

    def merge(self, other: Bitmap) -> int:
        """Set every bit that is set in ``other``; return how many were newly set."""
        newly = 0
        for first, end in list(other.runs()):
            newly += self.set(first, end)
        return newly

    def regrain(self, old: Bitmap, old_g: int, new_g: int) -> None:
        """Take over ``old`` (granularity ``old_g``) conservatively at granularity ``new_g``."""
        for i, j in list(old.runs()):
            self.set(i * old_g // new_g, -(-j * old_g // new_g))

    def page_bytes(self, p: int) -> bytes:
        """Page ``p`` as it goes to the file (the tail's bits included as set)."""
        page = self.pages.get(p)
        out = bytearray(page) if page is not None else bytearray(BLOCK)
        base = p * PAGE_BITS
        _mask(out, max(self.full_from - base, 0), min(self.nbits - base, PAGE_BITS), True)
        return bytes(out)

    def load_page(self, p: int, data: bytes) -> None:
        """Take a page read from the file (bits at or after full_from are ignored)."""
        base = p * PAGE_BITS
        if base >= self.full_from or not _NONZERO.search(data):
            return
        page = bytearray(BLOCK)
        page[: len(data)] = data[:BLOCK]
        _mask(page, max(min(self.full_from, self.nbits) - base, 0), PAGE_BITS, False)
        n = _popcount(page)
        if n:
            self.pages[p] = page
            bisect.insort(self._keys, p)
            self._set += n
