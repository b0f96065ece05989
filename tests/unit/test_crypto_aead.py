"""AEAD records: known answers, round trips, and tamper/replay/reorder/truncation detection."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from dst.crypto.aead import (
    CIPHER_ORDER,
    CIPHERS,
    RECORD_LIMIT,
    Opener,
    Sealer,
    cipher_by_wire_id,
    derive_session_keys,
    get_cipher,
    record_nonce,
)
from dst.errors import ProtocolError, UsageError

KEY = bytes(range(32))
AAD = b"\x00\x00\x00\x15"
PLAIN = b"DST known-answer test"
REAL = ("aes-256-gcm", "chacha20-poly1305")

# Computed once with AESGCM / ChaCha20Poly1305 called directly, with the nonce built by
# hand as b"\0" * 4 + n.to_bytes(8, "little"), for records n = 0, 1 of a fresh Sealer.
KNOWN_RECORDS = {
    "aes-256-gcm": (
        "4aefe1fede42ecca6685c85b6b5bf4ebf23733205c064edda164f1090e9642fe517c3c920c",
        "a1c4211015af717f30b02e189e24d784490958fce2b9d17ae972b4f4de2a8040915fde7e4f",
    ),
    "chacha20-poly1305": (
        "5ceb1611c688c9a67d4c3d0fdc342b55d8c5968695ff8fec0a2b0f7fb3cbe42d00b31bc465",
        "db04a77fde44c06f479bcf3221e2fcf5e5098e7d33fab406285bc1e347b77d09e1f547081f",
    ),
}
# Record number 0x0102030405060708: catches a big-endian or misplaced counter.
KNOWN_HIGH = {
    "aes-256-gcm": "58abab650941a739fb5e9f5ded595fd89d8152bb2c4ff4f8b75ab86a4b6ec931f519f3756d",
    "chacha20-poly1305": "b41af9c4c057856f0a864ba2000f04cac07297b7fca14fefab141f1baf617d5219aeb09e4c",
}

# HKDF-SHA256 computed by hand (RFC 5869 with hmac/hashlib), IKM = 0x11 * 32,
# salt = SHA-256(b"transcript"), info = b"dst v1 c2s" / b"dst v1 s2c", 32 bytes each.
SHARED = bytes.fromhex("11" * 32)
TRANSCRIPT = bytes.fromhex("54e6289e14c7b0e7ad9acc2dfc4c1e3d027d0eef7f5c4c3fe7c292761d0e06a6")
KNOWN_KEYS = (
    "4a8a76d3beeae3cc758eb6c8fa95636e34fe68e7b467986be564b665de2b0e68",
    "4f8568d2a931004c203453e992a236308a7f6fb5f5ea2a49cb81dcaf416e57ac",
)


def pair(name: str, key: bytes = KEY) -> tuple[Sealer, Opener]:
    c = get_cipher(name)
    return Sealer(c, key), Opener(c, key)


def test_registry_shape() -> None:
    assert tuple(CIPHERS) == CIPHER_ORDER == ("aes-256-gcm", "chacha20-poly1305", "none")
    for name, wire_id, tag in (
        ("none", 0, 0),
        ("aes-256-gcm", 1, 16),
        ("chacha20-poly1305", 2, 16),
    ):
        c = CIPHERS[name]
        assert (c.name, c.wire_id, c.key_size, c.tag_size) == (name, wire_id, 32, tag)
        assert cipher_by_wire_id(wire_id) is c
        assert c.releases_gil and c.inline_limit >= 4096
    assert cipher_by_wire_id(3) is None


def test_unknown_cipher_lists_valid_ones() -> None:
    with pytest.raises(UsageError) as ei:
        get_cipher("aes-128-cbc")
    assert str(ei.value) == (
        "unknown cipher 'aes-128-cbc'; choose one of aes-256-gcm, chacha20-poly1305, none"
    )


def test_nonce_layout() -> None:
    assert record_nonce(0) == bytes(12)
    assert record_nonce(0x0102030405060708).hex() == "000000000807060504030201"
    assert record_nonce(RECORD_LIMIT - 1) == b"\0\0\0\0" + b"\xff" * 8


@pytest.mark.parametrize("name", REAL)
def test_known_answer_records(name: str) -> None:
    s, o = pair(name)
    first, second = KNOWN_RECORDS[name]
    assert s.seal(PLAIN, AAD).hex() == first
    assert s.seal(PLAIN, AAD).hex() == second
    assert s.counter == 2
    assert o.open(bytes.fromhex(first), AAD) == PLAIN
    assert o.open(bytes.fromhex(second), AAD) == PLAIN
    assert o.counter == 2


@pytest.mark.parametrize("name", REAL)
def test_known_answer_high_counter(name: str) -> None:
    s, o = pair(name)
    s._counter = o._counter = 0x0102030405060708
    assert s.seal(PLAIN, AAD).hex() == KNOWN_HIGH[name]
    assert o.open(bytes.fromhex(KNOWN_HIGH[name]), AAD) == PLAIN


@pytest.mark.parametrize("name", REAL)
def test_record_matches_direct_library_call(name: str) -> None:
    prim = AESGCM(KEY) if name == "aes-256-gcm" else ChaCha20Poly1305(KEY)
    s, _ = pair(name)
    for n in range(3):
        nonce = b"\x00" * 4 + n.to_bytes(8, "little")
        assert s.seal(b"record %d" % n, AAD) == prim.encrypt(nonce, b"record %d" % n, AAD)


@pytest.mark.parametrize("name", REAL)
def test_known_session_keys(name: str) -> None:
    c2s, s2c = derive_session_keys(SHARED, TRANSCRIPT, get_cipher(name))
    assert (c2s.hex(), s2c.hex()) == KNOWN_KEYS


def test_session_keys_depend_on_every_input() -> None:
    aes = get_cipher("aes-256-gcm")
    base = derive_session_keys(SHARED, TRANSCRIPT, aes)
    assert base[0] != base[1]
    assert derive_session_keys(SHARED[:-1] + b"\x12", TRANSCRIPT, aes) != base
    assert derive_session_keys(SHARED, TRANSCRIPT[:-1] + b"\x00", aes) != base
    with pytest.raises(ValueError):
        derive_session_keys(b"", TRANSCRIPT, aes)


@pytest.mark.parametrize("name", CIPHER_ORDER)
@given(records=st.lists(st.tuples(st.binary(max_size=2048), st.binary(max_size=16)), max_size=8))
def test_round_trip(name: str, records: list[tuple[bytes, bytes]]) -> None:
    s, o = pair(name)
    for plain, aad in records:
        sealed = s.seal(memoryview(bytearray(plain)), aad)
        assert len(sealed) == len(plain) + get_cipher(name).tag_size
        assert o.open(memoryview(sealed), aad) == plain


@pytest.mark.parametrize("name", REAL)
@given(plain=st.binary(max_size=300), data=st.data())
def test_any_flipped_bit_fails(name: str, plain: bytes, data: st.DataObject) -> None:
    s, o = pair(name)
    sealed = bytearray(s.seal(plain, AAD))
    bit = data.draw(st.integers(0, 8 * len(sealed) - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError, match="tampered with, replayed or reordered"):
        o.open(sealed, AAD)
    sealed[bit // 8] ^= 1 << (bit % 8)
    assert o.open(sealed, AAD) == plain  # a failed record does not advance the counter


@pytest.mark.parametrize("name", REAL)
def test_changed_aad_fails(name: str) -> None:
    s, o = pair(name)
    sealed = s.seal(PLAIN, AAD)
    with pytest.raises(ProtocolError, match="AEAD tag check failed"):
        o.open(sealed, b"\x00\x00\x00\x16")


@pytest.mark.parametrize("name", REAL)
def test_replay_fails(name: str) -> None:
    s, o = pair(name)
    first = s.seal(b"one", AAD)
    assert o.open(first, AAD) == b"one"
    with pytest.raises(ProtocolError) as ei:
        o.open(first, AAD)
    assert str(ei.value) == (
        f"AEAD tag check failed: record 1 (19 bytes, {name}) does not authenticate; "
        "the frame was tampered with, replayed or reordered"
    )


@pytest.mark.parametrize("name", REAL)
def test_reorder_and_drop_fail(name: str) -> None:
    s, o = pair(name)
    a, b, c = (s.seal(x, AAD) for x in (b"a", b"b", b"c"))
    with pytest.raises(ProtocolError):
        o.open(b, AAD)  # b before a
    assert o.open(a, AAD) == b"a"
    with pytest.raises(ProtocolError):
        o.open(c, AAD)  # b was dropped
    assert o.open(b, AAD) == b"b"


@pytest.mark.parametrize("name", REAL)
def test_truncation_fails(name: str) -> None:
    s, o = pair(name)
    sealed = s.seal(PLAIN, AAD)
    for cut in (1, 15, 16, len(sealed) - 1, len(sealed)):
        with pytest.raises(ProtocolError, match="AEAD tag check failed"):
            o.open(sealed[:-cut], AAD)
    with pytest.raises(ProtocolError, match="shorter than the 16-byte tag"):
        o.open(b"", AAD)
    assert o.open(sealed, AAD) == PLAIN


@pytest.mark.parametrize("name", REAL)
def test_wrong_key_or_direction_fails(name: str) -> None:
    c2s, s2c = derive_session_keys(SHARED, TRANSCRIPT, get_cipher(name))
    sealed = Sealer(get_cipher(name), c2s).seal(PLAIN, AAD)
    with pytest.raises(ProtocolError):
        Opener(get_cipher(name), s2c).open(sealed, AAD)
    assert Opener(get_cipher(name), c2s).open(sealed, AAD) == PLAIN


@pytest.mark.parametrize("name", CIPHER_ORDER)
def test_counter_wrap_is_refused(name: str) -> None:
    s, o = pair(name)
    s._counter = o._counter = RECORD_LIMIT - 1
    last = s.seal(b"last", AAD)
    assert o.open(last, AAD) == b"last"
    with pytest.raises(ProtocolError, match="reconnect to derive fresh session keys"):
        s.seal(b"one too many", AAD)
    with pytest.raises(ProtocolError, match="reconnect to derive fresh session keys"):
        o.open(last, AAD)
    assert s.counter == o.counter == RECORD_LIMIT


def test_none_cipher_is_identity() -> None:
    s, o = pair("none")
    assert s.seal(memoryview(b"clear"), AAD) == b"clear"
    assert o.open(bytearray(b"clear"), b"") == b"clear"


@pytest.mark.parametrize("name", CIPHER_ORDER)
def test_wrong_key_size_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="needs a 32-byte key"):
        Sealer(get_cipher(name), KEY[:16])


@pytest.mark.parametrize("name", REAL)
def test_numbered_records_off_the_loop(name: str) -> None:
    """Numbers taken in wire order keep records valid when the work finishes out of order."""
    s, o = pair(name)
    numbers = [s.next_counter() for _ in range(3)]
    assert numbers == [0, 1, 2] and s.counter == 3
    sealed = {n: s.seal_record(n, b"record %d" % n, AAD) for n in reversed(numbers)}
    in_order, _ = pair(name)
    assert [sealed[n] for n in numbers] == [in_order.seal(b"record %d" % n, AAD) for n in numbers]
    taken = [o.next_counter() for _ in range(3)]
    plain = [o.open_record(n, sealed[n], AAD) for n in reversed(taken)]
    assert plain == [b"record 2", b"record 1", b"record 0"]
    with pytest.raises(ProtocolError, match="record 1 "):
        o.open_record(1, sealed[2], AAD)
    s2, _ = pair(name)
    s2._counter = RECORD_LIMIT
    with pytest.raises(ProtocolError, match="sealed 18446744073709551616 records"):
        s2.next_counter()
