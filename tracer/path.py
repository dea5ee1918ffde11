"""Path assembly: turn the probe's decoded events into hops and a verdict.

Theory of operation
-------------------

The input is what the kernel and user space saw of one probe: a list of
:class:`~tracer.events.Event` (possibly out of order: the ring buffer is fed
by several CPUs), whether ``sendto`` was refused (``send_error``), the packet
that reached the injector's socket (``reply``) and how many events were lost.
Nothing here touches the kernel, so a recorded trace replays exactly.

1. **Order.** Events are sorted by ``t_ns``; the sort is stable, so events
   with equal stamps keep the order the decoder gave them.

2. **Direction.** Each event is ``request`` or ``reply``. The packet's own
   headers decide first: ICMP echo request (type 8) is the request, echo
   reply (0) and ICMP errors (3, 11, which quote the probe) are the reply;
   for TCP and UDP the packet going *to* the probe's port is the request and
   the one coming *from* it is the reply (a TCP reset too). When the headers
   say nothing (the kernel may free an skb whose headers it can no longer
   parse; a route lookup has no packet), the addresses decide (from the
   probe's destination: reply; to it: request), then another event of the
   same skb, then the event before it. A neighbour event belongs to the
   packet before it. A route lookup made right after a packet was received
   or crossed PREROUTING or OUTPUT in the same namespace routes that packet
   (input route, reverse-path check, re-route after NAT) and takes its
   direction: an rp_filter lookup has the addresses the wrong way round.
   Any other lookup is for a new packet (an echo reply, an ICMP error) and
   goes by its addresses.

3. **Hooks.** nstrace links a netfilter program at the first and at the
   last priority of every IPv4 hook, so each crossing of a hook yields a
   ``first`` and a ``last`` event on the same skb in the same namespace.
   The pair is one hop; any address that differs between the two was
   rewritten by NAT inside the hook (MASQUERADE at POSTROUTING, conntrack's
   reverse NAT of a reply at PREROUTING) and becomes a ``nat`` entry. A
   ``first`` whose ``last`` never comes means the packet did not get through
   that hook: the pairing closes when the skb shows up anywhere else (device,
   free, another hook) and the hop is marked ``passed: false``.

4. **Frees.** ``kfree_skb`` is called for real drops and for the ordinary
   end of some packets. Benign frees: ``NO_SOCKET`` on a reply in the
   probe's namespace (the injector's raw socket got its copy and no other
   socket wanted it), ``OTHERHOST`` (a flooded copy that was not for this
   host), and any free after the reply reached the injector's socket. Every
   other free is a drop; the first one is *the* drop, attributed to the hook
   that the skb entered and never left (for ``NETFILTER_DROP``), otherwise to
   the last hook it entered there.

5. **Rules.** Rule attribution (`tracer.rules`) hands over the decision of
   each netfilter base chain the probe crossed, keyed by namespace, hook
   and direction but without a timestamp. The n-th crossing of a hook in a
   namespace and direction goes to the n-th hook hop of the same key, as
   ``rule`` (a drop if one of its tables dropped, else the last accept);
   ``rules`` lists them all when several tables decided. The drop's
   ``rule`` is the dropping decision at the drop's hook. Bridge-family hops
   arrive as ``bridge`` events carrying their rule already.

6. **Outcome.** ``unreachable`` when ``sendto`` was refused or an ICMP error
   (or a TCP reset) came back; ``reply`` when the answer reached the socket;
   ``dropped`` when a drop was seen; ``no-reply`` otherwise. User space's
   view of the socket is the truth for the outcome; the events explain it.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tracer import events as ev
from tracer.errors import UsageError
from tracer.events import Event
from tracer.rules import RuleVerdict

if TYPE_CHECKING:
    from collections.abc import Sequence

log = logging.getLogger(__name__)

SCHEMA = 1
RECORDING_FORMAT = "nstrace-recording"
RECORDING_VERSION = 1

OUTCOMES = ("reply", "dropped", "no-reply", "unreachable", "error")
PROTOS = {"icmp": ev.IPPROTO_ICMP, "tcp": ev.IPPROTO_TCP, "udp": ev.IPPROTO_UDP}
TCP_RST = 0x04

# Frees that are the normal end of a packet, not a loss (see step 4 above).
NO_SOCKET = "NO_SOCKET"
OTHERHOST = "OTHERHOST"
NETFILTER_DROP = "NETFILTER_DROP"

# Route lookups return a negative errno. fib_table_lookup() returns -EAGAIN
# when the table has no match (the caller then tries the next table or turns
# it into -ENETUNREACH); the other codes come from the matching route's type
# (fib_props[] in net/ipv4/fib_semantics.c).
ROUTE_ERRORS = {
    "EAGAIN": "no route in this table",
    "ENETUNREACH": "no route",
    "EHOSTUNREACH": "unreachable route",
    "EACCES": "prohibit route",
    "EINVAL": "blackhole route",
}


@dataclass(frozen=True)
class Probe:
    """The packet nstrace sends, as the pure core needs to know it."""

    src_netns: str
    dst: str
    proto: str = "icmp"
    ident: int = 0  # ICMP echo identifier
    src: str | None = None  # the source address, once known
    dport: int | None = None
    sport: int | None = None

    def __post_init__(self) -> None:
        if self.proto not in PROTOS:
            raise UsageError(
                f"protocol {self.proto!r} is not supported (use icmp, tcp or udp)"
            )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "src_netns": self.src_netns,
            "src": self.src,
            "dst": self.dst,
            "proto": self.proto,
            "id": self.ident,
        }
        # Ports only where they mean something: an ICMP probe has none.
        if self.proto != "icmp":
            out["dport"] = self.dport
            out["sport"] = self.sport
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Probe:
        """Read a probe from its JSON form (``id``) or recording form (``ident``)."""
        return cls(
            src_netns=data["src_netns"],
            dst=data["dst"],
            proto=data.get("proto", "icmp"),
            ident=data.get("ident", data.get("id", 0)),
            src=data.get("src"),
            dport=data.get("dport"),
            sport=data.get("sport"),
        )


@dataclass
class TraceResult:
    """The assembled trace: what :func:`render` and the explanation read.

    ``to_json`` gives DESIGN.md's schema 1. The fields after ``snapshot`` are
    for people (rendering) and are not part of the schema, except ``error``,
    which carries the message of an ``error`` outcome.
    """

    probe: Probe
    outcome: str
    hops: list[dict[str, Any]] = field(default_factory=list)
    hooks_hit: list[dict[str, Any]] = field(default_factory=list)
    drop: dict[str, Any] | None = None
    nat: list[dict[str, Any]] = field(default_factory=list)
    causes: list[dict[str, Any]] = field(default_factory=list)
    lost_events: int = 0
    snapshot: dict[str, Any] | None = None
    error: str | None = None
    send_error: str | None = None
    reply: dict[str, Any] | None = None
    elapsed_ns: int | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")

    def exit_code(self) -> int:
        """0 when the probe made the round trip, 1 otherwise."""
        return exit_code(self)

    @classmethod
    def failed(cls, probe: Probe, message: str) -> TraceResult:
        """A result for a trace that nstrace itself could not complete."""
        return cls(probe=probe, outcome="error", error=message)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "probe": self.probe.to_json(),
            "outcome": self.outcome,
            "hops": copy.deepcopy(self.hops),
            "hooks_hit": copy.deepcopy(self.hooks_hit),
            "drop": copy.deepcopy(self.drop),
            "nat": copy.deepcopy(self.nat),
            "causes": copy.deepcopy(self.causes),
            "lost_events": self.lost_events,
            "snapshot": copy.deepcopy(self.snapshot),
        }
        # TODO: DESIGN.md's schema 1 has no field for an internal failure's
        # message; it rides here, only on "error" outcomes, until it does.
        if self.outcome == "error":
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TraceResult:
        """Read back a result written by :meth:`to_json` (for `nstrace diff`)."""
        if data.get("schema") != SCHEMA:
            raise UsageError(
                f"trace has schema {data.get('schema')!r}, this nstrace reads "
                f"schema {SCHEMA} (record it again with this version)"
            )
        return cls(
            probe=Probe.from_json(data["probe"]),
            outcome=data["outcome"],
            hops=data.get("hops", []),
            hooks_hit=data.get("hooks_hit", []),
            drop=data.get("drop"),
            nat=data.get("nat", []),
            causes=data.get("causes", []),
            lost_events=data.get("lost_events", 0),
            snapshot=data.get("snapshot"),
            error=data.get("error"),
        )


def exit_code(result: TraceResult) -> int:
    """0 when the probe made the round trip, 1 otherwise."""
    return 0 if result.outcome == "reply" else 1


def errno_name(error: int) -> str:
    """The name of a (negative or positive) errno, e.g. -101 -> ENETUNREACH."""
    return errno.errorcode.get(abs(error), f"errno {abs(error)}")


RT_TABLE_LOCAL = 255  # include/uapi/linux/rtnetlink.h


# ---- direction -------------------------------------------------------------


def packet_direction(event: Event, probe: Probe) -> str | None:
    """request or reply for one event on its own, None when it cannot tell.

    Uses the packet's headers, then its addresses; not the events around it
    (that is :func:`assemble`'s job).
    """
    if event.kind == ev.SEND:
        return ev.REQUEST
    if event.kind == ev.RECV:
        return ev.REPLY
    return _direction_from_headers(event, probe) or _direction_from_addresses(
        event, probe
    )


def _direction_from_headers(event: Event, probe: Probe) -> str | None:
    if event.proto == ev.IPPROTO_ICMP and event.icmp_type in ev.ICMP_ERRORS:
        return ev.REPLY  # an error quoting the probe travels back to it
    if probe.proto == "icmp" and event.proto == ev.IPPROTO_ICMP:
        if event.icmp_type == ev.ICMP_ECHO_REQUEST:
            return ev.REQUEST
        if event.icmp_type == ev.ICMP_ECHO_REPLY:
            return ev.REPLY
        return None
    if probe.dport and event.proto == PROTOS[probe.proto]:
        to_port = event.dport == probe.dport
        from_port = event.sport == probe.dport
        if to_port and not from_port:
            return ev.REQUEST
        if from_port and not to_port:
            return ev.REPLY
    return None


def _direction_from_addresses(event: Event, probe: Probe) -> str | None:
    # The probe's destination is never rewritten on the way out in the lab
    # (only its source is, by MASQUERADE), so it identifies the direction.
    if event.src is not None and event.src == probe.dst:
        return ev.REPLY
    if event.dst is not None and event.dst == probe.dst:
        return ev.REQUEST
    if probe.src is not None:
        if event.src == probe.src:
            return ev.REQUEST
        if event.dst == probe.src:
            return ev.REPLY
    return None


def _assign_directions(events: list[Event], probe: Probe) -> list[str]:
    """One direction per event (already sorted), using the events around it."""
    headers = [
        packet_direction(e, probe)
        if e.kind in (ev.SEND, ev.RECV)
        else _direction_from_headers(e, probe)
        for e in events
    ]
    # An skb address is reused once the skb is freed, so an event borrows
    # the direction of the nearest event of its skb, earlier ones first.
    later: dict[int, str] = {}
    for e, d in zip(reversed(events), reversed(headers)):
        if e.skb and d:
            later[e.skb] = d
    earlier: dict[int, str] = {}

    dirs: list[str] = []
    previous = ev.REQUEST  # nothing seen yet: the probe is on its way out
    for i, (e, d) in enumerate(zip(events, headers)):
        by_skb = (earlier.get(e.skb) or later.get(e.skb)) if e.skb else None
        # Lookups in the local table (255) are the kernel asking "is this
        # address mine?" for whatever it is handling now (ARP, source checks):
        # they belong to the packet in flight, whichever way round they look.
        if e.kind == ev.NEIGH or (
            e.kind == ev.ROUTE
            and (
                e.table == RT_TABLE_LOCAL
                or (i and _routes_packet_before(events[i - 1], e))
            )
        ):
            chosen = previous
        else:
            chosen = d or _direction_from_addresses(e, probe) or by_skb or previous
        if e.skb and d:
            earlier[e.skb] = d
        dirs.append(chosen)
        previous = chosen
    return dirs


def _routes_packet_before(before: Event, lookup: Event) -> bool:
    """Whether *lookup* routes the packet of event *before* (see the top)."""
    if before.netns != lookup.netns:
        return False
    if before.kind == ev.RX:
        return True
    return before.kind == ev.HOOK and before.hook in ("PREROUTING", "OUTPUT")


# ---- frees -----------------------------------------------------------------


def is_benign_free(
    event: Event, probe: Probe, replied_at_ns: int | None = None
) -> bool:
    """Whether a free is the normal end of a packet rather than a drop.

    *replied_at_ns* is when the reply reached the injector's socket, if it
    did: anything freed after that no longer matters to the probe.
    """
    return _is_benign(event, packet_direction(event, probe), probe, replied_at_ns)


def _is_benign(
    event: Event, direction: str | None, probe: Probe, replied_at_ns: int | None
) -> bool:
    if event.reason == OTHERHOST:
        return True
    if replied_at_ns is not None and event.t_ns >= replied_at_ns:
        return True
    # The reply was delivered to the injector's raw socket, then the ICMP or
    # transport layer found no socket of its own for it. A free whose
    # headers could not be parsed (direction None) in the probe's namespace
    # is that same skb: the request is never freed NO_SOCKET where it starts.
    return (
        event.reason == NO_SOCKET
        and event.netns == probe.src_netns
        and direction in (ev.REPLY, None)
    )


# ---- hook pairing ----------------------------------------------------------


@dataclass
class _Step:
    """One hop in the making: an event, or a hook's first+last pair."""

    event: Event
    dir: str
    last: Event | None = None
    paired: bool = False  # hooks: a last was seen for this first
    merged: int = 1  # bridge: trace events folded into this crossing


def _pair_events(events: list[Event], dirs: list[str]) -> list[_Step]:
    steps: list[_Step] = []
    open_hooks: dict[tuple[int, str, str], _Step] = {}
    open_bridge: dict[tuple[Any, ...], _Step] = {}

    def close_skb(skb: int, keep: tuple[int, str, str] | None = None) -> None:
        # The skb went somewhere else, so an open hook was not passed.
        if not skb:
            return
        for key in [k for k in open_hooks if k[0] == skb and k != keep]:
            del open_hooks[key]
        for key in [k for k in open_bridge if k[0] == skb]:
            del open_bridge[key]

    for e, d in zip(events, dirs):
        if e.kind == ev.HOOK:
            key = (e.skb, e.netns, e.hook or "")
            close_skb(e.skb, keep=key)
            if e.stage == ev.LAST and key in open_hooks:
                step = open_hooks.pop(key)
                step.last, step.paired = e, True
                continue
            if e.stage == ev.LAST:
                # The first was lost (or tracing began mid-hook): the
                # packet still got through, so count it as passed.
                log.debug("hook %s in %s: last without first", e.hook, e.netns)
                steps.append(_Step(e, d, last=e, paired=True))
                continue
            # A stage we do not know says nothing about passing: assume it.
            step = _Step(e, d, paired=e.stage != ev.FIRST)
            steps.append(step)
            if e.stage == ev.FIRST:
                open_hooks[key] = step  # replaces an unpaired one: not passed
            continue

        if e.kind == ev.BRIDGE:
            bkey = (e.skb, e.netns, e.hook, d, e.extra.get("trace_id"))
            if bkey in open_bridge:
                open_bridge[bkey].merged += 1
                continue
            step = _Step(e, d)
            steps.append(step)
            open_bridge[bkey] = step
            continue

        if e.kind in (ev.RX, ev.TX, ev.FREE):
            close_skb(e.skb)
        steps.append(_Step(e, d))
    return steps


# ---- hops ------------------------------------------------------------------


def _hop(step: _Step) -> dict[str, Any]:
    e = step.event
    hop: dict[str, Any] = {
        "netns": e.netns,
        "dev": e.dev,
        "event": e.kind,
        "hook": e.hook if e.kind in (ev.HOOK, ev.BRIDGE) else None,
        "dir": step.dir,
        "src": e.src,
        "dst": e.dst,
        "t_ns": e.t_ns,
    }
    if e.kind in (ev.HOOK, ev.BRIDGE):
        _add_hook_keys(hop, step)
    elif e.kind == ev.ROUTE:
        _add_route_keys(hop, e)
    elif e.kind == ev.NEIGH:
        hop["neigh"] = {"addr": e.neigh_addr, "state": e.neigh_state}
    elif e.kind == ev.FREE:
        hop["reason"] = e.reason
    if e.proto in (ev.IPPROTO_TCP, ev.IPPROTO_UDP) and e.kind != ev.ROUTE:
        hop["sport"], hop["dport"] = e.sport, e.dport
        if e.proto == ev.IPPROTO_TCP:
            hop["tcp_flags"] = tcp_flag_names(e.tcp_flags)
    if e.proto == ev.IPPROTO_ICMP and e.icmp_type in ev.ICMP_ERRORS:
        hop["icmp_error"] = {
            "type": e.icmp_type,
            "code": e.icmp_code,
            "inner_src": e.inner_src,
            "inner_dst": e.inner_dst,
        }
    return hop


_TCP_FLAGS = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"))


def tcp_flag_names(flags: int) -> str:
    """TCP flags as people write them: SYN, SYN-ACK, RST-ACK..."""
    return "-".join(name for bit, name in _TCP_FLAGS if flags & bit) or "none"


def _add_hook_keys(hop: dict[str, Any], step: _Step) -> None:
    e = step.event
    # At OUTPUT skb->dev is NULL: the hook state's devices are the truth.
    hop["dev"] = e.out_dev or e.in_dev or e.dev
    if e.in_dev:
        hop["in_dev"] = e.in_dev
    if e.out_dev:
        hop["out_dev"] = e.out_dev
    last = step.last
    if last is not None and last is not e and (last.src, last.dst) != (e.src, e.dst):
        hop["after"] = {"src": last.src, "dst": last.dst}
    if e.kind == ev.HOOK and not step.paired:
        hop["passed"] = False
    if e.kind == ev.BRIDGE and e.extra.get("rule"):
        hop["rule"] = copy.deepcopy(e.extra["rule"])


def _add_route_keys(hop: dict[str, Any], e: Event) -> None:
    if e.table is not None:
        hop["table"] = e.table
    if e.gateway:
        hop["gateway"] = e.gateway
    if e.extra.get("oif"):
        hop["oif"] = e.extra["oif"]
    if e.error:
        hop["error"] = errno_name(e.error)


def _nat_entries(step: _Step) -> list[dict[str, Any]]:
    first, last = step.event, step.last
    if first.kind != ev.HOOK or last is None or last is first:
        return []
    out = []
    for name in ("src", "dst"):
        before, after = getattr(first, name), getattr(last, name)
        if before != after:
            out.append(
                {
                    "netns": first.netns,
                    "hook": first.hook,
                    "dir": step.dir,
                    "field": name,
                    "from": before,
                    "to": after,
                }
            )
    return out


def _hook_hit(step: _Step) -> dict[str, Any] | None:
    e = step.event
    if e.kind not in (ev.HOOK, ev.BRIDGE):
        return None
    family = "bridge" if e.kind == ev.BRIDGE else "ip"
    return {"netns": e.netns, "hook": e.hook, "dir": step.dir, "family": family}


# ---- drop ------------------------------------------------------------------


def _drop_hook(steps: list[_Step], index: int) -> _Step | None:
    """The hook step a free at steps[index] is attributed to, if any."""
    free = steps[index]
    e = free.event

    def same_packet(step: _Step) -> bool:
        s = step.event
        if s.kind != ev.HOOK or s.netns != e.netns:
            return False
        return s.skb == e.skb if e.skb else step.dir == free.dir

    candidates = [s for s in reversed(steps[:index]) if same_packet(s)]
    if e.reason == NETFILTER_DROP:
        for s in candidates:
            if not s.paired:
                return s
    return candidates[0] if candidates else None


def _drop_record(steps: list[_Step], index: int) -> dict[str, Any]:
    free = steps[index]
    hook_step = _drop_hook(steps, index)
    dev = free.event.dev
    if dev is None and hook_step is not None:
        dev = hook_step.event.in_dev or hook_step.event.out_dev
    return {
        "netns": free.event.netns,
        "hook": hook_step.event.hook if hook_step else None,
        "dev": dev,
        "dir": free.dir,
        "reason": free.event.reason,
        "rule": None,
    }


# ---- rule verdicts ----------------------------------------------------------


def _attach_verdicts(
    steps: list[_Step], verdicts: Sequence[RuleVerdict]
) -> dict[int, list[dict[str, Any]]]:
    """The rules that decided each hook step, by id() of the step (see the top)."""
    # One crossing of a hook: consecutive verdicts of one skb (trace id).
    crossings: dict[tuple[str, str, str], list[list[dict[str, Any]]]] = {}
    last: tuple[Any, ...] | None = None
    for v in verdicts:
        key = (v.netns, v.hook, v.dir)
        if (key, v.trace_id) != last:
            crossings.setdefault(key, []).append([])
            last = (key, v.trace_id)
        crossings[key][-1].append(v.rule)
    attached: dict[int, list[dict[str, Any]]] = {}
    for step in steps:
        e = step.event
        queue = crossings.get((e.netns, e.hook or "", step.dir))
        if e.kind == ev.HOOK and queue:
            attached[id(step)] = queue.pop(0)
    return attached


def _deciding_rule(rules: list[dict[str, Any]]) -> dict[str, Any]:
    drops = [r for r in rules if r.get("verdict") == "drop"]
    return copy.deepcopy(drops[0] if drops else rules[-1])


def _add_rules(hop: dict[str, Any], rules: list[dict[str, Any]] | None) -> None:
    if not rules:
        return
    hop["rule"] = _deciding_rule(rules)
    if len(rules) > 1:
        hop["rules"] = copy.deepcopy(rules)


def _drop_rule(
    steps: list[_Step], index: int, attached: dict[int, list[dict[str, Any]]]
) -> tuple[dict[str, Any] | None, str | None]:
    """The rule or policy that dropped the packet freed at steps[index].

    With it, the hook of a bridge-family drop (the IPv4 hooks the probes
    saw do not contain it), or None.
    """
    hook_step = _drop_hook(steps, index)
    rules = attached.get(id(hook_step), []) if hook_step is not None else []
    if any(r.get("verdict") == "drop" for r in rules):
        return _deciding_rule(rules), None
    # A bridge-family drop: the bridge hop of the same packet before the free.
    free = steps[index]
    for step in reversed(steps[:index]):
        e = step.event
        rule = e.extra.get("rule") if e.kind == ev.BRIDGE else None
        same_packet = e.netns == free.event.netns and step.dir == free.dir
        if rule and rule.get("verdict") == "drop" and same_packet:
            return copy.deepcopy(rule), e.hook
    return None, None


# ---- outcome ---------------------------------------------------------------


def _reply_info(reply: dict[str, Any] | None, events: list[Event]) -> dict | None:
    if reply is not None:
        return reply
    for e in events:
        if e.kind == ev.RECV:
            return {
                "src": e.src,
                "dst": e.dst,
                "icmp_type": e.icmp_type,
                "icmp_code": e.icmp_code,
                "tcp_flags": e.tcp_flags,
                "t_ns": e.t_ns,
            }
    return None


def is_error_reply(reply: dict[str, Any]) -> bool:
    """An ICMP error or a TCP reset: the far end (or a router) said no."""
    if reply.get("icmp_type") in ev.ICMP_ERRORS:
        return True
    return bool((reply.get("tcp_flags") or 0) & TCP_RST)


def _outcome(send_error: str | None, reply: dict | None, drop: dict | None) -> str:
    if send_error:
        return "unreachable"
    if reply is not None:
        return "unreachable" if is_error_reply(reply) else "reply"
    return "dropped" if drop is not None else "no-reply"


def _replied_at(reply: dict[str, Any] | None, events: list[Event]) -> int | None:
    for e in events:
        if e.kind == ev.RECV:
            return e.t_ns
    return reply.get("t_ns") if reply else None


def _elapsed(
    steps: list[_Step], outcome: str, drop_t: int | None, replied_at: int | None
) -> int | None:
    if not steps:
        return None
    start = steps[0].event.t_ns
    if outcome == "reply" or (outcome == "unreachable" and replied_at):
        if replied_at is not None:
            return replied_at - start
        # No socket timestamp: the reply's last sighting stands in for it.
        back = [s.event.t_ns for s in steps if s.dir == ev.REPLY]
        return (max(back) - start) if back else None
    if outcome == "dropped" and drop_t is not None:
        return drop_t - start
    return None


# ---- assembly --------------------------------------------------------------


def assemble(
    probe: Probe,
    events: list[Event],
    send_error: str | None = None,
    reply: dict[str, Any] | None = None,
    lost_events: int = 0,
    timeout_s: float | None = None,
    verdicts: Sequence[RuleVerdict] = (),
) -> TraceResult:
    """Build the trace result of one probe from its events (see the top).

    *verdicts* are the netfilter decisions from rule attribution, in the
    order the kernel reported them (`tracer.rules.verdicts`).
    """
    ordered = sorted(events, key=lambda e: e.t_ns)
    probe = _with_source(probe, ordered)
    dirs = _assign_directions(ordered, probe)
    steps = _pair_events(ordered, dirs)
    attached = _attach_verdicts(steps, verdicts)

    reply_info = _reply_info(reply, ordered)
    replied_at = _replied_at(reply_info, ordered)
    hops, nat, hooks_hit = [], [], []
    drop: dict[str, Any] | None = None
    drop_t: int | None = None
    drop_quotes = False
    for i, step in enumerate(steps):
        hop = _hop(step)
        _add_rules(hop, attached.get(id(step)))
        if step.event.kind == ev.FREE and not _is_benign(
            step.event, step.dir, probe, replied_at
        ):
            record = _drop_record(steps, i)
            record["rule"], bridge_hook = _drop_rule(steps, i, attached)
            if bridge_hook is not None:
                record["hook"] = bridge_hook
            hop["event"], hop["hook"] = "drop", record["hook"]
            # An ICMP error the kernel made about the probe (host unreachable
            # after a failed ARP) may be freed just before the probe itself
            # is: the probe's own drop is where it died.
            quoting = step.event.icmp_type in ev.ICMP_ERRORS and (
                step.event.proto == ev.IPPROTO_ICMP
            )
            if drop is None or (drop_quotes and not quoting):
                drop, drop_t, drop_quotes = record, step.event.t_ns, quoting
        hops.append(hop)
        nat.extend(_nat_entries(step))
        hit = _hook_hit(step)
        if hit is not None:
            hooks_hit.append(hit)

    outcome = _outcome(send_error, reply_info, drop)
    if outcome == "reply":
        # The round trip succeeded: a free on the way is kept in hops as
        # evidence but is not where the packet died (a TCP listener frees
        # the SYN it answered with reason NOT_SPECIFIED, kernel 6.18).
        drop = None
        for hop in hops:
            if hop["event"] == "drop":
                hop["event"] = ev.FREE
    log.debug("assembled %d events into %d hops: %s", len(events), len(hops), outcome)
    return TraceResult(
        probe=probe,
        outcome=outcome,
        hops=hops,
        hooks_hit=hooks_hit,
        drop=drop,
        nat=nat,
        lost_events=lost_events,
        send_error=send_error,
        reply=reply_info,
        elapsed_ns=_elapsed(steps, outcome, drop_t, replied_at),
        timeout_s=timeout_s,
    )


def _with_source(probe: Probe, events: list[Event]) -> Probe:
    """The probe with its source address filled from its first sighting."""
    if probe.src is not None:
        return probe
    for e in events:
        if e.netns != probe.src_netns or e.kind in (ev.ROUTE, ev.NEIGH):
            continue
        if e.src and e.src != "0.0.0.0" and packet_direction(e, probe) == ev.REQUEST:
            return replace(probe, src=e.src)
    return probe


# ---- recordings ------------------------------------------------------------


class Recording(NamedTuple):
    """A replayable trace: what the collector handed to path assembly."""

    probe: Probe
    events: list[Event]
    send_error: str | None = None
    reply: dict[str, Any] | None = None
    lost_events: int = 0
    timeout_s: float | None = None
    description: str = ""
    verdicts: tuple[RuleVerdict, ...] = ()

    def assemble(self) -> TraceResult:
        return assemble(
            self.probe,
            self.events,
            send_error=self.send_error,
            reply=self.reply,
            lost_events=self.lost_events,
            timeout_s=self.timeout_s,
            verdicts=self.verdicts,
        )


def load_recording(path: str | Path) -> Recording:
    """Read a recording written by :func:`save_recording` (or by hand)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read recording {path}: {err}") from err
    if data.get("format") != RECORDING_FORMAT or data.get("version") != 1:
        raise UsageError(
            f"{path} is not an nstrace recording of version {RECORDING_VERSION} "
            '(expected "format": "nstrace-recording", "version": 1)'
        )
    try:
        return Recording(
            probe=Probe.from_json(data["probe"]),
            events=[Event.from_dict(item) for item in data["events"]],
            send_error=data.get("send_error"),
            reply=data.get("reply"),
            lost_events=data.get("lost_events", 0),
            timeout_s=data.get("timeout_s"),
            description=data.get("description", ""),
            verdicts=tuple(RuleVerdict(**v) for v in data.get("verdicts", [])),
        )
    except (KeyError, TypeError) as err:
        raise UsageError(f"recording {path} is malformed: {err}") from err


def recording_to_json(recording: Recording) -> dict[str, Any]:
    """The JSON form of a recording (the format is in tests/data/README.md)."""
    probe = recording.probe
    return {
        "format": RECORDING_FORMAT,
        "version": RECORDING_VERSION,
        "description": recording.description,
        "probe": {
            "src_netns": probe.src_netns,
            "src": probe.src,
            "dst": probe.dst,
            "proto": probe.proto,
            "ident": probe.ident,
            "dport": probe.dport,
            "sport": probe.sport,
        },
        "send_error": recording.send_error,
        "reply": recording.reply,
        "lost_events": recording.lost_events,
        "timeout_s": recording.timeout_s,
        "events": [e.to_dict() for e in recording.events],
        "verdicts": [asdict(v) for v in recording.verdicts],
    }


def save_recording(path: str | Path, recording: Recording) -> None:
    Path(path).write_text(json.dumps(recording_to_json(recording), indent=2) + "\n")
