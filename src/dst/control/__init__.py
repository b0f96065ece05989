"""The control socket: `dst status` and `dst ctl` talk to a running node through it.

One JSON object per line in each direction over a unix socket (mode 0600), so
the protocol can be driven by ``socat`` or a few lines of any language; see
docs/operations.md for the messages.
"""

from __future__ import annotations

from dst.control.client import ControlClient, request
from dst.control.server import ControlServer, Handler, RequestError

__all__ = ["ControlClient", "ControlServer", "Handler", "RequestError", "request"]
