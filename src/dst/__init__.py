"""DST: distributed network block storage.

Export nodes serve storage over the DST node protocol; a client node assembles
them into one block device and serves it over NBD, FUSE or this Python API.
"""

from dst.api import AsyncDevice, Device, open_device, open_device_async
from dst.device import BlockDevice, Capabilities, IoFlags
from dst.errors import DstError

__all__ = [
    "AsyncDevice",
    "BlockDevice",
    "Capabilities",
    "Device",
    "DstError",
    "IoFlags",
    "open_device",
    "open_device_async",
]
__version__ = "0.1.0"
