"""Pure crypto building blocks: checksums, AEAD records, authentication, key files.

Nothing here does I/O on sockets, starts threads or reads a clock: the protocol
cores call these functions with bytes and get bytes back, so they stay testable
with virtual time.  Choosing where the work runs (inline or on a worker pool) is
the asyncio shell's business; see docs/crypto-measurements.md.
"""

from __future__ import annotations
