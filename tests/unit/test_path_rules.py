"""Case tables for path assembly's rules (tracer/path.py's theory of operation)."""

from __future__ import annotations

import pytest
from eventkit import (
    ECHO_REPLY,
    GATEWAY_IP,
    GOOGLE_IP,
    HOST_UPLINK_IP,
    IDENT,
    PROBE,
    RED_IP,
    REPLY_SKB,
    REQUEST_SKB,
    T0,
    Clock,
    free,
    hook_pair,
    icmp,
    lone_first,
    request_to_internet,
    route,
    step6_events,
    step7_events,
)

from tracer import events as ev
from tracer.events import Event
from tracer.path import (
    Probe,
    TraceResult,
    assemble,
    errno_name,
    exit_code,
    is_benign_free,
    packet_direction,
)

TCP_PROBE = Probe(src_netns="RED", dst=GOOGLE_IP, proto="tcp", dport=80, sport=40000)
UDP_PROBE = Probe(src_netns="RED", dst=GOOGLE_IP, proto="udp", dport=53)


def packet(**kw) -> Event:
    kw.setdefault("kind", ev.RX)
    kw.setdefault("t_ns", T0)
    kw.setdefault("netns", "host")
    return Event(**kw)


# ---- direction ---------------------------------------------------------------

DIRECTIONS = [
    ("echo request", PROBE, packet(proto=1, icmp_type=8), "request"),
    ("echo reply", PROBE, packet(proto=1, icmp_type=0), "reply"),
    (
        "dest unreachable quoting the probe",
        PROBE,
        packet(proto=1, icmp_type=3, icmp_code=1, src=GATEWAY_IP, dst=RED_IP),
        "reply",
    ),
    ("time exceeded", PROBE, packet(proto=1, icmp_type=11), "reply"),
    (
        "tcp syn to the port",
        TCP_PROBE,
        packet(proto=6, sport=40000, dport=80),
        "request",
    ),
    ("tcp syn-ack", TCP_PROBE, packet(proto=6, sport=80, dport=40000), "reply"),
    (
        "tcp reset",
        TCP_PROBE,
        packet(proto=6, sport=80, dport=40000, tcp_flags=0x14),
        "reply",
    ),
    (
        "port unreachable for udp",
        UDP_PROBE,
        packet(proto=1, icmp_type=3, icmp_code=3),
        "reply",
    ),
    ("udp query", UDP_PROBE, packet(proto=17, sport=5353, dport=53), "request"),
    ("udp answer", UDP_PROBE, packet(proto=17, sport=53, dport=5353), "reply"),
    ("no headers, from dst", PROBE, packet(src=GOOGLE_IP, dst=RED_IP), "reply"),
    ("no headers, to dst", PROBE, packet(src=HOST_UPLINK_IP, dst=GOOGLE_IP), "request"),
    ("nothing known", PROBE, packet(), None),
    ("user space send", PROBE, packet(kind=ev.SEND), "request"),
    ("user space recv", PROBE, packet(kind=ev.RECV), "reply"),
]


@pytest.mark.parametrize(
    ("event", "probe", "expected"),
    [pytest.param(e, p, x, id=name) for name, p, e, x in DIRECTIONS],
)
def test_packet_direction(event, probe, expected):
    assert packet_direction(event, probe) == expected


def test_headerless_free_takes_the_direction_of_its_skb():
    c = Clock()
    events = [
        icmp(ev.RX, c(), "host", GOOGLE_IP, HOST_UPLINK_IP, skb=REPLY_SKB, icmp_type=0),
        free(c(), "host", "IP_INADDRERRORS", skb=REPLY_SKB, dev="eth0"),
    ]
    hops = assemble(PROBE, events).hops
    assert [hop["dir"] for hop in hops] == ["reply", "reply"]


def test_rp_filter_lookup_belongs_to_the_packet_it_checks():
    # The reverse-path check of the reply looks up 8.8.8.8 from 11.11.11.2:
    # by its addresses alone it would pass for the request.
    c = Clock()
    events = [
        *hook_pair(
            c, "host", "PREROUTING", GOOGLE_IP, RED_IP, skb=REPLY_SKB, icmp_type=0
        ),
        route(c(), "host", RED_IP, GOOGLE_IP, dev="eth0"),
    ]
    hops = assemble(PROBE, events).hops
    assert hops[-1]["event"] == "route"
    assert hops[-1]["dir"] == "reply"


