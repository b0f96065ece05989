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
import logging
import os
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dst.backends.base import AsyncBackend
from dst.device import Done
from dst.errors import StorageError, UsageError
from dst.units import format_size

log = logging.getLogger("dst.rbd")

DEFAULT_CONF = "/etc/ceph/ceph.conf"
CONF_ENV = "CEPH_CONF"
DEFAULT_CLIENT = "admin"
DEFAULT_TIMEOUT = 10  # whole seconds: librados takes nothing finer
IDENTITY_KEY = "dst.identity"
EXAMPLE = "rbd:rbd/vm1"
_NAMESPACE = uuid.UUID("0b8f5d1e-3c1a-4e51-9d59-2b7c6a0e4f21")
EXCLUSIVE_LOCK = 1 << 2  # RBD_FEATURE_EXCLUSIVE_LOCK
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


def _conf_seconds(cluster: Any, key: str, default: float) -> float:
    try:
        return float(cluster.conf_get(key))
    except Exception:  # an option this librados does not know
        return default


def _errno(e: Exception) -> int:
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
        opener = _Opener(spec, where, rados, rbd, size, read_only)
        return opener.run()

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

    def start_zero(self, offset: int, length: int, may_trim: bool, done: Done) -> None:
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
            done(OSError(_errno(e), f"librbd refused the request: {e}"))

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

    def zero(self, offset: int, length: int, may_trim: bool) -> None:
        self._sync(lambda img: img.write_zeroes(offset, length, 0 if may_trim else THICK))

    def _sync(self, call: Callable[[Any], Any]) -> Any:
        try:
            return call(self._image_or_fail())
        except OSError:
            raise
        except Exception as e:
            raise OSError(_errno(e), f"librbd: {e}") from None

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


