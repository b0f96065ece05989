"""`--debug[=LIST]`: transaction events as JSON lines, one submit and one ack per request."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_control import READ_LEN, READS, WRITE_LEN, WRITES, workload
from tests.procs import Proc, Procs, member_uri

pytestmark = pytest.mark.integration

TXN_FIELDS = {"ts", "cat", "event", "member", "txn", "op", "offset", "length"}


def json_lines(p: Proc) -> list[dict[str, Any]]:
    """Every trace line of a process; any line that starts like JSON must be JSON."""
    out = []
    for line in p.output.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def run_pair(procs: Procs, tmp: Path, *debug: str, config: Path | None = None) -> tuple[Proc, Proc]:
    exp, addr = procs.export(
        f"file:{tmp}/d.img", "--size", "16M", *debug, listen=f"unix:{tmp}/e.sock"
    )
    extra = ("--config", str(config)) if config else debug
    att, uri = procs.attach(member_uri(addr), "--client-id", "tracer", *extra)
    workload(uri)
    assert att.stop() == 0 and exp.stop() == 0
    return exp, att


def check_txn_trace(att: Proc, exp: Proc) -> None:
    events = [e for e in json_lines(att) if e["cat"] == "txn"]
    submits = [e for e in events if e["event"] == "submit"]
    acks = [e for e in events if e["event"] == "ack"]
    io = [e for e in submits if e["op"] in ("read", "write")]
    assert Counter(e["op"] for e in io) == {"write": WRITES, "read": READS}
    assert {e["length"] for e in io if e["op"] == "write"} == {WRITE_LEN}
    assert {e["length"] for e in io if e["op"] == "read"} == {READ_LEN}
    # exactly one submit and one ack per transaction, the same request in both
    assert len(submits) == len(acks) == len({e["txn"] for e in submits})
    by_txn = {e["txn"]: e for e in submits}
    for ack in acks:
        s = by_txn[ack["txn"]]
        assert (ack["op"], ack["offset"], ack["length"]) == (s["op"], s["offset"], s["length"])
        assert ack["attempts"] == 1 and ack["seconds"] >= 0 and ack["ts"] >= s["ts"]
    for e in events:
        assert e.keys() >= TXN_FIELDS, e
        assert isinstance(e["ts"], float) and e["member"].startswith("dst+unix://")
    assert all("flags" in e for e in submits)
    assert not [e for e in events if e["event"] in ("fail", "resend")]

    served = [e for e in json_lines(exp) if e["cat"] == "txn" and e["event"] == "served"]
    assert len(served) == len(submits)
    assert {e["txn"] for e in served} == set(by_txn)
    assert all(e["status"] == 0 and e["client"] == "tracer" for e in served)


def test_debug_txn_gives_one_submit_and_one_ack_per_request(procs: Procs, sockdir: Path) -> None:
    exp, att = run_pair(procs, sockdir, "--debug=txn")
    check_txn_trace(att, exp)
    assert {e["cat"] for e in json_lines(att) + json_lines(exp)} == {"txn"}


def test_debug_from_the_config_file(procs: Procs, sockdir: Path) -> None:
    cfg = sockdir / "attach.toml"
    cfg.write_text(f'debug = "txn"\nnbd = "unix:{sockdir}/nbd.sock"\n')
    exp, att = run_pair(procs, sockdir, "--debug=txn", config=cfg)
    check_txn_trace(att, exp)


def test_debug_proto_only_and_off(procs: Procs, sockdir: Path) -> None:
    exp, att = run_pair(procs, sockdir, "--debug=proto")
    a, e = json_lines(att), json_lines(exp)
    assert {x["cat"] for x in a + e} == {"proto"}
    ready = [x for x in a if x["event"] == "ready"]
    assert len(ready) == 1 and ready[0]["generation"] == 1 and ready[0]["reconnect"] is False
    assert [x["event"] for x in e] == ["attached"] and e[0]["client"] == "tracer"

    off = sockdir / "off"
    off.mkdir()
    exp, att = run_pair(procs, off)
    assert json_lines(att) == [] and json_lines(exp) == []
    assert " DEBUG " not in att.output