def test_responder_lookup_for_its_reply_goes_by_addresses():
    c = Clock()
    events = [
        *hook_pair(c, "internet", "INPUT", HOST_UPLINK_IP, GOOGLE_IP),
        route(c(), "internet", GOOGLE_IP, HOST_UPLINK_IP, dev="isp0"),
    ]
    assert [hop["dir"] for hop in assemble(PROBE, events).hops] == ["request", "reply"]


def test_neighbour_update_takes_the_direction_of_the_packet_before():
    c = Clock()
    events = [
        icmp(ev.RX, c(), "host", GOOGLE_IP, HOST_UPLINK_IP, skb=REPLY_SKB, icmp_type=0),
        Event(
            kind=ev.NEIGH,
            t_ns=c(),
            netns="host",
            dev="br0",
            neigh_addr=RED_IP,
            neigh_state="REACHABLE",
        ),
    ]
    hops = assemble(PROBE, events).hops
    assert hops[1]["dir"] == "reply"
    assert hops[1]["neigh"] == {"addr": RED_IP, "state": "REACHABLE"}


# ---- hooks and NAT -------------------------------------------------------------


def test_hook_pair_is_one_hop_with_after_and_nat():
    c = Clock()
    events = hook_pair(
        c,
        "host",
        "POSTROUTING",
        RED_IP,
        GOOGLE_IP,
        out_dev="eth0",
        after=(HOST_UPLINK_IP, GOOGLE_IP),
    )
    result = assemble(PROBE, events)
    (hop,) = result.hops
    assert hop["event"] == "hook"
    assert (hop["src"], hop["dst"]) == (RED_IP, GOOGLE_IP)
    assert hop["after"] == {"src": HOST_UPLINK_IP, "dst": GOOGLE_IP}
    assert hop["dev"] == "eth0"
    assert hop["t_ns"] == events[0].t_ns
    assert "passed" not in hop
    assert result.nat == [
        {
            "netns": "host",
            "hook": "POSTROUTING",
            "dir": "request",
            "field": "src",
            "from": RED_IP,
            "to": HOST_UPLINK_IP,
        }
    ]


def test_hook_without_nat_has_no_after():
    c = Clock()
    result = assemble(PROBE, hook_pair(c, "RED", "OUTPUT", RED_IP, GOOGLE_IP))
    assert "after" not in result.hops[0]
    assert result.nat == []


def test_double_nat_gives_two_entries():
    c = Clock()
    events = hook_pair(
        c,
        "host",
        "PREROUTING",
        GOOGLE_IP,
        HOST_UPLINK_IP,
        after=("1.1.1.1", RED_IP),
        skb=REPLY_SKB,
        icmp_type=0,
    )
    fields = [(n["field"], n["from"], n["to"]) for n in assemble(PROBE, events).nat]
    assert fields == [("src", GOOGLE_IP, "1.1.1.1"), ("dst", HOST_UPLINK_IP, RED_IP)]


def test_output_hook_dev_comes_from_the_hook_state():
    # At OUTPUT skb->dev is NULL; the decoder leaves dev empty.
    c = Clock()
    events = hook_pair(c, "RED", "OUTPUT", RED_IP, GOOGLE_IP, out_dev="reth0")
    hop = assemble(PROBE, events).hops[0]
    assert hop["dev"] == "reth0"
    assert hop["out_dev"] == "reth0"
    assert "in_dev" not in hop


def test_lone_first_is_a_hop_that_did_not_pass_and_still_a_hook_hit():
    c = Clock()
    events = [
        lone_first(
            c, "host", "FORWARD", RED_IP, GOOGLE_IP, in_dev="br0", out_dev="eth0"
        ),
        free(c(), "host", "NETFILTER_DROP", skb=REQUEST_SKB, dev="reth1"),
    ]
    result = assemble(PROBE, events)
    assert result.hops[0]["passed"] is False
    assert result.hooks_hit == [
        {"netns": "host", "hook": "FORWARD", "dir": "request", "family": "ip"}
    ]


