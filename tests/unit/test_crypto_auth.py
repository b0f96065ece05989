"""Challenge-response proofs and the handshake transcript."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from hypothesis import given
from hypothesis import strategies as st

from dst.crypto.auth import (
    NONCE_SIZE,
    PROOF_SIZE,
    Transcript,
    new_nonce,
    proof,
    verify_proof,
)

KEY = bytes.fromhex("11" * 32)
TRANSCRIPT = hashlib.sha256(b"transcript").digest()
# HMAC-SHA256(KEY, b"dst v1 auth " + role + TRANSCRIPT), computed once with hmac/hashlib.
KNOWN = {
    "client": "e646f9469b7610e3c05f3511875ccd44271a1a249ecc769d627f3a7f1d8afbf0",
    "server": "58efbcc45747e8d91217b878b89b381b46c3c8f3058324e8f65167b5faaf091f",
}


def test_known_answer_proofs() -> None:
    assert proof(KEY, "client", TRANSCRIPT).hex() == KNOWN["client"]
    assert proof(KEY, "server", TRANSCRIPT).hex() == KNOWN["server"]
    assert len(proof(KEY, "client", TRANSCRIPT)) == PROOF_SIZE


def test_proof_matches_an_independent_hmac() -> None:
    h = HMAC(KEY, hashes.SHA256())
    h.update(b"dst v1 auth server" + TRANSCRIPT)
    assert proof(KEY, "server", TRANSCRIPT) == h.finalize()


def test_verify_accepts_only_the_right_proof() -> None:
    good = proof(KEY, "client", TRANSCRIPT)
    assert verify_proof(KEY, "client", TRANSCRIPT, good)
    assert verify_proof(KEY, "client", TRANSCRIPT, memoryview(good))
    # A reflected proof (the other role), another key, another transcript: all refused.
    assert not verify_proof(KEY, "server", TRANSCRIPT, good)
    assert not verify_proof(bytes(32), "client", TRANSCRIPT, good)
    assert not verify_proof(KEY, "client", hashlib.sha256(b"other").digest(), good)
    assert not verify_proof(KEY, "client", TRANSCRIPT, good[:-1])
    assert not verify_proof(KEY, "client", TRANSCRIPT, b"")


@given(bit=st.integers(0, 8 * PROOF_SIZE - 1))
def test_verify_refuses_any_flipped_bit(bit: int) -> None:
    bad = bytearray(proof(KEY, "server", TRANSCRIPT))
    bad[bit // 8] ^= 1 << (bit % 8)
    assert not verify_proof(KEY, "server", TRANSCRIPT, bad)


def test_bad_role_or_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="role must be 'client' or 'server'"):
        proof(KEY, "admin", TRANSCRIPT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty key"):
        proof(b"", "client", TRANSCRIPT)


def test_nonces_are_fresh() -> None:
    nonces = {new_nonce() for _ in range(64)}
    assert len(nonces) == 64
    assert all(len(n) == NONCE_SIZE == 32 for n in nonces)


def test_transcript_is_sha256_of_the_messages_in_order() -> None:
    t = Transcript()
    assert t.digest() == hashlib.sha256(b"").digest()
    t.add(b"hello")
    mid = t.digest()
    assert mid == hashlib.sha256(b"hello").digest()
    assert t.digest() == mid  # digest does not end the transcript
    t.add(memoryview(b"challenge"))
    t.add(bytearray(b"proof"))
    assert t.digest() == hashlib.sha256(b"hellochallengeproof").digest()
    assert t.messages == 3


@given(msgs=st.lists(st.binary(max_size=64), max_size=6))
def test_transcripts_of_equal_messages_agree(msgs: list[bytes]) -> None:
    a, b = Transcript(), Transcript()
    for m in msgs:
        a.add(m)
        b.add(memoryview(m))
    assert a.digest() == b.digest()
    b.add(b"x")
    assert a.digest() != b.digest()
