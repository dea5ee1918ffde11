"""`nstrace watch`: filters, packet numbering, lines, and a live run in the lab."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time

import pytest

from reliability.leftovers import (
    kill_quietly,
    netfilter_links,
    start,
    wait_for,
    wait_until_attached,
)
from tracer.errors import UsageError
from tracer.events import FREE, HOOK, IPPROTO_TCP, IPPROTO_UDP, ROUTE, RX, TX, Event
from tracer.probes import RECORD, Decoder, ip_to_u32
from tracer.watch import (
    PACKET_IDLE_NS,
    Filter,
    Grouper,
    Printer,
    hop_record,
    hop_text,
    parse_filter,
)


def event(kind: str = RX, t_ns: int = 1_000, skb: int = 0xA0, **fields) -> Event:
    base = {"netns": "host", "dev": "reth1", "src": "11.11.11.2", "dst": "11.11.11.3"}
    return Event(kind=kind, t_ns=t_ns, skb=skb, **{**base, **fields})


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, Filter()),
        ({"host": "8.8.8.8"}, Filter(host="8.8.8.8")),
        ({"proto": "UDP", "port": 53}, Filter(proto=IPPROTO_UDP, port=53)),
        ({"proto": "tcp"}, Filter(proto=IPPROTO_TCP)),
        ({"netns_name": "root"}, Filter(netns="root")),
    ],
)
def test_parse_filter(kwargs, expected):
    assert parse_filter(**kwargs) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": "8.8.8"}, "is not an IPv4 address"),
        ({"host": "::1"}, "IPv4 only"),
        ({"proto": "sctp"}, "unknown protocol"),
        ({"port": 0}, "out of range"),
        ({"port": 65536}, "out of range"),
        ({"proto": "icmp", "port": 7}, "ICMP has no ports"),
        ({"netns_name": "RED;id"}, "not a valid namespace name"),
    ],
)
def test_parse_filter_refuses(kwargs, message):
    with pytest.raises(UsageError, match=message):
        parse_filter(**kwargs)


def test_filter_describes_itself():
    assert Filter().describe() == "every IPv4 packet"
    chosen = Filter(netns="RED", host="8.8.8.8", proto=IPPROTO_UDP, port=53)
    assert chosen.describe() == "netns RED host 8.8.8.8 udp port 53"


def test_one_skb_is_one_packet_across_namespaces():
    grouper = Grouper()
    hops = [
        event(TX, 1, netns="RED", dev="reth0"),
        event(RX, 2),
        event(HOOK, 3, hook="FORWARD", stage="first"),
        event(HOOK, 4, hook="FORWARD", stage="last"),
        event(TX, 5, dev="beth1"),
    ]
    numbers = [grouper.packet_of(hop) for hop in hops]
    assert numbers == [(1, True)] + [(1, False)] * 4


def test_a_reused_skb_address_is_a_new_packet():
    grouper = Grouper()
    assert grouper.packet_of(event(RX, 1)) == (1, True)
    assert grouper.packet_of(event(TX, 2, dev="beth1")) == (1, False)
    # Consumed unseen; the next packet of the flood gets the same memory.
    assert grouper.packet_of(event(RX, 3)) == (2, True)
    # A freed skb is forgotten; so is one not seen for a while.
    assert grouper.packet_of(event(FREE, 4, reason="NETFILTER_DROP")) == (2, False)
    assert grouper.packet_of(event(TX, 5, dev="beth1")) == (3, True)
    assert grouper.packet_of(event(RX, 6 + PACKET_IDLE_NS, dev="x")) == (4, True)
    assert (grouper.packets, grouper.events) == (4, 6)


def test_route_lookups_belong_to_the_packet_seen_last():
    grouper = Grouper()
    grouper.packet_of(event(RX, 1, skb=0xA0))
    grouper.packet_of(event(RX, 2, skb=0xB0))
    assert grouper.packet_of(event(ROUTE, 3, skb=0)) == (2, False)


def test_hop_line_and_record():
    hop = event(
        HOOK,
        7,
        hook="POSTROUTING",
        stage="last",
        proto=IPPROTO_UDP,
        sport=40000,
        dport=53,
        src="10.0.2.15",
        dst="8.8.8.8",
    )
    line = hop_text(hop, 12)
    assert line.split() == [
        "#12",
        "host",
        "hook",
        "reth1",
        "POSTROUTING/last",
        "10.0.2.15",
        ">",
        "8.8.8.8",
        "udp",
        "40000",
        ">",
        "53",
    ]
    record = hop_record(hop, 12)
    assert record == {
        "packet": 12,
        "event": "hook",
        "t_ns": 7,
        "netns": "host",
        "dev": "reth1",
        "hook": "POSTROUTING",
        "stage": "last",
        "src": "10.0.2.15",
        "dst": "8.8.8.8",
        "proto": "udp",
        "sport": 40000,
        "dport": 53,
    }
    assert json.loads(json.dumps(record)) == record


def test_a_drop_says_why():
    hop = event(FREE, 9, reason="NETFILTER_DROP", proto=1, icmp_type=0, icmp_code=0)
    assert hop_text(hop, 1).endswith("freed: NETFILTER_DROP")
    assert hop_record(hop, 1)["reason"] == "NETFILTER_DROP"


def test_printer_text_groups_and_counts_losses_as_they_grow():
    out = io.StringIO()
    printer = Printer(out, as_json=False)
    printer.hops([event(RX, 1), event(TX, 2, dev="beth1")])
    printer.lost_count(0)
    printer.lost_count(5)
    printer.lost_count(5)
    printer.lost_count(9)
    summary = printer.summary(1.5)
    lines = out.getvalue().splitlines()
    assert lines[0] == "packet #1"
    assert lines[1].lstrip().startswith("#1") and lines[2].lstrip().startswith("#1")
    assert lines[3:5] == [
        "-- 5 events lost so far (ring buffer full)",
        "-- 9 events lost so far (ring buffer full)",
    ]
    assert lines[5] == "watched 1 packets, 2 events, 9 lost, in 1.5 s"
    assert summary["lost_events"] == 9


def test_printer_json_is_one_object_per_line():
    out = io.StringIO()
    printer = Printer(out, as_json=True)
    printer.hops([event(RX, 1)])
    printer.lost_count(3)
    printer.summary(0.25)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["packet"] == 1 and lines[0]["event"] == "rx"
    assert lines[1] == {"lost_events": 3}
    assert lines[2] == {
        "summary": True,
        "packets": 1,
        "events": 1,
        "lost_events": 3,
        "seconds": 0.25,
    }


@pytest.mark.root
@pytest.mark.lab
def test_watch_in_one_namespace_sees_a_ping_there_only(lab):
    lab.goto(7)
    child = start(
        "watch", "--netns", "host", "--host", "11.11.11.3", "--proto", "icmp", "--json"
    )
    try:
        assert child.stderr.readline().startswith("watching netns host")
        assert lab.ping("RED", "11.11.11.3") == "reply"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=20)
    finally:
        kill_quietly(child)
    assert child.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    hops = [line for line in lines if "event" in line and line["event"] != "neigh"]
    assert {hop["netns"] for hop in hops} == {"host"}, [
        h for h in hops if h["netns"] != "host"
    ]
    request = [h for h in hops if h.get("icmp_type") == 8]
    reply = [h for h in hops if h.get("icmp_type") == 0]
    assert request and reply
    # The request and the reply are different packets, each numbered once.
    assert {h["packet"] for h in request}.isdisjoint({h["packet"] for h in reply})
    assert ("FORWARD", "first") in {(h.get("hook"), h.get("stage")) for h in request}
    assert lines[-1]["summary"] is True and lines[-1]["lost_events"] == 0


# Datagrams to a closed port on the loopback: each is dropped (NO_SOCKET).
DROPPED_IPV6 = """
import socket, sys, time
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[1])
for _ in range(30_000):
    if time.monotonic() > end:
        break
    try:
        sock.sendto(b"x", ("::1", 9))
    except OSError:
        pass
    time.sleep(0.0005)
