"""Byte layouts of NBD messages and the small encoders the server core uses.

Every layout is a precompiled big-endian ``struct.Struct``. Encoders return
``bytes`` for headers only; payloads travel separately as memoryviews so that a
read reply is never joined with (copied into) its header.
"""

from __future__ import annotations

import struct

from dst.nbd.constants import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    HandshakeFlags,
    Info,
    Option,
    OptionReply,
    ReplyFlags,
    ReplyType,
)

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
OFFSET_DATA = struct.Struct(">IHHQIQ")  # structured header + data offset
ERROR_CHUNK = struct.Struct(">IHHQIIH")  # structured header + error + message length
BLOCK_STATUS = struct.Struct(">IHHQII")  # structured header + metadata context id
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

_ZEROES = bytes(EXPORT_NAME_PADDING)


def clip_text(text: str, limit: int = MAX_STRING) -> bytes:
    """UTF-8 of ``text`` cut to ``limit`` bytes without splitting a character."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def greeting(flags: HandshakeFlags) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option_reply(option: int, reply: OptionReply, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def option_error(option: int, reply: OptionReply, message: str) -> bytes:
    return option_reply(option, reply, clip_text(message))


def rep_server(name: str, description: str) -> bytes:
    raw = clip_text(name)
    return option_reply(
        Option.LIST, OptionReply.SERVER, U32.pack(len(raw)) + raw + clip_text(description)
    )


def info_export(option: int, size: int, flags: int) -> bytes:
    return option_reply(option, OptionReply.INFO, INFO_EXPORT.pack(Info.EXPORT, size, flags))


def info_text(option: int, kind: Info, text: str) -> bytes:
    return option_reply(option, OptionReply.INFO, U16.pack(kind) + clip_text(text))


def info_block_size(option: int, minimum: int, preferred: int, maximum: int) -> bytes:
    return option_reply(
        option,
        OptionReply.INFO,
        INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum),
    )


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    head = EXPORT_NAME_REPLY.pack(size, flags)
    return head if no_zeroes else head + _ZEROES


def simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def offset_data_header(handle: int, offset: int, length: int) -> bytes:
    """Header of a final OFFSET_DATA chunk carrying ``length`` data bytes."""
    return OFFSET_DATA.pack(
        STRUCTURED_REPLY_MAGIC,
        ReplyFlags.DONE,
        ReplyType.OFFSET_DATA,
        handle,
        length + 8,
        offset,
    )


def structured_done(handle: int) -> bytes:
    """A final NONE chunk: success without payload."""
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, ReplyFlags.DONE, ReplyType.NONE, handle, 0)


def block_status_chunk(
    handle: int, context: int, descriptors: list[tuple[int, int]], done: bool
) -> bytes:
    """One NBD_REPLY_TYPE_BLOCK_STATUS chunk: the context id, then (length, flags) pairs."""
    flat = [v for d in descriptors for v in d]
    head = BLOCK_STATUS.pack(
        STRUCTURED_REPLY_MAGIC,
        ReplyFlags.DONE if done else 0,
        ReplyType.BLOCK_STATUS,
        handle,
        4 + 8 * len(descriptors),
        context,
    )
    return head + struct.pack(f">{len(flat)}I", *flat)


def meta_context(option: int, context: int, name: str) -> bytes:
    """An NBD_REP_META_CONTEXT reply: the id (0 in a LIST) and the context's name."""
    return option_reply(option, OptionReply.META_CONTEXT, U32.pack(context) + clip_text(name))


def error_chunk(handle: int, error: int, message: str) -> bytes:
    text = clip_text(message)
    head = ERROR_CHUNK.pack(
        STRUCTURED_REPLY_MAGIC,
        ReplyFlags.DONE,
        ReplyType.ERROR,
        handle,
        6 + len(text),
        error,
        len(text),
    )
    return head + text
