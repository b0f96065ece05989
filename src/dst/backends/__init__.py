"""Storage backends: small synchronous plugins behind one asynchronous device.

``open_backend("file:/srv/a.img")`` opens a plugin; ``BackendDevice(backend)``
serves it as a :class:`dst.device.BlockDevice`. ``open_device`` does both.
"""

from __future__ import annotations

import concurrent.futures

from dst.backends.base import Backend, open_backend
from dst.backends.device import BackendDevice, shared_executor


def open_device(
    spec: str,
    *,
    size: int | None = None,
    read_only: bool = False,
    executor: concurrent.futures.Executor | None = None,
    name: str | None = None,
) -> BackendDevice:
    """Open a backend spec straight into a block device."""
    return BackendDevice(
        open_backend(spec, size=size, read_only=read_only), executor=executor, name=name
    )


__all__ = ["Backend", "BackendDevice", "open_backend", "open_device", "shared_executor"]
