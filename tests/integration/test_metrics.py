"""`--metrics HOST:PORT`: Prometheus text format that agrees with a known workload."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_control import (
    FAST,
    READ_LEN,
    READS,
    WRITE_LEN,
    WRITES,
    error_line,
    status,
    workload,
)
from tests.procs import Proc, Procs, dst_run, member_uri, nbdsh

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_url(p: Proc) -> str:
    return p.wait_for(r"serving metrics on (http://\S+)").group(1)


def scrape(url: str) -> tuple[Samples, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
        ctype = r.headers["Content-Type"]
    out: Samples = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out, ctype


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_reflect_a_known_workload(procs: Procs, sockdir: Path) -> None:
    exp, addr = procs.export(
        f"file:{sockdir}/d.img",
        "--size",
        "16M",
        "--metrics",
        "127.0.0.1:0",
        listen=f"unix:{sockdir}/e.sock",
    )
    att, uri = procs.attach(member_uri(addr), "--metrics", "127.0.0.1:0", "--client-id", "m")
    workload(uri)
    member = member_uri(addr)

    a, ctype = scrape(metrics_url(att))
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    assert value(a, "dst_requests_total", member=member, op="write") == WRITES
    assert value(a, "dst_requests_total", member=member, op="read") == READS
    assert value(a, "dst_requests_total", member=member, op="flush") == 0
    assert value(a, "dst_bytes_total", member=member, op="write") == WRITES * WRITE_LEN
    assert value(a, "dst_bytes_total", member=member, op="read") == READS * READ_LEN
    assert value(a, "dst_resends_total", member=member) == 0
    assert value(a, "dst_reconnects_total", member=member) == 0
    assert value(a, "dst_member_connected", member=member) == 1
    assert value(a, "dst_member_state", member=member, state="connected") == 1
    assert value(a, "dst_requests_in_flight", member=member) == 0
    h = "dst_request_duration_seconds"
    assert value(a, f"{h}_count", member=member, op="write") == WRITES
    assert value(a, f"{h}_bucket", member=member, op="write", le="+Inf") == WRITES
    assert value(a, f"{h}_bucket", member=member, op="read", le="60.0") == READS
    assert 0 < value(a, f"{h}_sum", member=member, op="write") < WRITES * 5
    assert value(a, "dst_device_size_bytes") == 16 << 20
    assert value(a, "dst_frontend_requests_total", frontend="nbd", op="write") == WRITES
    assert value(a, "process_resident_memory_bytes") > 0

    e, _ = scrape(metrics_url(exp))
    assert value(e, "dst_requests_total", export="default", op="write") == WRITES
    assert value(e, "dst_requests_total", export="default", op="read") == READS
    assert value(e, "dst_bytes_total", export="default", op="write") == WRITES * WRITE_LEN
    assert value(e, "dst_bytes_total", export="default", op="read") == READS * READ_LEN
    assert value(e, "dst_session_requests_total", export="default", client="m") == WRITES + READS
    assert value(e, "dst_sessions", export="default") == 1
    assert value(e, "dst_export_size_bytes", export="default") == 16 << 20
    assert value(e, "dst_filesystem_free_bytes", export="default") > 0
    assert value(e, "dst_enospc_total") == 0

    base = metrics_url(att).removesuffix("/metrics")
    assert http_error(base + "/nothing") == 404
    assert http_error(urllib.request.Request(base + "/metrics", b"x")) == 405


def http_error(req: str | urllib.request.Request) -> int:
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as err:
        err.close()
        return err.code
    raise AssertionError("the request succeeded")


def test_resends_and_reconnects_show_after_an_export_node_restart(
    procs: Procs, sockdir: Path
) -> None:
    listen = f"unix:{sockdir}/e.sock"
    export_args = (f"file:{sockdir}/d.img", "--size", "16M")
    exp, addr = procs.export(*export_args, listen=listen)
    actl = sockdir / "a.ctl"
    att, uri = procs.attach(
        member_uri(addr),
        *FAST,
        "--resend-timeout",
        "0.3",
        "--ping-interval",
        "0.5",
        "--ping-timeout",
        "0.5",
        "--control",
        str(actl),
        "--metrics",
        "127.0.0.1:0",
    )
    workload(uri)
    exp.signal(signal.SIGSTOP)  # the write is sent but never acked: it is resent
    writer = subprocess.Popen(
        [*nbdsh(), "-u", uri, "-c", "h.pwrite(b'\\x77' * 4096, 8192)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while status(actl)["members"][0]["resends"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        exp.kill()
        procs.export(*export_args, listen=listen)
        _, err = writer.communicate(timeout=20)
        assert writer.returncode == 0, err
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(5)
    att.wait_for("reconnected", timeout=10)
    m = status(actl)["members"][0]
    assert m["state"] == "connected" and m["reconnects"] >= 1 and m["resends"] >= 1
    assert m["generation"] >= 2 and m["failed"] == 0
    samples, _ = scrape(metrics_url(att))
    member = member_uri(addr)
    assert value(samples, "dst_reconnects_total", member=member) == m["reconnects"]
    assert value(samples, "dst_resends_total", member=member) >= m["resends"]
    assert value(samples, "dst_requests_total", member=member, op="write") == WRITES + 1
    assert (sockdir / "d.img").read_bytes()[8192 : 8192 + 4096] == b"\x77" * 4096
    assert att.stop() == 0


def test_metrics_address_errors(procs: Procs, sockdir: Path) -> None:
    cp = dst_run("export", "--listen", f"unix:{sockdir}/e.sock", "memory:1M", "--metrics", "::1:5")
    assert cp.returncode == 2 and "--metrics address" in error_line(cp.stderr)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cp = dst_run(
            "export",
            "--listen",
            f"unix:{sockdir}/e.sock",
            "memory:1M",
            "--metrics",
            f"127.0.0.1:{port}",
        )
    assert cp.returncode == 1 and "address in use" in error_line(cp.stderr)
    assert not (sockdir / "e.sock").exists()


def test_metric_names_follow_prometheus_conventions() -> None:
    from dst.metrics import render

    member = {
        "uri": "dst://n1/default",
        "state": "reconnecting",
        "requests": {"write": 2},
        "latency": {"write": {"count": 2, "sum": 0.5, "buckets": [[0.1, 1], [1.0, 2]]}},
        "resync": {"bytes_done": 10, "bytes_total": 40, "rate": 5.0, "eta": 6.0},
    }
    text = render(lambda: {"role": "attach", "members": [member], "device": {"size": 1}})
    types = {}
    for line in text.decode().splitlines():
        if line.startswith("# TYPE dst_"):
            _, _, name, kind = line.split()
            types[name] = kind
    for name, kind in types.items():
        assert name.startswith("dst_") and name == name.lower()
        assert (kind == "counter") == name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    for needed in (
        "dst_requests_total",
        "dst_bytes_total",
        "dst_resends_total",
        "dst_reconnects_total",
        "dst_request_duration_seconds",
    ):
        assert needed in types, needed
    assert types["dst_request_duration_seconds"] == "histogram"
    assert 'dst_member_state{member="dst://n1/default",state="reconnecting"} 1.0' in text.decode()
    assert 'dst_resync_done_bytes{member="dst://n1/default"} 10.0' in text.decode()
