"""Mutual challenge-response authentication; the key never crosses the wire.

Both sides hash every handshake message into a ``Transcript`` (the client's
nonce travels in its hello, the server's in its challenge).  Each side then
proves it holds the key with ``proof(key, role, transcript.digest())``: an
HMAC-SHA256 over a fixed label, its role and the transcript hash.  Because the
transcript contains both fresh nonces, a proof cannot be replayed on another
connection; because the role is inside the MAC, a server cannot reflect the
client's own proof back to it; and because the whole transcript is covered, a
man in the middle who edits the offered cipher or checksum lists is caught.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final, Literal

Buf = bytes | bytearray | memoryview
Role = Literal["client", "server"]

NONCE_SIZE: Final = 32
PROOF_SIZE: Final = 32
AUTH_LABEL: Final = b"dst v1 auth "
_ROLES: Final[dict[str, bytes]] = {"client": b"client", "server": b"server"}


def new_nonce() -> bytes:
    """A fresh random challenge nonce from the operating system's CSPRNG."""
    return secrets.token_bytes(NONCE_SIZE)


def _role_bytes(role: str) -> bytes:
    try:
        return _ROLES[role]
    except KeyError:
        raise ValueError(f"role must be 'client' or 'server', not {role!r}") from None


def proof(key: bytes, role: Role, transcript_hash: bytes) -> bytes:
    """``HMAC-SHA256(key, b"dst v1 auth " + role + transcript_hash)``, 32 bytes."""
    if not key:
        raise ValueError("an authentication proof needs a non-empty key")
    msg = AUTH_LABEL + _role_bytes(role) + bytes(transcript_hash)
    return hmac.new(key, msg, hashlib.sha256).digest()


def verify_proof(key: bytes, role: Role, transcript_hash: bytes, received: Buf) -> bool:
    """Whether ``received`` is ``role``'s proof; compared in constant time."""
    return hmac.compare_digest(proof(key, role, transcript_hash), bytes(received))


class Transcript:
    """Incremental SHA-256 over the handshake messages, in the order they were sent.

    Messages are hashed back to back without separators, so callers add whole
    frames (which carry their own length headers) and both sides must add the
    same bytes in the same order.  ``digest`` may be called at any point and
    does not end the transcript.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.messages = 0

    def add(self, message: Buf) -> None:
        """Append one handshake message."""
        self._hash.update(message)
        self.messages += 1

    def digest(self) -> bytes:
        """SHA-256 of everything added so far (32 bytes)."""
        return self._hash.copy().digest()
