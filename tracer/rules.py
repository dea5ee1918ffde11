"""Rule attribution: which table, chain and rule decided the probe's fate.

Theory of operation
-------------------

nftables can trace a packet: once an skb has ``meta nftrace`` set, every
base chain it crosses reports each matching rule, each jump and return, and
the policy that ended the chain, as ``NFT_MSG_TRACE`` messages on the
netlink group ``NFNLGRP_NFTRACE`` (what `nft monitor trace` prints; nft(8),
"Ruleset debug/tracing"). iptables-nft rules are nftables rules, so they are
traced too.

1. **Mark.** In every namespace in play nstrace adds tables of its own, one
   in the ``ip`` family (base chains at prerouting and output) and one in the
   ``bridge`` family (base chains at all five bridge hooks), at priority
   -500, before raw (-300) and conntrack (-200). Their one rule per pattern
   of the probe's flow sets ``meta nftrace set 1``: the ICMP echo with the
   probe's identifier, TCP or UDP from or to the probe's source port, and
   ICMP errors that quote either. The tables carry the ``owner`` flag, so
   they live only as long as nstrace's libnftables socket (`tracer.nft`).
   ``nf_trace`` is cleared when an skb crosses into another namespace
   (skb_scrub_packet), hence a table in each.

2. **Listen.** The kernel builds trace messages only when the packet's own
   namespace has a listener on the group (nfnetlink_has_listeners in
   net/netfilter/nf_tables_trace.c), so one socket is opened in each
   namespace, before the tables exist. Messages are sent while the packet
   is processed, so once the probes have seen the verdict, the messages
   about it are already queued: they are read after collection.

   Cost, measured on the lab (5 namespaces, kernel 6.18): 12-40 ms to make
   the tables and listeners, 9-12 ms to read the rulesets back, 10-15 ms to
   release the tables (RCU grace periods, waited for side by side).

3. **Parse.** Messages carry ``NFTA_TRACE_*`` attributes
   (include/uapi/linux/netfilter/nf_tables.h). The first message of each
   base-chain invocation carries the packet's headers; a trace id is stable
   per skb (kernel 6.3+). A message with headers opens a *crossing* of one
   base chain; the messages that follow with the same id belong to it. The
   last accept/drop (by a rule, or the chain's policy) is its decision.
   Crossings whose headers are not the probe's flow are ignored (another
   tool may trace too).

4. **Name.** Each base chain's hook, each rule's position and text come from
   the namespace's ruleset, listed as text with handles through the same
   libnftables context (see :func:`index_ruleset` for why not JSON); rules
   of iptables-nft tables are shown in iptables syntax from `iptables-save`
   when the chain's rules line up one for one.

5. **Hand over.** Crossings of nstrace's own bridge chains become
   ``bridge`` events, placed in time next to the device and hook events the
   probes saw (trace messages have no timestamp); every other crossing
   becomes a :class:`RuleVerdict` that path assembly attaches to the hook
   hop it belongs to.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from tracer import events as ev
from tracer import netns
from tracer.events import Event

log = logging.getLogger(__name__)

# include/uapi/linux/netlink.h and include/uapi/linux/netfilter/nfnetlink.h
NETLINK_NETFILTER = 12
NFNLGRP_NFTRACE = 9
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_TRACE = 17  # enum nf_tables_msg_types
TRACE_MSG_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE
NLMSG_HDR = struct.Struct("=IHHII")
NFGENMSG = struct.Struct("=BBH")
NLA_HDR = struct.Struct("=HH")
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

# enum nft_trace_attributes
NFTA_TRACE_TABLE = 1
NFTA_TRACE_CHAIN = 2
NFTA_TRACE_RULE_HANDLE = 3
NFTA_TRACE_TYPE = 4
NFTA_TRACE_VERDICT = 5
NFTA_TRACE_ID = 6
NFTA_TRACE_NETWORK_HEADER = 8
NFTA_TRACE_TRANSPORT_HEADER = 9
NFTA_TRACE_IIF = 10
NFTA_TRACE_OIF = 12
NFTA_TRACE_NFPROTO = 15
NFTA_TRACE_POLICY = 16
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2

TRACE_TYPES = {1: "policy", 2: "return", 3: "rule"}  # enum nft_trace_types
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
# include/uapi/linux/netfilter.h (NF_*) and nf_tables.h (NFT_*).
VERDICTS = {
    0: "drop",
    1: "accept",
    2: "stolen",
    3: "queue",
    4: "repeat",
    5: "stop",
    -1: "continue",
    -2: "break",
    -3: "jump",
    -4: "goto",
    -5: "return",
}
NF_VERDICT_MASK = 0xFF  # NF_DROP_ERR() keeps an errno in the upper bits
DECISIONS = ("accept", "drop", "queue", "stolen")

PROTOCOLS = {"icmp": ev.IPPROTO_ICMP, "tcp": ev.IPPROTO_TCP, "udp": ev.IPPROTO_UDP}
OWN_PREFIX = "nstrace_"
PRIORITY = -500
IP_HOOKS = ("prerouting", "output")
BRIDGE_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
RCVBUF = 1 << 20
SO_RCVBUFFORCE = 33  # include/uapi/asm-generic/socket.h


# ---- the probe's flow ------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """The probe's packets: ICMP echo with identifier *tag*, or TCP/UDP port."""

    proto: str  # icmp, tcp, udp
    tag: int  # ICMP echo identifier, or the probe's TCP/UDP source port

    def nft_matches(self) -> list[str]:
        """One nft match per pattern of the flow (nft(8), PAYLOAD EXPRESSION)."""
        # An ICMP error quotes the IP header (20 bytes without options) and
        # the first 8 bytes of the datagram after the error's 8-byte header:
        # the echo identifier is at byte 32, the source port at 28 and the
        # destination port at 30 of the transport header.
        errors = "icmp type { destination-unreachable, time-exceeded }"
        if self.proto == "icmp":
            return [
                f"icmp type {{ echo-request, echo-reply }} icmp id {self.tag}",
                f"{errors} @th,256,16 {self.tag}",
            ]
        return [
            f"{self.proto} sport {self.tag}",
            f"{self.proto} dport {self.tag}",
            f"{errors} @th,224,16 {self.tag}",
            f"{errors} @th,240,16 {self.tag}",
        ]


