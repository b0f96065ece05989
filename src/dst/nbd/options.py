"""The option (handshake) phase of the NBD server: one option in, reply bytes out.

Kept apart from the byte-level reader in ``server.py``: this module sees whole
options (header fields and data) and decides what to answer and whether the
handshake is over. It holds the per-connection negotiation state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dst.nbd import wire
from dst.nbd.constants import Info, Option, OptionReply
from dst.nbd.export import ExportInfo
from dst.nbd.meta import (
    MetaInvalid,
    MetaTooBig,
    list_contexts,
    parse_meta_request,
    select_contexts,
)

MAX_OPTION_LENGTH = 64 << 10  # option data beyond this is skipped without being stored


class OptionInvalid(Exception):
    """The option's data does not parse; answered with NBD_REP_ERR_INVALID."""


@dataclass(frozen=True)
class InfoRequest:
    """The data of NBD_OPT_INFO / NBD_OPT_GO."""

    name: str
    infos: tuple[int, ...]


def decode_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionInvalid("the export name is not valid UTF-8") from None


def parse_info_request(data: bytes) -> InfoRequest:
    """Name length, name, count of info requests, the 16-bit requests; nothing more."""
    if len(data) < 6:
        raise OptionInvalid(f"option data of {len(data)} bytes is shorter than 6")
    (name_len,) = wire.U32.unpack_from(data, 0)
    if name_len > len(data) - 6:
        raise OptionInvalid(
            f"name length {name_len} does not fit in {len(data)} bytes of option data"
        )
    name = decode_name(data[4 : 4 + name_len])
    pos = 4 + name_len
    (count,) = wire.U16.unpack_from(data, pos)
    pos += 2
    if len(data) - pos != 2 * count:
        raise OptionInvalid(
            f"{count} information requests need {2 * count} bytes, {len(data) - pos} were sent"
        )
    infos = tuple(wire.U16.unpack_from(data, pos + 2 * i)[0] for i in range(count))
    return InfoRequest(name, infos)


@dataclass
class OptionOutcome:
    """What one option produced: bytes to send and whether the phase ended."""

    replies: list[bytes]
    chosen: str | None = None  # the export's canonical name when transmission begins
    abort: bool = False
    violation: str | None = None  # the connection must be closed (after ``replies``)


