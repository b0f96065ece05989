"""Sequence-stamped 4 KiB records: a writer over NBD and a crash-consistency checker.

Record ``i`` lives at offset ``i * 4096`` and is fully determined by the run id and ``i``
(a header with magic, run id, sequence number and CRC, then the sequence number
repeated), so a block holds exactly one of: nothing (zeroes), record ``i`` whole, or
something else (an error).

``write URI --run ID --records N --every K [--depth D]`` (Debian's python3, which has
libnbd's module) writes the records in epochs of K: the records of an epoch go out with
up to D in flight, in any order, then a FLUSH; after each flush it prints ``flushed M``
(records 0..M-1 are acknowledged and flushed).

``check IMAGE --run ID --every K`` (any python3) reads an image and decides whether it
is a crash-consistent point of that stream: every record before some barrier is there
and none after the following one. With records 0..a-1 present and ``a`` the first
missing one, the last complete epoch ends at barrier ``k = a // K``; the image is
consistent when no record at or past ``(k + 1) * K`` is present, and no block holds
anything but a whole record or zeroes. It prints a one-line verdict (``consistent: ...``
or ``NOT consistent: ...``) and exits 0 or 1.
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib

BLOCK = 4096
MAGIC = b"DSTREC01"
HEAD = struct.Struct("<8sQQI")


def record(run: int, seq: int) -> bytes:
    head = HEAD.pack(MAGIC, run, seq, 0)
    head = HEAD.pack(MAGIC, run, seq, zlib.crc32(head))
    body = struct.pack("<Q", seq) * ((BLOCK - len(head)) // 8)
    return (head + body).ljust(BLOCK, b"\0")


def write(uri: str, run: int, records: int, every: int, depth: int) -> int:
    import nbd  # libnbd's module: Debian's python3

    h = nbd.NBD()
    h.connect_uri(uri)
    done = 0
    while done < records:
        end = min(records, done + every)
        cookies = []
        bufs = []
        for i in range(done, end):
            while h.aio_in_flight() >= depth:
                h.poll(-1)
            buf = nbd.Buffer.from_bytearray(bytearray(record(run, i)))
            bufs.append(buf)
            cookies.append(h.aio_pwrite(buf, i * BLOCK))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            h.aio_command_completed(c)  # raises if the write failed
        h.flush()
        done = end
        print(f"flushed {done}", flush=True)
    h.shutdown()
    return 0


def check(image: str, run: int, every: int) -> tuple[bool, str]:
    present: list[int] = []
    bad: list[int] = []
    zero = bytes(BLOCK)
    with open(image, "rb") as f:
        i = 0
        while True:
            block = f.read(BLOCK)
            if len(block) < BLOCK:
                break
            if block == zero:
                pass
            elif block == record(run, i):
                present.append(i)
            else:
                bad.append(i)
            i += 1
    if bad:
        return False, f"{len(bad)} block(s) hold neither zeroes nor their record, first at {bad[0]}"
    have = set(present)
    first_missing = next(i for i in range(len(have) + 1) if i not in have)
    k = first_missing // every
    last = max(present, default=-1)
    where = (
        f"records 0..{first_missing - 1} present (through barrier {k}), "
        f"{len(present)} present, last {last}"
    )
    if last >= (k + 1) * every:
        return False, f"{where}: record {last} is past barrier {k + 1}"
    return True, where


def main() -> int:
    p = argparse.ArgumentParser(prog="records.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("uri")
    w.add_argument("--run", type=int, required=True)
    w.add_argument("--records", type=int, required=True)
    w.add_argument("--every", type=int, required=True)
    w.add_argument("--depth", type=int, default=16)
    c = sub.add_parser("check")
    c.add_argument("image")
    c.add_argument("--run", type=int, required=True)
    c.add_argument("--every", type=int, required=True)
    a = p.parse_args()
    if a.cmd == "write":
        return write(a.uri, a.run, a.records, a.every, a.depth)
    ok, why = check(a.image, a.run, a.every)
    print(("consistent: " if ok else "NOT consistent: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
