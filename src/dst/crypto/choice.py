"""Choosing the cipher and checksum lists a node offers or accepts, from its options and keys."""

from __future__ import annotations

from collections.abc import Mapping

from dst.crypto.aead import CIPHER_ORDER, CIPHERS
from dst.crypto.checksums import CHECKSUM_ORDER, CHECKSUMS
from dst.errors import UsageError


def _validate(kind: str, names: list[str], known: Mapping[str, object]) -> tuple[str, ...]:
    out: list[str] = []
    for item in names:
        for n in item.split(","):
            n = n.strip().lower()
            if not n:
                continue
            if n not in known:
                raise UsageError(f"unknown {kind} {n!r}; choose from {', '.join(known)}")
            if n not in out:
                out.append(n)
    return tuple(out)


def export_algorithms(
    ciphers: list[str] | None, checksums: list[str] | None, has_key: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The export node offers aes-256-gcm with a key (else none); crc32c without a cipher."""
    c = (
        _validate("cipher", ciphers, CIPHERS)
        if ciphers
        else (("aes-256-gcm",) if has_key else ("none",))
    )
    if not has_key and any(x != "none" for x in c):
        raise UsageError(
            "--cipher needs a key to derive session keys from: add --key-file or --keys"
        )
    if checksums:
        k = _validate("checksum", checksums, CHECKSUMS)
    else:
        k = ("none",) if c[0] != "none" else ("crc32c",)
    return c, k


def client_algorithms(
    ciphers: list[str] | None, checksums: list[str] | None, has_key: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The client accepts everything it supports unless told otherwise."""
    c = _validate("cipher", ciphers, CIPHERS) if ciphers else tuple(CIPHER_ORDER)
    if not has_key and ciphers and any(x != "none" for x in c):
        raise UsageError("--cipher needs a key to derive session keys from: add --key-file")
    k = _validate("checksum", checksums, CHECKSUMS) if checksums else tuple(CHECKSUM_ORDER)
    return c, k
