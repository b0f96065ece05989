"""A ``faults`` layer for tests: error replies, delays, outages and held writes on demand.

Seen from above it behaves like a remote member: ``go_down()`` flips its state to
``reconnecting`` and holds requests as a link does while it resends; after the
budget they fail with EIO, as a transaction does after its last resend;
``come_up()`` flips it back to ``connected`` and lets held requests through.
Injected errors are *replies* (the member answered with an error), so they fail at
once while the state stays ``connected``.
"""

from __future__ import annotations

import asyncio
import errno
import uuid
from dataclasses import dataclass
from typing import Any

from dst.device import BlockDevice, Buffer, IoFlags, Layer
from dst.errors import IoError

OPS = ("read", "write", "flush", "trim", "zero")
CHANGES = frozenset({"write", "trim", "zero"})

_INHERIT: Any = object()


@dataclass
class Rule:
    """Fail ``count`` requests (``None``: until healed) of these kinds touching a byte range."""

    ops: frozenset[str]
    err: int
    count: int | None
    start: int = 0
    end: int | None = None

    def matches(self, op: str, offset: int, length: int) -> bool:
        if op not in self.ops:
            return False
        if op == "flush":
            return True
        end = self.end if self.end is not None else 1 << 62
        return offset < end and self.start < offset + max(length, 1)


def _ops(which: str | tuple[str, ...]) -> frozenset[str]:
    names = (which,) if isinstance(which, str) else which
    out: set[str] = set()
    for n in names:
        if n == "any":
            out.update(OPS)
        elif n == "change":
            out.update(CHANGES)
        elif n in OPS:
            out.add(n)
        else:
            raise ValueError(f"unknown operation {n!r}: use one of {', '.join(OPS)}, change, any")
    return frozenset(out)


class FaultDevice(Layer):
    """Pass everything through, except the faults a test asked for."""

    def __init__(
        self,
        inner: BlockDevice,
        *,
        name: str | None = None,
        identity: uuid.UUID | None = _INHERIT,
    ) -> None:
        super().__init__(inner)
        self.name = name or inner.name
        self.identity = inner.identity if identity is _INHERIT else identity
        self.state = inner.state
        self.trim_reads_zeroes: bool = bool(getattr(inner, "trim_reads_zeroes", False))
        self.delay = 0.0
        self.rules: list[Rule] = []
        self.counts = dict.fromkeys(OPS, 0)
        self.applied = dict.fromkeys(OPS, 0)
        self.injected = 0
        self._forced: str | None = None
        self._budget: float | None = 0.0
        self._up = asyncio.Event()
        self._up.set()
        self._release = asyncio.Event()
        self._release.set()
        inner.subscribe(self._follow)

    def _follow(self, dev: BlockDevice, state: str) -> None:
        if self._forced is None:
            self.set_state(state)

    # ---- what a test turns on and off -----------------------------------------------
    def fail(
        self,
        ops: str | tuple[str, ...] = "write",
        *,
        err: int = errno.EIO,
        count: int | None = 1,
        offset: int = 0,
        length: int | None = None,
    ) -> Rule:
        """Answer matching requests with ``err`` (an error reply, not a lost link)."""
        rule = Rule(_ops(ops), err, count, offset, None if length is None else offset + length)
        self.rules.append(rule)
        return rule

    def heal(self) -> None:
        """Forget every injected error."""
        self.rules.clear()

    def go_down(self, budget: float | None = 0.0) -> None:
        """Lose the link: requests wait up to ``budget`` seconds (``None``: until
        ``come_up``), then fail with EIO as after the last resend."""
        self._budget = budget
        self._forced = "reconnecting"
        self._up.clear()
        self.set_state("reconnecting")

    def come_up(self) -> None:
        """The link is back: held requests go through; the state follows the inner device."""
        self._forced = None
        self._up.set()
        self.set_state(self.inner.state)

    def fail_permanently(self) -> None:
        """A permanent refusal: state ``failed``, every request fails at once."""
        self._forced = "failed"
        self._up.set()
        self.set_state("failed")

    def hold_changes(self) -> None:
        """Keep writes, trims and zeroes waiting (not applied) until ``release_changes``."""
        self._release.clear()

    def release_changes(self) -> None:
        self._release.set()

    @property
    def down(self) -> bool:
        return self._forced is not None

    # ---- the gate every request passes -----------------------------------------------
    async def _gate(self, op: str, offset: int, length: int) -> None:
        self.counts[op] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._forced == "failed":
            raise IoError(errno.EIO, f"{self.name} has failed: {op} refused")
        if not self._up.is_set():
            if self._budget is None:
                await self._up.wait()
            else:
                try:
                    async with asyncio.timeout(self._budget):
                        await self._up.wait()
                except TimeoutError:
                    raise IoError(
                        errno.EIO,
                        f"{self.name}: {op} at {offset}+{length} failed after all resends "
                        "(the member is down)",
                    ) from None
            if self._forced == "failed":
                raise IoError(errno.EIO, f"{self.name} has failed: {op} refused")
        for rule in self.rules:
            if rule.matches(op, offset, length):
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self.rules.remove(rule)
                self.injected += 1
                name = errno.errorcode.get(rule.err, str(rule.err))
                raise IoError(rule.err, f"{self.name}: injected {name} on {op} at {offset}")
        if op in CHANGES:
            await self._release.wait()

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        await self._gate("read", offset, len(buf))
        await self.inner.read_into(offset, buf, flags)
        self.applied["read"] += 1

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        await self._gate("write", offset, len(memoryview(data)))
        await self.inner.write(offset, data, flags)
        self.applied["write"] += 1

    async def flush(self) -> None:
        await self._gate("flush", 0, 0)
        await self.inner.flush()
        self.applied["flush"] += 1

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        await self._gate("trim", offset, length)
        await self.inner.trim(offset, length, flags)
        self.applied["trim"] += 1

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        await self._gate("zero", offset, length)
        await self.inner.write_zeroes(offset, length, flags)
        self.applied["zero"] += 1

    def statistics(self) -> dict[str, Any]:
        stats = dict(self.inner.statistics())
        stats["faults"] = {
            "state": self.state,
            "rules": len(self.rules),
            "injected": self.injected,
            "delay": self.delay,
        }
        return stats
