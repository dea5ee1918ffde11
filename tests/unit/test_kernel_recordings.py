"""Replays of traces recorded from the real kernel on the tutorial's lab.

Made with `nstrace ping RED ... --record tests/data/kernel-stepN.json` at
steps 0, 5, 6 and 7 (kernel 6.18). They hold what the BPF probes really
emit, in the order and with the noise the kernel produces (ARP, local-table
look-ups, neighbour updates), so path assembly is tested on real input
without root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tracer.path import TraceResult, load_recording

DATA = Path(__file__).parent.parent / "data"


def replay(step: int) -> TraceResult:
    return load_recording(DATA / f"kernel-step{step}.json").assemble()


def hooks(result: TraceResult, netns: str, direction: str) -> list[str]:
    return [
        hit["hook"]
        for hit in result.hooks_hit
        if hit["netns"] == netns and hit["dir"] == direction
    ]


def test_step0_bridged_ping_crosses_host_forward_both_ways():
    result = replay(0)
    assert result.outcome == "reply"
    assert result.drop is None
    assert hooks(result, "host", "request").count("FORWARD") == 1
    assert hooks(result, "host", "reply").count("FORWARD") == 1
    # Bridged, not routed: no NAT and no host route lookup for BLUE.
    assert result.nat == []


def test_step5_request_leaves_untranslated_and_internet_cannot_answer():
    result = replay(5)
    assert result.outcome == "no-reply"
    assert result.drop is None
    sent = [
        hop
        for hop in result.hops
        if (hop["netns"], hop["event"], hop["dev"]) == ("host", "tx", "eth0")
    ]
    assert sent and sent[0]["src"] == "11.11.11.2"
    failed = [
        hop
        for hop in result.hops
        if hop["event"] == "route" and hop["netns"] == "internet" and hop.get("error")
    ]
    assert failed and failed[0]["dst"] == "11.11.11.2"


def test_step6_reply_dropped_at_forward_after_both_nat_rewrites():
    result = replay(6)
    assert result.outcome == "dropped"
    drop = result.drop
    assert drop is not None
    assert (drop["netns"], drop["hook"], drop["dir"], drop["reason"]) == (
        "host",
        "FORWARD",
        "reply",
        "NETFILTER_DROP",
    )
    rewrites = {
        (n["hook"], n["dir"], n["field"], n["from"], n["to"]) for n in result.nat
    }
    assert rewrites == {
        ("POSTROUTING", "request", "src", "11.11.11.2", "10.0.2.15"),
        ("PREROUTING", "reply", "dst", "10.0.2.15", "11.11.11.2"),
    }


def test_step7_reply_reaches_red_and_its_free_is_benign():
    result = replay(7)
    assert result.outcome == "reply"
    assert result.drop is None
    assert "INPUT" in hooks(result, "RED", "reply")
    frees = [hop for hop in result.hops if hop["event"] in ("free", "drop")]
    assert frees and all(hop["event"] == "free" for hop in frees)
    assert any(hop.get("reason") == "NO_SOCKET" for hop in frees)


@pytest.mark.parametrize("step", [0, 5, 6, 7])
def test_every_hop_is_in_a_namespace_of_the_lab(step):
    lab = {"host", "RED", "BLUE", "internet", "laptop"}
    result = replay(step)
    assert {hop["netns"] for hop in result.hops} <= lab
    assert result.lost_events == 0
