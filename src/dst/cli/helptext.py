"""What `--help` says about defaults and valid names, added to the option tables' help.

The tables in :mod:`dst.cli.options` hold each option's default where one value
applies; some defaults depend on other options or on the role (the cipher an export
node offers depends on whether it has a key), and those are spelled out here, next to
the names that ``--cipher`` and ``--checksum`` accept, so every `--help` shows them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dst.cli.options import Opt
from dst.control.runtime import runtime_dir
from dst.crypto.aead import CIPHER_ORDER
from dst.crypto.checksums import CHECKSUM_ORDER


def _names(names: Sequence[str]) -> str:
    return ", ".join(names)


def _extra(role: str) -> dict[str, str]:
    """Defaults that no single value in the table expresses, per role."""
    ciphers, checksums = _names(CIPHER_ORDER), _names(CHECKSUM_ORDER)
    node = (
        "export-PORT.sock, PORT or NAME after --listen"
        if role == "export"
        else "attach-NAME.sock, NAME after --nbd or --fuse"
    )
    out = {
        "crypto-workers": "default: one per CPU",
        "control": f"default: {runtime_dir()}/{node}",
        "metrics": "default: off",
        "key-file": "default: none, so no authentication and cipher none",
        "config": "default: none",
        "debug": "default: off",
    }
    if role == "export":
        out["cipher"] = (
            f"one of {ciphers}; default: aes-256-gcm with --key-file or --keys, else none"
        )
        out["checksum"] = f"one of {checksums}; default: crc32c without a cipher, none with one"
        out["keys"] = "default: none"
        out["size"] = "default: none; an existing file keeps its size"
        out["allow"] = "default: every client id"
    else:
        out["cipher"] = f"one of {ciphers}; default: all of them, in that order"
        out["checksum"] = f"one of {checksums}; default: all of them, in that order"
        out["bitmap"] = "default: in memory only, so a restart resyncs fully"
        out["resync-rate"] = "default: unlimited"
    return out


def _shown(o: Opt) -> str | None:
    if o.default is None or o.kind in ("bool", "debug", "list"):
        return None
    if isinstance(o.default, float):
        return f"default: {o.default:g}"
    return f"default: {o.default}"


def documented(opts: Sequence[Opt], role: str) -> list[Opt]:
    """``opts`` with their defaults (and the valid names of a list of algorithms) in the help."""
    extra = _extra(role)
    out = []
    for o in opts:
        note = extra.get(o.name) or _shown(o)
        if note and "default" not in o.help:
            if o.help.endswith(")"):  # "... (e.g. 100M)" -> "... (e.g. 100M; default: ...)"
                text = f"{o.help[:-1]}; {note})"
            else:
                text = f"{o.help} ({note})" if o.help else note
            o = dataclasses.replace(o, help=text)
        out.append(o)
    return out
