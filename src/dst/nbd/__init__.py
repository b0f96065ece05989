"""The NBD protocol, sans-IO: a server core that any shell (asyncio, tests) can drive.

See :mod:`dst.nbd.server` for the API. Nothing in this package does I/O, reads a
clock or starts a thread.
"""

from dst.nbd.constants import Command, NbdError, nbd_error
from dst.nbd.events import Disconnect, Event, ExportChosen, ProtocolViolation, Request
from dst.nbd.export import MAX_BLOCK, ExportInfo
from dst.nbd.server import NbdServerConnection

__all__ = [
    "MAX_BLOCK",
    "Command",
    "Disconnect",
    "Event",
    "ExportChosen",
    "ExportInfo",
    "NbdError",
    "NbdServerConnection",
    "ProtocolViolation",
    "Request",
    "nbd_error",
]