@dataclass
class Packet:
    """The headers a trace message quotes, as far as direction needs them."""

    src: str
    dst: str
    proto: int
    icmp_type: int | None = None
    ident: int | None = None  # echo identifier; of the quoted packet for errors
    sport: int | None = None  # of the quoted packet for errors
    dport: int | None = None
    quoted_proto: int | None = None  # errors: the quoted packet's protocol

    def direction(self, flow: Flow) -> str | None:
        """request, reply, or None when this is not the probe's packet."""
        is_error = self.proto == ev.IPPROTO_ICMP and self.icmp_type in ev.ICMP_ERRORS
        if is_error and self.ident is None and self.sport is None:
            # The kernel quotes only 20 bytes of the transport header
            # (NFT_TRACETYPE_TRANSPORT_HSIZE, net/netfilter/nf_tables_trace.c):
            # not enough to reach the quoted tag. nstrace's own rule marked
            # this error for quoting the probe; the protocol must agree.
            return ev.REPLY if self.quoted_proto == PROTOCOLS[flow.proto] else None
        if flow.proto == "icmp":
            if self.ident != flow.tag:
                return None
            if is_error:
                return ev.REPLY
            if self.icmp_type == ev.ICMP_ECHO_REQUEST:
                return ev.REQUEST
            return ev.REPLY if self.icmp_type == ev.ICMP_ECHO_REPLY else None
        if is_error:
            return ev.REPLY if flow.tag in (self.sport, self.dport) else None
        if self.sport == flow.tag:
            return ev.REQUEST
        return ev.REPLY if self.dport == flow.tag else None


