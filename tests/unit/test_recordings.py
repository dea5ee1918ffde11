"""The hand-made recordings of LAB.md steps 3, 6 and 7, replayed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tracer.errors import UsageError
from tracer.events import Event
from tracer.path import (
    Probe,
    Recording,
    assemble,
    exit_code,
    load_recording,
    save_recording,
)

DATA = Path(__file__).parent.parent / "data"

MASQUERADE = {
    "netns": "host",
    "hook": "POSTROUTING",
    "dir": "request",
    "field": "src",
    "from": "11.11.11.2",
    "to": "10.0.2.15",
}
REVERSE_NAT = {
    "netns": "host",
    "hook": "PREROUTING",
    "dir": "reply",
    "field": "dst",
    "from": "10.0.2.15",
    "to": "11.11.11.2",
}


def hits(*spec: str) -> list[dict]:
    """hooks_hit entries from "netns HOOK dir" strings (family ip)."""
    out = []
    for item in spec:
        netns, hook, direction = item.split()
        out.append({"netns": netns, "hook": hook, "dir": direction, "family": "ip"})
    return out


REQUEST_HITS = hits(
    "RED OUTPUT request",
    "RED POSTROUTING request",
    "host PREROUTING request",
    "host FORWARD request",
    "host POSTROUTING request",
    "internet PREROUTING request",
    "internet INPUT request",
    "internet OUTPUT reply",
    "internet POSTROUTING reply",
    "host PREROUTING reply",
    "host FORWARD reply",
)

CASES = [
    pytest.param(
        "step6-masquerade-reply-dropped.json",
        {
            "outcome": "dropped",
            "drop": {
                "netns": "host",
                "hook": "FORWARD",
                "dev": "eth0",
                "dir": "reply",
                "reason": "NETFILTER_DROP",
                "rule": None,
            },
            "nat": [MASQUERADE, REVERSE_NAT],
            "hooks_hit": REQUEST_HITS,
        },
        1,
        id="step6",
    ),
    pytest.param(
        "step7-reply.json",
        {
            "outcome": "reply",
            "drop": None,
            "nat": [MASQUERADE, REVERSE_NAT],
            "hooks_hit": REQUEST_HITS
            + hits("host POSTROUTING reply", "RED PREROUTING reply", "RED INPUT reply"),
        },
        0,
        id="step7",
    ),
    pytest.param(
        "step3-no-route.json",
        {"outcome": "unreachable", "drop": None, "nat": [], "hooks_hit": []},
        1,
        id="step3",
    ),
]


@pytest.mark.parametrize(("name", "expected", "code"), CASES)
def test_recording_replays_to_expected_result(name, expected, code):
    result = load_recording(DATA / name).assemble()
    got = result.to_json()
    assert {key: got[key] for key in expected} == expected
    assert exit_code(result) == code == result.exit_code()


def test_step6_source_is_learned_from_the_events():
    result = load_recording(DATA / "step6-masquerade-reply-dropped.json").assemble()
    assert result.probe.src == "11.11.11.2"


def test_step7_benign_free_stays_in_hops_as_free():
    result = load_recording(DATA / "step7-reply.json").assemble()
    last = result.hops[-1]
    assert (last["event"], last["reason"], last["netns"]) == (
        "free",
        "NO_SOCKET",
        "RED",
    )
    assert all(hop["event"] != "drop" for hop in result.hops)


def test_step3_route_error_is_named():
    result = load_recording(DATA / "step3-no-route.json").assemble()
    (hop,) = result.hops
    assert hop["event"] == "route"
    assert hop["error"] == "ENETUNREACH"
    assert hop["table"] == 254


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    "name", ["step6-masquerade-reply-dropped.json", "step7-reply.json"]
)
def test_order_of_events_does_not_matter(name, seed):
    recording = load_recording(DATA / name)
    shuffled = list(recording.events)
    random.Random(seed).shuffle(shuffled)
    assert shuffled != recording.events
    again = recording._replace(events=shuffled).assemble()
    assert again.to_json() == recording.assemble().to_json()


def test_recording_round_trip_keeps_icmp_type_zero(tmp_path):
    recording = load_recording(DATA / "step7-reply.json")
    save_recording(tmp_path / "again.json", recording)
    again = load_recording(tmp_path / "again.json")
    assert again == recording
    assert any(e.icmp_type == 0 for e in again.events)


def test_recording_round_trip_of_a_fresh_recording(tmp_path):
    probe = Probe(src_netns="BLUE", dst="11.11.11.2", proto="udp", dport=53)
    event = Event(kind="rx", t_ns=7, netns="host", dev="beth1", icmp_type=0)
    recording = Recording(probe, [event], reply=None, lost_events=3)
    save_recording(tmp_path / "r.json", recording)
    assert load_recording(tmp_path / "r.json") == recording


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"format": "something-else", "version": 1}',
        '{"format": "nstrace-recording", "version": 2}',
        '{"format": "nstrace-recording", "version": 1, "events": []}',
    ],
)
def test_bad_recordings_are_refused_with_a_usage_error(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UsageError, match="bad.json"):
        load_recording(path)


def test_assemble_takes_the_recording_fields():
    recording = load_recording(DATA / "step6-masquerade-reply-dropped.json")
    direct = assemble(recording.probe, recording.events, lost_events=0)
    assert direct.to_json() == recording.assemble().to_json()
