"""Random bytes in any chunking into either core: events or a protocol error, never a crash."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dst.proto.client import ClientConfig, ClientCore
from dst.proto.events import HelloReceived
from dst.proto.handshake import Hello
from dst.proto.server import ExportTerms, ServerConfig, ServerCore
from dst.proto.wire import REQ_HEADER, Command, MsgType, RequestHeader, pack_handshake
from tests.pair import IDENTITY

chunks = st.lists(st.binary(min_size=0, max_size=300), max_size=30)


def drain_server(s: ServerCore) -> None:
    while (ev := s.next_event()) is not None:
        if isinstance(ev, HelloReceived):
            s.accept(ExportTerms(1 << 20, False, IDENTITY))
    s.data_to_send()


@settings(max_examples=300, deadline=None)
@given(chunks)
def test_server_core_survives_garbage_before_handshake(parts: list[bytes]) -> None:
    s = ServerCore(ServerConfig())
    s.connection_made(0.0)
    for p in parts:
        s.receive_data(p, 0.0)
        drain_server(s)


def _accepted_server(checksums: tuple[str, ...]) -> ServerCore:
    s = ServerCore(ServerConfig(checksums=checksums))
    s.connection_made(0.0)
    hello = Hello(
        export="default", client_id="c", session=b"s" * 16, generation=1, checksums=checksums
    )
    s.receive_data(pack_handshake(MsgType.HELLO, hello.encode()), 0.0)
    drain_server(s)
    return s


@settings(max_examples=300, deadline=None)
@given(chunks, st.sampled_from([("none",), ("crc32c",), ("sha256",)]))
def test_server_core_survives_garbage_after_handshake(
    parts: list[bytes], cs: tuple[str, ...]
) -> None:
    s = _accepted_server(cs)
    for p in parts:
        s.receive_data(p, 0.0)
        drain_server(s)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
)
def test_server_core_answers_any_header(
    command: int, flags: int, txn: int, length: int, offset: int
) -> None:
    """Well-framed but arbitrary requests: never an exception, never a huge allocation."""
    s = _accepted_server(("none",))
    s.receive_data(RequestHeader(command, flags, txn, 1, length, offset).pack(), 0.0)
    drain_server(s)
    assert s.pool.stats.allocated <= 1 or length <= 32 << 20


@settings(max_examples=300, deadline=None)
@given(chunks, st.booleans())
def test_client_core_survives_garbage(parts: list[bytes], ready: bool) -> None:
    c = ClientCore(ClientConfig(checksums=("crc32c",)))
    c.connection_made(0.0)
    c.data_to_send()
    now = 0.0
    if ready:
        s = _accepted_server(("crc32c",))
        del s
    c.submit(Command.READ, 0, 512, 0, now, into=memoryview(bytearray(512)))
    for p in parts:
        now += 0.1
        c.receive_data(p, now)
        c.handle_timer(now)
        while c.next_event() is not None:
            pass
        c.data_to_send()
    assert REQ_HEADER.size == 32


KEY = bytes(range(32))


@settings(max_examples=200, deadline=None)
@given(chunks)
def test_authenticating_server_survives_garbage(parts: list[bytes]) -> None:
    s = ServerCore(ServerConfig(key=KEY, ciphers=("aes-256-gcm",)))
    s.connection_made(0.0)
    for p in parts:
        s.receive_data(p, 0.0)
        drain_server(s)


@settings(max_examples=200, deadline=None)
@given(chunks, st.sampled_from(["aes-256-gcm", "chacha20-poly1305"]))
def test_sealed_channel_survives_garbage_records(parts: list[bytes], cipher: str) -> None:
    """After a real authenticated handshake, random bytes as records: only a protocol error."""
    c = ClientCore(ClientConfig(key=KEY, checksums=("none",)))
    s = ServerCore(ServerConfig(key=KEY, ciphers=(cipher,), checksums=("none",)))
    s.connection_made(0.0)
    c.connection_made(0.0)
    for _ in range(4):
        for out in c.data_to_send():
            s.receive_data(bytes(out), 0.0)
        while (ev := s.next_event()) is not None:
            if isinstance(ev, HelloReceived):
                s.accept(ExportTerms(1 << 20, False, IDENTITY))
        for out in s.data_to_send():
            c.receive_data(bytes(out), 0.0)
    assert c.connected and s.welcome is not None and s.welcome.cipher == cipher
    for p in parts:
        s.receive_data(p, 0.0)
        c.receive_data(p, 0.0)
        drain_server(s)
        while c.next_event() is not None:
            pass