def test_first_is_not_paired_with_a_last_of_a_reused_skb():
    # The skb address is reused after the free: the later crossing of the
    # same hook is its own hop and does not complete the earlier one.
    c = Clock()
    events = [
        lone_first(c, "host", "FORWARD", RED_IP, GOOGLE_IP),
        free(c(), "host", "NETFILTER_DROP", skb=REQUEST_SKB),
        *hook_pair(c, "host", "FORWARD", RED_IP, GOOGLE_IP),
    ]
    hooks = [h for h in assemble(PROBE, events).hops if h["event"] == "hook"]
    assert [h.get("passed", True) for h in hooks] == [False, True]


def test_last_without_first_counts_as_passed():
    c = Clock()
    _, last = hook_pair(c, "host", "FORWARD", RED_IP, GOOGLE_IP)
    result = assemble(PROBE, [last])
    assert "passed" not in result.hops[0]
    assert len(result.hooks_hit) == 1


def test_hooks_hit_one_per_crossing_in_time_order():
    c = Clock()
    events = [
        *hook_pair(c, "RED", "OUTPUT", RED_IP, GOOGLE_IP),
        *hook_pair(c, "RED", "POSTROUTING", RED_IP, GOOGLE_IP),
        *hook_pair(c, "host", "PREROUTING", RED_IP, GOOGLE_IP),
    ]
    got = [(h["netns"], h["hook"]) for h in assemble(PROBE, events[::-1]).hooks_hit]
    assert got == [("RED", "OUTPUT"), ("RED", "POSTROUTING"), ("host", "PREROUTING")]


def bridge_event(t: int, hook: str, trace_id: int = 1, **kw) -> Event:
    return Event(
        kind=ev.BRIDGE,
        t_ns=t,
        netns="host",
        hook=hook,
        skb=REQUEST_SKB,
        src=RED_IP,
        dst="11.11.11.3",
        proto=1,
        icmp_type=8,
        ident=IDENT,
        in_dev="reth1",
        out_dev="beth1",
        extra={"trace_id": trace_id},
        **kw,
    )


def test_bridge_trace_events_are_one_bridge_family_hit_per_crossing():
    c = Clock()
    blue = Probe(src_netns="RED", dst="11.11.11.3", ident=IDENT)
    events = [
        icmp(ev.RX, c(), "host", RED_IP, "11.11.11.3", skb=REQUEST_SKB, dev="reth1"),
        bridge_event(c(), "FORWARD"),  # rule 1 evaluated
        bridge_event(c(), "FORWARD"),  # rule 2, then the verdict
        *hook_pair(
            c, "host", "FORWARD", RED_IP, "11.11.11.3", in_dev="br0", out_dev="br0"
        ),
        bridge_event(c(), "POSTROUTING", trace_id=2),
        icmp(ev.TX, c(), "host", RED_IP, "11.11.11.3", skb=REQUEST_SKB, dev="beth1"),
    ]
    result = assemble(blue, events)
    assert result.hooks_hit == [
        {"netns": "host", "hook": "FORWARD", "dir": "request", "family": "bridge"},
        {"netns": "host", "hook": "FORWARD", "dir": "request", "family": "ip"},
        {"netns": "host", "hook": "POSTROUTING", "dir": "request", "family": "bridge"},
    ]
    assert [h["event"] for h in result.hops] == ["rx", "bridge", "hook", "bridge", "tx"]
    assert result.hops[1]["hook"] == "FORWARD"


# ---- frees and the drop --------------------------------------------------------

