"""`nstrace ping --json` on the tutorial's sandbox, step by step (LAB.md).

Each test moves the shared lab to a step, runs the real command (real eBPF,
real namespaces, real iptables) and checks the JSON document and the exit
code against what LAB.md says that step must produce.
"""

from __future__ import annotations

import pytest
from cli_helpers import hooks, hops, nstrace, ping_json

pytestmark = pytest.mark.root


def test_start_red_to_blue_crosses_host_forward_both_ways(lab):
    lab.goto(0)
    result = ping_json("RED", "11.11.11.3")
    assert result["outcome"] == "reply"
    assert result["drop"] is None
    assert "FORWARD" in hooks(result, "host", "request")
    assert "FORWARD" in hooks(result, "host", "reply")
    assert result["lost_events"] == 0


def test_step1_host_to_red_leaves_by_eth0_not_br0(lab):
    lab.goto(1)
    result = ping_json("host", "11.11.11.2")
    assert result["outcome"] != "reply"
    assert hops(result, netns="host", event="tx", dev="eth0", dir="request")
    assert not hops(result, netns="host", event="tx", dev="br0")


def test_step3_red_to_eth1_is_unreachable_with_route_error(lab):
    lab.goto(3)
    result = ping_json("RED", "192.168.104.2")
    assert result["outcome"] == "unreachable"
    routes = hops(result, netns="RED", event="route")
    assert routes and all(route.get("error") for route in routes)
    # Nothing left RED: the kernel refused the probe before building a packet.
    assert not hops(result, event="tx")


def test_step4_red_to_eth1_is_local_delivery_not_forwarding(lab):
    lab.goto(4)
    result = ping_json("RED", "192.168.104.2")
    assert result["outcome"] == "reply"
    request = hooks(result, "host", "request")
    assert "PREROUTING" in request and "INPUT" in request
    assert "FORWARD" not in hooks(result, "host", "request")
    assert "FORWARD" not in hooks(result, "host", "reply")


def test_step5_request_leaves_eth0_untranslated(lab):
    lab.goto(5)
    result = ping_json("RED", "8.8.8.8")
    # Nothing drops it: the internet answers, but cannot route the answer.
    assert result["outcome"] == "no-reply"
    assert result["drop"] is None
    sent = hops(result, netns="host", event="tx", dev="eth0", dir="request")
    assert sent and sent[0]["src"] == "11.11.11.2"
    assert not [entry for entry in result["nat"] if entry["field"] == "src"]


def test_step6_reply_dropped_at_host_forward_after_nat(lab):
    lab.goto(6)
    result = ping_json("RED", "8.8.8.8")
    assert result["outcome"] == "dropped"
    drop = result["drop"]
    assert (drop["netns"], drop["hook"], drop["dir"], drop["reason"]) == (
        "host",
        "FORWARD",
        "reply",
        "NETFILTER_DROP",
    )
    nat = [
        (n["netns"], n["hook"], n["dir"], n["field"], n["from"], n["to"])
        for n in result["nat"]
    ]
    assert ("host", "POSTROUTING", "request", "src", "11.11.11.2", "10.0.2.15") in nat
    assert ("host", "PREROUTING", "reply", "dst", "10.0.2.15", "11.11.11.2") in nat


@pytest.mark.parametrize("src", ["RED", "BLUE"])
def test_step7_both_reach_the_internet_and_no_false_drop(lab, src):
    lab.goto(7)
    result = ping_json(src, "8.8.8.8")
    assert result["outcome"] == "reply"
    assert result["drop"] is None
    assert "FORWARD" in hooks(result, "host", "reply")
    # The reply reached the source namespace's INPUT hook.
    assert "INPUT" in hooks(result, src, "reply")


def test_text_output_ends_with_the_verdict(lab):
    lab.goto(6)
    done = nstrace("ping", "RED", "8.8.8.8")
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("RED -> 8.8.8.8")
    # The verdict, then the cause, its evidence and the fix (tests/explain).
    verdict = next(line for line in lines if line.startswith("dropped"))
    assert "FORWARD" in verdict
    assert lines[-1].startswith("fix: iptables -t filter -A FORWARD")


def test_unknown_namespace_is_a_one_line_error():
    done = nstrace("ping", "NO-SUCH-NS", "8.8.8.8")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "NO-SUCH-NS does not exist" in done.stderr
    assert "Traceback" not in done.stderr
