"""Debug tracing: structured JSON lines, one per event, per category.

Off by default and cheap when off: callers test ``trace.on.txn`` (a plain
attribute) before building anything.  ``--debug`` turns on every category,
``--debug=txn,proto`` some of them.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

CATEGORIES = ("proto", "txn", "crypto", "nbd", "mirror", "fuse", "control")


class _On:
    """One boolean attribute per category."""

    proto = False
    txn = False
    crypto = False
    nbd = False
    mirror = False
    fuse = False
    control = False


on = _On()
_out: TextIO = sys.stderr


def parse_categories(spec: str | bool | None) -> set[str]:
    """``True``/``""`` -> all; ``"txn,proto"`` -> those; raises ValueError naming a bad one."""
    if spec is None or spec is False:
        return set()
    if spec is True or spec == "" or spec == "all":
        return set(CATEGORIES)
    cats = {c.strip() for c in str(spec).split(",") if c.strip()}
    bad = cats - set(CATEGORIES) - {"all"}
    if bad:
        raise ValueError(
            f"unknown debug categor{'y' if len(bad) == 1 else 'ies'} {', '.join(sorted(bad))}; "
            f"choose from {', '.join(CATEGORIES)}"
        )
    return set(CATEGORIES) if "all" in cats else cats


def enable(categories: set[str], out: TextIO | None = None) -> None:
    global _out
    for c in CATEGORIES:
        setattr(on, c, c in categories)
    if out is not None:
        _out = out


def emit(category: str, event: str, **fields: Any) -> None:
    """Write one JSON line; call only when ``getattr(on, category)`` is true."""
    rec = {"ts": round(time.time(), 6), "cat": category, "event": event}
    rec.update(fields)
    _out.write(json.dumps(rec, default=str) + "\n")
    _out.flush()
