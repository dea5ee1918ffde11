"""Builders of synthetic event sequences shaped like what the probes decode.

The lab's addresses (LAB.md): RED 11.11.11.2 on reth0, its peer reth1 a port
of br0 (11.11.11.1) in `host`, whose uplink eth0 (10.0.2.15) leads to isp0 in
`internet` (10.0.2.2, and 8.8.8.8 on lo).
"""

from __future__ import annotations

from tracer import events as ev
from tracer.events import Event
from tracer.path import Probe

RED_IP = "11.11.11.2"
HOST_UPLINK_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"
GOOGLE_IP = "8.8.8.8"
IDENT = 0x1A2B
T0 = 5_000_000_000_000  # about 83 minutes of uptime, as bpf_ktime_get_ns gives
REQUEST_SKB = 0xFFFF888004A1E000
REPLY_SKB = 0xFFFF888004A1F100

PROBE = Probe(src_netns="RED", dst=GOOGLE_IP, proto="icmp", ident=IDENT)


class Clock:
    """Hands out increasing timestamps, a few microseconds apart."""

    def __init__(self, start: int = T0, step: int = 3_000) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> int:
        self.now += self.step
        return self.now


def icmp(kind: str, t: int, netns: str, src: str, dst: str, **kw) -> Event:
    """A packet event of the probe's ICMP flow (request unless icmp_type=0)."""
    kw.setdefault("icmp_type", ev.ICMP_ECHO_REQUEST)
    kw.setdefault("ident", IDENT)
    return Event(
        kind=kind, t_ns=t, netns=netns, src=src, dst=dst, proto=ev.IPPROTO_ICMP, **kw
    )


def hook_pair(
    clock: Clock,
    netns: str,
    hook: str,
    src: str,
    dst: str,
    *,
    after: tuple[str, str] | None = None,
    skb: int = REQUEST_SKB,
    in_dev: str | None = None,
    out_dev: str | None = None,
    icmp_type: int = ev.ICMP_ECHO_REQUEST,
) -> list[Event]:
    """The first and last events of one hook crossing; *after* = NAT result."""
    common = {
        "skb": skb,
        "hook": hook,
        "in_dev": in_dev,
        "out_dev": out_dev,
        "icmp_type": icmp_type,
    }
    last_src, last_dst = after or (src, dst)
    return [
        icmp(ev.HOOK, clock(), netns, src, dst, stage=ev.FIRST, **common),
        icmp(ev.HOOK, clock(), netns, last_src, last_dst, stage=ev.LAST, **common),
    ]


def lone_first(clock: Clock, netns: str, hook: str, src: str, dst: str, **kw) -> Event:
    kw.setdefault("skb", REQUEST_SKB)
    return icmp(ev.HOOK, clock(), netns, src, dst, hook=hook, stage=ev.FIRST, **kw)


def route(
    t: int,
    netns: str,
    src: str,
    dst: str,
    *,
    table: int = 254,
    dev: str | None = None,
    gateway: str | None = None,
    error: int = 0,
) -> Event:
    return Event(
        kind=ev.ROUTE,
        t_ns=t,
        netns=netns,
        src=src,
        dst=dst,
        proto=ev.IPPROTO_ICMP,
        table=table,
        dev=dev,
        gateway=gateway,
        error=error,
    )


def free(
    t: int,
    netns: str,
    reason: str,
    *,
    skb: int,
    dev: str | None = None,
    src: str | None = None,
    dst: str | None = None,
    icmp_type: int | None = None,
) -> Event:
    """A kfree_skb event; without src/dst it is an skb whose headers were gone."""
    return Event(
        kind=ev.FREE,
        t_ns=t,
        netns=netns,
        skb=skb,
        dev=dev,
        src=src,
        dst=dst,
        reason=reason,
        proto=ev.IPPROTO_ICMP if src else 0,
        icmp_type=icmp_type,
        ident=IDENT if src else 0,
    )


# ---- the tutorial's RED -> 8.8.8.8 (LAB.md steps 6 and 7) -------------------


