"""Rule attribution without a kernel: recorded trace messages, rulesets, placement.

tests/rules/data/step*.json hold the netlink datagrams that nstrace's trace
listeners received during real runs of `nstrace ping` on the tutorial lab
(kernel 6.18), captured at `RuleTracer.crossings`: ``flow`` is the probe's
flow, ``datagrams`` are ``[netns, hex]`` in arrival order per namespace.
host-step6-rule-drop.* are the host namespace's ruleset at step 6 with
`iptables -A FORWARD -d 11.11.11.0/24 -j DROP` added: `nft -a list
ruleset` and `iptables-save`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tracer import events as ev
from tracer import rules
from tracer.events import Event
from tracer.rules import Crossing, Flow, TraceMessage

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> tuple[Flow, list[tuple[str, TraceMessage]]]:
    data = json.loads((DATA / f"{name}.json").read_text())
    messages = [
        (ns, message)
        for ns, hexed in data["datagrams"]
        for message in rules.parse_messages(bytes.fromhex(hexed))
    ]
    return Flow(**data["flow"]), messages


def host_ruleset() -> rules.Ruleset:
    base = DATA / "host-step6-rule-drop"
    ruleset = rules.index_ruleset(base.with_suffix(".ruleset.nft").read_text())
    ruleset.iptables = rules.parse_iptables_save(
        base.with_suffix(".iptables").read_text()
    )
    return ruleset


def summary(found: list[Crossing]) -> list[tuple]:
    out = []
    for c in found:
        decision = c.decision()
        verdict = (decision.type, decision.verdict) if decision else None
        table = "own" if c.own else c.table
        out.append((c.netns, c.family, table, c.chain, c.dir, verdict))
    return out


# ---- parsing ---------------------------------------------------------------


def test_every_recorded_datagram_is_a_trace_message():
    flow, messages = recorded("step6-policy-drop")
    assert len(messages) == 25
    assert {m.type for _, m in messages} == {"rule", "policy"}
    first = messages[0][1]
    assert first.has_headers and first.packet is not None
    assert first.packet.icmp_type == ev.ICMP_ECHO_REQUEST
    assert first.packet.ident == flow.tag


def test_policy_drop_message_carries_the_policy_verdict():
    _, messages = recorded("step6-policy-drop")
    policy = [m for _, m in messages if m.table == "filter" and m.type == "policy"]
    assert [(m.chain, m.verdict, m.handle) for m in policy] == [
        ("FORWARD", "drop", None)
    ]


def test_rule_message_carries_handle_and_devices():
    _, messages = recorded("step6-rule-drop")
    (drop,) = [m for _, m in messages if m.verdict == "drop"]
    assert (drop.table, drop.chain, drop.handle, drop.type) == (
        "filter",
        "FORWARD",
        3,
        "rule",
    )
    assert drop.iif and drop.oif and drop.iif != drop.oif
    assert drop.packet is not None and drop.packet.dst == "11.11.11.2"


def test_other_netlink_messages_and_truncation_are_skipped():
    done = struct.pack("=IHHII", 20, 3, 0, 0, 0) + b"\0" * 4  # NLMSG_DONE
    assert rules.parse_messages(done) == []
    assert rules.parse_messages(b"\x01\x02") == []
    # A message whose length field lies is cut where it says, not beyond.
    data = bytes.fromhex(
        json.loads((DATA / "step6-rule-drop.json").read_text())["datagrams"][0][1]
    )
    assert rules.parse_messages(data[:30]) == []


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (0, "drop"),
        (1, "accept"),
        (0xFFFFFFFF, "continue"),
        (0xFFFFFFFD, "jump"),
        ((1 << 16) | 0, "drop"),
        (3, "queue"),
    ],
)
def test_verdict_codes(code, name):
    assert rules._verdict_name(code) == name


# ---- direction of quoted packets -------------------------------------------


def ip_header(src: str, dst: str, proto: int) -> bytes:
    return bytes([0x45, 0, 0, 60, 0, 0, 0, 0, 64, proto, 0, 0]) + bytes(
        int(x) for x in f"{src}.{dst}".split(".")
    )


@pytest.mark.parametrize(
    ("flow", "transport", "proto", "expected"),
    [
        (Flow("icmp", 7), bytes([8, 0, 0, 0, 0, 7, 0, 1]), 1, ev.REQUEST),
        (Flow("icmp", 7), bytes([0, 0, 0, 0, 0, 7, 0, 1]), 1, ev.REPLY),
        (Flow("icmp", 7), bytes([8, 0, 0, 0, 0, 8, 0, 1]), 1, None),
        (Flow("tcp", 40000), struct.pack("!HH", 40000, 80), 6, ev.REQUEST),
        (Flow("tcp", 40000), struct.pack("!HH", 80, 40000), 6, ev.REPLY),
        (Flow("udp", 40000), struct.pack("!HH", 53, 40001), 17, None),
        # An error quoting the probe: only 20 bytes of transport header are
        # dumped, so the quoted protocol decides.
        (
            Flow("udp", 40000),
            bytes([3, 3, 0, 0, 0, 0, 0, 0]) + ip_header("1.1.1.1", "2.2.2.2", 17)[:12],
            1,
            ev.REPLY,
        ),
        (
            Flow("icmp", 7),
            bytes([3, 3, 0, 0, 0, 0, 0, 0]) + ip_header("1.1.1.1", "2.2.2.2", 17)[:12],
            1,
            None,
        ),
        # A whole quote (a network header long enough) is read to the tag.
        (
            Flow("icmp", 7),
            bytes([11, 0, 0, 0, 0, 0, 0, 0])
            + ip_header("1.1.1.1", "2.2.2.2", 1)
            + bytes([8, 0, 0, 0, 0, 7]),
            1,
            ev.REPLY,
        ),
    ],
)
def test_packet_direction(flow, transport, proto, expected):
    packet = rules.parse_packet(ip_header("10.0.0.1", "10.0.0.2", proto), transport)
    assert packet is not None and packet.direction(flow) == expected


def test_non_ipv4_headers_are_not_a_packet():
    assert rules.parse_packet(b"\x60" + b"\0" * 39, None) is None
    assert rules.parse_packet(b"\x45\0", None) is None


def test_crossings_ignore_packets_of_other_flows():
    flow, messages = recorded("step6-policy-drop")
    assert rules.crossings(messages, Flow("icmp", (flow.tag + 1) & 0xFFFF)) == []


# ---- crossings -------------------------------------------------------------


def test_step6_crossings_in_order():
    flow, messages = recorded("step6-policy-drop")
    found = [s for s in summary(rules.crossings(messages, flow)) if s[0] == "host"]
    assert found == [
        ("host", "bridge", "own", "prerouting", "request", ("policy", "accept")),
        ("host", "ip", "own", "prerouting", "request", ("policy", "accept")),
        ("host", "bridge", "own", "input", "request", ("policy", "accept")),
        ("host", "ip", "filter", "FORWARD", "request", ("rule", "accept")),
        ("host", "ip", "nat", "POSTROUTING", "request", ("rule", "accept")),
        ("host", "ip", "own", "prerouting", "reply", ("policy", "accept")),
        ("host", "ip", "filter", "FORWARD", "reply", ("policy", "drop")),
    ]


def test_step0_bridged_frames_cross_every_forwarding_bridge_hook():
    flow, messages = recorded("step0-red-to-blue")
    found = rules.crossings(messages, flow)
    bridge = [(c.chain, c.dir) for c in found if c.family == "bridge" and c.own]
    assert bridge == [
        ("prerouting", "request"),
        ("forward", "request"),
        ("postrouting", "request"),
        ("prerouting", "reply"),
        ("forward", "reply"),
        ("postrouting", "reply"),
    ]


def test_reject_and_its_icmp_error():
    flow, messages = recorded("step7-reject")
    found = summary(rules.crossings(messages, flow))
    assert ("host", "ip", "filter", "FORWARD", "request", ("rule", "drop")) in found
    # The port unreachable the REJECT sent goes back through host and RED.
    assert ("host", "ip", "own", "output", "reply", ("policy", "accept")) in found
    assert ("RED", "ip", "own", "prerouting", "reply", ("policy", "accept")) in found


@pytest.mark.parametrize("name", ["step7-tcp-closed", "step7-udp-closed"])
def test_port_probes_are_traced_both_ways(name):
    flow, messages = recorded(name)
    found = summary(rules.crossings(messages, flow))
    assert ("host", "ip", "filter", "FORWARD", "request", ("rule", "accept")) in found
    assert ("host", "ip", "filter", "FORWARD", "reply", ("rule", "accept")) in found
    assert ("internet", "ip", "own", "output", "reply", ("policy", "accept")) in found


# ---- naming from the ruleset -----------------------------------------------


def described(name: str) -> list[Crossing]:
    flow, messages = recorded(name)
    found = rules.crossings(messages, flow)
    ruleset = host_ruleset()
    for c in found:
        rules.describe(c, ruleset if c.netns == "host" else rules.Ruleset())
    return found


def test_policy_drop_is_named_in_iptables_syntax():
    found = described("step6-policy-drop")
    (drop,) = [c for c in found if c.rule and c.rule["verdict"] == "drop"]
    assert drop.hook == "FORWARD"
    assert drop.rule == {
        "family": "ip",
        "table": "filter",
        "chain": "FORWARD",
        "policy": True,
        "verdict": "drop",
        "text": "-P FORWARD DROP",
    }


def test_rule_drop_and_accepts_are_named_by_position():
    found = described("step6-rule-drop")
    texts = [
        (c.hook, c.dir, c.rule["policy"], c.rule["text"])
        for c in found
        if c.rule and not c.own
    ]
    assert texts == [
        ("FORWARD", "request", False, "-A FORWARD -s 11.11.11.0/24 -j ACCEPT"),
        (
            "POSTROUTING",
            "request",
            False,
            "-A POSTROUTING -s 11.11.11.0/24 -j MASQUERADE",
        ),
        ("FORWARD", "reply", False, "-A FORWARD -d 11.11.11.0/24 -j DROP"),
    ]


def test_own_crossings_take_their_hook_from_the_chain_name():
    found = described("step0-red-to-blue")
    assert {c.hook for c in found if c.own} == {
        "PREROUTING",
        "OUTPUT",
        "FORWARD",
        "POSTROUTING",
    }
    assert all(c.rule is None for c in found if c.own)


def test_nft_syntax_when_iptables_does_not_line_up():
    ruleset = host_ruleset()
    ruleset.iptables["filter"]["FORWARD"].pop()  # one rule fewer than nft has
    assert (
        ruleset.rule_text("ip", "filter", "FORWARD", 3) == "ip daddr 11.11.11.0/24 drop"
    )
    assert ruleset.policy_text("ip", "filter", "FORWARD", "drop") == "policy drop"
    assert ruleset.rule_text("ip", "filter", "FORWARD", 99) == "rule handle 99"


def test_index_of_a_native_table_with_a_set_and_a_user_chain():
    text = (
        "table inet fw { # handle 7\n"
        "\tset blocked { # handle 2\n\t\ttype ipv4_addr\n"
        "\t\telements = { 10.1.1.1 }\n\t}\n"
        "\tchain input { # handle 1\n"
        "\t\ttype filter hook input priority 10; policy accept;\n"
        "\t\tip saddr @blocked counter packets 3 bytes 180 reject # handle 4\n"
        '\t\tjump "DOCKER-USER" # handle 6\n'
        "\t}\n"
        '\tchain "DOCKER-USER" { # handle 5\n'
        "\t\ttcp dport 22 drop # handle 8\n"
        "\t}\n}\n"
    )
    ruleset = rules.index_ruleset(text)
    assert ruleset.hooks == {("inet", "fw", "input"): "INPUT"}
    assert ruleset.policies == {("inet", "fw", "input"): "accept"}
    assert ruleset.order == {
        ("inet", "fw", "input"): [4, 6],
        ("inet", "fw", "DOCKER-USER"): [8],
    }
    assert ruleset.rule_text("inet", "fw", "input", 4) == "ip saddr @blocked reject"
    assert ruleset.rule_text("inet", "fw", "DOCKER-USER", 8) == "tcp dport 22 drop"
    assert ruleset.policy_text("inet", "fw", "input", "accept") == "policy accept"


def test_index_of_the_lab_host():
    ruleset = host_ruleset()
    assert ruleset.hooks == {
        ("ip", "filter", "FORWARD"): "FORWARD",
        ("ip", "nat", "POSTROUTING"): "POSTROUTING",
    }
    assert ruleset.policies[("ip", "filter", "FORWARD")] == "drop"
    assert ruleset.order[("ip", "filter", "FORWARD")] == [2, 3]


# ---- bridge hops and rule verdicts for path assembly -----------------------


def test_bridge_events_are_placed_around_the_probes_events():
    found = [c for c in described("step0-red-to-blue") if c.netns == "host"]
    request = [c for c in found if c.dir == ev.REQUEST]
    forward = next(c for c in request if c.own and c.chain == "forward")
    iif, oif = forward.iif, forward.oif
    events = [
        Event(
            ev.RX,
            100,
            "host",
            dev="reth1",
            ifindex=iif,
            src="11.11.11.2",
            dst="11.11.11.3",
        ),
        Event(ev.HOOK, 200, "host", hook="PREROUTING", stage=ev.FIRST),
        Event(ev.HOOK, 300, "host", hook="FORWARD", stage=ev.FIRST),
        Event(ev.HOOK, 400, "host", hook="POSTROUTING", stage=ev.FIRST),
        Event(ev.TX, 500, "host", dev="beth1", ifindex=oif),
    ]
    placed = rules.bridge_events(request, events)
    assert [(e.kind, e.hook, e.t_ns) for e in placed] == [
        (ev.BRIDGE, "PREROUTING", 101),
        (ev.BRIDGE, "FORWARD", 299),
        (ev.BRIDGE, "POSTROUTING", 399),
    ]
    assert placed[1].in_dev == "reth1" and placed[1].out_dev == "beth1"


def test_verdicts_leave_out_own_and_bridge_tables():
    found = described("step6-policy-drop")
    out = rules.verdicts(found)
    assert [(v.netns, v.hook, v.dir, v.rule["verdict"]) for v in out] == [
        ("host", "FORWARD", "request", "accept"),
        ("host", "POSTROUTING", "request", "accept"),
        ("host", "FORWARD", "reply", "drop"),
    ]


def test_table_commands_mark_only_the_flow():
    commands = rules.table_commands("nstrace_1_7", Flow("icmp", 7))
    assert commands.count("flags owner") == 2
    assert (
        "add chain bridge nstrace_1_7 forward { type filter hook forward priority -500;"
        in commands
    )
    assert "icmp id 7 meta nftrace set 1" in commands
    assert "@th,256,16 7 meta nftrace set 1" in commands
    tcp = rules.table_commands("t", Flow("tcp", 40000))
    assert "tcp sport 40000 meta nftrace set 1" in tcp and "tcp dport 40000" in tcp