class Negotiation:
    """Option-phase state: exports, structured replies, metadata contexts, NO_ZEROES,
    shutdown."""

    def __init__(self, exports: Mapping[str, ExportInfo], default_export: str) -> None:
        self.exports = dict(exports)
        self.default_export = default_export
        self.structured = False
        self.no_zeroes = False
        self.shutting_down = False
        self.meta_export: str | None = None  # the export the last SET_META_CONTEXT named
        self.meta: tuple[str, ...] = ()  # what it selected

    def contexts_for(self, canonical: str) -> tuple[str, ...]:
        """The contexts of a transmission phase on ``canonical``: the last selection, if it
        named the same export (the specification's rule for NBD_CMD_BLOCK_STATUS)."""
        return self.meta if self.structured and self.meta_export == canonical else ()

    def lookup(self, name: str) -> tuple[str, ExportInfo] | None:
        canonical = name or self.default_export
        export = self.exports.get(canonical)
        return None if export is None else (canonical, export)

    def unknown_export(self, name: str) -> str:
        names = ", ".join(repr(n) for n in self.exports) or "none"
        return (
            f"unknown export {name!r}: this server has {names} "
            f"(the empty name means {self.default_export!r})"
        )

    def too_big(self, option: int, length: int) -> OptionOutcome:
        """An option whose data exceeds MAX_OPTION_LENGTH (its data is skipped)."""
        message = f"option data of {length} bytes exceeds the limit of {MAX_OPTION_LENGTH}"
        if option == Option.EXPORT_NAME:
            return OptionOutcome([], violation=message)
        return OptionOutcome([wire.option_error(option, OptionReply.ERR_TOO_BIG, message)])

    def handle(self, option: int, data: bytes) -> OptionOutcome:
        if self.shutting_down and option != Option.ABORT:
            if option == Option.EXPORT_NAME:
                return OptionOutcome([], violation="the server is shutting down")
            return self._error(option, OptionReply.ERR_SHUTDOWN, "the server is shutting down")
        try:
            if option == Option.EXPORT_NAME:
                return self._export_name(data)
            if option == Option.ABORT:
                return OptionOutcome([wire.option_reply(option, OptionReply.ACK)], abort=True)
            if option == Option.LIST:
                return self._list(data)
            if option in (Option.INFO, Option.GO):
                return self._info(option, parse_info_request(data))
            if option == Option.STRUCTURED_REPLY:
                if data:
                    raise OptionInvalid("NBD_OPT_STRUCTURED_REPLY takes no data")
                self.structured = True
                return OptionOutcome([wire.option_reply(option, OptionReply.ACK)])
            if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
                return self._meta(option, data)
            if option == Option.STARTTLS:
                return self._error(option, OptionReply.ERR_UNSUP, "TLS is not supported")
        except (OptionInvalid, MetaInvalid) as exc:
            return self._error(option, OptionReply.ERR_INVALID, str(exc))
        except MetaTooBig as exc:
            return self._error(option, OptionReply.ERR_TOO_BIG, str(exc))
        return self._error(option, OptionReply.ERR_UNSUP, f"option {option} is not supported")

    @staticmethod
    def _error(option: int, reply: OptionReply, message: str) -> OptionOutcome:
        return OptionOutcome([wire.option_error(option, reply, message)])

    def _export_name(self, data: bytes) -> OptionOutcome:
        try:
            name = decode_name(data)
        except OptionInvalid as exc:
            return OptionOutcome([], violation=str(exc))
        found = self.lookup(name)
        if found is None:  # this option cannot answer with an error: hang up
            return OptionOutcome([], violation=self.unknown_export(name))
        canonical, export = found
        flags = export.transmission_flags(self.structured)
        return OptionOutcome(
            [wire.export_name_reply(export.size, flags, self.no_zeroes)], chosen=canonical
        )

    def _meta(self, option: int, data: bytes) -> OptionOutcome:
        """LIST_META_CONTEXT (ids 0) or SET_META_CONTEXT (replaces the selection, even when
        it fails; ids from 1), each answered with META_CONTEXT replies and an ACK."""
        setting = option == Option.SET_META_CONTEXT
        if setting:
            self.meta_export, self.meta = None, ()
        if not self.structured:
            raise OptionInvalid(
                "metadata contexts need structured replies: send NBD_OPT_STRUCTURED_REPLY first"
            )
        req = parse_meta_request(data)
        found = self.lookup(req.export)
        if found is None:
            return self._error(option, OptionReply.ERR_UNKNOWN, self.unknown_export(req.export))
        canonical, export = found
        if setting:
            names = select_contexts(export.contexts, req.queries)
            self.meta_export, self.meta = canonical, names
            replies = [wire.meta_context(option, i + 1, n) for i, n in enumerate(names)]
        else:
            names = tuple(list_contexts(export.contexts, req.queries))
            replies = [wire.meta_context(option, 0, n) for n in names]
        replies.append(wire.option_reply(option, OptionReply.ACK))
        return OptionOutcome(replies)

    def _list(self, data: bytes) -> OptionOutcome:
        if data:
            raise OptionInvalid("NBD_OPT_LIST takes no data")
        replies = [wire.rep_server(name, e.description) for name, e in self.exports.items()]
        replies.append(wire.option_reply(Option.LIST, OptionReply.ACK))
        return OptionOutcome(replies)

    def _info(self, option: int, req: InfoRequest) -> OptionOutcome:
        found = self.lookup(req.name)
        if found is None:
            return self._error(option, OptionReply.ERR_UNKNOWN, self.unknown_export(req.name))
        canonical, export = found
        flags = export.transmission_flags(self.structured)
        replies = [wire.info_export(option, export.size, flags)]
        if Info.NAME in req.infos:
            replies.append(wire.info_text(option, Info.NAME, canonical))
        if Info.DESCRIPTION in req.infos and export.description:
            replies.append(wire.info_text(option, Info.DESCRIPTION, export.description))
        replies.append(
            wire.info_block_size(
                option,
                export.min_block,
                export.preferred_block,
                min(export.max_block, 0xFFFFFFFF),
            )
        )
        replies.append(wire.option_reply(option, OptionReply.ACK))
        return OptionOutcome(replies, chosen=canonical if option == Option.GO else None)