BENIGN = [
    (
        "NO_SOCKET on the reply in the source netns",
        free(T0, "RED", "NO_SOCKET", skb=1, src=GOOGLE_IP, dst=RED_IP, icmp_type=0),
        None,
        True,
    ),
    (
        "NO_SOCKET on a headerless skb in the source netns",
        free(T0, "RED", "NO_SOCKET", skb=1),
        None,
        True,
    ),
    (
        "NO_SOCKET on the reply in another netns",
        free(
            T0,
            "host",
            "NO_SOCKET",
            skb=1,
            src=GOOGLE_IP,
            dst=HOST_UPLINK_IP,
            icmp_type=0,
        ),
        None,
        False,
    ),
    (
        "NO_SOCKET on the request in the source netns",
        free(T0, "RED", "NO_SOCKET", skb=1, src=RED_IP, dst=GOOGLE_IP, icmp_type=8),
        None,
        False,
    ),
    ("OTHERHOST anywhere", free(T0, "BLUE", "OTHERHOST", skb=1), None, True),
    ("NETFILTER_DROP", free(T0, "host", "NETFILTER_DROP", skb=1), None, False),
    ("NOT_SPECIFIED", free(T0, "host", "NOT_SPECIFIED", skb=1), None, False),
    (
        "NETFILTER_DROP after the reply reached the socket",
        free(T0, "host", "NETFILTER_DROP", skb=1),
        T0 - 1,
        True,
    ),
    (
        "NETFILTER_DROP before the reply reached the socket",
        free(T0, "host", "NETFILTER_DROP", skb=1),
        T0 + 1,
        False,
    ),
]


@pytest.mark.parametrize(
    ("event", "replied_at", "expected"),
    [pytest.param(e, r, x, id=name) for name, e, r, x in BENIGN],
)
def test_is_benign_free(event, replied_at, expected):
    assert is_benign_free(event, PROBE, replied_at) is expected


def drop_of(events: list[Event]) -> dict | None:
    return assemble(PROBE, events).drop


def test_netfilter_drop_goes_to_the_hook_entered_and_not_left():
    c = Clock()
    events = [
        *hook_pair(c, "host", "PREROUTING", RED_IP, GOOGLE_IP, in_dev="br0"),
        lone_first(
            c, "host", "FORWARD", RED_IP, GOOGLE_IP, in_dev="br0", out_dev="eth0"
        ),
        free(c(), "host", "NETFILTER_DROP", skb=REQUEST_SKB),
    ]
    assert drop_of(events) == {
        "netns": "host",
        "hook": "FORWARD",
        # The free has no device: the open hook's input device stands in.
        "dev": "br0",
        "dir": "request",
        "reason": "NETFILTER_DROP",
        "rule": None,
    }


def test_other_reasons_go_to_the_last_hook_entered():
    c = Clock()
    events = [
        *hook_pair(c, "host", "PREROUTING", RED_IP, GOOGLE_IP, in_dev="br0"),
        free(c(), "host", "IP_INADDRERRORS", skb=REQUEST_SKB, dev="reth1"),
    ]
    drop = drop_of(events)
    assert (drop["hook"], drop["dev"], drop["reason"]) == (
        "PREROUTING",
        "reth1",
        "IP_INADDRERRORS",
    )


def test_hooks_of_another_skb_or_netns_are_not_blamed():
    c = Clock()
    events = [
        lone_first(c, "RED", "OUTPUT", RED_IP, GOOGLE_IP),  # same skb, RED
        lone_first(c, "host", "FORWARD", RED_IP, GOOGLE_IP, skb=REPLY_SKB),
        free(c(), "host", "NETFILTER_DROP", skb=REQUEST_SKB, dev="eth0"),
    ]
    assert drop_of(events)["hook"] is None


def test_drop_without_hooks_has_no_hook():
    c = Clock()
    events = [
        icmp(ev.TX, c(), "RED", RED_IP, GOOGLE_IP, skb=REQUEST_SKB, dev="reth0"),
        free(c(), "RED", "NEIGH_FAILED", skb=REQUEST_SKB, dev="reth0"),
    ]
    drop = drop_of(events)
    assert (drop["hook"], drop["reason"], drop["dev"]) == (
        None,
        "NEIGH_FAILED",
        "reth0",
    )


def test_the_first_real_drop_wins_and_benign_frees_are_skipped():
    c = Clock()
    events = [
        free(c(), "BLUE", "OTHERHOST", skb=5, dev="beth0"),
        free(c(), "host", "NOT_SPECIFIED", skb=REQUEST_SKB, dev="eth0"),
        free(c(), "host", "NETFILTER_DROP", skb=REQUEST_SKB, dev="eth0"),
    ]
    result = assemble(PROBE, events)
    assert result.drop["reason"] == "NOT_SPECIFIED"
    assert [h["event"] for h in result.hops] == ["free", "drop", "drop"]