def parse_packet(network: bytes, transport: bytes | None) -> Packet | None:
    """The IPv4 packet quoted by a trace message, or None if it is not IPv4."""
    if len(network) < 20 or network[0] >> 4 != 4:
        return None
    proto = network[9]
    packet = Packet(
        src=str(ipaddress.IPv4Address(network[12:16])),
        dst=str(ipaddress.IPv4Address(network[16:20])),
        proto=proto,
    )
    if not transport:
        # Without a transport header attribute the packet quotes it itself.
        transport = network[(network[0] & 0x0F) * 4 :]
    if proto == ev.IPPROTO_ICMP and len(transport) >= 8:
        packet.icmp_type = transport[0]
        if packet.icmp_type in ev.ICMP_ERRORS:
            _parse_quoted(packet, transport[8:])
        else:
            packet.ident = struct.unpack_from("!H", transport, 4)[0]
    elif proto in (ev.IPPROTO_TCP, ev.IPPROTO_UDP) and len(transport) >= 4:
        packet.sport, packet.dport = struct.unpack_from("!HH", transport)
    return packet


def _parse_quoted(packet: Packet, quoted: bytes) -> None:
    if len(quoted) >= 10:
        packet.quoted_proto = quoted[9]
    if len(quoted) < 20:
        return
    inner = quoted[(quoted[0] & 0x0F) * 4 :]
    if quoted[9] == ev.IPPROTO_ICMP and len(inner) >= 6:
        packet.ident = struct.unpack_from("!H", inner, 4)[0]
    elif len(inner) >= 4:
        packet.sport, packet.dport = struct.unpack_from("!HH", inner)


# ---- netlink trace messages ------------------------------------------------


@dataclass
class TraceMessage:
    """One NFT_MSG_TRACE, decoded."""

    family: str
    table: str
    chain: str
    trace_id: int
    type: str  # rule, return or policy
    verdict: str | None = None
    handle: int | None = None
    jump_chain: str | None = None
    iif: int | None = None
    oif: int | None = None
    packet: Packet | None = None
    has_headers: bool = False


def _attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    attrs = {}
    while start + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(data, start)
        if length < NLA_HDR.size or start + length > end:
            break
        attrs[kind & NLA_TYPE_MASK] = data[start + NLA_HDR.size : start + length]
        start += (length + 3) & ~3
    return attrs


