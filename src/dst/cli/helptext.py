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
from dst.units import format_size


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
        out["bitmap"] = (
            "default: none: a mirror's bitmap in memory only (a restart resyncs fully), "
            "no checkpoints"
        )
        out["resync-rate"] = "default: unlimited"
    return out


def _defaults(role: str) -> dict[str, object]:
    """Option name -> default, from the configuration dataclasses (the one source)."""
    from dst.config import AttachConfig, ExportConfig, MemberOptions

    classes: tuple[type, ...] = (
        (ExportConfig,) if role == "export" else (AttachConfig, MemberOptions)
    )
    out: dict[str, object] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name.replace("_", "-")] = f.default
    if role == "export":
        out["listen"] = "0.0.0.0:10810"
    return out


def _shown(o: Opt, defaults: dict[str, object]) -> str | None:
    value = defaults.get(o.name)
    if value is None or o.kind in ("bool", "debug", "list"):
        return None
    if isinstance(value, float):
        return f"default: {value:g}"
    if o.kind == "size" and isinstance(value, int):
        return f"default: {format_size(value).replace(' ', '').replace('iB', '')}"
    return f"default: {value}"


def documented(opts: Sequence[Opt], role: str) -> list[Opt]:
    """``opts`` with their defaults (and the valid names of a list of algorithms) in the help."""
    extra = _extra(role)
    defaults = _defaults(role)
    out = []
    for o in opts:
        note = extra.get(o.name) or _shown(o, defaults)
        if note and "default" not in o.help:
            if o.help.endswith(")"):  # "... (e.g. 100M)" -> "... (e.g. 100M; default: ...)"
                text = f"{o.help[:-1]}; {note})"
            else:
                text = f"{o.help} ({note})" if o.help else note
            o = dataclasses.replace(o, help=text)
        out.append(o)
    return out
