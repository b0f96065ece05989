"""``rbd:POOL/IMAGE``: a Ceph RBD image through librbd's asynchronous calls.

``rbd:POOL[/NAMESPACE]/IMAGE[?conf=PATH&id=CLIENT&timeout=S]``; the config defaults to
``$CEPH_CONF``, then ``/etc/ceph/ceph.conf``, the client to ``admin``, the connect timeout
to 10 s. Requests go to librbd with ``aio_read``/``aio_write``/``aio_flush``/
``aio_discard``/``aio_write_zeroes``; their completions run on librbd's own threads and
are handed back to the event loop (one wake-up for a batch of them), so no thread waits
per request. A read-write export takes librbd's exclusive lock and keeps it (the file
backend's ``flock``): a second export node on the image is refused. The export's identity
lives in the image's metadata (``dst.identity``), so it follows the image, not the host.

Durability: librbd's cache (``rbd cache``, write-around by default) may complete a write
before the OSDs have it, so FLUSH is ``aio_flush`` and FUA a flush after the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dst.backends.base import AsyncBackend, not_fast
from dst.device import Done
from dst.errors import StorageError, UsageError

DEFAULT_CONF = "/etc/ceph/ceph.conf"
CONF_ENV = "CEPH_CONF"
DEFAULT_CLIENT = "admin"
DEFAULT_TIMEOUT = 10  # whole seconds: librados takes nothing finer
EXAMPLE = "rbd:rbd/vm1"
THICK = 1  # RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: allocate, do not punch


def binding() -> tuple[Any, Any]:
    """Ceph's Python modules (``rados``, ``rbd``), or an error saying how to get them."""
    try:
        import rados
        import rbd
    except ImportError as e:
        raise StorageError(
            f"rbd: backends need Ceph's Python binding, which {sys.executable} cannot import "
            f"({e}); install it with `apt-get install python3-rbd python3-rados` (Debian "
            "builds it for /usr/bin/python3: a virtualenv sees it when made with "
            "--system-site-packages or with /usr/lib/python3/dist-packages on its path)"
        ) from None
    return rados, rbd


@dataclass(frozen=True)
class RbdSpec:
    """Where an ``rbd:`` backend is: pool, namespace, image, config, client, timeout."""

    pool: str
    image: str
    namespace: str = ""
    conf: str = ""
    client: str = DEFAULT_CLIENT
    timeout: int = DEFAULT_TIMEOUT
    conf_given: bool = False

    @property
    def path(self) -> str:
        """``pool[/namespace]/image``, as the rbd tool writes it."""
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.pool}/{ns}{self.image}"

    @classmethod
    def parse(cls, spec: str, rest: str) -> RbdSpec:
        """``POOL[/NAMESPACE]/IMAGE[?conf=PATH&id=CLIENT&timeout=S]``; a UsageError that
        helps otherwise (found without contacting the cluster)."""
        where, _, query = rest.partition("?")
        parts = where.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(
                f"invalid backend {spec!r}: name the image as rbd:POOL/IMAGE "
                f"(or rbd:POOL/NAMESPACE/IMAGE), e.g. {EXAMPLE}"
            )
        pool, image = parts[0], parts[-1]
        namespace = parts[1] if len(parts) == 3 else ""
        try:
            pairs = urllib.parse.parse_qsl(
                query, keep_blank_values=True, strict_parsing=bool(query)
            )
        except ValueError:
            raise UsageError(
                f"invalid backend {spec!r}: the options after '?' must be KEY=VALUE joined "
                f"by '&', e.g. {EXAMPLE}?conf=/etc/ceph/ceph.conf&id=dst"
            ) from None
        opts: dict[str, str] = {}
        for key, value in pairs:
            if key not in ("conf", "id", "timeout"):
                raise UsageError(
                    f"invalid backend {spec!r}: unknown option {key!r}; rbd: takes conf=PATH, "
                    "id=CLIENT and timeout=SECONDS"
                )
            if key in opts:
                raise UsageError(f"invalid backend {spec!r}: {key}= is given twice")
            if not value:
                raise UsageError(f"invalid backend {spec!r}: {key}= has no value")
            opts[key] = value
        timeout = DEFAULT_TIMEOUT
        if "timeout" in opts:
            try:
                timeout = int(opts["timeout"])
            except ValueError:
                timeout = -1
            if not 0 < timeout <= 3600:
                raise UsageError(
                    f"invalid backend {spec!r}: timeout={opts['timeout']} is not a whole number "
                    "of seconds from 1 to 3600, e.g. timeout=10"
                )
        client = opts.get("id", DEFAULT_CLIENT).removeprefix("client.")
        conf_given = "conf" in opts
        conf = os.path.expanduser(opts["conf"]) if conf_given else ""
        if not conf:
            conf = os.environ.get(CONF_ENV) or DEFAULT_CONF
        return cls(pool, image, namespace, conf, client, timeout, conf_given)

    def check_conf(self, spec: str) -> None:
        """A readable config file, or a UsageError naming where it was looked for."""
        if os.path.isfile(self.conf) and os.access(self.conf, os.R_OK):
            return
        if self.conf_given:
            where = f"the config {self.conf} given with conf="
        elif os.environ.get(CONF_ENV):
            where = f"the config {self.conf} named by ${CONF_ENV}"
        else:
            where = f"the default config {self.conf}"
        state = "cannot be read" if os.path.exists(self.conf) else "does not exist"
        raise UsageError(
            f"{spec}: {where} {state}; give the cluster's ceph.conf with "
            f"rbd:{self.path}?conf=PATH or set ${CONF_ENV}"
        )