def request_to_internet(clock: Clock) -> list[Event]:
    """RED's echo request out through br0, MASQUERADE on eth0, into internet."""
    c = clock
    out: list[Event] = [
        route(c(), "RED", "0.0.0.0", GOOGLE_IP, dev="reth0", gateway="11.11.11.1"),
        *hook_pair(c, "RED", "OUTPUT", RED_IP, GOOGLE_IP, out_dev="reth0"),
        *hook_pair(c, "RED", "POSTROUTING", RED_IP, GOOGLE_IP, out_dev="reth0"),
        Event(
            kind=ev.NEIGH,
            t_ns=c(),
            netns="RED",
            dev="reth0",
            neigh_addr="11.11.11.1",
            neigh_state="REACHABLE",
        ),
        icmp(ev.TX, c(), "RED", RED_IP, GOOGLE_IP, skb=REQUEST_SKB, dev="reth0"),
        icmp(ev.RX, c(), "host", RED_IP, GOOGLE_IP, skb=REQUEST_SKB, dev="reth1"),
        # br_netfilter runs the IPv4 hooks with the bridge as the device.
        *hook_pair(c, "host", "PREROUTING", RED_IP, GOOGLE_IP, in_dev="br0"),
        route(c(), "host", RED_IP, GOOGLE_IP, dev="eth0", gateway=GATEWAY_IP),
        icmp(ev.RX, c(), "host", RED_IP, GOOGLE_IP, skb=REQUEST_SKB, dev="br0"),
        *hook_pair(
            c, "host", "FORWARD", RED_IP, GOOGLE_IP, in_dev="br0", out_dev="eth0"
        ),
        *hook_pair(
            c,
            "host",
            "POSTROUTING",
            RED_IP,
            GOOGLE_IP,
            out_dev="eth0",
            after=(HOST_UPLINK_IP, GOOGLE_IP),
        ),
        icmp(
            ev.TX, c(), "host", HOST_UPLINK_IP, GOOGLE_IP, skb=REQUEST_SKB, dev="eth0"
        ),
        icmp(
            ev.RX,
            c(),
            "internet",
            HOST_UPLINK_IP,
            GOOGLE_IP,
            skb=REQUEST_SKB,
            dev="isp0",
        ),
        *hook_pair(
            c, "internet", "PREROUTING", HOST_UPLINK_IP, GOOGLE_IP, in_dev="isp0"
        ),
        route(c(), "internet", HOST_UPLINK_IP, GOOGLE_IP, table=255, dev="lo"),
        *hook_pair(c, "internet", "INPUT", HOST_UPLINK_IP, GOOGLE_IP, in_dev="isp0"),
    ]
    return out


def reply_to_host(clock: Clock) -> list[Event]:
    """8.8.8.8's echo reply back to eth0 and conntrack's reverse NAT."""
    c = clock
    reply = {"skb": REPLY_SKB, "icmp_type": ev.ICMP_ECHO_REPLY}
    return [
        route(c(), "internet", GOOGLE_IP, HOST_UPLINK_IP, dev="isp0"),
        *hook_pair(
            c, "internet", "OUTPUT", GOOGLE_IP, HOST_UPLINK_IP, out_dev="isp0", **reply
        ),
        *hook_pair(
            c,
            "internet",
            "POSTROUTING",
            GOOGLE_IP,
            HOST_UPLINK_IP,
            out_dev="isp0",
            **reply,
        ),
        icmp(ev.TX, c(), "internet", GOOGLE_IP, HOST_UPLINK_IP, dev="isp0", **reply),
        icmp(ev.RX, c(), "host", GOOGLE_IP, HOST_UPLINK_IP, dev="eth0", **reply),
        *hook_pair(
            c,
            "host",
            "PREROUTING",
            GOOGLE_IP,
            HOST_UPLINK_IP,
            in_dev="eth0",
            after=(GOOGLE_IP, RED_IP),
            **reply,
        ),
        route(c(), "host", GOOGLE_IP, RED_IP, dev="br0"),
    ]


def step6_events() -> list[Event]:
    """The reply dies in the host's FORWARD chain (policy DROP)."""
    c = Clock()
    return [
        *request_to_internet(c),
        *reply_to_host(c),
        lone_first(
            c,
            "host",
            "FORWARD",
            GOOGLE_IP,
            RED_IP,
            skb=REPLY_SKB,
            in_dev="eth0",
            out_dev="br0",
            icmp_type=ev.ICMP_ECHO_REPLY,
        ),
        free(
            c(),
            "host",
            "NETFILTER_DROP",
            skb=REPLY_SKB,
            dev="eth0",
            src=GOOGLE_IP,
            dst=RED_IP,
            icmp_type=ev.ICMP_ECHO_REPLY,
        ),
    ]


def step7_events() -> list[Event]:
    """The reply is forwarded to br0, bridged to reth1 and reaches RED."""
    c = Clock()
    reply = {"skb": REPLY_SKB, "icmp_type": ev.ICMP_ECHO_REPLY}
    return [
        *request_to_internet(c),
        *reply_to_host(c),
        *hook_pair(
            c,
            "host",
            "FORWARD",
            GOOGLE_IP,
            RED_IP,
            in_dev="eth0",
            out_dev="br0",
            **reply,
        ),
        *hook_pair(c, "host", "POSTROUTING", GOOGLE_IP, RED_IP, out_dev="br0", **reply),
        icmp(ev.TX, c(), "host", GOOGLE_IP, RED_IP, dev="br0", **reply),
        icmp(ev.TX, c(), "host", GOOGLE_IP, RED_IP, dev="reth1", **reply),
        icmp(ev.RX, c(), "RED", GOOGLE_IP, RED_IP, dev="reth0", **reply),
        *hook_pair(c, "RED", "PREROUTING", GOOGLE_IP, RED_IP, in_dev="reth0", **reply),
        route(c(), "RED", GOOGLE_IP, RED_IP, table=255, dev="reth0"),
        *hook_pair(c, "RED", "INPUT", GOOGLE_IP, RED_IP, in_dev="reth0", **reply),
        # The raw socket got its copy; icmp_rcv found no ping socket for it.
        free(
            c(),
            "RED",
            "NO_SOCKET",
            skb=REPLY_SKB,
            dev="reth0",
            src=GOOGLE_IP,
            dst=RED_IP,
            icmp_type=ev.ICMP_ECHO_REPLY,
        ),
    ]


ECHO_REPLY = {"src": GOOGLE_IP, "dst": RED_IP, "icmp_type": 0, "icmp_code": 0}
