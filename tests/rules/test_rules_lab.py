"""Rule attribution on the tutorial's lab, through the real `nstrace ping`.

Each test moves the shared lab to a step, runs the command with real eBPF,
nftables trace tables and iptables-nft rules, and checks the JSON: the rule
or policy behind the drop, the accepting rule on the hook it let through,
the bridge family's hooks, and that nstrace's own tables are gone once the
command has ended, however it ended.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest
from cli_helpers import nstrace, ping_json

from tracer.rules import Flow, RuleTracer

pytestmark = [pytest.mark.root, pytest.mark.lab]

ACCEPT_SOURCES = "-A FORWARD -s 11.11.11.0/24 -j ACCEPT"
NOBODY = "11.11.11.99"  # in RED's subnet, owned by no one: ARP never answers


def hook_hops(result: dict[str, Any], netns: str, hook: str, direction: str) -> list:
    return [
        hop
        for hop in result["hops"]
        if (hop["event"], hop["netns"], hop["hook"], hop["dir"])
        == ("hook", netns, hook, direction)
    ]


def own_tables(lab) -> dict[str, list[str]]:
    """nstrace's tables left in each namespace of the lab."""
    left = {}
    for ns in lab.scenario.namespaces:
        listed = lab.run(ns, ["nft", "list", "tables"]).stdout.split("\n")
        left[ns] = [line for line in listed if "nstrace_" in line]
    return {ns: tables for ns, tables in left.items() if tables}


def test_step0_bridged_frames_show_the_bridge_hooks(lab):
    lab.goto(0)
    result = ping_json("RED", "11.11.11.3")
    assert result["outcome"] == "reply"
    bridge = [
        (hit["netns"], hit["hook"], hit["dir"])
        for hit in result["hooks_hit"]
        if hit["family"] == "bridge"
    ]
    for direction in ("request", "reply"):
        assert [hook for ns, hook, d in bridge if ns == "host" and d == direction] == [
            "PREROUTING",
            "FORWARD",
            "POSTROUTING",
        ]
    # br_netfilter hands the same frames to the host's FORWARD chain.
    (forward,) = hook_hops(result, "host", "FORWARD", "request")
    assert forward["rule"]["text"] == ACCEPT_SOURCES
    assert own_tables(lab) == {}


def test_step6_reply_dropped_by_the_forward_policy(lab):
    lab.goto(6)
    result = ping_json("RED", "8.8.8.8")
    assert result["outcome"] == "dropped"
    drop = result["drop"]
    assert (drop["netns"], drop["hook"], drop["dir"]) == ("host", "FORWARD", "reply")
    assert drop["rule"] == {
        "family": "ip",
        "table": "filter",
        "chain": "FORWARD",
        "policy": True,
        "verdict": "drop",
        "text": "-P FORWARD DROP",
    }
    # The request went through FORWARD on the tutorial's first rule.
    (forward,) = hook_hops(result, "host", "FORWARD", "request")
    assert forward["rule"] == {
        "family": "ip",
        "table": "filter",
        "chain": "FORWARD",
        "policy": False,
        "verdict": "accept",
        "text": ACCEPT_SOURCES,
    }
    (masquerade,) = hook_hops(result, "host", "POSTROUTING", "request")
    assert masquerade["rule"]["table"] == "nat"
    assert "MASQUERADE" in masquerade["rule"]["text"]
    assert own_tables(lab) == {}


def test_step6_text_names_the_policy(lab):
    lab.goto(6)
    done = nstrace("ping", "RED", "8.8.8.8")
    assert done.returncode == 1
    assert "ip filter FORWARD policy: -P FORWARD DROP" in done.stdout
    assert f"ip filter FORWARD: {ACCEPT_SOURCES}" in done.stdout


def test_step6_rule_drop_names_the_rule(lab):
    lab.goto(6)
    rule = ["-d", "11.11.11.0/24", "-j", "DROP"]
    lab.run("host", ["iptables", "-A", "FORWARD", *rule])
    try:
        result = ping_json("RED", "8.8.8.8")
    finally:
        lab.run("host", ["iptables", "-D", "FORWARD", *rule])
    assert result["outcome"] == "dropped"
    assert result["drop"]["hook"] == "FORWARD"
    assert result["drop"]["rule"] == {
        "family": "ip",
        "table": "filter",
        "chain": "FORWARD",
        "policy": False,
        "verdict": "drop",
        "text": "-A FORWARD -d 11.11.11.0/24 -j DROP",
    }


