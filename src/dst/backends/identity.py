"""Persistent identities of backing stores.

A client node refuses a member whose identity changed under the same address,
and a mirror records each leg's identity, so a blank or foreign file never
rejoins as "in sync". The identity therefore lives with the store and survives
export-node restarts:

- a file keeps it in the extended attribute ``user.dst.identity``, or, where the
  filesystem has no user xattrs, in a sidecar file ``PATH.dst-identity``;
- a disk keeps it in a state directory (``$DST_STATE_DIR`` or
  ``/var/lib/dst/identity``), keyed by the device path as given;
- a store that can keep it nowhere (read-only medium) gets one derived from its
  device and inode numbers, stable as long as the file is.
"""

from __future__ import annotations

import errno
import os
import urllib.parse
import uuid
from pathlib import Path

from dst.errors import StorageError

XATTR = "user.dst.identity"
SIDECAR_SUFFIX = ".dst-identity"
STATE_DIR_ENV = "DST_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/dst/identity"

_NAMESPACE = uuid.UUID("6d1b7f0e-5a43-4c1e-9a8e-4f2d1e0c7b51")
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS, *_NO_XATTR}


def _parse(raw: bytes | str, where: str, fix: str) -> uuid.UUID:
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise StorageError(
            f"the identity kept in {where} is not a UUID ({text.strip()[:40]!r}); {fix} "
            "to get a new one (clients will then see a different store)"
        ) from None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None


def _create_text(path: Path, value: uuid.UUID) -> bool:
    """Write ``value`` to ``path`` unless it exists; atomic, so readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{value}\n", encoding="ascii")
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _derived(st: os.stat_result) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{st.st_dev}:{st.st_ino}")


def _from_sidecar(path: str, st: os.stat_result, spec: str) -> tuple[uuid.UUID, str]:
    side = Path(path + SIDECAR_SUFFIX)
    fix = f"remove {side}"
    for _ in range(2):
        text = _read_text(side)
        if text is not None:
            return _parse(text, str(side), fix), "sidecar"
        try:
            new = uuid.uuid4()
            if _create_text(side, new):
                return new, "sidecar"
        except OSError as e:
            if e.errno in _CANNOT_WRITE:
                return _derived(st), "derived"
            raise StorageError(
                f"cannot keep the identity of {spec} in {side}: {e.strerror}; "
                "make its directory writable"
            ) from None
    raise StorageError(f"the identity file {side} of {spec} keeps changing; try again")


def file_identity(fd: int, path: str, spec: str) -> tuple[uuid.UUID, str]:
    """The identity of an open regular file and where it is kept (xattr/sidecar/derived)."""
    st = os.fstat(fd)
    fix = f"remove it with `setfattr -x {XATTR} {path}`"
    try:
        return _parse(os.getxattr(fd, XATTR), f"the xattr {XATTR} of {path}", fix), "xattr"
    except OSError as e:
        if e.errno in _NO_XATTR:
            return _from_sidecar(path, st, spec)
        if e.errno != errno.ENODATA:
            raise
    side = Path(path + SIDECAR_SUFFIX)
    if side.exists():
        # kept next to the file earlier (say, before it moved to a filesystem with xattrs)
        return _from_sidecar(path, st, spec)
    new = uuid.uuid4()
    try:
        os.setxattr(fd, XATTR, str(new).encode(), os.XATTR_CREATE)
        return new, "xattr"
    except OSError as e:
        if e.errno == errno.EEXIST:  # another opener won the race: use theirs
            return _parse(os.getxattr(fd, XATTR), f"the xattr {XATTR} of {path}", fix), "xattr"
        if e.errno not in _CANNOT_WRITE:
            raise
    return _from_sidecar(path, st, spec)


def state_dir() -> Path:
    """Where disk identities live; ``$DST_STATE_DIR`` overrides the default."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def disk_identity(path: str, spec: str) -> tuple[uuid.UUID, str]:
    """The identity of a block device, kept in the state directory by its path.

    Give stable paths (``/dev/disk/by-id/...``): ``/dev/sdb`` may name another
    disk after a reboot, and then it would carry this one's identity.
    """
    base = state_dir()
    key = urllib.parse.quote(os.path.abspath(path), safe="")
    where = base / key
    hint = f"set {STATE_DIR_ENV} to a writable directory"
    try:
        for _ in range(2):
            text = _read_text(where)
            if text is not None:
                return _parse(text, str(where), f"remove {where}"), "state"
            base.mkdir(parents=True, exist_ok=True)
            new = uuid.uuid4()
            if _create_text(where, new):
                return new, "state"
    except OSError as e:
        raise StorageError(
            f"cannot keep the identity of {spec} in {base}: {e.strerror}; {hint}"
        ) from None
    raise StorageError(f"the identity file {where} of {spec} keeps changing; try again")
