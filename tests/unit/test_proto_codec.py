"""The DST node protocol's byte layouts, against exact bytes."""

from __future__ import annotations

import ast
import pathlib
import uuid

import pytest

from dst.errors import ProtocolError
from dst.proto import tlv
from dst.proto.handshake import Hello, Refuse, Welcome, choose_algorithm, choose_version
from dst.proto.wire import (
    HS_HEADER,
    MsgType,
    Refusal,
    ReplyHeader,
    RequestHeader,
    pack_handshake,
)

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "dst"


def test_request_header_bytes() -> None:
    h = RequestHeader(
        command=2, flags=1, txn=0x0102030405060708, attempt=3, length=4096, offset=1 << 32
    )
    assert h.pack() == (
        b"DSTQ"
        + b"\x02\x00"
        + b"\x01\x00"
        + bytes.fromhex("0807060504030201")
        + b"\x03\x00\x00\x00"
        + b"\x00\x10\x00\x00"
        + b"\x00\x00\x00\x00\x01\x00\x00\x00"
    )
    assert len(h.pack()) == 32


def test_reply_header_bytes() -> None:
    h = ReplyHeader(command=1, status=0x1000, txn=7, attempt=2, length=512)
    assert h.pack() == (
        b"DSTA"
        + b"\x01\x00"
        + b"\x00\x10"
        + (7).to_bytes(8, "little")
        + b"\x02\x00\x00\x00"
        + b"\x00\x02\x00\x00"
    )


def test_handshake_header_and_tlv_bytes() -> None:
    frame = pack_handshake(MsgType.REFUSE, Refuse(Refusal.BUSY, "busy").encode())
    assert frame[:12] == b"DSTH" + b"\x05\x00" + b"\x00\x00" + (14).to_bytes(4, "little")
    assert frame[12:] == b"\x28\x00\x02\x00\x08\x00" + b"\x29\x00\x04\x00busy"
    assert HS_HEADER.size == 12


def test_hello_round_trip_and_unknown_fields() -> None:
    h = Hello(
        export="e",
        client_id="c",
        session=b"s" * 16,
        generation=3,
        read_only=True,
        ciphers=("aes-256-gcm", "none"),
        checksums=("xxh3",),
        nonce=b"n" * 32,
        auth=True,
    )
    body = h.encode()
    assert Hello.decode(body) == h
    # an unknown optional field is ignored; an unknown critical one is refused
    assert Hello.decode(body + tlv.encode([(999, b"future")])) == h
    with pytest.raises(ProtocolError, match="critical"):
        Hello.decode(body + tlv.encode([(0x8000 | 999, b"x")]))


def test_hello_missing_fields_and_truncation() -> None:
    with pytest.raises(ProtocolError, match="lacks"):
        Hello.decode(tlv.encode([(2, b"e")]))
    with pytest.raises(ProtocolError, match=r"truncated|claims"):
        Hello.decode(b"\x02\x00\x10\x00abc")


def test_welcome_proof_must_be_last_and_is_excluded_from_cover() -> None:
    w = Welcome(version=1, size=10, read_only=False, identity=uuid.UUID(int=5), proof=b"p" * 32)
    decoded, covered = Welcome.decode(w.encode())
    assert decoded == w
    assert covered == w.encode_unproven()
    bad = tlv.encode([(42, b"p" * 32)]) + w.encode_unproven()
    with pytest.raises(ProtocolError, match="last"):
        Welcome.decode(bad)


@pytest.mark.parametrize(
    ("ours", "theirs", "expect"),
    [
        (("crc32c", "xxh3"), ("xxh3", "crc32c"), "crc32c"),
        (("sha256",), ("crc32c", "sha256"), "sha256"),
        (("crc32c",), ("sha256",), None),
    ],
)
def test_algorithm_choice_table(
    ours: tuple[str, ...], theirs: tuple[str, ...], expect: str | None
) -> None:
    c = choose_algorithm("checksum", ours, theirs)
    assert c.value == expect
    if expect is None:
        assert c.refusal == Refusal.NO_COMMON_CHECKSUM
        assert "crc32c" in c.message and "sha256" in c.message


def test_version_choice() -> None:
    assert choose_version(1, 5).value == 1
    assert choose_version(2, 3).refusal == Refusal.VERSION


@pytest.mark.parametrize("package", ["proto", "nbd", "crypto"])
def test_sans_io_cores_import_no_io(package: str) -> None:
    """The protocol cores stay pure: no sockets, event loops, threads or clocks."""
    banned = {"asyncio", "socket", "selectors", "threading", "subprocess", "time", "uvloop"}
    for path in sorted((SRC / package).glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in banned, f"{path.name} imports {n}"