def _string(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def _u32(value: bytes) -> int:
    return struct.unpack("!I", value[:4])[0]


def parse_messages(data: bytes) -> list[TraceMessage]:
    """Every trace message in one netlink datagram; anything else is skipped."""
    out = []
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            break  # truncated: the socket buffer was too small
        if kind == TRACE_MSG_TYPE:
            family = data[offset + NLMSG_HDR.size]
            start = offset + NLMSG_HDR.size + NFGENMSG.size
            message = _trace_message(family, _attributes(data, start, offset + length))
            if message is not None:
                out.append(message)
        offset += (length + 3) & ~3
    return out


def _trace_message(family: int, attrs: dict[int, bytes]) -> TraceMessage | None:
    if NFTA_TRACE_ID not in attrs or NFTA_TRACE_TYPE not in attrs:
        return None
    message = TraceMessage(
        family=FAMILIES.get(family, str(family)),
        table=_string(attrs.get(NFTA_TRACE_TABLE, b"")),
        chain=_string(attrs.get(NFTA_TRACE_CHAIN, b"")),
        trace_id=_u32(attrs[NFTA_TRACE_ID]),
        type=TRACE_TYPES.get(_u32(attrs[NFTA_TRACE_TYPE]), "unknown"),
    )
    if NFTA_TRACE_RULE_HANDLE in attrs:
        message.handle = struct.unpack("!Q", attrs[NFTA_TRACE_RULE_HANDLE][:8])[0]
    if NFTA_TRACE_VERDICT in attrs:
        verdict = _attributes(
            attrs[NFTA_TRACE_VERDICT], 0, len(attrs[NFTA_TRACE_VERDICT])
        )
        if NFTA_VERDICT_CODE in verdict:
            message.verdict = _verdict_name(_u32(verdict[NFTA_VERDICT_CODE]))
        if NFTA_VERDICT_CHAIN in verdict:
            message.jump_chain = _string(verdict[NFTA_VERDICT_CHAIN])
    if NFTA_TRACE_POLICY in attrs:
        message.verdict = _verdict_name(_u32(attrs[NFTA_TRACE_POLICY]))
    for key, name in ((NFTA_TRACE_IIF, "iif"), (NFTA_TRACE_OIF, "oif")):
        if key in attrs:
            setattr(message, name, _u32(attrs[key]))
    if NFTA_TRACE_NETWORK_HEADER in attrs:
        message.has_headers = True
        message.packet = parse_packet(
            attrs[NFTA_TRACE_NETWORK_HEADER], attrs.get(NFTA_TRACE_TRANSPORT_HEADER)
        )
    return message


def _verdict_name(code: int) -> str:
    signed = code - (1 << 32) if code & 0x80000000 else code
    if signed >= 0:
        signed &= NF_VERDICT_MASK
    return VERDICTS.get(signed, f"verdict {signed}")


# ---- crossings of base chains ----------------------------------------------


@dataclass
class Crossing:
    """One base chain crossed by one probe packet, and what decided it."""

    netns: str
    family: str
    table: str
    chain: str  # the base chain
    trace_id: int
    dir: str
    iif: int | None = None
    oif: int | None = None
    messages: list[TraceMessage] = field(default_factory=list)
    hook: str | None = None  # PREROUTING...; filled from the ruleset
    rule: dict[str, Any] | None = None  # filled by :func:`describe`

    @property
    def own(self) -> bool:
        return self.table.startswith(OWN_PREFIX)

    def decision(self) -> TraceMessage | None:
        """The message that ended the crossing with a verdict, if any."""
        for message in reversed(self.messages):
            if message.verdict in DECISIONS:
                return message
        return None


def crossings(
    messages: Iterable[tuple[str, TraceMessage]], flow: Flow
) -> list[Crossing]:
    """Group (netns, message) pairs, in arrival order, into the flow's crossings."""
    out: list[Crossing] = []
    open_by_id: dict[tuple[str, int], Crossing | None] = {}
    for ns, message in messages:
        key = (ns, message.trace_id)
        if message.has_headers:
            direction = message.packet.direction(flow) if message.packet else None
            if direction is None:
                open_by_id[key] = None  # another packet: ignore its messages
                continue
            crossing = Crossing(
                ns,
                message.family,
                message.table,
                message.chain,
                message.trace_id,
                direction,
                message.iif,
                message.oif,
            )
            out.append(crossing)
            open_by_id[key] = crossing
        crossing = open_by_id.get(key)
        if crossing is not None:
            crossing.messages.append(message)
    return out


# ---- the ruleset: hooks and rule text --------------------------------------


@dataclass
class Ruleset:
    """One namespace's ruleset, indexed for naming trace messages."""

    hooks: dict[tuple[str, str, str], str] = field(default_factory=dict)
    policies: dict[tuple[str, str, str], str] = field(default_factory=dict)
    # (family, table, chain) -> rule handles in chain order
    order: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    # (family, table, handle) -> nft syntax
    text: dict[tuple[str, str, int], str] = field(default_factory=dict)
    # iptables-save: table -> chain -> its "-A ..." lines, in order
    iptables: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def rule_text(self, family: str, table: str, chain: str, handle: int) -> str:
        lines = self.iptables_rules(family, table, chain)
        position = self.order.get((family, table, chain), [])
        if lines is not None and handle in position:
            return lines[position.index(handle)]
        return self.text.get((family, table, handle), f"rule handle {handle}")

    def policy_text(self, family: str, table: str, chain: str, verdict: str) -> str:
        if self.iptables_rules(family, table, chain) is not None:
            return f"-P {chain} {verdict.upper()}"
        return f"policy {verdict}"

    def iptables_rules(self, family: str, table: str, chain: str) -> list[str] | None:
        """The chain's rules in iptables syntax, if they match nft's one for one."""
        if family != "ip" or table not in self.iptables:
            return None
        lines = self.iptables[table].get(chain)
        if lines is None or len(lines) != len(
            self.order.get((family, table, chain), [])
        ):
            return None
        return lines


def index_ruleset(text: str) -> Ruleset:
    """Index `nft -a list ruleset` text: base chains' hooks, rule order and text.

    The text form, not `nft -j`: libnftables 1.0.6 corrupted its heap when
    it printed JSON while other contexts of the same process held owner
    tables (glibc "corrupted double-linked list" after a few dozen traces in
    one process; the text printer ran 200 rounds clean).
    """
    ruleset = Ruleset()
    table: tuple[str, str] | None = None
    chain: tuple[str, str, str] | None = None
    for line in text.splitlines():
        if found := _TABLE_LINE.match(line):
            table, chain = (found.group(1), found.group(2)), None
        elif (found := _CHAIN_LINE.match(line)) and table is not None:
            chain = (*table, found.group(1).strip('"'))
            ruleset.order.setdefault(chain, [])
        elif _BLOCK_LINE.match(line) or line.strip() == "}":
            chain = None  # a set, map or other object, or the end of a chain
        elif chain is None:
            continue
        elif found := _BASE_LINE.match(line):
            ruleset.hooks[chain] = found.group(1).upper()
            ruleset.policies[chain] = found.group(2) or "accept"
        elif found := _RULE_LINE.match(line):
            handle = int(found.group(2))
            ruleset.order[chain].append(handle)
            body = _COUNTER.sub("", found.group(1)).strip()
            ruleset.text[(chain[0], chain[1], handle)] = body
    return ruleset


_TABLE_LINE = re.compile(r"^table (\S+) (\S+) \{")
_CHAIN_LINE = re.compile(r"^\s+chain (\S+) \{")
_BLOCK_LINE = re.compile(r"^\s+\S+ .*\{ # handle \d+$")
_BASE_LINE = re.compile(r"^\s+type \S+ hook (\S+) .*priority [^;]+;(?: policy (\S+);)?")
_RULE_LINE = re.compile(r"^\s+(.*\S)\s+# handle (\d+)$")
_COUNTER = re.compile(r"\s*counter packets \d+ bytes \d+")


def parse_iptables_save(text: str) -> dict[str, dict[str, list[str]]]:
    """iptables-save output -> table -> chain -> its ``-A`` lines, in order."""
    tables: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), {})
        elif current is not None and line.startswith(":"):
            current.setdefault(line[1:].split()[0], [])
        elif current is not None and line.startswith("-A "):
            current.setdefault(line.split()[1], []).append(line.strip())
    return tables


