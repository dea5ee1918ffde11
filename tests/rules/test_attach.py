"""Path assembly's use of rule verdicts, case by case, on synthetic events."""

from __future__ import annotations

import logging

import pytest

from tracer import events as ev
from tracer import rules
from tracer.errors import CannotTraceError
from tracer.events import Event
from tracer.path import Probe, assemble
from tracer.rules import RuleVerdict

PROBE = Probe(src_netns="RED", dst="8.8.8.8", proto="icmp", ident=7)
REQUEST_SKB, REPLY_SKB = 0x1000, 0x2000


def packet(kind: str, t: int, **kw) -> Event:
    request = kw.pop("skb", REQUEST_SKB) == REQUEST_SKB
    src, dst = ("11.11.11.2", "8.8.8.8") if request else ("8.8.8.8", "11.11.11.2")
    icmp_type = ev.ICMP_ECHO_REQUEST if request else ev.ICMP_ECHO_REPLY
    return Event(
        kind, t, "host", skb=REQUEST_SKB if request else REPLY_SKB, src=src, dst=dst,
        proto=ev.IPPROTO_ICMP, icmp_type=icmp_type, ident=7, **kw,
    )  # fmt: skip


def rule(table: str, verdict: str, policy: bool = False) -> dict:
    text = f"-P FORWARD {verdict.upper()}" if policy else f"a rule of {table}"
    return {
        "family": "ip", "table": table, "chain": "FORWARD",
        "policy": policy, "verdict": verdict, "text": text,
    }  # fmt: skip


EVENTS = [
    packet(ev.HOOK, 10, hook="FORWARD", stage=ev.FIRST),
    packet(ev.HOOK, 11, hook="FORWARD", stage=ev.LAST),
    packet(ev.HOOK, 20, hook="FORWARD", stage=ev.FIRST, skb=REPLY_SKB),
    packet(ev.FREE, 21, reason="NETFILTER_DROP", skb=REPLY_SKB),
]


def hook_rules(result) -> list:
    hooks = [hop for hop in result.hops if hop["event"] == "hook"]
    return [(hop["dir"], hop.get("rule"), hop.get("rules")) for hop in hooks]


def test_each_crossing_goes_to_its_hop_and_a_drop_decides():
    mangle, accept = rule("mangle", "accept"), rule("filter", "accept")
    policy = rule("filter", "drop", policy=True)
    verdicts = [
        RuleVerdict("host", "ip", "FORWARD", ev.REQUEST, mangle, trace_id=1),
        RuleVerdict("host", "ip", "FORWARD", ev.REQUEST, accept, trace_id=1),
        RuleVerdict("host", "ip", "FORWARD", ev.REPLY, rule("mangle", "accept"), 2),
        RuleVerdict("host", "ip", "FORWARD", ev.REPLY, policy, trace_id=2),
    ]
    result = assemble(PROBE, EVENTS, verdicts=verdicts)
    (request, reply) = hook_rules(result)
    assert request == (ev.REQUEST, accept, [mangle, accept])
    assert reply[1] == policy
    assert result.drop is not None and result.drop["rule"] == policy


def test_a_verdict_of_another_hook_or_namespace_goes_nowhere():
    verdicts = [
        RuleVerdict("host", "ip", "INPUT", ev.REPLY, rule("filter", "drop"), 2),
        RuleVerdict("BLUE", "ip", "FORWARD", ev.REPLY, rule("filter", "drop"), 2),
    ]
    result = assemble(PROBE, EVENTS, verdicts=verdicts)
    assert all(r is None for _, r, _ in hook_rules(result))
    assert result.drop is not None and result.drop["rule"] is None


def test_an_accept_at_the_dropping_hook_is_not_the_drops_rule():
    verdicts = [
        RuleVerdict("host", "ip", "FORWARD", ev.REPLY, rule("raw", "accept"), 2)
    ]
    result = assemble(PROBE, EVENTS, verdicts=verdicts)
    assert result.drop is not None and result.drop["rule"] is None


def test_without_libnftables_the_trace_goes_on(monkeypatch, caplog):
    def refuse(*args):
        raise CannotTraceError("cannot load libnftables.so.1")

    monkeypatch.setattr(rules, "RuleTracer", refuse)
    with caplog.at_level(logging.WARNING, logger="tracer.rules"):
        assert rules.start_rule_tracer(["RED"], rules.Flow("icmp", 7)) is None
    assert "rule attribution is off" in caplog.text


@pytest.mark.parametrize("flow", [rules.Flow("icmp", 7), rules.Flow("udp", 40000)])
def test_no_verdicts_and_no_bridge_events_from_nothing(flow):
    assert rules.crossings([], flow) == []
    assert rules.verdicts([]) == [] and rules.bridge_events([], EVENTS) == []