"""


def ipv6_drops_in(ns: str, seconds: float) -> subprocess.Popen[str]:
    """About 2,000 dropped IPv6 datagrams a second inside lab namespace *ns*."""
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", DROPPED_IPV6, str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.root
@pytest.mark.lab
def test_watch_links_hooks_only_where_its_flow_shows(lab):
    """Hooks cost every packet: linked where the flow goes, once it goes there.

    Meanwhile `laptop` drops IPv6 datagrams on its loopback: the memory of the
    ping's skbs comes back for them at once, and such a drop was once taken
    for the flow's (a `free` in `laptop`, whose hooks then got linked too).
    """
    lab.goto(7)
    # With the neighbours known, the ping's skbs end at once (consume_skb,
    # which this watch attaches only after the first match).
    assert lab.ping("RED", "11.11.11.3") == "reply"
    noise = ipv6_drops_in("laptop", seconds=15)
    child = start("watch", "--host", "11.11.11.3", "--proto", "icmp", "--json")
    steps = []  # what was seen, step by step, for the message of a failure
    try:
        steps.append(child.stderr.readline().split(";")[0])
        wait_until_attached(child)
        steps.append(netfilter_links(child.pid))
        steps.append(lab.ping("RED", "11.11.11.3"))
        wait_for(lambda: netfilter_links(child.pid) >= 30)
        time.sleep(0.2)  # and no more than 30 come
        steps.append(netfilter_links(child.pid))
        steps.append(lab.ping("RED", "11.11.11.3"))
        noise_ran = noise.poll() is None  # it sent all along, did not fail
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=20)
    finally:
        kill_quietly(child)
        kill_quietly(noise)
    assert noise_ran, noise.stderr.read()
    # RED, host and BLUE: the five hooks, at two priorities each, once the
    # flow has shown there. The lab's other namespaces see nothing of it.
    assert steps == ["watching host 11.11.11.3 icmp", 0, "reply", 30, "reply"], (
        steps,
        err,
        out[-2000:],
    )
    assert child.returncode == 0, err
    hooks = {
        (hop["netns"], hop["hook"])
        for hop in map(json.loads, out.splitlines())
        if hop.get("event") == "hook" and hop.get("icmp_type") == 8
    }
    assert {
        ("RED", "OUTPUT"),
        ("host", "FORWARD"),
        ("BLUE", "PREROUTING"),
        ("BLUE", "INPUT"),
    } <= hooks
    assert netfilter_links(child.pid) == 0  # ended: nothing held


def test_printer_keeps_only_the_chosen_namespace():
    out = io.StringIO()
    printer = Printer(out, as_json=True, netns="host")
    printer.hops([event(ROUTE, 1, netns="BLUE", skb=0), event(RX, 2)])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["netns"] for line in lines] == ["host"]


@pytest.mark.root
@pytest.mark.lab
def test_a_flood_past_capacity_is_counted_and_ctrl_c_still_ends_it(lab):
    lab.goto(7)
    port = "5298"
    ip_exec = ["ip", "netns", "exec"]
    server = subprocess.Popen(
        [*ip_exec, "BLUE", "iperf3", "-s", "-1", "-B", "11.11.11.3", "-p", port],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    child = start("watch", "--proto", "udp", "--port", port, "--json")
    try:
        assert child.stderr.readline().startswith("watching udp port")
        # Unlimited 64-byte datagrams for 3 s: far more than the watch can print.
        flood = subprocess.run(
            [
                *ip_exec,
                "RED",
                "iperf3",
                "-c",
                "11.11.11.3",
                "-p",
                port,
                "-u",
                "-l",
                "64",
                "-b",
                "0",
                "-t",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert flood.returncode == 0, flood.stderr
        asked = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
        took = time.monotonic() - asked
    finally:
        kill_quietly(child)
        server.kill()
        server.wait()
    assert child.returncode == 0, err
    assert took < 5, f"Ctrl-C took {took:.1f} s under a flood"
    # Every line whole: Ctrl-C came while the watch was writing to a full pipe.
    lines = [json.loads(line) for line in out.splitlines()]
    counts = [line["lost_events"] for line in lines if list(line) == ["lost_events"]]
    summary = lines[-1]
    assert summary["summary"] is True and summary["lost_events"] > 0
    # Shown as it grew, never only at the end.
    assert counts and counts == sorted(counts) and counts[-1] == summary["lost_events"]


def raw_record(kind: int, t_ns: int, skb: int, inode: int = 11, **fields) -> bytes:
    """A ring-buffer record as the probes write it (struct event, nstrace.h)."""
    values = {
        "value": 0,
        "hook": 0,
        "stage": 0,
        "saddr": ip_to_u32("11.11.11.2"),
        "daddr": ip_to_u32("11.11.11.3"),
        "ident": 0,
        "seq": 0,
        "sport": 0,
        "dport": 0,
        "proto": IPPROTO_UDP,
        "icmp_type": 0,
        "dev": b"reth1",
        **fields,
    }
    return RECORD.pack(
        t_ns, skb, inode, 4, values["value"], 0, 0, 0,
        kind, values["hook"], values["stage"], 0, 0,
        values["saddr"], values["daddr"], 0, 0,
        values["ident"], values["seq"], values["sport"], values["dport"],
        values["proto"], 0, values["icmp_type"], 0, 0, 0,
        values["dev"], b"", b"",
    )  # fmt: skip


def flood() -> list[bytes]:
    """Records of a UDP flood through two namespaces, an ICMP flow and a drop."""
    records = []
    for n in range(4):
        skb, t_ns = 0xA0 + n % 2, 1_000 * (n + 1)  # two skbs, reused
        udp = {"sport": 4000, "dport": 5299}
        records += [
            raw_record(2, t_ns, skb, inode=12, dev=b"eth0", **udp),  # tx in RED
            raw_record(1, t_ns + 1, skb, **udp),  # rx in host
            raw_record(3, t_ns + 2, skb, hook=2, stage=1, dev=b"", **udp),
            raw_record(3, t_ns + 3, skb, hook=2, stage=2, dev=b"", **udp),
            raw_record(4, t_ns + 4, 0, dev=b"br0", **udp),  # a route lookup
            # ICMP echoes differ in their sequence number: no two alike.
            raw_record(2, t_ns + 5, 0xC0, proto=1, icmp_type=8, ident=7, seq=n),
        ]
    records.append(raw_record(6, 9_000, 0xA0, value=2, sport=4000, dport=5299))
    return records


class SeenNamespaces:
    def __init__(self) -> None:
        self.names: list[str] = []

    def saw(self, event: Event) -> None:
        self.names.append(event.netns)


def reference_lines(events: list[Event], as_json: bool, netns: str | None) -> str:
    """The watch's lines built the plain way, one event at a time."""
    grouper, lines = Grouper(), []
    for event in events:
        if netns and event.netns != netns:
            continue
        packet, new = grouper.packet_of(event)
        if as_json:
            lines.append(json.dumps(hop_record(event, packet)))
        else:
            lines += [f"packet #{packet}"] if new else []
            lines.append("  " + hop_text(event, packet))
    return "".join(line + "\n" for line in lines)


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
@pytest.mark.parametrize("netns", [None, "host"])
def test_printed_lines_are_the_plain_ones_for_events_and_raw_records(as_json, netns):
    names = {11: "host", 12: "RED"}
    decoder = Decoder(names)
    expected = reference_lines([decoder.decode(r) for r in flood()], as_json, netns)
    assert expected.count("\n") >= (10 if netns else 25)
    from_events = io.StringIO()
    Printer(from_events, as_json, netns).hops(decoder.decode(r) for r in flood())
    assert from_events.getvalue() == expected
    from_records = io.StringIO()
    seen = SeenNamespaces()
    printer = Printer(from_records, as_json, netns)
    printer.records(flood(), Decoder(names), seen)
    assert from_records.getvalue() == expected
    # Repeated records are decoded once: the linker sees each distinct one.
    assert len(seen.names) < len(flood()) and set(seen.names) == {"host", "RED"}
