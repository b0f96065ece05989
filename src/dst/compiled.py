"""The modules built as C extensions by mypyc (see setup.py), and what this process runs.

They are the request path: every 4 KiB request passes through each of them, and under the
interpreter their Python was most of the CPU a request cost (docs/benchmarks.md). The list
lives here, importing only the standard library, so that setup.py reads it without
importing the package, and ``dst --version`` and the test suite can say whether the
compiled form is what runs.

What mypyc (2.4) compiles differently from the interpreter, so what these modules avoid
(tests/unit/test_compiled_rules.py checks the first two in the source):

- a bare ``raise`` in an ``except`` block after an ``await`` in it: once the await was
  cancelled, the re-raise corrupts memory; name the exception (``except E as exc: ...
  raise exc``);
- an ``await`` in a ``finally`` block (mypyc loses the exception being raised);
- class attributes an interpreted subclass sets in its class body: a compiled class keeps
  its own default in a slot, so declare them ``ClassVar``;
- narrowing an attribute's type in a subclass, and walking ``__dict__`` (there is none);
- a class subclassed outside these modules carries
  ``mypyc_attr(allow_interpreted_subclasses=True)``.
"""

from __future__ import annotations

import importlib
import os
from importlib.machinery import EXTENSION_SUFFIXES

MODULES: tuple[str, ...] = (
    "dst.buffers",
    "dst.aio.driver",
    "dst.aio.stream",
    "dst.aio.timer",
    "dst.crypto.checksums",
    "dst.proto.reader",
    "dst.proto.channel",
    "dst.proto.jobs",
    "dst.proto.wire",
    "dst.proto.client",
    "dst.proto.server",
    "dst.nbd.wire",
    "dst.nbd.server",
    "dst.frontends.nbd",
    "dst.client.latency",
    "dst.server.node",
    "dst.server.sessions",
    "dst.device",
    "dst.client.link",
    "dst.client.remote",
    "dst.backends.device",
)


def _extension(module: str) -> str | None:
    """The C extension ``module`` was imported from, or None (imported from source)."""
    path = getattr(importlib.import_module(module), "__file__", None) or ""
    return path if any(path.endswith(s) for s in EXTENSION_SUFFIXES) else None


def is_compiled(module: str) -> bool:
    """Whether ``module`` was imported from a C extension."""
    return _extension(module) is not None


def summary() -> str:
    """One phrase for ``--version``: compiled, pure Python, or partly."""
    n = sum(is_compiled(m) for m in MODULES)
    if n == len(MODULES):
        return "request path compiled with mypyc"
    if n == 0:
        return "pure Python"
    return f"{n} of {len(MODULES)} request-path modules compiled"


def stale() -> list[str]:
    """Compiled modules whose source is newer than the extension (an editable install
    whose source was edited after the build): the extension, not the edit, would run;
    and extensions of modules no longer compiled."""
    out = []
    for m in MODULES:
        so = _extension(m)
        if so is None:
            continue
        py = os.path.join(os.path.dirname(so), m.rsplit(".", 1)[1] + ".py")
        if os.path.exists(py) and os.path.getmtime(py) > os.path.getmtime(so):
            out.append(m)
    return out + _leftovers()


def _leftovers() -> list[str]:
    """Modules off the list that still have an extension beside their source (an editable
    install built from an earlier list): the extension would be imported, not the source."""
    top = os.path.dirname(os.path.abspath(__file__))
    out = []
    for d, _, files in os.walk(top):
        for f in files:
            suffix = next((s for s in EXTENSION_SUFFIXES if f.endswith(s)), None)
            if suffix is None:
                continue
            rel = os.path.relpath(os.path.join(d, f[: -len(suffix)]), os.path.dirname(top))
            module = rel.replace(os.sep, ".")
            if module not in MODULES and not module.endswith("__mypyc"):  # mypyc's runtime
                out.append(f"{module} (no longer on the list)")
    return out
