"""Handshake messages (HELLO, CHALLENGE, PROOF, WELCOME, REFUSE) and negotiation rules.

The messages are TLV bodies (see :mod:`dst.proto.tlv`); this module turns them
into frozen dataclasses and back, and holds the pure decision functions both
sides use (version overlap, algorithm choice), so they are tested as tables.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from dst.errors import ProtocolError
from dst.proto import tlv
from dst.proto.tlv import CRITICAL
from dst.proto.wire import MAX_VERSION, MIN_VERSION, Refusal


class F(IntEnum):
    """Field types.  Numbers are stable wire values."""

    VERSIONS = 1  # u16 min, u16 max (HELLO); u16 chosen twice (WELCOME)
    EXPORT = 2  # utf-8 export name
    CLIENT_ID = 3  # utf-8
    SESSION = 4  # 16 bytes
    GENERATION = 5  # u32
    READ_ONLY = 6  # u8: HELLO asks, WELCOME grants
    CIPHERS = 7  # comma-separated names, preference order (WELCOME: the one chosen)
    CHECKSUMS = 8  # same, for checksums
    MAX_REQUEST = 9  # u32
    QUEUE_DEPTH = 10  # u32
    NONCE = 11  # 32 bytes
    AUTH = 12  # u8: the client holds a key
    TAKEOVER = 13  # u8: fence a live session of the same client id instead of being refused
    PING_TIMEOUT = 14  # u32 ms: the client answers probe pings; how long a probe may wait
    SIZE = 20  # u64 export size
    MIN_BLOCK = 21  # u32
    PREFERRED_BLOCK = 22  # u32
    COMMANDS = 24  # u32 bit mask, bit n = command n
    FLAGS = 25  # u16 request flags honoured
    IDENTITY = 26  # 16-byte UUID of the export's backing store
    TRIM_ZEROES = 27  # u8: trimmed ranges read back as zeroes
    REASON = 40  # u16 Refusal
    MESSAGE = 41  # utf-8
    PROOF = 42  # 32-byte HMAC; in WELCOME it is the last field


def _names(v: bytes) -> tuple[str, ...]:
    text = tlv.get_str(F.CIPHERS, v)
    return tuple(n for n in text.split(",") if n)


def _check_unknown(t: int) -> None:
    if t & CRITICAL:
        raise ProtocolError(
            f"unknown critical handshake field {t & ~CRITICAL}; upgrade the older side"
        )


@dataclass(frozen=True)
class Hello:
    """Client -> export node: who I am and what I can do."""

    export: str
    client_id: str
    session: bytes
    generation: int
    read_only: bool = False
    ciphers: tuple[str, ...] = ("none",)
    checksums: tuple[str, ...] = ("none",)
    max_request: int = 32 << 20
    queue_depth: int = 128
    nonce: bytes = b""
    auth: bool = False
    min_version: int = MIN_VERSION
    max_version: int = MAX_VERSION
    takeover: bool = False
    # None: an older client that does not answer the export node's probe pings
    ping_timeout: float | None = None

    def encode(self) -> bytes:
        fields: list[tuple[int, bytes]] = [
            (F.VERSIONS, tlv.u16(self.min_version) + tlv.u16(self.max_version)),
            (F.EXPORT, self.export.encode()),
            (F.CLIENT_ID, self.client_id.encode()),
            (F.SESSION, self.session),
            (F.GENERATION, tlv.u32(self.generation)),
            (F.READ_ONLY, tlv.u8(int(self.read_only))),
            (F.CIPHERS, ",".join(self.ciphers).encode()),
            (F.CHECKSUMS, ",".join(self.checksums).encode()),
            (F.MAX_REQUEST, tlv.u32(self.max_request)),
            (F.QUEUE_DEPTH, tlv.u32(self.queue_depth)),
            (F.NONCE, self.nonce),
            (F.AUTH, tlv.u8(int(self.auth))),
        ]
        if self.takeover:
            fields.append((F.TAKEOVER, tlv.u8(1)))
        if self.ping_timeout is not None:
            ms = min(0xFFFFFFFF, max(1, round(self.ping_timeout * 1000)))
            fields.append((F.PING_TIMEOUT, tlv.u32(ms)))
        return tlv.encode(fields)

    @classmethod
    def decode(cls, body: bytes) -> Hello:
        kw: dict[str, object] = {}
        for t, v in tlv.decode(body):
            if t == F.VERSIONS:
                if len(v) != 4:
                    raise ProtocolError("bad version range field")
                kw["min_version"] = int.from_bytes(v[:2], "little")
                kw["max_version"] = int.from_bytes(v[2:], "little")
            elif t == F.EXPORT:
                kw["export"] = tlv.get_str(t, v)
            elif t == F.CLIENT_ID:
                kw["client_id"] = tlv.get_str(t, v)
            elif t == F.SESSION:
                if len(v) != 16:
                    raise ProtocolError("session id must be 16 bytes")
                kw["session"] = bytes(v)
            elif t == F.GENERATION:
                kw["generation"] = tlv.get_int(t, v)
            elif t == F.READ_ONLY:
                kw["read_only"] = bool(tlv.get_int(t, v))
            elif t == F.CIPHERS:
                kw["ciphers"] = _names(v)
            elif t == F.CHECKSUMS:
                kw["checksums"] = _names(v)
            elif t == F.MAX_REQUEST:
                kw["max_request"] = tlv.get_int(t, v)
            elif t == F.QUEUE_DEPTH:
                kw["queue_depth"] = tlv.get_int(t, v)
            elif t == F.NONCE:
                kw["nonce"] = bytes(v)
            elif t == F.AUTH:
                kw["auth"] = bool(tlv.get_int(t, v))
            elif t == F.TAKEOVER:
                kw["takeover"] = bool(tlv.get_int(t, v))
            elif t == F.PING_TIMEOUT:
                ms = tlv.get_int(t, v)
                if ms == 0:
                    raise ProtocolError("the ping timeout field must not be 0")
                kw["ping_timeout"] = ms / 1000
            else:
                _check_unknown(t)
        for required in ("export", "client_id", "session", "generation"):
            if required not in kw:
                raise ProtocolError(f"HELLO lacks the {required} field")
        return cls(**kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Welcome:
    """Export node -> client: the terms of this connection."""

    version: int
    size: int
    read_only: bool
    identity: uuid.UUID
    cipher: str = "none"
    checksum: str = "none"
    max_request: int = 32 << 20
    queue_depth: int = 128
    min_block: int = 1
    preferred_block: int = 4096
    commands: int = 0
    flags: int = 0
    trim_zeroes: bool = False
    proof: bytes = b""

    def encode_unproven(self) -> bytes:
        """Every field but the proof (the proof covers these bytes)."""
        return tlv.encode(
            [
                (F.VERSIONS, tlv.u16(self.version) + tlv.u16(self.version)),
                (F.SIZE, tlv.u64(self.size)),
                (F.READ_ONLY, tlv.u8(int(self.read_only))),
                (F.IDENTITY, self.identity.bytes),
                (F.CIPHERS, self.cipher.encode()),
                (F.CHECKSUMS, self.checksum.encode()),
                (F.MAX_REQUEST, tlv.u32(self.max_request)),
                (F.QUEUE_DEPTH, tlv.u32(self.queue_depth)),
                (F.MIN_BLOCK, tlv.u32(self.min_block)),
                (F.PREFERRED_BLOCK, tlv.u32(self.preferred_block)),
                (F.COMMANDS, tlv.u32(self.commands)),
                (F.FLAGS, tlv.u16(self.flags)),
                (F.TRIM_ZEROES, tlv.u8(int(self.trim_zeroes))),
            ]
        )

    def encode(self) -> bytes:
        body = self.encode_unproven()
        if self.proof:
            body += tlv.encode([(F.PROOF, self.proof)])
        return body

    @classmethod
    def decode(cls, body: bytes) -> tuple[Welcome, bytes]:
        """The message and the bytes its proof covers (everything before the PROOF field)."""
        kw: dict[str, object] = {}
        covered = body
        pos = 0
        for t, v in tlv.decode(body):
            start = pos
            pos += tlv.TLV_HEADER.size + len(v)
            if t == F.VERSIONS:
                if len(v) != 4:
                    raise ProtocolError("bad version field")
                kw["version"] = int.from_bytes(v[:2], "little")
            elif t == F.SIZE:
                kw["size"] = tlv.get_int(t, v)
            elif t == F.READ_ONLY:
                kw["read_only"] = bool(tlv.get_int(t, v))
            elif t == F.IDENTITY:
                if len(v) != 16:
                    raise ProtocolError("identity must be 16 bytes")
                kw["identity"] = uuid.UUID(bytes=bytes(v))
            elif t == F.CIPHERS:
                kw["cipher"] = tlv.get_str(t, v)
            elif t == F.CHECKSUMS:
                kw["checksum"] = tlv.get_str(t, v)
            elif t == F.MAX_REQUEST:
                kw["max_request"] = tlv.get_int(t, v)
            elif t == F.QUEUE_DEPTH:
                kw["queue_depth"] = tlv.get_int(t, v)
            elif t == F.MIN_BLOCK:
                kw["min_block"] = tlv.get_int(t, v)
            elif t == F.PREFERRED_BLOCK:
                kw["preferred_block"] = tlv.get_int(t, v)
            elif t == F.COMMANDS:
                kw["commands"] = tlv.get_int(t, v)
            elif t == F.FLAGS:
                kw["flags"] = tlv.get_int(t, v)
            elif t == F.TRIM_ZEROES:
                kw["trim_zeroes"] = bool(tlv.get_int(t, v))
            elif t == F.PROOF:
                if pos != len(body):
                    raise ProtocolError("the PROOF field must be the last field of WELCOME")
                kw["proof"] = bytes(v)
                covered = body[:start]
            else:
                _check_unknown(t)
        for required in ("version", "size", "read_only", "identity"):
            if required not in kw:
                raise ProtocolError(f"WELCOME lacks the {required} field")
        return cls(**kw), covered  # type: ignore[arg-type]


@dataclass(frozen=True)
class Refuse:
    reason: int
    message: str

    def encode(self) -> bytes:
        return tlv.encode(
            [(F.REASON, tlv.u16(self.reason)), (F.MESSAGE, self.message.encode()[:4000])]
        )

    @classmethod
    def decode(cls, body: bytes) -> Refuse:
        reason = int(Refusal.BAD_HANDSHAKE)
        message = "refused without a reason"
        for t, v in tlv.decode(body):
            if t == F.REASON:
                reason = tlv.get_int(t, v)
            elif t == F.MESSAGE:
                message = v.decode("utf-8", "replace")
            else:
                _check_unknown(t)
        return cls(reason, message)


@dataclass(frozen=True)
class Challenge:
    nonce: bytes

    def encode(self) -> bytes:
        return tlv.encode([(F.NONCE, self.nonce)])

    @classmethod
    def decode(cls, body: bytes) -> Challenge:
        nonce = b""
        for t, v in tlv.decode(body):
            if t == F.NONCE:
                nonce = bytes(v)
            else:
                _check_unknown(t)
        if len(nonce) < 16:
            raise ProtocolError("CHALLENGE lacks a nonce of at least 16 bytes")
        return cls(nonce)


@dataclass(frozen=True)
class Proof:
    proof: bytes

    def encode(self) -> bytes:
        return tlv.encode([(F.PROOF, self.proof)])

    @classmethod
    def decode(cls, body: bytes) -> Proof:
        proof = b""
        for t, v in tlv.decode(body):
            if t == F.PROOF:
                proof = bytes(v)
            else:
                _check_unknown(t)
        return cls(proof)


@dataclass(frozen=True)
class Choice:
    """Outcome of a negotiation step: a value, or a refusal."""

    value: str | int | None = None
    refusal: Refusal | None = None
    message: str = ""
    extra: dict[str, object] = field(default_factory=dict)


def choose_version(lo: int, hi: int) -> Choice:
    best = min(hi, MAX_VERSION)
    if best < max(lo, MIN_VERSION):
        return Choice(
            refusal=Refusal.VERSION,
            message=(
                f"no common protocol version: the client speaks {lo}..{hi}, this export node "
                f"{MIN_VERSION}..{MAX_VERSION}; upgrade the older side"
            ),
        )
    return Choice(value=best)


def choose_algorithm(kind: str, ours: Sequence[str], theirs: Sequence[str]) -> Choice:
    """The export node's first choice that the client also lists."""
    for name in ours:
        if name in theirs:
            return Choice(value=name)
    refusal = Refusal.NO_COMMON_CIPHER if kind == "cipher" else Refusal.NO_COMMON_CHECKSUM
    return Choice(
        refusal=refusal,
        message=(
            f"no common {kind}: the export node offers {', '.join(ours) or 'nothing'}, "
            f"the client accepts {', '.join(theirs) or 'nothing'}; make the --{kind} lists overlap"
        ),
    )