class Handoff:
    """librbd's completion callbacks -> the event loop.

    A callback (on a librbd thread) queues its result; only the first of a batch wakes the
    loop, which then runs every queued completion in one turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._queue: list[tuple[Done, BaseException | None]] = []

    def post(self, done: Done, err: BaseException | None) -> None:
        with self._lock:
            first = not self._queue
            self._queue.append((done, err))
        if first:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody waits any more
                with self._lock:
                    self._queue.clear()

    def _drain(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        for done, err in batch:
            try:
                done(err)
            except Exception as exc:  # one broken callback must not strand the others
                self.loop.call_exception_handler(
                    {"message": "a librbd completion callback failed", "exception": exc}
                )


def _failure(ret: int, what: str) -> OSError | None:
    """A librbd return value as the OSError the framework maps (None: success)."""
    if ret >= 0:
        return None
    return OSError(-ret, f"librbd {what}: {os.strerror(-ret)}")


def _thick_not_fast(spec: str) -> OSError:
    return not_fast(spec, "NO_HOLE means thick provisioning, which writes every byte")


def errno_of(e: Exception) -> int:
    """The errno of a binding error (they are not OSErrors), EIO when it has none."""
    return int(getattr(e, "errno", None) or errno.EIO)


class RbdBackend(AsyncBackend):
    """An RBD image; the asynchronous calls serve the export node, the synchronous ones
    anything that runs outside an event loop."""

    kind = "rbd"
    can_trim = True
    can_zero = True
    can_fua = False  # the framework flushes after a FUA write
    can_flush = True
    trim_reads_zeroes = False  # librbd skips the parts of a discard that miss whole objects

    def __init__(
        self,
        spec: str,
        where: RbdSpec,
        parts: tuple[Any, Any, Any],
        *,
        size: int,
        read_only: bool,
        info: dict[str, Any],
    ) -> None:
        self.spec = spec
        self.where = where
        self.size = size
        self.read_only = read_only
        self._cluster, self._ioctx, self._image = parts
        self.info = info
        self.identity = uuid.UUID(int=0)
        self.identity_store = "none"
        self._handoff: Handoff | None = None

    # ---- opening ------------------------------------------------------------------
    @classmethod
    def open(cls, spec: str, rest: str, *, size: int | None, read_only: bool) -> RbdBackend:
        where = RbdSpec.parse(spec, rest)
        where.check_conf(spec)
        rados, rbd = binding()
        from dst.backends.rbd_open import Opener

        return Opener(spec, where, rados, rbd, size, read_only).run()

    def _loop_handoff(self) -> Handoff:
        loop = asyncio.get_running_loop()
        h = self._handoff
        if h is None or h.loop is not loop:
            h = self._handoff = Handoff(loop)
        return h

    def _image_or_fail(self) -> Any:
        if self._image is None:
            raise OSError(errno.EBADF, f"{self.spec} is closed")
        return self._image

    # ---- asynchronous requests ----------------------------------------------------------
    def start_read(self, buf: memoryview, offset: int, done: Done) -> None:
        post = self._loop_handoff().post
        n = len(buf)
        if n == 0:
            done(None)
            return

        def complete(c: Any, data: bytes | None) -> None:
            err = _failure(c.get_return_value(), "read")
            if err is None:
                if data is None or len(data) != n:
                    got = 0 if data is None else len(data)
                    err = OSError(errno.EIO, f"librbd read returned {got} of {n} bytes")
                else:
                    buf[:] = data  # the request owns ``buf`` until ``done``
            post(done, err)

        self._submit(lambda img: img.aio_read(offset, n, complete), done)

    def start_write(self, buf: memoryview, offset: int, fua: bool, done: Done) -> None:
        post = self._loop_handoff().post
        data = bytes(buf)  # the binding takes bytes only

        def complete(c: Any) -> None:
            post(done, _failure(c.get_return_value(), "write"))

        self._submit(lambda img: img.aio_write(data, offset, complete), done)

    def start_flush(self, done: Done) -> None:
        post = self._loop_handoff().post

        def complete(c: Any) -> None:
            post(done, _failure(c.get_return_value(), "flush"))

        self._submit(lambda img: img.aio_flush(complete), done)

    def start_trim(self, offset: int, length: int, done: Done) -> None:
        post = self._loop_handoff().post

        def complete(c: Any) -> None:
            post(done, _failure(c.get_return_value(), "discard"))

        self._submit(lambda img: img.aio_discard(offset, length, complete), done)

    def start_zero(
        self, offset: int, length: int, may_trim: bool, done: Done, fast: bool = False
    ) -> None:
        """librbd write_zeroes: objects covered whole are discarded and the rest zeroed by
        the OSDs, a metadata operation (fast); NO_HOLE asks for thick provisioning, which
        writes every byte on the OSDs, so with ``fast`` (FAST_ZERO) it is refused."""
        if fast and not may_trim:
            done(_thick_not_fast(self.spec))
            return
        post = self._loop_handoff().post
        flags = 0 if may_trim else THICK

        def complete(c: Any) -> None:
            post(done, _failure(c.get_return_value(), "write_zeroes"))

        self._submit(
            lambda img: img.aio_write_zeroes(offset, length, complete, zero_flags=flags), done
        )

    def _submit(self, call: Callable[[Any], Any], done: Done) -> None:
        """Queue one request with librbd; an error at submission goes to ``done`` at once."""
        try:
            call(self._image_or_fail())
        except OSError as e:
            done(e)
        except Exception as e:  # the binding's errors are not OSErrors
            done(OSError(errno_of(e), f"librbd refused the request: {e}"))

    # ---- synchronous requests (outside an event loop) -----------------------------------
    def pread_into(self, buf: memoryview, offset: int) -> None:
        data = self._sync(lambda img: img.read(offset, len(buf)))
        buf[:] = data

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self._sync(lambda img: img.write(bytes(buf), offset))
        if fua:
            self.flush()

    def flush(self) -> None:
        self._sync(lambda img: img.flush())

    def trim(self, offset: int, length: int) -> None:
        self._sync(lambda img: img.discard(offset, length))

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        if fast and not may_trim:
            raise _thick_not_fast(self.spec)
        self._sync(lambda img: img.write_zeroes(offset, length, 0 if may_trim else THICK))

    def _sync(self, call: Callable[[Any], Any]) -> Any:
        try:
            return call(self._image_or_fail())
        except OSError:
            raise
        except Exception as e:
            raise OSError(errno_of(e), f"librbd: {e}") from None

    # ---- the rest -------------------------------------------------------------------
    def close(self) -> None:
        """Release the lock and the watch, then the pool and the cluster connection."""
        image, ioctx, cluster = self._image, self._ioctx, self._cluster
        self._image = self._ioctx = self._cluster = None
        for obj, method in ((image, "close"), (ioctx, "close"), (cluster, "shutdown")):
            if obj is not None:
                with contextlib.suppress(Exception):  # closing: nothing is left to tell
                    getattr(obj, method)()

    def statistics(self) -> dict[str, Any]:
        """What is known without asking the cluster: a status poll must never block."""
        stats = super().statistics()
        stats.update(self.info)
        stats["identity_store"] = self.identity_store
        stats["closed"] = self._image is None
        return stats