def iptables_save(ns: str) -> dict[str, dict[str, list[str]]]:
    """The namespace's iptables-nft rules, or nothing if they cannot be read."""

    def save() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["iptables-save"], capture_output=True, text=True, timeout=5, check=False
        )

    try:
        # Started from a thread inside the namespace, which the child
        # inherits (fork(2)), rather than through nsenter: one exec less,
        # 2.4 ms instead of 3.7 on the tutorial's host.
        done = save() if ns == netns.ROOT else netns.run_in(ns, save)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.info("iptables-save in %s failed: %s", ns, err)
        return {}
    if done.returncode != 0:
        log.info("iptables-save in %s: %s", ns, done.stderr.strip())
        return {}
    return parse_iptables_save(done.stdout)


def describe(crossing: Crossing, ruleset: Ruleset) -> None:
    """Fill the crossing's hook and its deciding rule from the ruleset."""
    if crossing.own:
        crossing.hook = crossing.chain.upper()
        return
    key = (crossing.family, crossing.table, crossing.chain)
    crossing.hook = ruleset.hooks.get(key)
    decision = crossing.decision()
    if decision is None:
        return
    policy = decision.type == "policy"
    if policy:
        text = ruleset.policy_text(
            decision.family, decision.table, decision.chain, decision.verdict or "?"
        )
    else:
        text = ruleset.rule_text(
            decision.family, decision.table, decision.chain, decision.handle or 0
        )
    crossing.rule = {
        "family": decision.family,
        "table": decision.table,
        "chain": decision.chain,
        "policy": policy,
        "verdict": decision.verdict,
        "text": text,
    }


# ---- what path assembly gets -----------------------------------------------


@dataclass
class RuleVerdict:
    """A non-bridge crossing's decision, for path assembly to place on a hop."""

    netns: str
    family: str
    hook: str
    dir: str
    rule: dict[str, Any]
    trace_id: int = 0  # the same for every table's chain at one hook crossing


def verdicts(found: Sequence[Crossing]) -> list[RuleVerdict]:
    """The decisions of other tables' crossings outside the bridge family."""
    return [
        RuleVerdict(c.netns, c.family, c.hook, c.dir, c.rule, c.trace_id)
        for c in found
        if not c.own and c.family != "bridge" and c.hook and c.rule
    ]


