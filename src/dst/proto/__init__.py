"""The DST node protocol as pure state machines (sans-IO).

Bytes and the current time go in; bytes to send, events and the next timer
deadline come out.  No sockets, no asyncio, no threads and no clocks in here, so
resend, ping and fencing logic can be tested deterministically with virtual time.
The byte layouts are documented in docs/protocol.md.
"""
