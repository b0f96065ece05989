"""One error hierarchy. Every message says what was wrong and what to do."""

from __future__ import annotations

import errno


class DstError(Exception):
    """Base of every error DST raises on purpose.

    ``exit_code`` follows the command-line contract: 2 for a wrong command line or
    config file (found without touching a peer or storage), 1 for run-time failures.
    """

    exit_code = 1


class UsageError(DstError):
    """The command line or a config file is wrong."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file is wrong."""


class ProtocolError(DstError):
    """A peer sent bytes that break the protocol; the connection must be closed."""


class HandshakeRefused(DstError):
    """The peer refused the handshake with a reason code and a message."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class IoError(DstError, OSError):
    """A block I/O request failed with an errno-style status."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)
        self.errno = err

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno or 0, str(self.errno))
        return f"{self.strerror} ({name})"


class StorageError(DstError):
    """A backend could not be opened or used as asked."""
