"""Where a node's control socket lives when ``--control`` is not given, and finding them.

Every node makes one, as every DRBD resource can be asked for its status: in
``/run/dst/`` when it runs as root, in ``$XDG_RUNTIME_DIR/dst/`` otherwise (or
``/tmp/dst-UID/`` when that variable is not set), or in ``$DST_RUNTIME_DIR`` when
that is set (a service manager's runtime directory, or a test's).  The socket is
named after the node, stably across restarts:

- an export node: ``export-PORT.sock`` for a TCP ``--listen``, ``export-NAME.sock``
  for ``unix:/.../NAME.sock``;
- a client node: ``attach-PORT.sock`` or ``attach-NAME.sock`` after its ``--nbd``
  address, else ``attach-DIR.sock`` after its ``--fuse`` directory.

Port 0 (a port picked at start) gives ``-pidPID`` instead of the port; a name that a
live node already uses gets ``-pidPID`` appended.  ``dst status`` without
``--control`` asks every socket there; sockets left by killed nodes are skipped.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path

from dst.errors import DstError
from dst.units import Address

ENV = "DST_RUNTIME_DIR"
SUFFIX = ".sock"


def runtime_dir() -> Path:
    """The directory of default control sockets (not created here)."""
    given = os.environ.get(ENV)
    if given:
        return Path(given)
    if os.geteuid() == 0:
        return Path("/run/dst")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "dst"
    return Path(f"/tmp/dst-{os.geteuid()}")


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name[:64] or "node"


def node_name(role: str, front: Address | str | None) -> str:
    """``export-10810``, ``attach-vm1``...: the node's name after its address (see above)."""
    if isinstance(front, Address):
        if front.path is not None:
            base = Path(front.path).name
            tail = base[: -len(SUFFIX)] if base.endswith(SUFFIX) else base
        elif front.port:
            tail = str(front.port)
        else:
            tail = f"pid{os.getpid()}"
    elif front:
        tail = Path(str(front).rstrip("/")).name
    else:
        tail = f"pid{os.getpid()}"
    return f"{role}-{_safe_name(tail)}"


def answers(path: str | Path, timeout: float = 1.0) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _make_dir(d: Path) -> None:
    """Create the directory (mode 0700) or check that it is ours and private."""
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.lstat()
    except OSError as exc:
        raise DstError(
            f"cannot create the runtime directory {d} for the control socket: {exc.strerror}; "
            f"give --control SOCK elsewhere, or set {ENV}"
        ) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise DstError(
            f"the runtime directory {d} for the control socket is not a directory of this "
            f"user; give --control SOCK elsewhere, or set {ENV}"
        )


def control_socket(given: str | None, role: str, front: Address | str | None) -> str:
    """The control socket path of a node: ``--control`` when given, else its default one
    in :func:`runtime_dir` (the directory is created)."""
    if given:
        return given
    d = runtime_dir()
    _make_dir(d)
    name = node_name(role, front)
    path = d / f"{name}{SUFFIX}"
    if path.exists() and answers(path):
        path = d / f"{name}-pid{os.getpid()}{SUFFIX}"
    return str(path)


def node_sockets() -> list[Path]:
    """Every socket in :func:`runtime_dir` (live or stale), sorted by name."""
    d = runtime_dir()
    try:
        entries = sorted(d.iterdir())
    except OSError:
        return []
    out = []
    for p in entries:
        try:
            if p.name.endswith(SUFFIX) and stat.S_ISSOCK(p.lstat().st_mode):
                out.append(p)
        except OSError:
            continue
    return out


def name_of(path: str | Path) -> str:
    """A node's name from its socket path (``/run/dst/export-10810.sock`` -> ``export-10810``)."""
    base = Path(path).name
    return base[: -len(SUFFIX)] if base.endswith(SUFFIX) else base
