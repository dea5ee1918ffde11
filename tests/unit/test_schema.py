"""The JSON document matches DESIGN.md's schema 1, key for key and type for type."""

from __future__ import annotations

import json

import pytest
from eventkit import PROBE, Clock, icmp, request_to_internet, step6_events, step7_events

from tracer import events as ev
from tracer.path import Probe, TraceResult, assemble
from tracer.render import render_json

TOP_KEYS = [
    "schema",
    "probe",
    "outcome",
    "hops",
    "hooks_hit",
    "drop",
    "nat",
    "causes",
    "lost_events",
    "snapshot",
]
HOP_KEYS = ["netns", "dev", "event", "hook", "dir", "src", "dst", "t_ns"]
OPTIONAL_HOP_KEYS = {
    "after",
    "reason",
    "error",
    "table",
    "gateway",
    "oif",
    "neigh",
    "in_dev",
    "out_dev",
    "passed",
    "icmp_error",
}
HOOKS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING", None}
OPTIONAL_STR = (str, type(None))

RESULTS = {
    "dropped": lambda: assemble(PROBE, step6_events(), lost_events=2),
    "reply": lambda: assemble(
        PROBE,
        step7_events(),
        reply={"src": "8.8.8.8", "dst": "11.11.11.2", "icmp_type": 0, "icmp_code": 0},
    ),
    "no-reply": lambda: assemble(PROBE, request_to_internet(Clock())),
    "unreachable": lambda: assemble(PROBE, [], send_error="ENETUNREACH"),
}


@pytest.fixture(params=sorted(RESULTS))
def document(request) -> dict:
    # Through the JSON text, as a program reading `nstrace ping --json` would.
    return json.loads(render_json(RESULTS[request.param]()))


def test_top_level_keys_in_schema_order(document):
    assert list(document) == TOP_KEYS
    assert document["schema"] == 1
    assert document["causes"] == []
    assert document["snapshot"] is None
    assert isinstance(document["lost_events"], int)
    assert document["outcome"] in ("reply", "dropped", "no-reply", "unreachable")


def test_probe_keys_and_types(document):
    probe = document["probe"]
    assert list(probe) == ["src_netns", "src", "dst", "proto", "id"]
    assert probe["src_netns"] == "RED"
    assert probe["proto"] == "icmp"
    assert probe["id"] == 0x1A2B
    assert isinstance(probe["dst"], str)
    assert isinstance(probe["src"], OPTIONAL_STR)


def test_hops_keys_and_types(document):
    for hop in document["hops"]:
        assert list(hop)[: len(HOP_KEYS)] == HOP_KEYS
        assert set(hop) - set(HOP_KEYS) <= OPTIONAL_HOP_KEYS, hop
        assert isinstance(hop["netns"], str)
        assert isinstance(hop["dev"], OPTIONAL_STR)
        assert hop["event"] in ("rx", "tx", "hook", "route", "neigh", "drop", "free")
        assert hop["hook"] in HOOKS
        assert hop["dir"] in ("request", "reply")
        assert isinstance(hop["src"], OPTIONAL_STR)
        assert isinstance(hop["dst"], OPTIONAL_STR)
        assert isinstance(hop["t_ns"], int)


def test_hops_are_in_time_order(document):
    stamps = [hop["t_ns"] for hop in document["hops"]]
    assert stamps == sorted(stamps)


def test_hooks_hit_keys_and_types(document):
    for hit in document["hooks_hit"]:
        assert list(hit) == ["netns", "hook", "dir", "family"]
        assert hit["hook"] in HOOKS - {None}
        assert hit["dir"] in ("request", "reply")
        assert hit["family"] in ("ip", "bridge")


def test_nat_keys_and_types(document):
    for entry in document["nat"]:
        assert list(entry) == ["netns", "hook", "dir", "field", "from", "to"]
        assert entry["field"] in ("src", "dst")
        assert isinstance(entry["from"], str) and isinstance(entry["to"], str)


def test_drop_keys_and_types(document):
    drop = document["drop"]
    if document["outcome"] != "dropped":
        assert drop is None
        return
    assert list(drop) == ["netns", "hook", "dev", "dir", "reason", "rule"]
    assert drop["hook"] in HOOKS
    assert isinstance(drop["reason"], str)
    assert drop["rule"] is None


def test_tcp_probe_also_carries_its_ports():
    probe = Probe(src_netns="RED", dst="8.8.8.8", proto="tcp", dport=80, sport=4000)
    document = assemble(probe, []).to_json()
    assert list(document["probe"]) == [
        "src_netns",
        "src",
        "dst",
        "proto",
        "id",
        "dport",
        "sport",
    ]
    assert (document["probe"]["dport"], document["probe"]["sport"]) == (80, 4000)


def test_render_json_is_stable_and_indented():
    first = render_json(RESULTS["dropped"]())
    assert first == render_json(RESULTS["dropped"]())
    assert first.startswith('{\n  "schema": 1,\n  "probe": {\n    "src_netns"')


def test_to_json_does_not_share_state_with_the_result():
    result = RESULTS["dropped"]()
    document = result.to_json()
    document["hops"][0]["netns"] = "changed"
    document["nat"].clear()
    assert result.hops[0]["netns"] != "changed"
    assert result.nat


def test_json_reads_back_into_an_equal_document():
    document = RESULTS["dropped"]().to_json()
    assert TraceResult.from_json(document).to_json() == document


def test_json_of_another_schema_is_refused():
    from tracer.errors import UsageError

    document = RESULTS["dropped"]().to_json()
    document["schema"] = 2
    with pytest.raises(UsageError, match="schema 2"):
        TraceResult.from_json(document)


def test_error_result_json_has_the_message_after_the_schema_keys():
    document = TraceResult.failed(PROBE, "probes could not attach").to_json()
    assert list(document) == [*TOP_KEYS, "error"]
    assert document["outcome"] == "error"
    assert document["error"] == "probes could not attach"


def test_hop_with_every_optional_key_serialises():
    c = Clock()
    event = icmp(
        ev.RX,
        c(),
        "host",
        "10.0.2.2",
        "10.0.2.15",
        icmp_type=3,
        icmp_code=1,
        inner_src="10.0.2.15",
        inner_dst="8.8.8.8",
    )
    document = json.loads(render_json(assemble(PROBE, [event])))
    assert document["hops"][0]["icmp_error"]["inner_dst"] == "8.8.8.8"