def test_drop_hop_carries_the_blamed_hook():
    hops = assemble(PROBE, step6_events()).hops
    assert hops[-1]["event"] == "drop"
    assert hops[-1]["hook"] == "FORWARD"
    assert hops[-1]["reason"] == "NETFILTER_DROP"


# ---- outcome -------------------------------------------------------------------

ICMP_HOST_UNREACHABLE = {
    "src": GATEWAY_IP,
    "dst": RED_IP,
    "icmp_type": 3,
    "icmp_code": 1,
}
OUTCOMES = [
    ("send refused", {"send_error": "ENETUNREACH"}, [], "unreachable"),
    (
        "send refused wins over a reply",
        {"send_error": "EPERM", "reply": ECHO_REPLY},
        [],
        "unreachable",
    ),
    ("icmp error came back", {"reply": ICMP_HOST_UNREACHABLE}, [], "unreachable"),
    (
        "time exceeded came back",
        {"reply": {**ICMP_HOST_UNREACHABLE, "icmp_type": 11, "icmp_code": 0}},
        [],
        "unreachable",
    ),
    (
        "tcp reset came back",
        {"reply": {"src": GOOGLE_IP, "dst": RED_IP, "tcp_flags": 0x14}},
        [],
        "unreachable",
    ),
    ("echo reply", {"reply": ECHO_REPLY}, [], "reply"),
    (
        "syn-ack",
        {"reply": {"src": GOOGLE_IP, "dst": RED_IP, "tcp_flags": 0x12}},
        [],
        "reply",
    ),
    ("drop seen", {}, step6_events(), "dropped"),
    ("nothing came back", {}, request_to_internet(Clock()), "no-reply"),
    ("no events at all", {}, [], "no-reply"),
]


@pytest.mark.parametrize(
    ("kwargs", "events", "expected"),
    [pytest.param(k, e, x, id=name) for name, k, e, x in OUTCOMES],
)
def test_outcome(kwargs, events, expected):
    result = assemble(PROBE, events, **kwargs)
    assert result.outcome == expected
    assert exit_code(result) == (0 if expected == "reply" else 1)


def test_reply_outcome_clears_a_drop_seen_on_the_way():
    c = Clock()
    events = [
        *request_to_internet(c),
        free(
            c(), "host", "NOT_SPECIFIED", skb=99, src=RED_IP, dst=GOOGLE_IP, icmp_type=8
        ),
    ]
    result = assemble(PROBE, events, reply=ECHO_REPLY)
    assert result.outcome == "reply"
    assert result.drop is None
    # Still shown as evidence, but as a free: the packet was not lost there.
    assert result.hops[-1]["event"] == "free"
    assert result.hops[-1]["reason"] == "NOT_SPECIFIED"


def test_free_after_the_recv_event_is_benign():
    c = Clock()
    events = [
        *step7_events()[:-1],
        Event(
            kind=ev.RECV,
            t_ns=c.now + 10**9,
            netns="RED",
            src=GOOGLE_IP,
            dst=RED_IP,
            proto=1,
            icmp_type=0,
        ),
        free(c.now + 2 * 10**9, "host", "NOT_SPECIFIED", skb=REPLY_SKB, dev="br0"),
    ]
    result = assemble(PROBE, events)
    assert result.outcome == "reply"  # the recv event stands for the reply
    assert result.hops[-1]["event"] == "free"


def test_icmp_error_hop_has_the_quoted_packet():
    c = Clock()
    error = icmp(
        ev.RX,
        c(),
        "host",
        GATEWAY_IP,
        HOST_UPLINK_IP,
        skb=REPLY_SKB,
        icmp_type=3,
        icmp_code=1,
        inner_src=HOST_UPLINK_IP,
        inner_dst=GOOGLE_IP,
        dev="eth0",
    )
    result = assemble(PROBE, [error], reply=ICMP_HOST_UNREACHABLE)
    hop = result.hops[0]
    assert hop["dir"] == "reply"
    assert hop["icmp_error"] == {
        "type": 3,
        "code": 1,
        "inner_src": HOST_UPLINK_IP,
        "inner_dst": GOOGLE_IP,
    }
    assert result.outcome == "unreachable"


