"""Key files: ``dst keygen`` writes them, ``--key-file`` and ``--keys`` read them.

A key file holds 64 hexadecimal characters (256 bits) and an optional trailing
newline.  A keys file holds one ``CLIENT_ID HEXKEY`` line per client, with
blank lines and ``#`` comment lines allowed.  Like ssh with private keys, both
are refused when group or others may access them: a key anyone on the host can
read authenticates nobody.  Every problem reading one is a UsageError (exit code 2)
that names the file, says what is wrong and how to fix it; a key file that cannot be
written is a DstError (exit code 1).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import Final

from dst.errors import DstError, UsageError

KEY_BYTES: Final = 32
KEY_HEX_CHARS: Final = 2 * KEY_BYTES
#: Far larger than any sane file of either kind; bigger ones are refused unread.
_MAX_FILE_BYTES: Final = 1 << 20
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_USER_ERRORS: Final = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_new(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: str, data: bytes) -> None:
    """Write a complete temporary file next to ``path``, then rename it over ``path``."""
    if os.path.isdir(path):
        raise IsADirectoryError(21, "Is a directory", path)
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def generate_key_file(path: str, force: bool = False) -> None:
    """Write a new random 256-bit key to ``path`` with mode 0600.

    Without ``force`` the file is created with O_EXCL, so an existing key (or a
    symlink planted in its place) is never overwritten.  With ``force`` the new
    key is written to a temporary file and renamed over the old one, so a crash
    leaves either the old key or the new one, never half of one.
    """
    data = (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode()
    try:
        if force:
            _replace(path, data)
        else:
            _write_new(path, data)
    except FileExistsError:
        if os.path.isdir(path):
            raise DstError(
                f"cannot write key file {path}: Is a directory; give a file path"
            ) from None
        raise UsageError(f"key file {path} exists; use --force to overwrite it") from None
    except OSError as e:  # found by trying to write: a run-time fact (exit 1)
        hint = (
            "; choose a path in an existing directory that you may write to"
            if isinstance(e, _USER_ERRORS)
            else ""
        )
        raise DstError(f"cannot write key file {path}: {e.strerror}{hint}") from None


def _read_private(path: str, what: str, create_hint: str) -> bytes:
    """The contents of a secret file, after the existence, type and permission checks."""
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the command.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist; {create_hint}") from None
    except PermissionError:
        raise UsageError(
            f"{what} {path} cannot be read: permission denied; run dst as the user "
            "that owns it, or `chown` it to the user that runs dst"
        ) from None
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {path} is not a regular file; give the path of a file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            how = "readable" if mode & 0o044 else "writable" if mode & 0o022 else "accessible"
            raise UsageError(
                f"{what} {path} is {how} by group or others (mode {mode:04o}); "
                f"run `chmod 600 {path}`"
            )
        if st.st_size > _MAX_FILE_BYTES:
            raise UsageError(
                f"{what} {path} is malformed: it is {st.st_size} bytes, far too large; "
                "give the right file"
            )
        return os.read(fd, _MAX_FILE_BYTES)
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)


def _parse_hex_key(text: str) -> bytes | str:
    """The key, or a description of what is wrong with ``text``."""
    if len(text) != KEY_HEX_CHARS:
        return f"it has {len(text)} characters"
    bad = next((c for c in text if c not in _HEX_DIGITS), None)
    if bad is not None:
        return f"it contains {bad!r}, which is not a hex digit"
    return bytes.fromhex(text)


def load_key_file(path: str) -> bytes:
    """The 32-byte key in ``path``; UsageError says which problem and how to fix it."""
    raw = _read_private(path, "key file", f"create one with `dst keygen {path}`")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if text.endswith("\n"):
        text = text[:-1]
    key = _parse_hex_key(text)
    if isinstance(key, str):
        raise UsageError(
            f"key file {path} is malformed: it must hold {KEY_HEX_CHARS} hex characters "
            f"(a trailing newline is allowed) but {key}; "
            f"create a new key with `dst keygen --force {path}`"
        )
    return key


def load_keys_file(path: str) -> dict[str, bytes]:
    """``{client_id: key}`` from lines ``CLIENT_ID HEXKEY``; errors name the line number."""
    raw = _read_private(path, "keys file", "create it with one `CLIENT_ID HEXKEY` line per client")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = raw[: e.start].count(b"\n") + 1
        raise UsageError(f"keys file {path} line {bad_line}: is not valid UTF-8 text") from None
    keys: dict[str, bytes] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"keys file {path} line {number}"
        if len(fields) != 2:
            raise UsageError(
                f"{where}: expected `CLIENT_ID HEXKEY` (two fields), found {len(fields)}"
            )
        client_id, hex_key = fields
        key = _parse_hex_key(hex_key)
        if isinstance(key, str):
            raise UsageError(
                f"{where}: the key for {client_id!r} must be {KEY_HEX_CHARS} hex characters "
                f"but {key}; make one with `dst keygen FILE`"
            )
        if client_id in keys:
            raise UsageError(
                f"{where}: client id {client_id!r} already has a key on line "
                f"{first_line[client_id]}; give each client id one line"
            )
        keys[client_id] = key
        first_line[client_id] = number
    if not keys:
        raise UsageError(
            f"keys file {path} holds no keys; add one `CLIENT_ID HEXKEY` line per client"
        )
    return keys