def test_step7_accepting_rules_both_ways(lab):
    lab.goto(7)
    result = ping_json("RED", "8.8.8.8")
    assert result["outcome"] == "reply"
    assert result["drop"] is None
    (request,) = hook_hops(result, "host", "FORWARD", "request")
    (reply,) = hook_hops(result, "host", "FORWARD", "reply")
    assert (request["rule"]["text"], request["rule"]["verdict"]) == (
        ACCEPT_SOURCES,
        "accept",
    )
    assert reply["rule"]["text"] == "-A FORWARD -d 11.11.11.0/24 -j ACCEPT"
    assert own_tables(lab) == {}


def test_no_table_left_after_kill_9(lab):
    lab.goto(7)
    command = [sys.executable, "-m", "tracer.cli", "ping", "RED", NOBODY]
    process = subprocess.Popen(
        [*command, "--timeout", "5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not own_tables(lab) and time.monotonic() < deadline:
            assert process.poll() is None, "nstrace ended before its tables appeared"
            time.sleep(0.02)
        assert own_tables(lab), "nstrace's tables never appeared"
    finally:
        process.kill()
        process.wait(timeout=10)
    assert process.returncode == -9
    # The kernel removes an owner table when its netlink socket is released,
    # which happens as the killed process's files are closed.
    deadline = time.monotonic() + 5
    while own_tables(lab) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert own_tables(lab) == {}


def test_tables_live_exactly_as_long_as_the_tracer(lab):
    lab.goto(0)
    namespaces = list(lab.scenario.namespaces)
    tracer = RuleTracer(namespaces, Flow("icmp", 7))
    try:
        tables = own_tables(lab)
        assert sorted(tables) == sorted(namespaces)
        assert all(len(found) == 2 for found in tables.values())  # ip and bridge
        # libnftables's socket was found, so it can be released in parallel.
        assert all(len(nft._socket_fds) == 1 for nft in tracer.contexts.values())
    finally:
        tracer.close()
    assert own_tables(lab) == {}


def test_drop_in_a_user_chain_and_policy_after_a_return(lab):
    lab.goto(6)
    lab.run("host", ["iptables", "-N", "CHECKS"])
    lab.run("host", ["iptables", "-I", "FORWARD", "-j", "CHECKS"])
    try:
        lab.run(
            "host", ["iptables", "-A", "CHECKS", "-d", "11.11.11.0/24", "-j", "DROP"]
        )
        dropped = ping_json("RED", "8.8.8.8")
        lab.run("host", ["iptables", "-F", "CHECKS"])
        lab.run("host", ["iptables", "-A", "CHECKS", "-s", "8.8.8.8", "-j", "RETURN"])
        returned = ping_json("RED", "8.8.8.8")
    finally:
        lab.run("host", ["iptables", "-D", "FORWARD", "-j", "CHECKS"])
        lab.run("host", ["iptables", "-F", "CHECKS"])
        lab.run("host", ["iptables", "-X", "CHECKS"])
    rule = dropped["drop"]["rule"]
    assert (rule["chain"], rule["policy"], rule["text"]) == (
        "CHECKS",
        False,
        "-A CHECKS -d 11.11.11.0/24 -j DROP",
    )
    assert dropped["drop"]["hook"] == "FORWARD"
    rule = returned["drop"]["rule"]
    assert (rule["chain"], rule["policy"], rule["text"]) == (
        "FORWARD",
        True,
        "-P FORWARD DROP",
    )


def test_native_table_at_another_priority_in_nft_syntax(lab):
    lab.goto(7)
    table = ["nft", "add", "table", "ip", "guard"]
    chain = "add chain ip guard gate { type filter hook forward priority 10; }"
    lab.run("host", table)
    try:
        lab.run("host", ["nft", *chain.split()])
        lab.run("host", ["nft", "add", "rule", "ip", "guard", "gate", "ip", "daddr",
                         "11.11.11.2", "icmp", "type", "echo-reply", "drop"])  # fmt: skip
        result = ping_json("RED", "8.8.8.8")
    finally:
        lab.run("host", ["nft", "delete", "table", "ip", "guard"])
    assert result["outcome"] == "dropped"
    assert result["drop"]["rule"] == {
        "family": "ip",
        "table": "guard",
        "chain": "gate",
        "policy": False,
        "verdict": "drop",
        "text": "ip daddr 11.11.11.2 icmp type echo-reply drop",
    }
    # The filter table accepted the reply first (priority 0), then guard
    # dropped it (priority 10): the hop lists both.
    (reply,) = hook_hops(result, "host", "FORWARD", "reply")
    assert [r["table"] for r in reply["rules"]] == ["filter", "guard"]
    assert reply["rule"]["table"] == "guard"
