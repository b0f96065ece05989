"""The option phase of the sans-IO NBD client: greeting, structured replies, metadata
contexts, NBD_OPT_GO (NBD_OPT_EXPORT_NAME when GO is unsupported).

:class:`Handshake` is the base of :class:`dst.nbd.client.NbdClientCore`; it holds the
handshake's state and answers, and leaves reading (``_expect``), the transmission
phase (``_expect_header``, ``_send_pending``) and violations to the core. After
structured replies it asks for the configured metadata contexts
(``base:allocation``); a server that refuses or lacks them still connects, and
then no BLOCK_STATUS is sent on that connection.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

from dst.nbd import wire
from dst.nbd.client_events import Connected, ExportRefused, NbdClientConfig, ServerExport
from dst.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlags,
    HandshakeFlags,
    Info,
    Option,
    OptionReply,
    TransmissionFlags,
)
from dst.nbd.events import Event

OLDSTYLE_MAGIC = 0x00420281861253
MAX_OPTION_REPLY = 32 << 10  # option reply data beyond this is a protocol violation
_REP_ERROR = 1 << 31


class Handshake:
    """The client's option haggling, one option at a time."""

    config: NbdClientConfig
    export: ServerExport | None
    generation: int
    ready: bool
    _events: deque[Event]
    _out: list[bytes | memoryview]
    _hs_deadline: float | None
    _dead: bool
    _option: int
    _info: dict[int, tuple[int, ...]]
    _structured: bool
    _no_zeroes: bool
    _meta: dict[int, str]  # metadata contexts of this connection, by id

    # provided by the core
    def _expect(self, n: int, handler: Callable[[memoryview], None]) -> None:
        raise NotImplementedError

    def _violation(self, message: str) -> None:
        raise NotImplementedError

    def _expect_header(self) -> None:
        raise NotImplementedError

    def _send_pending(self) -> None:
        raise NotImplementedError

    def _send_option(self, option: Option, data: bytes = b"") -> None:
        self._option = option
        self._out.append(wire.OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data)
        if option == Option.EXPORT_NAME:
            size = wire.EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
            self._expect(size, self._on_export_name_reply)
        else:
            self._expect(wire.OPTION_REPLY.size, self._on_option_reply)

    def _send_go(self) -> None:
        name = self.config.export.encode("utf-8")
        data = wire.U32.pack(len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE)
        self._send_option(Option.GO, data)

    def _on_greeting(self, v: memoryview) -> None:
        magic, second, hflags = wire.GREETING.unpack(v)
        if magic != NBDMAGIC:
            return self._violation(f"bad greeting magic 0x{magic:016x}: is this an NBD server?")
        if second == OLDSTYLE_MAGIC:
            return self._refuse("the server uses the oldstyle handshake; run it in newstyle mode")
        if second != IHAVEOPT:
            return self._violation(f"bad greeting 0x{second:016x} (expected IHAVEOPT)")
        fixed = bool(hflags & HandshakeFlags.FIXED_NEWSTYLE)
        self._no_zeroes = bool(hflags & HandshakeFlags.NO_ZEROES)
        cflags = (ClientFlags.FIXED_NEWSTYLE if fixed else 0) | (
            ClientFlags.NO_ZEROES if self._no_zeroes else 0
        )
        self._out.append(wire.CLIENT_FLAGS.pack(cflags))
        if not fixed:
            self._send_option(Option.EXPORT_NAME, self.config.export.encode("utf-8"))
        elif self.config.structured:
            self._send_option(Option.STRUCTURED_REPLY)
        else:
            self._send_go()

    def _send_set_meta(self) -> None:
        """Ask for the configured contexts (after structured replies, before NBD_OPT_GO)."""
        name = self.config.export.encode("utf-8")
        queries = [q.encode("utf-8") for q in self.config.contexts]
        data = wire.U32.pack(len(name)) + name + wire.U32.pack(len(queries))
        data += b"".join(wire.U32.pack(len(q)) + q for q in queries)
        self._send_option(Option.SET_META_CONTEXT, data)

    def _on_meta_context(self, rtype: int, data: bytes) -> None:
        """A reply to NBD_OPT_SET_META_CONTEXT: one context, or the end of the list."""
        if rtype == OptionReply.ACK and not data:
            return self._send_go()
        if rtype != OptionReply.META_CONTEXT or len(data) < 5:
            return self._violation(f"reply type {rtype:#x} of {len(data)} bytes to a context")
        (ident,) = wire.U32.unpack_from(data)
        try:
            name = data[4:].decode("utf-8")
        except UnicodeDecodeError:
            return self._violation("a metadata context name that is not UTF-8")
        if name not in self.config.contexts or ident in self._meta:
            return self._violation(f"context {name!r} (id {ident}) was not asked for, or twice")
        self._meta[ident] = name
        self._expect(wire.OPTION_REPLY.size, self._on_option_reply)

    def _on_option_reply(self, v: memoryview) -> None:
        magic, option, rtype, length = wire.OPTION_REPLY.unpack(v)
        if magic != OPTION_REPLY_MAGIC:
            return self._violation(f"bad option reply magic 0x{magic:016x}")
        if option != self._option:
            return self._violation(f"a reply to option {option}, but {self._option} was sent")
        if length > MAX_OPTION_REPLY:
            return self._violation(f"option reply of {length} bytes (limit {MAX_OPTION_REPLY})")
        self._expect(length, lambda data: self._on_option_data(rtype, bytes(data)))

    def _on_option_data(self, rtype: int, data: bytes) -> None:
        option = self._option
        if rtype & _REP_ERROR:
            text = data.decode("utf-8", "replace")
            if option in (Option.STRUCTURED_REPLY, Option.SET_META_CONTEXT):
                self._meta = {}  # a failed SET selects nothing
                return self._send_go()  # carry on without (simple replies, or no contexts)
            if option == Option.GO and rtype == OptionReply.ERR_UNSUP:
                return self._send_option(Option.EXPORT_NAME, self.config.export.encode("utf-8"))
            return self._refuse_go(rtype, text)
        if option == Option.SET_META_CONTEXT:
            return self._on_meta_context(rtype, data)
        if rtype == OptionReply.ACK and not data and option == Option.STRUCTURED_REPLY:
            self._structured = True
            return self._send_set_meta() if self.config.contexts else self._send_go()
        if option != Option.GO or rtype not in (OptionReply.ACK, OptionReply.INFO):
            return self._violation(f"unexpected reply type {rtype:#x} to option {option}")
        if rtype == OptionReply.INFO:
            self._expect(wire.OPTION_REPLY.size, self._on_option_reply)
            return self._on_info(data)
        if data or Info.EXPORT not in self._info:
            return self._violation("NBD_OPT_GO ended without NBD_INFO_EXPORT")
        size, flags = self._info[Info.EXPORT]
        blocks = self._info.get(Info.BLOCK_SIZE, (1, 4096, 32 << 20))
        self._connected(size, flags, *blocks)

    def _on_info(self, data: bytes) -> None:
        kind = wire.U16.unpack_from(data)[0] if len(data) >= 2 else -1
        if kind == Info.EXPORT:
            if len(data) != wire.INFO_EXPORT.size:
                return self._violation(f"NBD_INFO_EXPORT of {len(data)} bytes")
            self._info[kind] = wire.INFO_EXPORT.unpack(data)[1:]
        elif kind == Info.BLOCK_SIZE:
            if len(data) != wire.INFO_BLOCK_SIZE.size:
                return self._violation(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
            lo, pref, hi = wire.INFO_BLOCK_SIZE.unpack(data)[1:]
            if not _pow2(lo) or lo > 1 << 16 or not _pow2(pref) or (hi % lo and hi != 0xFFFFFFFF):
                return self._violation(f"block sizes min {lo}, preferred {pref}, max {hi}")
            self._info[kind] = (lo, pref, hi)
        elif kind < 0:
            self._violation("an NBD_REP_INFO shorter than 2 bytes")

    def _on_export_name_reply(self, v: memoryview) -> None:
        size, flags = wire.EXPORT_NAME_REPLY.unpack_from(v)
        self._connected(size, flags, 1, 4096, 32 << 20)

    def _refuse(self, message: str, permanent: bool = True) -> None:
        if not self._dead:
            self._dead = True
            self._hs_deadline = None
            self._events.append(ExportRefused(message, permanent))

    def _refuse_go(self, rtype: int, text: str) -> None:
        name = self.config.export
        reasons: dict[int, str] = {
            OptionReply.ERR_UNKNOWN: f"the server has no export {name!r}",
            OptionReply.ERR_POLICY: f"the server's policy refuses export {name!r}",
            OptionReply.ERR_TLS_REQD: "the server requires TLS, which dst does not speak",
            OptionReply.ERR_SHUTDOWN: "the server is shutting down",
        }
        why = reasons.get(rtype, f"the server refused export {name!r} (reply {rtype:#x})")
        self._out.append(wire.OPTION_HEADER.pack(IHAVEOPT, Option.ABORT, 0))
        self._refuse(f"{why}: {text}" if text else why, rtype != OptionReply.ERR_SHUTDOWN)

    def _connected(self, size: int, flags: int, lo: int, pref: int, hi: int) -> None:
        if not flags & TransmissionFlags.HAS_FLAGS:
            flags = 0
        if size >= 1 << 63:
            return self._violation(f"export size {size} is out of range")
        contexts = tuple((name, ident) for ident, name in self._meta.items())
        export = ServerExport(
            size, TransmissionFlags(flags), self._structured, lo, pref, hi, contexts
        )
        first = self.export
        if first is not None and first.size != size:
            return self._refuse(
                f"the export's size changed from {first.size} to {size} bytes: a different "
                "export answers at this address now"
            )
        self.export = export
        self.ready, self._hs_deadline = True, None
        self._events.append(Connected(export, self.generation, first is not None))
        self._expect_header()
        self._send_pending()


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
