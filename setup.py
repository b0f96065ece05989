"""Build script: the request path's modules become C extensions, compiled by mypyc.

Everything else is in pyproject.toml. The modules named in ``src/dst/compiled.py`` carry
every request (the wire cores, the receive buffer, the driver and socket adapter, the NBD
front end, the export node's connection): compiled from the same type-checked source,
small I/O costs a fraction of the CPU it costs under the interpreter (docs/benchmarks.md).
The source stays the truth and runs as it is where it is not compiled: with
``DST_PURE_PYTHON=1``, or where there is no C compiler or no Python headers (a warning
says so, and ``dst --version`` tells which runs).
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# the one list, also read at run time; read without importing the package
MODULES = runpy.run_path(os.path.join(HERE, "src", "dst", "compiled.py"))["MODULES"]


def why_not_compiled() -> str | None:
    """Why the modules stay pure Python, or None to compile them."""
    if os.environ.get("DST_PURE_PYTHON"):
        return "DST_PURE_PYTHON is set"
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(cc.split()[0]) is None and shutil.which("gcc") is None:
        return "no C compiler (install gcc)"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "no Python headers (install python3-dev)"
    return None


ext_modules = []
reason = why_not_compiled()
if reason is None:
    from mypyc.build import mypycify

    ext_modules = mypycify(
        # the build environment holds no runtime dependency: their types count as Any
        ["--ignore-missing-imports", "--no-warn-return-any"]
        + [os.path.join("src", *m.split(".")) + ".py" for m in MODULES],
        opt_level="3",
    )
else:
    print(f"dst: installing the request path as pure Python (slower): {reason}", file=sys.stderr)

setup(ext_modules=ext_modules)
