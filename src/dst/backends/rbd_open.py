"""Opening an ``rbd:`` backend: connect, open the pool, open or create the image, take
its exclusive lock, find its identity; and the errors that say what to do when a step fails.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
import uuid
from typing import Any

from dst.backends.rbd import RbdBackend, RbdSpec, errno_of
from dst.errors import StorageError, UsageError
from dst.units import format_size

log = logging.getLogger("dst.rbd")

IDENTITY_KEY = "dst.identity"
EXCLUSIVE_LOCK = 1 << 2  # RBD_FEATURE_EXCLUSIVE_LOCK
_NAMESPACE = uuid.UUID("0b8f5d1e-3c1a-4e51-9d59-2b7c6a0e4f21")


def _conf_seconds(cluster: Any, key: str, default: float) -> float:
    try:
        return float(cluster.conf_get(key))
    except Exception:  # an option this librados does not know
        return default


class Opener:
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
            if errno_of(e) in (errno.EROFS, errno.EBUSY, errno.EAGAIN):
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
        w, err = self.where, errno_of(e)
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
        w, err = self.where, errno_of(e)
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
        w, err = self.where, errno_of(e)
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
