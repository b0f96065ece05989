"""A DST device as a Python file object, for code that wants files, not offsets.

``shutil.copyfileobj``, ``tarfile``, ``hashlib.file_digest`` and anything else that
reads, writes and seeks a binary file can then use a device directly:

    import shutil, dst
    from dst.fileio import open_file

    with dst.open_device("dst://node1/default") as dev, open_file(dev, "r+b") as f:
        with open("image.raw", "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
    # closing f flushed: the data is durable on the export nodes

The size is fixed, like a block device's: writing past the end fails with ENOSPC,
reads there return nothing, and ``truncate`` is not supported. ``flush()`` (and so
``close()``) is a FLUSH on the device when something was written since the last
one, so a closed file is durable, as after ``fsync`` on a real one.
"""

from __future__ import annotations

import errno
import io
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from dst.api import Device

DEFAULT_BUFFER = 1 << 20  # one round trip per MiB: a remote request costs far more than a copy
_MODES = {"rb": (True, False), "wb": (False, True), "r+b": (True, True), "w+b": (True, True)}


class DeviceFile(io.RawIOBase):
    """Unbuffered binary file over a synchronous :class:`dst.api.Device`.

    ``mode`` is ``"rb"``, ``"wb"``, ``"r+b"`` or ``"w+b"``; none of them truncates
    (the device's size is its size). ``closefd=True`` closes the device with the file.
    """

    def __init__(self, device: Device, mode: str = "rb", *, closefd: bool = False) -> None:
        super().__init__()
        mode = mode.replace("rw", "r+")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, not {mode!r}")
        self._readable, self._writable = _MODES[mode]
        if self._writable and device.read_only:
            raise OSError(errno.EROFS, "the device is read-only; open it with mode 'rb'")
        self.device = device
        self.mode = mode
        self.name = f"<dst device of {device.size} bytes>"
        self._size = device.size
        self._pos = 0
        self._dirty = False
        self._closefd = closefd

    @property
    def size(self) -> int:
        """The device's size in bytes (fixed)."""
        return self._size

    # ---- capabilities ---------------------------------------------------------------
    def readable(self) -> bool:
        self._checkClosed()
        return self._readable

    def writable(self) -> bool:
        self._checkClosed()
        return self._writable

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    # ---- position -------------------------------------------------------------------
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence ({whence}; use 0, 1 or 2)")
        if pos < 0:
            raise OSError(errno.EINVAL, f"negative seek position {pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    # ---- data -----------------------------------------------------------------------
    def readinto(self, buffer: WriteableBuffer) -> int:
        """Read straight into ``buffer`` (no intermediate copy); 0 at the end."""
        self._checkClosed()
        if not self._readable:
            raise io.UnsupportedOperation("the file is not open for reading")
        mv = memoryview(buffer).cast("B")
        n = max(0, min(len(mv), self._size - self._pos))
        if n == 0:
            return 0
        self.device.read_into(self._pos, mv[:n])
        self._pos += n
        return n

    def write(self, b: ReadableBuffer) -> int:
        """Write at the position; a write across the end is short, one at the end ENOSPC."""
        self._checkClosed()
        if not self._writable:
            raise io.UnsupportedOperation("the file is not open for writing")
        mv = memoryview(b).cast("B")
        if len(mv) == 0:
            return 0
        n = max(0, min(len(mv), self._size - self._pos))
        if n == 0:
            raise OSError(errno.ENOSPC, f"no space left: the device ends at byte {self._size}")
        self.device.write(self._pos, mv[:n])
        self._pos += n
        self._dirty = True
        return n

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("a DST device has a fixed size; it cannot be truncated")

    def flush(self) -> None:
        """FLUSH the device if anything was written since the last flush."""
        if self.closed:
            return
        if self._dirty:
            self.device.flush()
            self._dirty = False

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()  # flushes
        finally:
            if self._closefd:
                self.device.close()


def open_file(
    device: Device, mode: str = "rb", buffering: int = -1, *, closefd: bool = False
) -> io.RawIOBase | io.BufferedIOBase:
    """Open ``device`` like :func:`open` opens a file: buffered unless ``buffering=0``.

    Returns a BufferedReader (``rb``), BufferedWriter (``wb``) or BufferedRandom
    (``r+b``/``w+b``) with a 1 MiB buffer by default, or the raw :class:`DeviceFile`.
    """
    raw = DeviceFile(device, mode, closefd=closefd)
    if buffering == 0:
        return raw
    size = buffering if buffering > 1 else DEFAULT_BUFFER
    if raw.mode == "rb":
        return io.BufferedReader(raw, size)
    if raw.mode == "wb":
        return io.BufferedWriter(raw, size)
    return io.BufferedRandom(raw, size)
