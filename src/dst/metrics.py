"""Prometheus metrics, built from the node's status document at scrape time.

Nothing is counted twice: the collector turns the same dictionary that
`dst status --json` prints into metric families, so the two views agree by
construction.  The HTTP endpoint is a small asyncio server on the node's own
event loop rather than prometheus_client's server thread: the counters live in
objects that only the loop mutates, and reading them from another thread could
see a dictionary change size mid-iteration.  A scrape costs one status call.

Latency histograms need bucket counts since start, which the members' recent
sample windows cannot give; :func:`instrument` swaps in a recorder that keeps
them (:class:`BucketLatency`), and the status document then carries ``sum`` and
cumulative ``buckets`` per operation.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from dst.aio.listen import bind_listener, bound_address, unlink_unix
from dst.client.latency import Latency
from dst.control.handlers import STATES, leaves
from dst.device import BlockDevice
from dst.units import Address

log = logging.getLogger("dst.metrics")

StatusFn = Callable[[], dict[str, Any]]

# seconds; from a fast local round trip to the longest resend budgets
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
EXPORT_OPS = {
    "reads": "read",
    "writes": "write",
    "flushes": "flush",
    "trims": "trim",
    "zeroes": "zero",
    "caches": "cache",
}
MAX_REQUEST_HEAD = 8192
# the classic text format, which every scraper accepts; our names need nothing newer
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BucketLatency(Latency):
    """A Latency that also keeps histogram bucket counts and the sum since start."""

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        super().__init__()
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)

    def add(self, seconds: float) -> None:
        super().add(seconds)
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1

    def summary(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(super().summary())
        cumulative: list[list[float]] = []
        n = 0
        for le, c in zip(self.bounds, self.counts, strict=False):
            n += c
            cumulative.append([le, n])
        s["sum"] = self.total
        s["buckets"] = cumulative
        return s


def instrument(device: BlockDevice) -> None:
    """Give every member under ``device`` bucketed latency recorders (idempotent).

    Samples already recorded in a member's window are carried over, so a member
    that joins later (a mirror leg added at run time) loses nothing it still holds.
    """
    for leaf in leaves(device):
        lat = getattr(leaf, "latency", None)
        if not isinstance(lat, dict):
            continue
        for op, old in list(lat.items()):
            if type(old) is not Latency:
                continue
            new = BucketLatency()
            for sample in old._samples:
                new.add(sample)
            new.count, new.total = old.count, old.total
            lat[op] = new


class StatusCollector:
    """A prometheus_client collector over a status callable (export or attach node)."""

    def __init__(self, status: StatusFn) -> None:
        self.status = status

    def describe(self) -> list[Metric]:
        return []  # families depend on the node's role; described at collect time

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        if st.get("role") == "export":
            yield from export_metrics(st)
        else:
            yield from attach_metrics(st)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def attach_metrics(st: dict[str, Any]) -> Iterator[Metric]:
    """Families for a client node, labelled by member URI."""
    requests = _counter("dst_requests_total", "Requests submitted to a member.", ["member", "op"])
    nbytes = _counter(
        "dst_bytes_total", "Bytes read from or written to a member.", ["member", "op"]
    )
    simple = {
        "resends": _counter(
            "dst_resends_total", "Transaction attempts after the first.", ["member"]
        ),
        "reconnects": _counter(
            "dst_reconnects_total", "Connections re-established to a member.", ["member"]
        ),
        "failed": _counter(
            "dst_request_failures_total",
            "Requests that failed after their resend budget ran out.",
            ["member"],
        ),
        "errors": _counter(
            "dst_request_errors_total",
            "Requests answered with an error status (EIO, ENOSPC, EPERM, ...).",
            ["member"],
        ),
        "checksum_errors": _counter(
            "dst_checksum_errors_total", "Payload checksum mismatches (each resent).", ["member"]
        ),
        "timeouts": _counter(
            "dst_request_timeouts_total", "Attempts that waited out --resend-timeout.", ["member"]
        ),
        "pings": _counter("dst_pings_total", "Liveness pings sent to a member.", ["member"]),
    }
    in_flight = _gauge("dst_requests_in_flight", "Requests awaiting their ack.", ["member"])
    connected = _gauge("dst_member_connected", "1 when the member is connected.", ["member"])
    state = _gauge("dst_member_state", "1 for the member's current state.", ["member", "state"])
    generation = _gauge(
        "dst_member_generation", "Connection generation of the member's session.", ["member"]
    )
    resync_done = _gauge("dst_resync_done_bytes", "Bytes resynced so far.", ["member"])
    resync_total = _gauge("dst_resync_total_bytes", "Bytes the running resync covers.", ["member"])
    duration = HistogramMetricFamily(
        "dst_request_duration_seconds",
        "Time from submission to ack of a successful request.",
        labels=["member", "op"],
    )
    for m in st.get("members", []):
        uri = str(m.get("uri"))
        for op, n in (m.get("requests") or {}).items():
            requests.add_metric([uri, op], _num(n))
        nbytes.add_metric([uri, "read"], _num(m.get("bytes_read")))
        nbytes.add_metric([uri, "write"], _num(m.get("bytes_written")))
        for key, fam in simple.items():
            fam.add_metric([uri], _num(m.get(key)))
        in_flight.add_metric([uri], _num(m.get("in_flight")))
        connected.add_metric([uri], 1.0 if m.get("state") == "connected" else 0.0)
        for s in STATES:
            state.add_metric([uri, s], 1.0 if m.get("state") == s else 0.0)
        generation.add_metric([uri], _num(m.get("generation")))
        rs = m.get("resync")
        if isinstance(rs, dict):
            resync_done.add_metric([uri], _num(rs.get("bytes_done")))
            resync_total.add_metric([uri], _num(rs.get("bytes_total")))
        for op, lat in (m.get("latency") or {}).items():
            buckets = lat.get("buckets") if isinstance(lat, dict) else None
            if not isinstance(buckets, list):
                continue
            pairs = [(_le(le), _num(n)) for le, n in buckets]
            pairs.append(("+Inf", _num(lat.get("count"))))
            duration.add_metric([uri, op], pairs, _num(lat.get("sum")))
    yield requests
    yield nbytes
    yield from simple.values()
    yield from (in_flight, connected, state, generation, resync_done, resync_total, duration)
    dirty = _gauge("dst_member_dirty_bytes", "Bytes a mirror leg must resync.", ["member"])
    for m in st.get("members", []):
        if "dirty_bytes" in m:
            dirty.add_metric([str(m.get("uri"))], _num(m.get("dirty_bytes")))
    yield dirty
    lag = _gauge("dst_async_lag_bytes", "Bytes an asynchronous leg lags behind.", ["member"])
    lag_s = _gauge(
        "dst_async_lag_seconds",
        "Age of the oldest write not yet on an asynchronous leg.",
        ["member"],
    )
    for m in st.get("members", []):
        if m.get("mode") == "async":
            lag.add_metric([str(m.get("uri"))], _num(m.get("lag_bytes")))
            lag_s.add_metric([str(m.get("uri"))], _num(m.get("lag_seconds")))
    yield lag
    yield lag_s
    dev = st.get("device") or {}
    size = _gauge("dst_device_size_bytes", "Size of the assembled device.", [])
    size.add_metric([], _num(dev.get("size")))
    yield size
    dstate = _gauge("dst_device_state", "1 for the device's current state.", ["state"])
    for s in STATES:
        dstate.add_metric([s], 1.0 if dev.get("state") == s else 0.0)
    yield dstate
    for key, name, doc in (
        ("degrades", "dst_mirror_degrades_total", "Times a mirror leg was degraded."),
        ("repairs", "dst_mirror_repairs_total", "Read errors fixed by rewriting from another leg."),
    ):
        if key in dev:
            fam = _counter(name, doc, [])
            fam.add_metric([], _num(dev.get(key)))
            yield fam
    fconn = _gauge("dst_frontend_connections", "Open front-end connections.", ["frontend"])
    freq = _counter(
        "dst_frontend_requests_total", "Requests a front end served.", ["frontend", "op"]
    )
    for f in st.get("frontends", []):
        kind = str(f.get("kind"))
        fconn.add_metric([kind], _num(f.get("connections_open")))
        for op, n in (f.get("requests") or {}).items():
            freq.add_metric([kind, op], _num(n))
    yield fconn
    yield freq


def _le(v: Any) -> str:
    return repr(float(v))


def export_metrics(st: dict[str, Any]) -> Iterator[Metric]:
    """Families for an export node, labelled by export name."""
    requests = _counter("dst_requests_total", "Requests an export executed.", ["export", "op"])
    nbytes = _counter("dst_bytes_total", "Bytes an export read or wrote.", ["export", "op"])
    errors = _counter("dst_request_errors_total", "Requests that failed.", ["export"])
    size = _gauge("dst_export_size_bytes", "Size of the export.", ["export"])
    alloc = _gauge("dst_export_allocated_bytes", "Bytes allocated to a file export.", ["export"])
    fs_size = _gauge("dst_filesystem_size_bytes", "Size of the filesystem under it.", ["export"])
    fs_free = _gauge("dst_filesystem_free_bytes", "Free space of the filesystem.", ["export"])
    sessions = _gauge("dst_sessions", "Connected sessions.", ["export"])
    rbd = _gauge(
        "dst_export_rbd_info",
        "1 for an export on a Ceph RBD image.",
        ["export", "pool", "image", "cluster"],
    )
    served = _counter(
        "dst_session_requests_total", "Requests served to a session.", ["export", "client"]
    )
    for e in st.get("exports", []):
        name = str(e.get("name"))
        stats = e.get("statistics") or {}
        for key, op in EXPORT_OPS.items():
            requests.add_metric([name, op], _num(stats.get(key)))
        nbytes.add_metric([name, "read"], _num(stats.get("bytes_read")))
        nbytes.add_metric([name, "write"], _num(stats.get("bytes_written")))
        errors.add_metric([name], _num(stats.get("errors")))
        size.add_metric([name], _num(e.get("size")))
        fs = e.get("filesystem")
        if isinstance(fs, dict):
            alloc.add_metric([name], _num(fs.get("allocated")))
            fs_size.add_metric([name], _num(fs.get("size")))
            fs_free.add_metric([name], _num(fs.get("free")))
        backend = stats.get("backend") or {}
        if backend.get("kind") == "rbd":
            where = [str(backend.get(k)) for k in ("pool", "image", "cluster")]
            rbd.add_metric([name, *where], 1.0)
        sessions.add_metric(
            [name],
            float(
                sum(
                    1
                    for s in st.get("sessions", [])
                    if s.get("export") == name and s.get("connected")
                )
            ),
        )
    for s in st.get("sessions", []):
        served.add_metric([str(s.get("export")), str(s.get("client_id"))], _num(s.get("requests")))
    yield from (requests, nbytes, errors, size, alloc, fs_size, fs_free, sessions, rbd, served)
    enospc = _counter("dst_enospc_total", "Writes refused with ENOSPC by a backend.", [])
    enospc.add_metric([], _num(st.get("enospc")))
    conns = _gauge("dst_connections", "Open client connections.", [])
    conns.add_metric([], _num(st.get("connections")))
    yield enospc
    yield conns


def make_registry(status: StatusFn) -> CollectorRegistry:
    """A private registry: the node's families plus the standard process_* ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    ProcessCollector(registry=registry)
    return registry