def test_failed_result_is_an_error_outcome_with_its_message():
    result = TraceResult.failed(PROBE, "ring buffer could not be read")
    assert result.outcome == "error"
    assert result.to_json()["error"] == "ring buffer could not be read"
    assert exit_code(result) == 1


def test_unknown_outcome_is_refused():
    with pytest.raises(ValueError, match="sideways"):
        TraceResult(probe=PROBE, outcome="sideways")


# ---- routes --------------------------------------------------------------------

ROUTE_ERRORS = [
    (-101, "ENETUNREACH"),
    (-11, "EAGAIN"),
    (-113, "EHOSTUNREACH"),
    (-22, "EINVAL"),
    (-13, "EACCES"),
]


@pytest.mark.parametrize(("error", "name"), ROUTE_ERRORS)
def test_route_error_is_named(error, name):
    event = route(T0, "RED", "0.0.0.0", "192.168.104.2", error=error)
    hop = assemble(PROBE, [event]).hops[0]
    assert hop["error"] == name
    assert hop["dev"] is None
    assert errno_name(error) == errno_name(-error) == name


def test_successful_route_has_no_error_and_keeps_gateway_and_table():
    event = route(T0, "host", RED_IP, GOOGLE_IP, dev="eth0", gateway=GATEWAY_IP)
    event.extra["oif"] = "eth0"
    hop = assemble(PROBE, [event]).hops[0]
    assert "error" not in hop
    assert (hop["dev"], hop["gateway"], hop["table"], hop["oif"]) == (
        "eth0",
        GATEWAY_IP,
        254,
        "eth0",
    )


def test_unknown_errno_still_gets_a_name():
    assert errno_name(-4242) == "errno 4242"


# ---- the probe -----------------------------------------------------------------


def test_probe_source_is_kept_when_given():
    probe = Probe(src_netns="RED", dst=GOOGLE_IP, ident=IDENT, src="11.11.11.9")
    assert assemble(probe, step6_events()).probe.src == "11.11.11.9"


def test_probe_source_ignores_the_route_lookup_zero_address():
    events = request_to_internet(Clock())
    assert events[0].kind == ev.ROUTE and events[0].src == "0.0.0.0"
    assert assemble(PROBE, events).probe.src == RED_IP


def test_unknown_protocol_is_a_usage_error():
    from tracer.errors import UsageError

    with pytest.raises(UsageError, match="sctp"):
        Probe(src_netns="RED", dst=GOOGLE_IP, proto="sctp")


def test_last_after_the_skb_was_freed_does_not_complete_the_first():
    # The skb address was reused and the new packet's first event was lost:
    # its last is a crossing of its own, not the end of the dropped one.
    c = Clock()
    first = lone_first(c, "host", "FORWARD", RED_IP, GOOGLE_IP)
    dropped = free(c(), "host", "NETFILTER_DROP", skb=REQUEST_SKB)
    _, last = hook_pair(c, "host", "FORWARD", RED_IP, GOOGLE_IP)
    result = assemble(PROBE, [first, dropped, last])
    hooks = [h for h in result.hops if h["event"] == "hook"]
    assert [h.get("passed", True) for h in hooks] == [False, True]
    assert result.drop["hook"] == "FORWARD"


def test_headerless_event_takes_the_direction_of_a_later_event_of_its_skb():
    # Stamps from different CPUs can put the unparsed event first.
    events = [
        free(T0, "host", "NOT_SPECIFIED", skb=REPLY_SKB, dev="eth0"),
        icmp(
            ev.RX, T0 + 1, "host", GOOGLE_IP, HOST_UPLINK_IP, skb=REPLY_SKB, icmp_type=0
        ),
    ]
    assert [hop["dir"] for hop in assemble(PROBE, events).hops] == ["reply"] * 2
