"""Channel encryption: AEAD records with per-direction counter nonces.

After the handshake each direction of a connection has its own 32-byte key
(``derive_session_keys``) and its own record counter.  The nonce of record
number ``n`` is 12 bytes: four zero bytes, then ``n`` as an unsigned 64-bit
little-endian integer.  Both ends count records, so the receiver never reads a
nonce off the wire: a replayed, reordered, dropped or truncated record is
opened with the wrong nonce, fails the tag check, and the connection is closed.
A key is never used for more than 2**64 records: the sealer refuses first.

The ``none`` cipher is a real registry entry (so negotiation and the command
line treat it like the others) with a zero-length tag; its Sealer and Opener
copy bytes unchanged.  The protocol does not start a record layer for it at all,
and authentication still runs (``--cipher none`` keeps the challenge-response).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dst.errors import ProtocolError, UsageError

Buf = bytes | bytearray | memoryview
KIB: Final = 1024
#: ``inline_limit`` of the identity cipher: no work, never worth a hand-off.
ALWAYS_INLINE: Final = (1 << 63) - 1

NONCE: Final = struct.Struct("<4xQ")
#: Records a key may seal or open; counter values 0 .. RECORD_LIMIT - 1 are used once each.
RECORD_LIMIT: Final = 1 << 64
#: HKDF ``info`` labels, one per direction (docs/protocol.md, "Session keys").
C2S_LABEL: Final = b"dst v1 c2s"
S2C_LABEL: Final = b"dst v1 s2c"


class _Aead(Protocol):
    def encrypt(self, nonce: Buf, data: Buf, associated_data: Buf | None) -> bytes: ...
    def decrypt(self, nonce: Buf, data: Buf, associated_data: Buf | None) -> bytes: ...
    def encrypt_into(self, nonce: Buf, data: Buf, associated_data: Buf | None, buf: Buf) -> int: ...
    def decrypt_into(self, nonce: Buf, data: Buf, associated_data: Buf | None, buf: Buf) -> int: ...


class _Factory(Protocol):
    def __call__(self, key: Buf, /) -> _Aead: ...


class _Identity:
    """The ``none`` cipher's primitive: no secrecy, no tag."""

    def __init__(self, key: Buf) -> None:
        del key

    def encrypt(self, nonce: Buf, data: Buf, associated_data: Buf | None) -> bytes:
        return bytes(data)

    def decrypt(self, nonce: Buf, data: Buf, associated_data: Buf | None) -> bytes:
        return bytes(data)

    def encrypt_into(self, nonce: Buf, data: Buf, associated_data: Buf | None, buf: Buf) -> int:
        n = len(data)
        memoryview(buf).cast("B")[:n] = memoryview(data).cast("B")
        return n

    def decrypt_into(self, nonce: Buf, data: Buf, associated_data: Buf | None, buf: Buf) -> int:
        return self.encrypt_into(nonce, data, associated_data, buf)


def _aes_gcm(key: Buf) -> _Aead:
    return AESGCM(key)


def _chacha(key: Buf) -> _Aead:
    return ChaCha20Poly1305(key)


def _identity(key: Buf) -> _Aead:
    return _Identity(key)


@dataclass(frozen=True)
class Cipher:
    """One named AEAD algorithm; a value object, safe to share.

    ``releases_gil`` and ``inline_limit`` guide the asyncio shell: records of at
    most ``inline_limit`` plaintext bytes cost the event loop less when sealed
    or opened inline than when handed to a worker thread (measured,
    docs/crypto-measurements.md).  ``cryptography`` releases the GIL for AEAD
    inputs of 2 KiB and more in the installed version (50.x); older versions
    held it, which the measurement script shows.
    """

    name: str
    wire_id: int
    key_size: int
    tag_size: int
    releases_gil: bool
    inline_limit: int
    _factory: _Factory = field(repr=False, compare=False)

    def primitive(self, key: Buf) -> _Aead:
        """A keyed primitive with ``encrypt``/``decrypt`` (nonce, data, aad)."""
        if len(key) != self.key_size:
            raise ValueError(f"{self.name} needs a {self.key_size}-byte key, not {len(key)} bytes")
        return self._factory(key)


CIPHERS: Final[dict[str, Cipher]] = {
    c.name: c
    for c in (
        # Both AEADs stay on the loop at every size: measured end to end (docs/benchmarks.md,
        # "Channel encryption"), handing 1 MiB records to the pool cost more CPU per request
        # and less throughput than sealing them inline (AES-GCM about 9 GB/s, ChaCha20
        # about 3.5 GB/s per core here).  The pool path stays for a machine where it wins.
        Cipher("aes-256-gcm", 1, 32, 16, True, ALWAYS_INLINE, _aes_gcm),
        Cipher("chacha20-poly1305", 2, 32, 16, True, ALWAYS_INLINE, _chacha),
        Cipher("none", 0, 32, 0, True, ALWAYS_INLINE, _identity),
    )
}

#: Preference order: AES-GCM is fastest with AES-NI (every x86-64 and ARMv8 server).
CIPHER_ORDER: Final[tuple[str, ...]] = ("aes-256-gcm", "chacha20-poly1305", "none")

_BY_WIRE_ID: Final[dict[int, Cipher]] = {c.wire_id: c for c in CIPHERS.values()}


def get_cipher(name: str) -> Cipher:
    """The cipher called ``name``; a UsageError lists the valid names otherwise."""
    try:
        return CIPHERS[name]
    except KeyError:
        raise UsageError(
            f"unknown cipher {name!r}; choose one of {', '.join(CIPHER_ORDER)}"
        ) from None