class _Opener:
    """Connect, open the pool, open or create the image, lock it, find its identity.

    The steps run on a helper thread under the connect timeout: librados has a timeout
    for reaching the monitors, but opening an image whose OSDs do not answer would hang
    ``dst export`` without a word."""

    def __init__(
        self,
        spec: str,
        where: RbdSpec,
        rados: Any,
        rbd: Any,
        size: int | None,
        read_only: bool,
    ) -> None:
        self.spec = spec
        self.where = where
        self.rados = rados
        self.rbd = rbd
        self.size = size
        self.read_only = read_only
        self._mutex = threading.Lock()
        self.deadline = 0.0
        self.stuck = ""
        self.abandoned = False
        self._step(  # librados itself gives up on the monitors after the timeout
            "connecting",
            where.timeout + 2,
            f"the monitors of {where.conf} did not answer within {where.timeout + 2} s; check "
            "that they are up and reachable from here (`ceph -s`)",
        )
        self.parts: list[Any] = []
        self.result: RbdBackend | None = None
        self.error: BaseException | None = None

    def run(self) -> RbdBackend:
        t = threading.Thread(target=self._work, name="dst-rbd-open", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.05)
            with self._mutex:
                if t.is_alive() and time.monotonic() > self.deadline:
                    self.abandoned = True  # the thread releases what it opens later
                    raise StorageError(f"{self.spec}: {self.stuck}")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _step(self, stage: str, budget: float, stuck: str = "") -> None:
        """Enter the next step: what to say if it takes longer than ``budget`` seconds."""
        with self._mutex:
            self.deadline = time.monotonic() + budget
            self.stuck = stuck or (
                f"the Ceph cluster of {self.where.conf} did not answer within {budget:g} s "
                f"while {stage}; check that its OSDs are up (`ceph -s`, `ceph osd tree`)"
            )

    def _work(self) -> None:
        try:
            result = self._open()
        except BaseException as e:
            self.error = e
            self._release()
            return
        with self._mutex:
            if not self.abandoned:
                self.result = result
                return
        result.close()

    def _release(self) -> None:
        for obj in reversed(self.parts):  # image, pool, cluster
            with contextlib.suppress(Exception):  # the first error is the one to tell
                obj.shutdown() if obj is self.parts[0] else obj.close()

    def _open(self) -> RbdBackend:
        w, rados, rbd, spec = self.where, self.rados, self.rbd, self.spec
        try:
            cluster = rados.Rados(conffile=w.conf, rados_id=w.client)
            cluster.conf_set("client_mount_timeout", str(w.timeout))
            self.parts.append(cluster)
            cluster.connect()
        except rados.Error as e:
            raise self._connect_error(e) from None
        fsid: str = cluster.get_fsid()
        self._step(f"opening pool {w.pool!r}", w.timeout)
        try:
            ioctx = cluster.open_ioctx(w.pool)
            self.parts.append(ioctx)
            if w.namespace:
                ioctx.set_namespace(w.namespace)
        except rados.Error as e:
            raise self._pool_error(e, fsid) from None
        self._step(f"opening image {w.path}", w.timeout)
        created = False
        try:
            try:
                image = rbd.Image(ioctx, w.image, read_only=self.read_only)
            except rbd.ImageNotFound:
                self._may_create()
                assert self.size is not None
                self._step(f"creating image {w.path}", w.timeout)
                try:
                    rbd.RBD().create(ioctx, w.image, self.size)
                    created = True
                except rbd.ImageExists:
                    pass  # created meanwhile by someone else: open theirs
                image = rbd.Image(ioctx, w.image)
            self.parts.append(image)
        except rbd.Error as e:
            raise self._image_error(e, fsid) from None
        nbytes: int = image.size()
        if self.size is not None and self.size != nbytes:
            raise UsageError(
                f"{spec} is {nbytes} bytes ({format_size(nbytes)}) but --size asks for "
                f"{self.size} ({format_size(self.size)}); an existing image keeps its size: "
                f"drop --size, or resize it with `rbd resize {w.path} --size ...`"
            )
        features: int = image.features()
        if not self.read_only:
            self._lock(image, features)
        identity, store = self._identity(image, fsid)
        info = {
            "pool": w.pool,
            "namespace": w.namespace,
            "image": w.image,
            "image_id": str(image.id()),
            "cluster": fsid,
            "client": f"client.{w.client}",
            "conf": w.conf,
            "features": features,
            "object_size": int(image.stat()["obj_size"]),
            "exclusive_lock": not self.read_only,
            "created": created,
        }
        backend = RbdBackend(
            spec,
            w,
            (cluster, ioctx, image),
            size=nbytes,
            read_only=self.read_only,
            info=info,
        )
        backend.identity, backend.identity_store = identity, store
        return backend

    def _may_create(self) -> None:
        w = self.where
        if self.size is None:
            raise UsageError(
                f"{self.spec}: image {w.path} does not exist; give --size SIZE to create it, "
                f"or create it with `rbd create {w.path} --size SIZE`"
            )
        if self.read_only:
            raise UsageError(
                f"{self.spec}: image {w.path} does not exist and a read-only export cannot "
                "create it; drop --read-only or create the image first"
            )

    def _lock(self, image: Any, features: int) -> None:
        w, rbd = self.where, self.rbd
        if not features & EXCLUSIVE_LOCK:
            raise StorageError(
                f"{self.spec}: image {w.path} has no exclusive-lock feature, so two export "
                f"nodes could write it at once; enable it with `rbd feature enable {w.path} "
                "exclusive-lock`, or export it with --read-only"
            )
        owners: list[str] = []
        with contextlib.suppress(rbd.Error):
            owners = [str(o.get("owner")) for o in image.lock_get_owners()]
        who = f" ({', '.join(owners)})" if owners else ""
        # a dead owner's lock is broken by librbd once the owner's watch has timed out
        watch = _conf_seconds(self.parts[0], "osd_client_watch_timeout", 30)
        budget = watch + 2 * w.timeout
        self._step(
            "taking the exclusive lock",
            budget,
            f"the exclusive lock of {w.path} is held by another client{who} that neither "
            f"handed it over nor went away within {budget:g} s; stop the other export node "
            f"(or qemu), or remove a stale lock with `rbd lock rm`",
        )
        if owners:
            log.info(
                "%s: waiting for the exclusive lock of %s, held by%s; if that client is gone, "
                "Ceph frees the lock when its watch times out (osd_client_watch_timeout, %g s)",
                self.spec,
                w.path,
                who,
                watch,
            )
        try:
            image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        except rbd.Error as e:
            with contextlib.suppress(rbd.Error):
                owners = [str(o.get("owner")) for o in image.lock_get_owners()]
            who = f" ({', '.join(owners)})" if owners else ""
            if _errno(e) in (errno.EROFS, errno.EBUSY, errno.EAGAIN):
                raise StorageError(
                    f"{self.spec} is already in use by another client{who}: it holds the "
                    f"image's exclusive lock and keeps it; stop the other export node (or "
                    "qemu) first"
                ) from None
            raise StorageError(
                f"{self.spec}: cannot take the exclusive lock of {w.path}: {e}; check the "
                "client's caps (it must be allowed to blocklist dead lock owners)"
            ) from None

    def _identity(self, image: Any, fsid: str) -> tuple[uuid.UUID, str]:
        """Kept in the image's metadata; a read-only export of an image without one gets
        one derived from the cluster and the image id (stable as long as the image is)."""
        rbd = self.rbd
        where = f"the metadata key {IDENTITY_KEY} of {self.where.path}"
        try:
            text: str = image.metadata_get(IDENTITY_KEY)
        except KeyError:
            text = ""
        except rbd.Error as e:
            raise StorageError(f"{self.spec}: cannot read {where}: {e}") from None
        if text:
            try:
                return uuid.UUID(text.strip()), "metadata"
            except ValueError:
                raise StorageError(
                    f"{self.spec}: {where} is not a UUID ({text.strip()[:40]!r}); remove it "
                    f"with `rbd image-meta remove {self.where.path} {IDENTITY_KEY}` to get a "
                    "new one (clients will then see a different store)"
                ) from None
        if self.read_only:
            return uuid.uuid5(_NAMESPACE, f"{fsid}/{self.where.pool}/{image.id()}"), "derived"
        new = uuid.uuid4()
        try:
            image.metadata_set(IDENTITY_KEY, str(new))
        except rbd.Error as e:
            raise StorageError(f"{self.spec}: cannot write {where}: {e}") from None
        return new, "metadata"

    # ---- errors that say what to do ------------------------------------------------------
    def _connect_error(self, e: Exception) -> StorageError:
        w, err = self.where, _errno(e)
        if err == errno.ETIMEDOUT:
            return StorageError(
                f"{self.spec}: cannot reach the Ceph cluster of {w.conf} within "
                f"{w.timeout} s; check that its monitors (mon host in {w.conf}) are up and "
                "reachable from here (`ceph -s`)"
            )
        if err in (errno.EACCES, errno.EPERM):
            return StorageError(
                f"{self.spec}: the cluster refused client.{w.client}: permission denied; "
                f"check its key in the keyring named by {w.conf}, or give another ?id=CLIENT"
            )
        if err == errno.ENOENT:
            return StorageError(
                f"{self.spec}: cannot connect as client.{w.client}: no keyring found for it; "
                f"add `keyring = PATH` to {w.conf} or give another ?id=CLIENT"
            )
        return StorageError(
            f"{self.spec}: cannot connect to the Ceph cluster of {w.conf} as "
            f"client.{w.client}: {e}; check the config (`ceph -s -c {w.conf}`)"
        )

    def _pool_error(self, e: Exception, fsid: str) -> StorageError:
        w, err = self.where, _errno(e)
        if err == errno.ENOENT:
            if w.namespace and "namespace" in str(e).lower():
                return StorageError(
                    f"{self.spec}: namespace {w.namespace!r} does not exist in pool "
                    f"{w.pool!r}; create it with `rbd namespace create {w.pool}/{w.namespace}`"
                )
            return StorageError(
                f"{self.spec}: pool {w.pool!r} does not exist in the cluster {fsid}; create "
                f"it (`ceph osd pool create {w.pool}` and `rbd pool init {w.pool}`) or check "
                "the name (`ceph osd pool ls`)"
            )
        if err in (errno.EACCES, errno.EPERM):
            return self._denied(f"pool {w.pool!r}")
        return StorageError(f"{self.spec}: cannot open pool {w.pool!r}: {e}")

    def _image_error(self, e: Exception, fsid: str) -> StorageError:
        w, err = self.where, _errno(e)
        if err == errno.ENOENT and w.namespace:
            return StorageError(
                f"{self.spec}: namespace {w.namespace!r} of pool {w.pool!r} or its image "
                f"{w.image!r} does not exist; check with `rbd ls {w.pool}/{w.namespace}`"
            )
        if err in (errno.EACCES, errno.EPERM):
            return self._denied(f"image {w.path}")
        return StorageError(f"{self.spec}: cannot open image {w.path}: {e}")

    def _denied(self, what: str) -> StorageError:
        w = self.where
        return StorageError(
            f"{self.spec}: client.{w.client} may not use {what}: permission denied; give it "
            f"rbd caps (`ceph auth caps client.{w.client} mon 'profile rbd' osd 'profile rbd "
            f"pool={w.pool}'`) or give another ?id=CLIENT"
        )
