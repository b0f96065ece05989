"""Checksum registry: known answers, multi-part digests, and the package's import purity."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dst.crypto
from dst.crypto.checksums import (
    CHECKSUM_ORDER,
    CHECKSUMS,
    checksum_by_wire_id,
    get_checksum,
)
from dst.errors import UsageError

CHECK = b"123456789"

# Expected digests of b"123456789", hard-coded from published check values
# (CRC-32C check value 0xE3069283, SHA-256 of "123456789") and one-shot library calls.
KNOWN = {
    "crc32c": "839206e3",  # 0xE3069283 little-endian
    "xxh3": "72dcb18b67a17dff",  # XXH3-64 0x72DCB18B67A17DFF, canonical big-endian
    "blake2b": "16e0bf1f85594a11e75030981c0b670370b3ad83a43f49ae58a2fd6f6513cde9",
    "sha256": "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225",
    "none": "",
}


@pytest.mark.parametrize("name", CHECKSUM_ORDER)
def test_known_answer(name: str) -> None:
    assert get_checksum(name).compute(CHECK).hex() == KNOWN[name]


def test_crc32c_check_value_is_little_endian() -> None:
    assert int.from_bytes(get_checksum("crc32c").compute(CHECK), "little") == 0xE3069283


def test_xxh3_empty_input_is_the_reference_value() -> None:
    # XXH3_64bits("") from the xxHash reference implementation.
    assert get_checksum("xxh3").compute(b"").hex() == "2d06800538d394c2"


def test_compute_with_no_parts_is_digest_of_empty_input() -> None:
    assert get_checksum("sha256").compute() == hashlib.sha256(b"").digest()
    assert get_checksum("crc32c").compute() == bytes(4)


def test_registry_shape() -> None:
    assert tuple(CHECKSUMS) == CHECKSUM_ORDER
    expected = {
        "none": (0, 0),
        "crc32c": (1, 4),
        "xxh3": (2, 8),
        "blake2b": (3, 32),
        "sha256": (4, 32),
    }
    for name, (wire_id, size) in expected.items():
        c = CHECKSUMS[name]
        assert (c.name, c.wire_id, c.digest_size) == (name, wire_id, size)
        assert len(c.compute(CHECK)) == size
        assert checksum_by_wire_id(wire_id) is c
        assert c.releases_gil and c.inline_limit >= 4096
    assert checksum_by_wire_id(99) is None


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(UsageError) as ei:
        get_checksum("md5")
    assert str(ei.value) == (
        "unknown checksum 'md5'; choose one of crc32c, xxh3, blake2b, sha256, none"
    )
    assert ei.value.exit_code == 2


@pytest.mark.parametrize("name", CHECKSUM_ORDER)
def test_buffer_types_agree(name: str) -> None:
    c = get_checksum(name)
    data = bytes(range(256)) * 5
    expected = c.compute(data)
    assert c.compute(bytearray(data)) == expected
    assert c.compute(memoryview(data)) == expected
    assert c.compute(memoryview(b"xx" + data + b"yy")[2:-2]) == expected


@pytest.mark.parametrize("name", CHECKSUM_ORDER)
@given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 4096), max_size=5))
def test_multi_part_equals_single_part(name: str, data: bytes, cuts: list[int]) -> None:
    c = get_checksum(name)
    points = sorted({min(x, len(data)) for x in cuts})
    parts: list[bytes | memoryview] = []
    start = 0
    for p in [*points, len(data)]:
        parts.append(memoryview(data)[start:p])
        start = p
    assert c.compute(*parts) == c.compute(data)
    assert c.verify(c.compute(data), *parts)


@pytest.mark.parametrize("name", [n for n in CHECKSUM_ORDER if n != "none"])
def test_a_flipped_bit_changes_the_digest(name: str) -> None:
    c = get_checksum(name)
    data = bytearray(b"\x5a" * 4096)
    good = c.compute(data)
    for bit in (0, 7, 8 * 2048 + 3, 8 * 4096 - 1):
        data[bit // 8] ^= 1 << (bit % 8)
        assert c.compute(data) != good
        assert not c.verify(good, data)
        data[bit // 8] ^= 1 << (bit % 8)
    assert c.verify(good, data)


FORBIDDEN = {
    "asyncio",
    "socket",
    "selectors",
    "threading",
    "subprocess",
    "time",
    "concurrent",
    "multiprocessing",
    "_thread",
}


def _imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call):
            f = node.func
            called = getattr(f, "id", None) or getattr(f, "attr", "")
            if called in ("__import__", "import_module"):
                names.add("<dynamic import>")
    return names


def test_crypto_package_is_pure() -> None:
    """No sockets, event loops, threads, processes or clocks inside dst.crypto."""
    root = Path(dst.crypto.__file__).parent
    files = sorted(root.glob("*.py"))
    assert {f.name for f in files} >= {"checksums.py", "aead.py", "auth.py", "keys.py"}
    for f in files:
        mods = _imported_modules(ast.parse(f.read_text(), str(f)))
        assert "<dynamic import>" not in mods, f"{f.name} imports dynamically"
        bad = {m for m in mods if m.split(".")[0] in FORBIDDEN}
        assert not bad, f"{f.name} imports {sorted(bad)}"
        local = {m for m in mods if m.split(".")[0] == "dst"}
        assert all(m == "dst.errors" or m.startswith("dst.crypto") for m in local), (
            f"{f.name} imports {sorted(local)}; dst.crypto may only use dst.errors"
        )