def render(status: StatusFn) -> bytes:
    """The Prometheus text exposition of one status document."""
    return generate_latest(make_registry(status))


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on the node's event loop; one response per connection."""

    def __init__(self, address: Address, status: StatusFn) -> None:
        self.requested = address
        self.address = address
        self.registry = make_registry(status)
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        if self.address.path is not None:
            return f"http+unix:{self.address.path}/metrics"
        return f"http://{self.address}/metrics"

    def bind(self) -> Address:
        """Take the address now (a node binds before it does anything else); :meth:`start`
        serves it."""
        if self._sock is None:
            self._sock = bind_listener(self.requested, "serve metrics")
            self.address = bound_address(self._sock, self.requested)
        return self.address

    async def start(self) -> Address:
        """Serve (binding first if needed); logs ``serving metrics on URL`` with the real port."""
        self.bind()
        sock, self._sock = self._sock, None
        assert sock is not None
        try:
            if sock.family == socket.AF_UNIX:
                self._server = await asyncio.start_unix_server(self._on_client, sock=sock)
            else:
                self._server = await asyncio.start_server(self._on_client, sock=sock)
        except BaseException:
            sock.close()
            unlink_unix(self.requested)
            raise
        log.info("serving metrics on %s", self.url)
        return self.address

    def release(self) -> None:
        """Give up an address that was bound but never served (the node did not start)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            unlink_unix(self.requested)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            if len(head) > MAX_REQUEST_HEAD:
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) < 2:
                await self._reply(writer, 400, b"bad request\n")
                return
            method, path = parts[0], parts[1].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._reply(writer, 405, b"only GET\n", extra="Allow: GET, HEAD\r\n")
            elif path in ("/metrics", "/"):
                body = generate_latest(self.registry)
                await self._reply(writer, 200, body, CONTENT_TYPE, head_only=method == "HEAD")
            else:
                await self._reply(writer, 404, b"not found; metrics are at /metrics\n")
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
            OSError,
        ):
            pass
        except Exception:
            log.exception("metrics request failed")
            with contextlib.suppress(Exception):
                await self._reply(writer, 500, b"internal error; see the node's log\n")
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter,
        code: int,
        body: bytes,
        ctype: str = "text/plain; charset=utf-8",
        *,
        extra: str = "",
        head_only: bool = False,
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head = (
            f"HTTP/1.1 {code} {reason.get(code, 'Internal Server Error')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + (b"" if head_only else body))
        await writer.drain()

    async def aclose(self) -> None:
        self.release()
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for w in list(self._writers):
            w.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)
        unlink_unix(self.requested)
