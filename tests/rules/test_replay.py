"""Path assembly and rendering of rule verdicts, replayed from real traces.

tests/rules/data/recording-*.json were made with `nstrace ping RED ...
--record FILE` on the tutorial lab (kernel 6.18): step 0 (RED -> 11.11.11.3
across br0), step 6 (RED -> 8.8.8.8, the reply dropped by the FORWARD
policy) and step 6 with `iptables -A FORWARD -d 11.11.11.0/24 -j DROP`. They
hold the probes' events, the bridge events placed by rule attribution, and
its verdicts.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from tracer import render
from tracer.path import TraceResult, load_recording, recording_to_json
from tracer.rules import RuleVerdict

DATA = Path(__file__).parent / "data"
ACCEPT_SOURCES = "-A FORWARD -s 11.11.11.0/24 -j ACCEPT"


def replay(name: str) -> TraceResult:
    return load_recording(DATA / f"recording-{name}.json").assemble()


def hook_hop(result: TraceResult, netns: str, hook: str, direction: str) -> dict:
    (hop,) = [
        h
        for h in result.hops
        if (h["event"], h["netns"], h["hook"], h["dir"])
        == ("hook", netns, hook, direction)
    ]
    return hop


def text_of(result: TraceResult) -> str:
    out = io.StringIO()
    render.render_text(result, Console(file=out, width=100, no_color=True))
    return out.getvalue()


def test_policy_drop_fills_drop_rule_and_the_hook_hop():
    result = replay("step6")
    assert result.outcome == "dropped"
    policy = {
        "family": "ip",
        "table": "filter",
        "chain": "FORWARD",
        "policy": True,
        "verdict": "drop",
        "text": "-P FORWARD DROP",
    }
    assert result.drop is not None and result.drop["rule"] == policy
    assert hook_hop(result, "host", "FORWARD", "reply")["rule"] == policy
    assert hook_hop(result, "host", "FORWARD", "request")["rule"]["text"] == (
        ACCEPT_SOURCES
    )
    # No rule where no table of anyone's but nstrace's has a chain.
    assert "rule" not in hook_hop(result, "host", "PREROUTING", "reply")


def test_rule_drop_fills_drop_rule():
    result = replay("step6-rule-drop")
    assert result.drop is not None
    rule = result.drop["rule"]
    assert (rule["policy"], rule["verdict"], rule["text"]) == (
        False,
        "drop",
        "-A FORWARD -d 11.11.11.0/24 -j DROP",
    )


def test_bridge_hooks_in_hooks_hit_in_kernel_order():
    result = replay("step0")
    hits = [
        (h["family"], h["hook"])
        for h in result.hooks_hit
        if h["netns"] == "host" and h["dir"] == "request"
    ]
    assert hits == [
        ("bridge", "PREROUTING"),
        ("ip", "PREROUTING"),
        ("bridge", "FORWARD"),
        ("ip", "FORWARD"),
        ("bridge", "POSTROUTING"),
        ("ip", "POSTROUTING"),
    ]
    bridge = [h for h in result.hops if h["event"] == "bridge"]
    forward = [h for h in bridge if h["hook"] == "FORWARD" and h["dir"] == "request"]
    assert forward[0]["in_dev"] == "reth1" and forward[0]["out_dev"] == "beth1"


def test_verdicts_survive_a_recording_round_trip():
    recording = load_recording(DATA / "recording-step6.json")
    data = recording_to_json(recording)
    assert len(data["verdicts"]) == 3
    assert all(isinstance(v, RuleVerdict) for v in recording.verdicts)


def test_without_verdicts_nothing_is_made_up():
    recording = load_recording(DATA / "recording-step6.json")
    result = recording._replace(verdicts=()).assemble()
    assert result.drop is not None and result.drop["rule"] is None
    assert not [h for h in result.hops if "rule" in h and h["event"] == "hook"]


def test_json_keeps_schema_1_drop_keys():
    drop = replay("step6").to_json()["drop"]
    assert set(drop) == {"netns", "hook", "dev", "dir", "reason", "rule"}
    assert set(drop["rule"]) == {
        "family",
        "table",
        "chain",
        "policy",
        "verdict",
        "text",
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("step6", "drop   ip filter FORWARD policy: -P FORWARD DROP"),
        ("step6", f"accept ip filter FORWARD: {ACCEPT_SOURCES}"),
        (
            "step6-rule-drop",
            "drop   ip filter FORWARD: -A FORWARD -d 11.11.11.0/24 -j DROP",
        ),
        ("step0", "bridge FORWARD  reth1 -> beth1"),
    ],
)
def test_text_shows_rules_under_their_hops(name, expected):
    assert expected in text_of(replay(name))


def test_the_dropping_rule_is_shown_once():
    text = text_of(replay("step6"))
    assert text.count("ip filter FORWARD policy: -P FORWARD DROP") == 1


def test_outcome_line_names_the_chain_and_policy():
    line = render.outcome_line(replay("step6")).plain
    assert line == (
        "dropped in host at FORWARD, reply direction, by filter FORWARD policy"
    )
    line = render.outcome_line(replay("step6-rule-drop")).plain
    assert line.endswith("by filter FORWARD rule")


def test_a_bridge_family_drop_is_placed_at_its_bridge_hook():
    # recording-step0-bridge-drop.json: step 0 with a bridge-family table
    # `filter`, chain `forward` (priority 0), rule `ip daddr 11.11.11.3 drop`.
    result = replay("step0-bridge-drop")
    assert result.outcome == "dropped"
    assert result.drop is not None
    assert (result.drop["netns"], result.drop["hook"]) == ("host", "FORWARD")
    assert result.drop["rule"] == {
        "family": "bridge",
        "table": "filter",
        "chain": "forward",
        "policy": False,
        "verdict": "drop",
        "text": "ip daddr 11.11.11.3 drop",
    }
    hits = [(h["family"], h["hook"]) for h in result.hooks_hit if h["netns"] == "host"]
    # br_netfilter ran the IPv4 PREROUTING hook before the bridge forwarded.
    assert hits == [
        ("bridge", "PREROUTING"),
        ("ip", "PREROUTING"),
        ("bridge", "FORWARD"),
    ]
    line = render.outcome_line(result).plain
    assert line.endswith("by bridge filter forward rule")