def bridge_events(found: Sequence[Crossing], events: Sequence[Event]) -> list[Event]:
    """nstrace's own bridge crossings as ``bridge`` events, placed in time.

    Trace messages carry no timestamp, so each crossing is put next to what
    the probes saw of the same packet in the same namespace: PREROUTING
    right after the receive on its input port, FORWARD and POSTROUTING
    right before br_netfilter's IPv4 hook of the same name (or, without
    br_netfilter, before the transmit on the output port), INPUT before the
    receive on the bridge device, OUTPUT before the transmit on its port.
    """
    ordered = sorted(events, key=lambda e: e.t_ns)
    rules = _bridge_rules(found)
    out: list[Event] = []
    previous: dict[tuple[str, int], int] = {}
    for c in found:
        if not (c.own and c.family == "bridge" and c.hook):
            continue
        after = previous.get((c.netns, c.trace_id), 0)
        t = _bridge_time(c, ordered, after)
        previous[(c.netns, c.trace_id)] = t
        extra: dict[str, Any] = {"trace_id": c.trace_id}
        rule = rules.get((c.netns, c.trace_id, c.hook))
        if rule:
            extra["rule"] = rule
        out.append(
            Event(
                ev.BRIDGE,
                t,
                c.netns,
                hook=c.hook,
                dev=_dev(ordered, c.oif or c.iif),
                in_dev=_dev(ordered, c.iif),
                out_dev=_dev(ordered, c.oif),
                src=c.messages[0].packet.src if c.messages[0].packet else None,
                dst=c.messages[0].packet.dst if c.messages[0].packet else None,
                extra=extra,
            )
        )
    return out


def _bridge_rules(found: Sequence[Crossing]) -> dict[tuple[str, int, str], dict]:
    # Other bridge tables' decisions, by the crossing of our own they share.
    return {
        (c.netns, c.trace_id, c.hook): c.rule
        for c in found
        if not c.own and c.family == "bridge" and c.hook and c.rule
    }


def _dev(events: Sequence[Event], ifindex: int | None) -> str | None:
    if not ifindex:
        return None
    for e in events:
        if e.ifindex == ifindex and e.dev:
            return e.dev
    return None


def _bridge_time(c: Crossing, events: Sequence[Event], after: int) -> int:
    def first(match) -> Event | None:
        return next((e for e in events if e.t_ns > after and match(e)), None)

    def device(kind: str, ifindex: int | None):
        return lambda e: e.kind == kind and e.netns == c.netns and e.ifindex == ifindex

    def ip_hook(name: str):
        return lambda e: (
            e.kind == ev.HOOK
            and e.netns == c.netns
            and e.hook == name
            and e.stage != ev.LAST
        )

    if c.hook == "PREROUTING":
        anchor = first(device(ev.RX, c.iif))
        if anchor is not None:
            return anchor.t_ns + 1
    elif c.hook in ("FORWARD", "POSTROUTING"):
        tx = first(device(ev.TX, c.oif))
        hook = first(ip_hook(c.hook))
        if hook is not None and (tx is None or hook.t_ns < tx.t_ns):
            return hook.t_ns - 1
        if tx is not None:
            return tx.t_ns - 1
    elif c.hook == "INPUT":
        anchor = first(
            lambda e: e.kind == ev.RX and e.netns == c.netns and e.ifindex != c.iif
        )
        if anchor is not None:
            return anchor.t_ns - 1
    elif c.hook == "OUTPUT":
        anchor = first(device(ev.TX, c.oif))
        if anchor is not None:
            return anchor.t_ns - 2
    # No anchor (the frame died in this hook): just before the drop seen in
    # this namespace, after the IPv4 hook br_netfilter called before it.
    free = first(lambda e: e.kind == ev.FREE and e.netns == c.netns)
    if free is not None:
        return free.t_ns - 1
    return after + 1 if after else (events[-1].t_ns + 1 if events else 0)


# ---- the tracer: tables, listeners, teardown -------------------------------


