"""What the server knows about one export, and the flags it advertises for it."""

from __future__ import annotations

from dataclasses import dataclass

from dst.nbd.constants import TransmissionFlags

MAX_BLOCK = 32 << 20  # the largest READ/WRITE the specification says never to treat as abuse


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class ExportInfo:
    """An export as advertised; every flag is a promise the front end must keep.

    A read-only export advertises neither FUA, TRIM nor WRITE_ZEROES (as nbdkit
    does): those only make sense for writes, which it answers with EPERM. FAST_ZERO
    is advertised with WRITE_ZEROES when the device honours it (``can_fast_zero``),
    CACHE when the server serves it (``can_cache``).
    """

    size: int
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = False
    can_zero: bool = True
    can_fast_zero: bool = False
    can_cache: bool = False
    can_multi_conn: bool = True
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_BLOCK
    description: str = ""
    contexts: tuple[str, ...] = ()  # metadata contexts offered, e.g. ("base:allocation",)

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export size {self.size} is out of range")
        if not _power_of_two(self.min_block) or self.min_block > 1 << 16:
            raise ValueError(f"min_block {self.min_block} must be a power of two <= 64 KiB")
        if not _power_of_two(self.preferred_block) or self.preferred_block < max(
            self.min_block, 512
        ):
            raise ValueError(
                f"preferred_block {self.preferred_block} must be a power of two >= "
                f"max(min_block, 512)"
            )
        if (
            self.max_block < self.preferred_block
            or self.max_block % self.min_block
            or self.max_block >= 1 << 32
        ):
            raise ValueError(
                f"max_block {self.max_block} must be a multiple of min_block, at least "
                "preferred_block and below 4 GiB"
            )

    @property
    def writable(self) -> bool:
        return not self.read_only

    def transmission_flags(self, structured: bool) -> TransmissionFlags:
        """The flags for this export on a connection (SEND_DF needs structured replies)."""
        f = TransmissionFlags.HAS_FLAGS
        if self.read_only:
            f |= TransmissionFlags.READ_ONLY
        if self.can_flush:
            f |= TransmissionFlags.SEND_FLUSH
        if self.writable and self.can_fua:
            f |= TransmissionFlags.SEND_FUA
        if self.writable and self.can_trim:
            f |= TransmissionFlags.SEND_TRIM
        if self.writable and self.can_zero:
            f |= TransmissionFlags.SEND_WRITE_ZEROES
            if self.can_fast_zero:
                f |= TransmissionFlags.SEND_FAST_ZERO
        if self.can_cache:
            f |= TransmissionFlags.SEND_CACHE
        if structured:
            f |= TransmissionFlags.SEND_DF
        if self.can_multi_conn:
            f |= TransmissionFlags.CAN_MULTI_CONN
        return f