def cipher_by_wire_id(wire_id: int) -> Cipher | None:
    """The cipher with this wire id, or None: the caller decides how to refuse it."""
    return _BY_WIRE_ID.get(wire_id)


def record_nonce(counter: int) -> bytes:
    """The 12-byte nonce of record number ``counter``: 4 zero bytes + u64 little-endian."""
    return NONCE.pack(counter)


class _Direction:
    """Key and record counter of one direction; shared by Sealer and Opener."""

    _verb = ""

    def __init__(self, cipher: Cipher, key: bytes) -> None:
        self.cipher = cipher
        self._aead = cipher.primitive(key)
        self._counter = 0

    @property
    def counter(self) -> int:
        """How many record numbers were used so far (the next record's number)."""
        return self._counter

    def next_counter(self) -> int:
        """Take the next record number, for ``seal_record``/``open_record`` off the loop.

        Take numbers on the event loop in wire order, then do the work anywhere:
        the records stay numbered in the order they travel even when worker
        threads finish out of order.
        """
        n = self._counter
        self._check_limit(n)
        self._counter = n + 1
        return n

    def _check_limit(self, n: int) -> None:
        if n >= RECORD_LIMIT:
            raise ProtocolError(
                f"{self.cipher.name} session key {self._verb} {n} records, the most one key "
                "may; reconnect to derive fresh session keys"
            )


class Sealer(_Direction):
    """Seals the records of one direction, numbering them 0, 1, 2, ..."""

    _verb = "sealed"

    def seal(self, plaintext: Buf, aad: bytes) -> bytes:
        """``ciphertext || tag`` of the next record; ``aad`` is authenticated, not sent."""
        return self.seal_record(self.next_counter(), plaintext, aad)

    def seal_record(self, counter: int, plaintext: Buf, aad: bytes) -> bytes:
        """Seal record number ``counter`` (from ``next_counter``); safe in a worker thread."""
        return self._aead.encrypt(NONCE.pack(counter), plaintext, aad)

    def seal_into(self, counter: int, plaintext: Buf, aad: bytes, out: memoryview) -> None:
        """Like :meth:`seal_record`, writing ``ciphertext || tag`` into ``out``.

        ``out`` is exactly ``len(plaintext) + tag_size`` bytes and must not overlap
        ``plaintext``.  The channel seals large payloads into pooled buffers this
        way: a fresh megabyte per record cost more than the cipher (allocation,
        zero-fill, page faults; docs/benchmarks.md, "Channel encryption").
        """
        self._aead.encrypt_into(NONCE.pack(counter), plaintext, aad, out)


class Opener(_Direction):
    """Opens the records of one direction in the order they were sealed."""

    _verb = "opened"

    def open(self, ciphertext_and_tag: Buf, aad: bytes) -> bytes:
        """The plaintext of the next record, or ProtocolError if it does not authenticate.

        A record that fails does not use up its number; the connection must be
        closed anyway.
        """
        n = self._counter
        self._check_limit(n)
        plain = self.open_record(n, ciphertext_and_tag, aad)
        self._counter = n + 1
        return plain

    def open_record(self, counter: int, ciphertext_and_tag: Buf, aad: bytes) -> bytes:
        """Open record number ``counter`` (from ``next_counter``); safe in a worker thread."""
        size = len(ciphertext_and_tag)
        self._check_size(counter, size)
        try:
            return self._aead.decrypt(NONCE.pack(counter), ciphertext_and_tag, aad)
        except InvalidTag:
            raise self._tag_failed(counter, size) from None

    def open_into(self, counter: int, ciphertext_and_tag: Buf, aad: bytes, out: memoryview) -> None:
        """Like :meth:`open_record`, writing the plaintext into ``out``.

        ``out`` is exactly ``len(ciphertext_and_tag) - tag_size`` bytes and must not
        overlap the input.  When the tag does not check, ``out`` holds garbage that
        nobody may read: the caller drops the connection without using it.
        """
        size = len(ciphertext_and_tag)
        self._check_size(counter, size)
        try:
            self._aead.decrypt_into(NONCE.pack(counter), ciphertext_and_tag, aad, out)
        except InvalidTag:
            raise self._tag_failed(counter, size) from None

    def _check_size(self, counter: int, size: int) -> None:
        if size < self.cipher.tag_size:
            raise ProtocolError(
                f"AEAD tag check failed: record {counter} is {size} bytes, shorter than the "
                f"{self.cipher.tag_size}-byte tag; the frame was tampered with, replayed "
                "or reordered"
            )

    def _tag_failed(self, counter: int, size: int) -> ProtocolError:
        return ProtocolError(
            f"AEAD tag check failed: record {counter} ({size} bytes, {self.cipher.name}) "
            "does not authenticate; the frame was tampered with, replayed or reordered"
        )


def derive_session_keys(
    shared_key: bytes, transcript_hash: bytes, cipher: Cipher
) -> tuple[bytes, bytes]:
    """``(client_to_server, server_to_client)`` keys for one connection.

    HKDF-SHA256 with the long-term key as input keying material and the
    handshake transcript hash as salt: every connection gets fresh keys (both
    nonces are in the transcript), so restarting the record counters at zero
    never reuses a nonce under one key.  Distinct ``info`` labels keep the two
    directions' keys unrelated.  The cipher is not an HKDF input: the transcript
    already contains the export node's choice of cipher.
    """
    if not shared_key:
        raise ValueError("derive_session_keys needs a non-empty shared key")
    keys = []
    for label in (C2S_LABEL, S2C_LABEL):
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=cipher.key_size,
            salt=transcript_hash,
            info=label,
        )
        keys.append(hkdf.derive(shared_key))
    return keys[0], keys[1]