def table_commands(name: str, flow: Flow) -> str:
    """The nft commands that make nstrace's two tables in one namespace."""
    lines = []
    for family, hooks in (("ip", IP_HOOKS), ("bridge", BRIDGE_HOOKS)):
        lines.append(f"add table {family} {name} {{ flags owner; }}")
        for hook in hooks:
            lines.append(
                f"add chain {family} {name} {hook} "
                f"{{ type filter hook {hook} priority {PRIORITY}; policy accept; }}"
            )
            for match in flow.nft_matches():
                lines.append(
                    f"add rule {family} {name} {hook} {match} meta nftrace set 1"
                )
    return "\n".join(lines) + "\n"


def start_rule_tracer(namespaces: Sequence[str], flow: Flow) -> RuleTracer | None:
    """A :class:`RuleTracer`, or None (said once on stderr) if it cannot run.

    Without it the trace still has every hop, only no rule names.
    """
    from tracer.errors import NstraceError
    from tracer.nft import NftError

    try:
        return RuleTracer(namespaces, flow)
    except (NstraceError, NftError, OSError) as err:
        log.warning("rule attribution is off for this trace: %s", err)
        return None


def _open_listener() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        try:
            # Past net.core.rmem_max, which root may do (socket(7)).
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, 1 << (NFNLGRP_NFTRACE - 1)))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class RuleTracer:
    """nstrace's tables and trace listeners in every namespace in play.

    Use as a context manager, or call :meth:`close` in a ``finally``: the
    tables go when the libnftables contexts are freed (and with the process,
    whatever happens, because of the ``owner`` flag).
    """

    def __init__(self, namespaces: Sequence[str], flow: Flow) -> None:
        from tracer.nft import Nft  # loads libnftables

        self.flow = flow
        self.table = f"{OWN_PREFIX}{os.getpid()}_{flow.tag}"
        self.listeners: dict[str, socket.socket] = {}
        self.contexts: dict[str, Any] = {}
        self.messages: list[tuple[str, TraceMessage]] = []
        self.datagrams: list[tuple[str, bytes]] = []  # as received, for recordings
        self.lost = 0
        try:
            for ns in namespaces:
                if not netns.exists(ns):
                    log.info("namespace %s is gone; no rule attribution there", ns)
                    continue
                self.listeners[ns] = netns.run_in(ns, _open_listener)
                self.contexts[ns] = Nft(ns)
                self.contexts[ns].run(table_commands(self.table, flow))
        except BaseException:
            self.close()
            raise

    def drain(self) -> None:
        """Read every trace message queued so far, namespace by namespace."""
        for ns, sock in self.listeners.items():
            while True:
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError as err:  # ENOBUFS: the socket overflowed
                    self.lost += 1
                    log.warning("trace messages lost in %s: %s", ns, err)
                    continue
                self.datagrams.append((ns, data))
                self.messages.extend((ns, m) for m in parse_messages(data))

    def crossings(self) -> list[Crossing]:
        """The flow's crossings, each named from its namespace's ruleset."""
        self.drain()
        found = crossings(self.messages, self.flow)
        rulesets: dict[str, Ruleset] = {}
        for c in found:
            if c.netns not in rulesets:
                rulesets[c.netns] = self._ruleset(c.netns, found)
            describe(c, rulesets[c.netns])
        return found

    def _ruleset(self, ns: str, found: Sequence[Crossing]) -> Ruleset:
        nft = self.contexts.get(ns)
        if nft is None or all(c.own for c in found if c.netns == ns):
            return Ruleset()
        ruleset = index_ruleset(nft.ruleset_text())
        if any(c.family == "ip" and not c.own for c in found if c.netns == ns):
            ruleset.iptables = iptables_save(ns)
        return ruleset

    def close(self) -> None:
        # Releasing the sockets deletes the tables; each release waits for
        # an RCU grace period in the kernel, so they run side by side.
        releasing = [
            threading.Thread(target=nft.release_socket, name=f"nft-release-{ns}")
            for ns, nft in self.contexts.items()
        ]
        for thread in releasing:
            thread.start()
        for thread in releasing:
            thread.join()
        for nft in self.contexts.values():
            nft.close()
        self.contexts.clear()
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
