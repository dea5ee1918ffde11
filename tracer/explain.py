"""Explanation: name the cause of a failed probe, its evidence, and the fix.

Theory of operation
-------------------

:func:`explain` is pure: it reads an assembled :class:`~tracer.path.
TraceResult` (hops, drop, NAT, outcome) and the :class:`~tracer.snapshot.
Snapshot` taken before the probe, and returns DESIGN.md's ``causes``. It
knows no name or address of any lab: every namespace, device, subnet and
gateway in a summary or a fix is read from the path or the snapshot.

1. **Hops we can place.** Only hops in namespaces the snapshot holds are
   read (the probes also see lookalike packets of other namespaces, shown
   as ``netns:<inode>``; they say nothing about this lab).

2. **Findings.** Each rule below looks for one kind of wrong fact and
   reports it at the position in the path where it acted: a route lookup
   that failed (no-route) or chose the wrong device (misrouted), a packet
   that left the uplink with an untranslated private source (no-snat), a
   netfilter drop (filter-drop), a packet a namespace should have forwarded
   with forwarding off (forwarding-disabled), a reverse-path drop
   (rp-filter), an unanswered ARP request, which the snapshot then tries to
   explain (link-down, not-bridged, rp-filter at the owner, or neigh-failed),
   a reset or port unreachable (no-listener).

3. **The rest of the way.** The packet stopped at its first problem, so
   whatever lies beyond it is read from the snapshot alone: the route
   lookups are replayed hop by hop for the request and (without NAT) for
   the reply, with forwarding, links, ARP reachability and the simple
   matches of filter chains (a rule it cannot read means no prediction,
   never a guessed drop). Nothing is claimed about a segment that leaves
   the namespaces in play (a physical NIC).

4. **Order.** The finding earliest in the path is the cause that stopped
   this packet first; those of step 3 come after every finding of the
   path. A packet sent the wrong way (misrouted, no-snat) makes what
   happens after it a consequence, not a fact of its own, so those later
   findings are dropped. One cause per code and namespace (per hook and
   direction for filter drops).

5. **Nothing found.** A failure that no rule explains is ``unknown``, with
   where the packet was last seen as its evidence.

A probe that got its reply has no cause.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

from tracer.snapshot import Address, NetnsState, Snapshot, is_iptables_chain

log = logging.getLogger(__name__)

CODES = (
    "no-route",
    "misrouted",
    "filter-drop",
    "no-snat",
    "forwarding-disabled",
    "rp-filter",
    "neigh-failed",
    "link-down",
    "not-bridged",
    "no-listener",
    "unknown",
)
LOCAL_TABLE = 255
ICMP_UNREACH = 3
ICMP_PORT_UNREACH = 3
TCP_RST = 0x04
# Codes whose packet went somewhere it should not: whatever happens to it
# afterwards follows from them (see the top, step 3).
DIVERTING = ("misrouted", "no-snat")
# The error of a route lookup replayed on the snapshot, not seen in the path.
PREDICTED = "predicted"


@dataclass
class Finding:
    position: int
    code: str
    netns: str
    summary: str
    evidence: list[str] = field(default_factory=list)
    fix: str | None = None
    # What makes two findings the same fact; (code, netns) when None.
    key: tuple[str, ...] | None = None

    def cause(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "netns": self.netns,
            "summary": self.summary,
            "evidence": list(self.evidence),
            "fix": self.fix,
        }


class _Context:
    """The path and the snapshot, with the questions the rules ask of them."""

    def __init__(self, result: Any, snapshot: Snapshot | None) -> None:
        self.result = result
        self.snapshot = snapshot or Snapshot({})
        self.probe = result.probe
        known = self.snapshot.namespaces
        self.hops = [h for h in result.hops if not known or h.get("netns") in known]
        # With NAT in the lab, addresses change on the way: predicting the
        # verdicts of filter rules from the probe's addresses could be wrong.
        self.predict_filters = not result.nat and not any(
            item.get("chain", {}).get("type") == "nat"
            for state in self.snapshot.namespaces.values()
            for item in state.ruleset
        )

    def ns(self, name: str) -> NetnsState | None:
        return self.snapshot.ns(name)

    def subnet(self, addr: str, netns: str | None = None) -> str:
        """The subnet *addr* lives in, as the lab wrote it; else the address."""
        owner = self.snapshot.owner(addr)
        if owner is not None and owner.dev != "lo":
            return str(owner.network)
        state = self.ns(netns) if netns else None
        network = state.connected_network(addr) if state else None
        if network is not None and network.prefixlen < 32:
            return str(network)
        return addr

    def packet_addresses(self) -> set[str]:
        """Every address the probe or its reply carried (NAT included)."""
        found = {self.probe.dst}
        if self.probe.src:
            found.add(self.probe.src)
        for entry in self.result.nat:
            found.update((entry["from"], entry["to"]))
        return found


def explain(result: Any, snapshot: Snapshot | None) -> list[dict[str, Any]]:
    """The causes of a failed probe, first cause first; [] for a reply."""
    if result.outcome in ("reply", "error"):
        return []
    ctx = _Context(result, snapshot)
    findings: list[Finding] = []
    for rule in RULES:
        try:
            findings.extend(rule(ctx))
        except Exception as exc:  # one confused rule must not hide the others
            log.warning("explain rule %s failed: %s", rule.__name__, exc)
            log.debug("explain rule %s", rule.__name__, exc_info=True)
    ordered = _order(findings)
    if not ordered:
        ordered = [_unknown(ctx)]
    return [f.cause() for f in ordered]


def _order(findings: list[Finding]) -> list[Finding]:
    findings = sorted(findings, key=lambda f: f.position)
    kept: list[Finding] = []
    seen: set[tuple[str, ...]] = set()
    for finding in findings:
        if kept and kept[0].code in DIVERTING and finding.position > kept[0].position:
            log.debug("dropping %s: follows from %s", finding.code, kept[0].code)
            continue
        key = finding.key or (finding.code, finding.netns)
        if key not in seen:
            seen.add(key)
            kept.append(finding)
    return kept


# ---- helpers ---------------------------------------------------------------


def _route_text(hop: dict[str, Any]) -> str:
    text = f"{hop.get('dst')}"
    if hop.get("gateway"):
        text += f" via {hop['gateway']}"
    if hop.get("dev"):
        text += f" dev {hop['dev']}"
    return text


def _is_lookup(hop: dict[str, Any]) -> bool:
    return hop.get("event") == "route" and hop.get("table") != LOCAL_TABLE


def _host_addresses(network: ipaddress.IPv4Network):
    if network.prefixlen >= 31:
        return iter(network)
    return network.hosts()


def _free_address(ctx: _Context, network: ipaddress.IPv4Network, segment: set) -> str:
    """The first host address of *network* nobody on *segment* uses."""
    used = {a.addr for s in ctx.snapshot.namespaces.values() for a in s.addresses}
    for node in segment:
        state = ctx.ns(node[0])
        if state:
            used.update(a.addr for a in state.addresses_on(node[1]))
    for host in _host_addresses(network):
        if str(host) not in used:
            return str(host)
    return str(next(_host_addresses(network)))


def _gateway_for(ctx: _Context, netns: str, target: str) -> tuple[str, str, str] | None:
    """(address, namespace, device) of a router next to *netns* towards *target*.

    A router is a namespace on the layer-2 segment of one of *netns*'s links
    that has an address in that link's subnet and forwards; one that owns
    *target* or has a route to it is preferred.
    """
    state = ctx.ns(netns)
    if state is None:
        return None
    best: tuple[int, tuple[str, str, str]] | None = None
    for address in state.addresses:
        link = state.links.get(address.dev)
        if address.dev == "lo" or link is None:
            continue
        for node in ctx.snapshot.segment(netns, address.dev):
            other = ctx.ns(node[0])
            if node[0] == netns or other is None:
                continue
            for candidate in other.addresses_on(node[1]):
                if ipaddress.ip_address(candidate.addr) not in address.network:
                    continue
                # A gateway owns the target, forwards, or at least has a
                # route to it (then forwarding off is a cause of its own).
                reaches = other.owns(target) is not None or bool(other.lookup(target))
                forwards = other.forwarding(node[1])
                if not (reaches or forwards):
                    continue
                score = 2 * forwards + reaches
                if best is None or score > best[0]:
                    best = (score, (candidate.addr, node[0], node[1]))
    return best[1] if best else None


# ---- no-route, misrouted ---------------------------------------------------


def _no_route(ctx: _Context) -> list[Finding]:
    found = []
    addresses = ctx.packet_addresses()
    succeeded = {
        (h["netns"], h.get("dst"))
        for h in ctx.hops
        if _is_lookup(h) and not h.get("error")
    }
    for i, hop in enumerate(ctx.hops):
        if not _is_lookup(hop) or not hop.get("error"):
            continue
        target = hop.get("dst")
        if target not in addresses or (hop["netns"], target) in succeeded:
            continue
        found.append(_no_route_finding(ctx, i, hop))
    return found


def _no_route_finding(ctx: _Context, i: int, hop: dict[str, Any]) -> Finding:
    netns, target = hop["netns"], hop["dst"]
    state = ctx.ns(netns)
    down = _down_link_towards(state, target) if state else None
    if down is not None:
        return Finding(
            i,
            "link-down",
            netns,
            f"{down} in {netns} is down, so its routes are gone and {netns} "
            f"has no route to {target}",
            [
                f"route lookup in {netns} for {target}: {hop['error']}",
                f"{down} is administratively down",
            ],
            f"ip link set {down} up",
        )
    refused = ctx.result.send_error and netns == ctx.probe.src_netns
    summary = f"{netns} has no route to {target}"
    if refused:
        summary += ", so the kernel refused to send the probe"
    elif hop.get("dir") == "reply":
        summary += ", so the reply cannot be sent back"
    if hop.get("error") == PREDICTED:
        evidence = [f"no route in {netns} matches {target} (read from the snapshot)"]
    else:
        evidence = [
            f"route lookup in {netns} for {target} failed: {hop['error']}"
            + (f" (table {hop['table']})" if hop.get("table") is not None else "")
        ]
    if state is not None:
        routes = [_snapshot_route(r) for r in state.main_routes()]
        evidence.append(f"routes in {netns}: {'; '.join(routes) or 'none'}")
    gateway = _gateway_for(ctx, netns, target)
    fix = None
    if gateway is not None:
        addr, router, dev = gateway
        forwards = "forwards" if ctx.ns(router).forwarding(dev) else "routes"
        evidence.append(f"{addr} ({router}, {dev}) is next to {netns} and {forwards}")
        if state is not None and state.default_route() is None:
            fix = f"ip route add default via {addr}"
        else:
            fix = f"ip route add {ctx.subnet(target, netns)} via {addr}"
    return Finding(i, "no-route", netns, summary, evidence, fix)


def _snapshot_route(route) -> str:
    text = route.dst
    if route.gateway:
        text += f" via {route.gateway}"
    return text + (f" dev {route.dev}" if route.dev else "")


def _down_link_towards(state: NetnsState, target: str) -> str | None:
    """A link of *state* that is down and whose subnet holds *target*."""
    ip = ipaddress.ip_address(target)
    for address in state.addresses:
        link = state.links.get(address.dev)
        if link is not None and not link.admin_up and ip in address.network:
            return link.name
    return None


def _misrouted(ctx: _Context) -> list[Finding]:
    found, seen = [], set()
    for i, hop in enumerate(ctx.hops):
        if not _is_lookup(hop) or hop.get("error") or not hop.get("dev"):
            continue
        netns, target, chosen = hop["netns"], hop.get("dst"), hop["dev"]
        owner = ctx.snapshot.owner(target) if target else None
        if owner is None or owner.netns == netns or (netns, target) in seen:
            continue
        if target not in ctx.packet_addresses():
            continue
        where = (owner.netns, owner.dev)
        if where in ctx.snapshot.segment(netns, chosen):
            continue
        state = ctx.ns(netns)
        # A bridge port carries no addresses of its own: the bridge does.
        better = sorted(
            (
                link
                for link in (state.links.values() if state else [])
                if link.name != chosen
                and not link.master
                and where in ctx.snapshot.segment(netns, link.name)
            ),
            key=lambda link: link.kind != "bridge",
        )
        better = [link.name for link in better]
        if not better:
            continue
        seen.add((netns, target))
        found.append(_misrouted_finding(ctx, i, hop, owner, better[0]))
    return found


def _misrouted_finding(
    ctx: _Context, i: int, hop: dict[str, Any], owner: Address, link: str
) -> Finding:
    netns, target = hop["netns"], hop["dst"]
    state = ctx.ns(netns)
    route = state.lookup(target) if state else None
    chose = "the default route" if route and route.dst == "default" else "a route"
    network = owner.network
    on_link = [a for a in state.addresses_on(link)] if state else []
    in_subnet = [a for a in on_link if ipaddress.ip_address(a.addr) in network]
    if in_subnet:
        fix = f"ip route add {network} dev {link}"
        why = f"{netns} has no route to {network} through {link}"
    else:
        segment = ctx.snapshot.segment(netns, link)
        free = _free_address(ctx, network, segment)
        fix = f"ip addr add {free}/{network.prefixlen} dev {link}"
        why = f"{link} has no address in {network}, so no route to it exists"
    return Finding(
        i,
        "misrouted",
        netns,
        f"the route lookup in {netns} for {target} chose {chose} "
        f"({_snapshot_route(route) if route else _route_text(hop)}) because "
        f"{why}; {target} is behind {link}",
        [
            f"route lookup in {netns}: {_route_text(hop)}",
            (
                f"{target} belongs to {owner.netns} ({owner.dev}), which is on "
                f"the layer-2 segment of {link}, not of {hop['dev']}"
            ),
            f"addresses on {link}: "
            + (", ".join(f"{a.addr}/{a.prefixlen}" for a in on_link) or "none"),
        ],
        fix,
    )


# ---- no-snat ---------------------------------------------------------------


def _no_snat(ctx: _Context) -> list[Finding]:
    translated = {
        n["netns"]
        for n in ctx.result.nat
        if n["field"] == "src" and n["dir"] == "request"
    }
    for i, hop in enumerate(ctx.hops):
        if hop.get("event") != "tx" or hop.get("dir") != "request":
            continue
        netns, source = hop["netns"], hop.get("src")
        state = ctx.ns(netns)
        default = state.default_route() if state else None
        if state is None or default is None or hop.get("dev") != default.dev:
            continue
        if not source or state.owns(source) or netns in translated:
            continue
        inside = state.lookup(source)
        if inside is None or inside.dst == "default" or inside.dev == default.dev:
            continue
        subnet = ctx.subnet(source, netns)
        evidence = [
            (
                f"the request left {hop['dev']} in {netns} (default via "
                f"{default.gateway or '?'}) with source {source}"
            ),
            (
                f"no source NAT at POSTROUTING in {netns}; {subnet} is reached "
                f"through {inside.dev}, inside {netns}"
            ),
        ]
        for later in ctx.hops[i + 1 :]:
            if _is_lookup(later) and later.get("error") and later.get("dst") == source:
                evidence.append(f"{later['netns']} has no route back to {source}")
                break
        return [
            Finding(
                i,
                "no-snat",
                netns,
                f"the request left {netns}'s uplink {hop['dev']} with the private "
                f"source {source} untranslated, and nothing beyond it routes "
                f"{subnet} back",
                evidence,
                f"iptables -t nat -A POSTROUTING -s {subnet} -j MASQUERADE",
            )
        ]
    return []


# ---- filter-drop -----------------------------------------------------------


def _filter_drop(ctx: _Context) -> list[Finding]:
    found = []
    for i, hop in enumerate(ctx.hops):
        if hop.get("event") != "drop" or hop.get("reason") != "NETFILTER_DROP":
            continue
        drop = ctx.result.drop or {}
        rule = drop.get("rule") if _same_drop(drop, hop) else None
        found.append(_filter_finding(ctx, i, hop, rule))
        break  # the first netfilter drop stopped the packet
    return found


def _same_drop(drop: dict[str, Any], hop: dict[str, Any]) -> bool:
    return (drop.get("netns"), drop.get("hook"), drop.get("dir")) == (
        hop.get("netns"),
        hop.get("hook"),
        hop.get("dir"),
    )


def _filter_finding(
    ctx: _Context, i: int, hop: dict[str, Any], rule: dict[str, Any] | None
) -> Finding:
    netns, hook, direction = hop["netns"], hop.get("hook") or "?", hop.get("dir")
    crossing = _hook_hop(ctx, i, hop)
    src, dst = (crossing or hop).get("src"), (crossing or hop).get("dst")
    chain, rule_json = _dropping_chain(ctx, netns, hook, rule)
    evidence = [f"the {direction} {src} > {dst} did not pass {hook} in {netns}"]
    if crossing and (crossing.get("in_dev") or crossing.get("out_dev")):
        devices = crossing.get("in_dev") or "-", crossing.get("out_dev") or "-"
        evidence[0] += " (in {}, out {})".format(*devices)
    what = "netfilter"
    if chain is not None:
        what = _chain_words(chain, rule, rule_json)
        evidence.append(f"{what} in {netns}")
    if direction == "reply" and any(
        h["netns"] == netns and h["hook"] == hook and h["dir"] == "request"
        for h in ctx.result.hooks_hit
    ):
        evidence.append(f"the request passed {hook} in {netns}; the reply did not")
    summary = f"the {direction} was dropped in {netns} at {hook} by the {what}"
    fix = _filter_fix(ctx, netns, hook, direction, src, dst, chain, rule, rule_json)
    key = ("filter-drop", netns, hook, str(direction))
    return Finding(i, "filter-drop", netns, summary, evidence, fix, key)


def _hook_hop(ctx: _Context, i: int, drop: dict[str, Any]) -> dict[str, Any] | None:
    for hop in reversed(ctx.hops[:i]):
        if (
            hop.get("event") == "hook"
            and hop["netns"] == drop["netns"]
            and hop.get("hook") == drop.get("hook")
            and hop.get("dir") == drop.get("dir")
        ):
            return hop
    return None


def _dropping_chain(
    ctx: _Context, netns: str, hook: str, rule: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The base chain that dropped (and its dropping rule, if one did).

    Rule attribution (``drop.rule``) names it when present; otherwise the
    snapshot's chains at that hook with a drop policy or a drop rule are the
    suspects, and the first of them in priority order is taken.
    """
    state = ctx.ns(netns)
    chains = state.base_chains(hook.lower()) if state else []
    if rule:
        named = (rule.get("family"), rule.get("table"), rule.get("chain"))
        for chain in chains:
            if (chain["family"], chain["table"], chain["name"]) == named:
                return chain, None if rule.get("policy") else _rule_json(
                    state, chain, rule
                )
        chain = {"family": named[0], "table": named[1], "name": named[2]}
        return chain, None
    for chain in sorted(chains, key=lambda c: c.get("prio", 0)):
        drops = [
            r
            for r in state.rules_of(chain["family"], chain["table"], chain["name"])
            if any("drop" in e or "reject" in e for e in r.get("expr", []))
        ]
        if drops:
            return chain, drops[0]
        if chain.get("policy") == "drop":
            return chain, None
    return None, None


def _rule_json(
    state: NetnsState | None, chain: dict[str, Any], rule: dict[str, Any]
) -> dict[str, Any] | None:
    """The snapshot's JSON of the rule that rule attribution named."""
    if state is None:
        return None
    rules = state.rules_of(chain["family"], chain["table"], chain["name"])
    for candidate in rules:
        if _nft_rule_text(candidate) == rule.get("text"):
            return candidate
    drops = [r for r in rules if _verdict(r) in ("drop", "reject")]
    return drops[0] if len(drops) == 1 else None


def _chain_words(
    chain: dict[str, Any], rule: dict[str, Any] | None, rule_json: dict | None
) -> str:
    name = f"{chain['table']} {chain['name']}"
    if not is_iptables_chain(chain):
        name = f"{chain['family']} {name}"
    policy = rule.get("policy") if rule else rule_json is None
    if policy:
        return f"policy drop of {name}"
    text = rule.get("text") if rule else _nft_rule_text(rule_json)
    return f"rule `{text}` of {name}"


def _filter_fix(
    ctx: _Context,
    netns: str,
    hook: str,
    direction: str | None,
    src: str | None,
    dst: str | None,
    chain: dict | None,
    rule: dict | None,
    rule_json: dict | None,
) -> str | None:
    if chain is None or not src or not dst:
        return None
    if direction == "request":
        side, addr = ("d", dst) if hook == "OUTPUT" else ("s", ctx.subnet(src, netns))
    elif hook == "INPUT" and netns == ctx.probe.src_netns:
        side, addr = "s", src
    else:
        side, addr = "d", ctx.subnet(dst, netns)
    policy = rule.get("policy") if rule else rule_json is None
    table, name = chain["table"], chain["name"]
    if is_iptables_chain(chain):
        text = (rule or {}).get("text") or ""
        if not policy and text.startswith("-A "):
            return f"iptables -t {table} -D {text[3:]}"
        if not policy and rule_json is not None:
            iptables = _iptables_rule_text(rule_json)
            if iptables:
                return f"iptables -t {table} -D {name} {iptables}"
        verb = "-A" if policy else "-I"
        return f"iptables -t {table} {verb} {name} -{side} {addr} -j ACCEPT"
    family = chain["family"]
    if not policy and rule_json is not None and "handle" in rule_json:
        return f"nft delete rule {family} {table} {name} handle {rule_json['handle']}"
    field_name = "saddr" if side == "s" else "daddr"
    verb = "add" if policy else "insert"
    return f"nft {verb} rule {family} {table} {name} ip {field_name} {addr} accept"


def _match_parts(rule: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(kind, field, value) of each simple match of an nft JSON rule."""
    parts = []
    for expr in rule.get("expr", []):
        match = expr.get("match")
        if not match:
            continue
        left, right = match.get("left", {}), match.get("right")
        if "prefix" in (right if isinstance(right, dict) else {}):
            right = f"{right['prefix']['addr']}/{right['prefix']['len']}"
        if "payload" in left:
            parts.append(("payload", left["payload"].get("field"), right))
        elif "meta" in left:
            parts.append(("meta", left["meta"].get("key"), right))
        else:
            parts.append(("other", "", right))
    return parts


def _verdict(rule: dict[str, Any]) -> str:
    for expr in rule.get("expr", []):
        for key in ("drop", "reject", "accept"):
            if key in expr:
                return key
    return "continue"


def _nft_rule_text(rule: dict[str, Any] | None) -> str:
    if not rule:
        return "?"
    words = []
    for kind, name, value in _match_parts(rule):
        if kind == "payload":
            words.append(f"ip {name} {value}")
        elif kind == "meta":
            words.append(f"meta {name} {value}")
        else:
            words.append(f"... {value}")
    return " ".join(words + [_verdict(rule)])


IPTABLES_OPTIONS = {"saddr": "-s", "daddr": "-d", "iifname": "-i", "oifname": "-o"}


def _iptables_rule_text(rule: dict[str, Any]) -> str | None:
    """The rule in iptables syntax when every part of it has one, else None."""
    words = []
    for kind, name, value in _match_parts(rule):
        option = IPTABLES_OPTIONS.get(name)
        if kind == "other" or option is None or not isinstance(value, str):
            return None
        words.append(f"{option} {value}")
    verdict = _verdict(rule)
    if verdict not in ("drop", "reject"):
        return None
    return " ".join(words + [f"-j {verdict.upper()}"])


# ---- forwarding-disabled, rp-filter ----------------------------------------


def _forwarding(ctx: _Context) -> list[Finding]:
    for i, hop in enumerate(ctx.hops):
        if hop.get("event") != "rx" or not hop.get("dst"):
            continue
        netns, dev, target = hop["netns"], hop.get("dev"), hop["dst"]
        state = ctx.ns(netns)
        link = state.links.get(dev) if state and dev else None
        if state is None or link is None or link.master or state.owns(target):
            continue
        route = state.lookup(target)
        if route is None or route.dev == dev or state.forwarding(dev):
            continue
        if state.sysctl("net/ipv4/ip_forward") == 0:
            setting = "net.ipv4.ip_forward"
        else:
            setting = f"net.ipv4.conf.{dev}.forwarding"
        return [
            Finding(
                i,
                "forwarding-disabled",
                netns,
                f"{netns} received the {hop.get('dir')} for {target} on {dev} and "
                f"would route it out of {route.dev}, but forwarding is off",
                [
                    f"{setting} = 0 in {netns}",
                    f"route in {netns}: {_snapshot_route(route)}",
                ],
                f"sysctl -w {setting}=1",
            )
        ]
    return []


def _rp_filter(ctx: _Context) -> list[Finding]:
    for i, hop in enumerate(ctx.hops):
        if hop.get("event") != "drop" or hop.get("reason") != "IP_RPFILTER":
            continue
        netns, dev, source = hop["netns"], hop.get("dev"), hop.get("src")
        state = ctx.ns(netns)
        return [_rp_finding(i, netns, dev, source, state, "the packet")]
    return []


def _rp_finding(
    i: int,
    netns: str,
    dev: str | None,
    source: str | None,
    state: NetnsState | None,
    what: str,
) -> Finding:
    evidence = []
    mode = state.rp_filter(dev) if state and dev else None
    if mode is not None:
        evidence.append(
            f"rp_filter on {dev} in {netns} is {mode} "
            f"({'strict' if mode == 1 else 'loose' if mode == 2 else 'off'})"
        )
    back = state.lookup(source) if state and source else None
    if back is not None:
        evidence.append(
            f"the route back to {source} in {netns} goes out {back.dev} "
            f"({_snapshot_route(back)}), not {dev}"
        )
    return Finding(
        i,
        "rp-filter",
        netns,
        f"{netns} dropped {what} from {source} arriving on {dev}: strict "
        f"reverse-path filtering, and its route back to {source} leaves by "
        f"another link",
        evidence,
        f"sysctl -w net.ipv4.conf.{dev}.rp_filter=2",
    )


# ---- ARP: neigh-failed, link-down, not-bridged -----------------------------


def _neighbour(ctx: _Context) -> list[Finding]:
    for i, hop in enumerate(ctx.hops):
        failed = hop.get("event") == "drop" and hop.get("reason") in (
            "NEIGH_FAILED",
            "NEIGH_QUEUEFULL",
            "NEIGH_DEAD",
        )
        state_name = (hop.get("neigh") or {}).get("state")
        if not failed and state_name not in ("FAILED", "INCOMPLETE"):
            continue
        if not failed and any(
            h.get("event") == "tx" and h["netns"] == hop["netns"]
            for h in ctx.hops[i + 1 :]
        ):
            continue  # INCOMPLETE that resolved later
        return [_neigh_finding(ctx, i, hop)]
    return []


def _asked(ctx: _Context, i: int, hop: dict[str, Any]) -> tuple[str | None, str | None]:
    """(address asked for, source of the packet) for a failed resolution."""
    if hop.get("neigh"):
        return hop["neigh"].get("addr"), None
    for before in reversed(ctx.hops[:i]):
        if (
            _is_lookup(before)
            and before["netns"] == hop["netns"]
            and not before.get("error")
            and before.get("dst") == hop.get("dst")
        ):
            return before.get("gateway") or before.get("dst"), hop.get("src")
    return hop.get("dst"), hop.get("src")


def _neigh_finding(ctx: _Context, i: int, hop: dict[str, Any]) -> Finding:
    netns, dev = hop["netns"], hop.get("dev") or "?"
    wanted, source = _asked(ctx, i, hop)
    asked = f"{netns} asked for {wanted} on {dev} (ARP) and no answer came"
    return _unanswered(ctx, i, netns, dev, wanted, source, asked)


def _unanswered(
    ctx: _Context,
    i: int,
    netns: str,
    dev: str,
    wanted: str | None,
    source: str | None,
    asked: str,
) -> Finding:
    """Why *wanted* does not answer on *dev*, as far as the snapshot tells."""
    finding = _why_unanswered(ctx, i, netns, dev, wanted, source, asked)
    state = ctx.ns(netns)
    for entry in state.neighbours if state else []:
        if (entry.dev, entry.addr) == (dev, wanted):
            finding.evidence.insert(
                1,
                f"{netns}'s neighbour entry for {wanted} before the probe: "
                f"{entry.state}",
            )
    return finding


def _why_unanswered(
    ctx: _Context,
    i: int,
    netns: str,
    dev: str,
    wanted: str | None,
    source: str | None,
    asked: str,
) -> Finding:
    owner = ctx.snapshot.owner(wanted) if wanted else None
    if owner is None:
        return _nobody_has(ctx, i, netns, dev, wanted, asked)
    path = ctx.snapshot.l2_path((netns, dev), (owner.netns, owner.dev))
    if path is not None:
        down = [n for n in path if not ctx.snapshot.link(*n).admin_up]
        if down:
            where, name = down[0]
            return Finding(
                i,
                "link-down",
                where,
                f"{name} in {where} is down, so {wanted} ({owner.netns}) cannot "
                f"answer {netns}'s ARP request on {dev}",
                [asked, f"layer-2 path: {_path_text(path)}", f"{name} is down"],
                f"ip link set {name} up",
            )
        finding = _owner_rp_filter(ctx, i, owner, source or ctx.probe.src, asked)
        if finding is not None:
            return finding
        return Finding(
            i,
            "neigh-failed",
            netns,
            asked + f"; {wanted} is {owner.netns}'s "
            f"({owner.dev}) and the path to it is up",
            [asked, f"layer-2 path: {_path_text(path)}"],
            None,
        )
    missing = _not_bridged(ctx, netns, dev, owner)
    if missing is not None:
        port, where, bridge = missing
        return Finding(
            i,
            "not-bridged",
            where,
            f"{port} in {where} is not a port of {bridge}, so {owner.netns} "
            f"({wanted}) never hears {netns}'s ARP request",
            [
                asked,
                (
                    f"{owner.netns}'s {owner.dev} is the peer of {port}, "
                    f"which has no master; the other ports of {bridge} reach {netns}"
                ),
            ],
            f"ip link set {port} master {bridge}",
        )
    return Finding(
        i,
        "neigh-failed",
        netns,
        asked + f"; {wanted} is {owner.netns}'s ({owner.dev}), which is not on "
        f"the layer-2 segment of {dev}",
        [asked],
        None,
    )


def _nobody_has(
    ctx: _Context, i: int, netns: str, dev: str, wanted: str | None, asked: str
) -> Finding:
    # TODO: no command fixes "nobody has this address" when it is not a
    # gateway's: the snapshot cannot say who was meant to have it.
    segment = ctx.snapshot.segment(netns, dev)
    present = sorted(
        f"{a.addr} ({node[0]})"
        for node in segment
        for a in (ctx.ns(node[0]).addresses_on(node[1]) if ctx.ns(node[0]) else [])
        if node[0] != netns
    )
    evidence = [
        asked,
        f"no namespace in play has {wanted}",
        f"addresses on the segment of {dev}: {', '.join(present) or 'none'}",
    ]
    if not _segment_closed(ctx, netns, dev):
        evidence.append(
            f"the segment of {dev} reaches beyond the namespaces nstrace can "
            f"see: whoever should have {wanted} there did not answer"
        )
    fix = None
    state = ctx.ns(netns)
    route = state.lookup(ctx.probe.dst) if state else None
    if route is not None and route.gateway == wanted:
        gateway = _gateway_for(ctx, netns, ctx.probe.dst)
        if gateway is not None:
            what = "default" if route.dst == "default" else route.dst
            fix = f"ip route replace {what} via {gateway[0]}"
            evidence.append(f"{gateway[0]} ({gateway[1]}) on that segment forwards")
    return Finding(
        i,
        "neigh-failed",
        netns,
        asked
        + (
            f": nobody in the lab has {wanted}"
            if _segment_closed(ctx, netns, dev)
            else f": no namespace nstrace can see has {wanted}"
        ),
        evidence,
        fix,
    )


def _path_text(path: list[tuple[str, str]]) -> str:
    return " - ".join(f"{name}@{ns}" for ns, name in path)


def _owner_rp_filter(
    ctx: _Context, i: int, owner: Address, source: str | None, asked: str
) -> Finding | None:
    # The owner validates the ARP request's sender address like a packet's
    # source (arp_process() routes it with ip_route_input), so strict
    # rp_filter there silences the answer.
    state = ctx.ns(owner.netns)
    if state is None or not source or state.rp_filter(owner.dev) != 1:
        return None
    back = state.lookup(source)
    if back is not None and back.dev == owner.dev:
        return None
    finding = _rp_finding(i, owner.netns, owner.dev, source, state, "the ARP request")
    finding.evidence.insert(0, asked)
    return finding


def _not_bridged(
    ctx: _Context, netns: str, dev: str, owner: Address
) -> tuple[str, str, str] | None:
    """(port, its namespace, bridge) when the veth peer of one end is outside
    a bridge that the other end's segment goes through."""
    ends = ((owner.netns, owner.dev), (netns, dev))
    for near, far in (ends, ends[::-1]):
        link = ctx.snapshot.link(*near)
        peer = ctx.snapshot.link(*link.peer) if link and link.peer else None
        if peer is None or peer.master:
            continue
        for ns_name, name in ctx.snapshot.segment(*far):
            candidate = ctx.snapshot.link(ns_name, name)
            if candidate and candidate.kind == "bridge" and ns_name == peer.netns:
                return peer.name, peer.netns, candidate.name
    return None


# ---- no-listener -----------------------------------------------------------


def _no_listener(ctx: _Context) -> list[Finding]:
    if ctx.result.outcome != "unreachable":
        return []
    port, proto = ctx.probe.dport, ctx.probe.proto
    for i, hop in enumerate(ctx.hops):
        if hop.get("dir") != "reply":
            continue
        reset = _is_reset(hop.get("tcp_flags"))
        icmp = hop.get("icmp_error") or {}
        refused = (
            icmp.get("type") == ICMP_UNREACH and icmp.get("code") == ICMP_PORT_UNREACH
        )
        if not reset and not refused:
            continue
        netns = hop["netns"]
        owner = ctx.snapshot.owner(ctx.probe.dst)
        if owner is not None:
            netns = owner.netns
        answer = "a TCP reset" if reset else "ICMP port unreachable"
        evidence = [f"{hop.get('src')} answered {proto} port {port} with {answer}"]
        for h in ctx.hops:
            if h.get("event") == "drop" and h.get("reason") == "NO_SOCKET":
                evidence.append(f"the kernel in {h['netns']} found no socket for it")
                break
        listen = "nc -l -p" if proto == "tcp" else "nc -u -l -p"
        return [
            Finding(
                i,
                "no-listener",
                netns,
                f"nothing listens on {proto} port {port} at {ctx.probe.dst} in {netns}",
                evidence,
                f"{listen} {port}",
            )
        ]
    return []


def _is_reset(flags: Any) -> bool:
    if isinstance(flags, int):
        return bool(flags & TCP_RST)
    return isinstance(flags, str) and "RST" in flags


# ---- unknown ---------------------------------------------------------------


def _segment_closed(ctx: _Context, netns: str, dev: str | None) -> bool:
    """Whether every link that hears *dev* is in the snapshot.

    A veth whose peer is known, a bridge or a loopback keeps the segment
    inside the namespaces in play; a physical NIC, or a veth whose peer lives
    in a namespace nstrace was not asked about, opens it to the unknown.
    """
    if not dev:
        return False
    for node in ctx.snapshot.segment(netns, dev) or {(netns, dev)}:
        link = ctx.snapshot.link(*node)
        if link is None:
            return False
        if link.kind not in ("bridge", "loopback") and not (
            link.kind == "veth" and link.peer
        ):
            return False
    return True


def _unknown(ctx: _Context) -> Finding:
    last = ctx.hops[-1] if ctx.hops else None
    evidence = []
    if last is not None:
        evidence.append(
            f"last seen: {last.get('event')} in {last['netns']}"
            + (f" on {last['dev']}" if last.get("dev") else "")
            + f" ({last.get('dir')}, {last.get('src')} > {last.get('dst')})"
        )
    drop = ctx.result.drop
    if drop:
        evidence.append(
            f"dropped in {drop['netns']} ({drop.get('reason')}) at "
            f"{drop.get('hook') or drop.get('dev') or '?'}"
        )
    sent = [h for h in ctx.hops if h.get("event") == "tx" and h.get("dir") == "request"]
    if sent and not _segment_closed(ctx, sent[-1]["netns"], sent[-1].get("dev")):
        evidence.append(
            f"the request left {sent[-1]['netns']} through {sent[-1].get('dev')}, "
            "beyond the namespaces nstrace can see; no answer came back from there"
        )
    elif ctx.result.outcome == "no-reply":
        evidence.append("no drop was seen: the packet may have left the lab")
    netns = last["netns"] if last else ctx.probe.src_netns
    return Finding(
        len(ctx.hops),
        "unknown",
        netns,
        "nstrace cannot tell why; the evidence below is what it saw",
        evidence,
        None,
    )


# ---- the rest of the way, from the snapshot alone ---------------------------


def _walk(ctx: _Context) -> list[Finding]:
    """Wrong facts further along the probe's way, which the packet never met.

    The route lookups are replayed on the snapshot (longest prefix match in
    the main tables; policy rules and marks are not modelled), hop by hop:
    the request from the source to the destination, and the reply back when
    no NAT is involved (with NAT, the way back depends on conntrack). Each
    finding comes after every finding of the path itself.
    """
    probe = ctx.probe
    found = _walk_one(ctx, probe.src_netns, probe.dst, "request", len(ctx.hops))
    owner = ctx.snapshot.owner(probe.dst)
    if owner is not None and probe.src and not ctx.result.nat:
        found += _walk_one(ctx, owner.netns, probe.src, "reply", len(ctx.hops) + 50)
    return found


# TODO: policy routing (ip rule, fwmark) is not replayed: a lab that uses it
# gets its lookups from the main tables here, and may see a false no-route.
def _walk_one(
    ctx: _Context, start: str, target: str, direction: str, position: int
) -> list[Finding]:
    netns, visited = start, set()
    for step in range(32):
        state = ctx.ns(netns)
        if state is None or state.owns(target) or netns in visited:
            return []
        visited.add(netns)
        found, owner = _next_hop(
            ctx, position + step, state, target, direction, visited
        )
        if found is not None or owner is None:
            return [found] if found is not None else []
        netns = owner.netns
    return []


def _next_hop(
    ctx: _Context,
    at: int,
    state: NetnsState,
    target: str,
    direction: str,
    visited: set[str],
) -> tuple[Finding | None, Address | None]:
    """What goes wrong between *state* and its next hop towards *target*, or
    (None, the next hop's address) when nothing does, or (None, None) when
    the snapshot cannot tell."""
    route = state.lookup(target)
    if route is None:
        hop = {"netns": state.name, "dst": target, "dir": direction, "error": PREDICTED}
        return _no_route_finding(ctx, at, hop), None
    link = state.links.get(route.dev or "")
    if link is None:
        return None, None  # a device the snapshot does not know: no verdict
    if not link.admin_up:
        return Finding(
            at,
            "link-down",
            state.name,
            f"{link.name} in {state.name} is down, and the {direction}'s route "
            f"to {target} leaves through it",
            [
                f"route in {state.name}: {_snapshot_route(route)}",
                f"{link.name} is down",
            ],
            f"ip link set {link.name} up",
        ), None
    nexthop = route.gateway or target
    owner = ctx.snapshot.owner(nexthop)
    if owner is None and not _segment_closed(ctx, state.name, link.name):
        return None, None  # the next hop is beyond what nstrace can see
    path = (
        ctx.snapshot.l2_path((state.name, link.name), (owner.netns, owner.dev))
        if owner is not None
        else None
    )
    asked = f"{state.name} would ask for {nexthop} on {link.name} (ARP)"
    if (
        owner is None
        or path is None
        or any(not ctx.snapshot.link(*n).admin_up for n in path)
    ):
        return _unanswered(ctx, at, state.name, link.name, nexthop, None, asked), None
    sender = _sender(ctx, state, link.name, direction)
    silenced = _owner_rp_filter(ctx, at, owner, sender, asked)
    if silenced is not None:
        return silenced, None
    if owner.netns in visited:
        return _loop(ctx, at, state, route, owner, target, direction), None
    following = ctx.ns(owner.netns)
    if following is None:
        return None, None  # out of the snapshot: no verdict
    found = (
        _reverse_path(ctx, at, following, owner.dev, direction)
        or _cannot_forward(at, state, route, owner, following, target, direction)
        or _predicted_filter(ctx, at, path, owner, following, target, direction)
    )
    return (found, None) if found is not None else (None, owner)


def _sender(ctx: _Context, state: NetnsState, dev: str, direction: str) -> str | None:
    """The source address of the packet as it leaves *state* on *dev*.

    The probe's own addresses where it starts (and where the reply starts);
    for a forwarded packet, the address an ARP request would carry is the
    namespace's own on that device (arp_announce 0, ip-sysctl.rst).
    """
    probe = ctx.probe
    if direction == "request" and state.name == probe.src_netns:
        return probe.src
    if direction == "reply" and state.owns(probe.dst):
        return probe.dst
    own = state.addresses_on(dev)
    return own[0].addr if own else None


def _reverse_path(
    ctx: _Context, at: int, state: NetnsState, dev: str, direction: str
) -> Finding | None:
    """Strict (or loose) reverse-path filtering that would drop the packet."""
    source = ctx.probe.src if direction == "request" else ctx.probe.dst
    if not source or state.owns(source):
        return None
    mode = state.rp_filter(dev)
    back = state.lookup(source)
    if (mode == 1 and (back is None or back.dev != dev)) or (mode == 2 and not back):
        return _rp_finding(at, state.name, dev, source, state, f"the {direction}")
    return None


def _cannot_forward(
    at: int,
    state: NetnsState,
    route: Any,
    owner: Address,
    following: NetnsState,
    target: str,
    direction: str,
) -> Finding | None:
    if following.owns(target) or following.forwarding(owner.dev):
        return None
    return Finding(
        at,
        "forwarding-disabled",
        owner.netns,
        f"{owner.netns} would have to forward the {direction} for {target}, but "
        "forwarding is off",
        [
            f"route in {state.name}: {_snapshot_route(route)}",
            f"net.ipv4.ip_forward = 0 in {owner.netns}",
        ],
        "sysctl -w net.ipv4.ip_forward=1",
    )


def _loop(
    ctx: _Context,
    at: int,
    state: NetnsState,
    route: Any,
    owner: Address,
    target: str,
    direction: str,
) -> Finding:
    """The route of *state* sends the packet back where it came from."""
    fix = None
    home = ctx.snapshot.owner(target)
    for link in state.links.values():
        for address in state.addresses_on(link.name) if home else []:
            for node in ctx.snapshot.segment(state.name, link.name):
                if node[0] != home.netns:
                    continue
                for theirs in ctx.ns(node[0]).addresses_on(node[1]):
                    if ipaddress.ip_address(theirs.addr) in address.network:
                        fix = f"ip route replace {route.dst} via {theirs.addr}"
    evidence = [f"route in {state.name}: {_snapshot_route(route)}"]
    if home is not None:
        evidence.append(f"{target} belongs to {home.netns} ({home.dev})")
    return Finding(
        at,
        "misrouted",
        state.name,
        f"the route in {state.name} for {target} sends the {direction} back to "
        f"{owner.netns}, where it came from: a routing loop",
        evidence,
        fix,
    )


def _predicted_filter(
    ctx: _Context,
    at: int,
    path: list,
    owner: Address,
    following: NetnsState,
    target: str,
    direction: str,
) -> Finding | None:
    """A filter drop the packet would meet reaching and entering *following*."""
    if not ctx.predict_filters or not ctx.probe.src:
        return None
    probe = ctx.probe
    src, dst = (
        (probe.src, probe.dst) if direction == "request" else (probe.dst, probe.src)
    )
    packet = {
        "src": src,
        "dst": dst,
        "proto": probe.proto,
        "ct": "new" if direction == "request" else "established",
    }
    checks: list[tuple[NetnsState, str, dict[str, Any]]] = []
    # br_netfilter hands bridged IPv4 to the FORWARD hook of the bridge's
    # namespace, with the bridge as both devices (br_nf_forward_ip()).
    for ns_name, name in path[1:-1]:
        link, state = ctx.snapshot.link(ns_name, name), ctx.ns(ns_name)
        if (
            link
            and link.kind == "bridge"
            and state
            and state.sysctl("net/bridge/bridge-nf-call-iptables") == 1
        ):
            checks.append((state, "FORWARD", {"iif": name, "oif": name}))
    checks.append((following, "PREROUTING", {"iif": owner.dev}))
    if following.owns(target):
        checks.append((following, "INPUT", {"iif": owner.dev}))
    else:
        out = following.lookup(target)
        if out is not None and out.dev:
            checks.append((following, "FORWARD", {"iif": owner.dev, "oif": out.dev}))
    for state, hook, devices in checks:
        predicted = _predict_drop(state, hook, {**packet, **devices})
        if predicted is None:
            continue
        chain, rule_json = predicted
        what = _chain_words(chain, None, rule_json)
        where = ", ".join(f"{k} {v}" for k, v in devices.items())
        return Finding(
            at,
            "filter-drop",
            state.name,
            f"the {direction} would be dropped in {state.name} at {hook} by the {what}",
            [
                f"predicted from the ruleset of {state.name}: {src} > {dst} ({where})",
                f"{what} in {state.name}",
            ],
            _filter_fix(
                ctx, state.name, hook, direction, src, dst, chain, None, rule_json
            ),
            ("filter-drop", state.name, hook, direction),
        )
    return None


# ---- predicting netfilter verdicts (for the rest of the way) ---------------

# What the evaluator understands of a rule; anything else makes it give up.
_IGNORED = ("counter", "log", "comment")


def _predict_drop(
    state: NetnsState, hook: str, packet: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """(chain, dropping rule or None for the policy) that would drop *packet*
    at *hook* of *state*, or None when it would pass or the rules say more
    than this evaluator understands (it never guesses a drop)."""
    chains = [c for c in state.base_chains(hook.lower()) if c.get("type") == "filter"]
    for chain in sorted(chains, key=lambda c: c.get("prio", 0)):
        outcome = _run_chain(state, chain, packet)
        if outcome is None:
            return None
        verdict, rule = outcome
        if verdict == "drop":
            return chain, rule
    return None


def _run_chain(
    state: NetnsState, chain: dict[str, Any], packet: dict[str, Any]
) -> tuple[str, dict[str, Any] | None] | None:
    for rule in state.rules_of(chain["family"], chain["table"], chain["name"]):
        matched = _rule_matches(rule, packet)
        if matched is None:
            return None
        if not matched:
            continue
        verdict = _verdict(rule)
        if verdict == "accept":
            return "accept", None
        if verdict in ("drop", "reject"):
            return "drop", rule
        if any(not _understood(e) for e in rule.get("expr", [])):
            return None  # a jump, a goto, a target of iptables: give up
    return ("drop", None) if chain.get("policy") == "drop" else ("accept", None)


def _understood(expr: dict[str, Any]) -> bool:
    return any(key in expr for key in (*_IGNORED, "match", "accept", "drop", "reject"))


def _rule_matches(rule: dict[str, Any], packet: dict[str, Any]) -> bool | None:
    """True, False, or None when a part of the rule is beyond the evaluator."""
    results = []
    for expr in rule.get("expr", []):
        if "match" in expr:
            results.append(_match_holds(expr["match"], packet))
        elif not _understood(expr):
            results.append(None)
    if False in results:
        return False
    return None if None in results else True


def _match_holds(match: dict[str, Any], packet: dict[str, Any]) -> bool | None:
    left, right, op = match.get("left", {}), match.get("right"), match.get("op")
    if op not in ("==", "!=", "in"):
        return None
    value: Any = None
    if "payload" in left and left["payload"].get("protocol") == "ip":
        name = left["payload"].get("field")
        value = {
            "saddr": packet.get("src"),
            "daddr": packet.get("dst"),
            "protocol": packet.get("proto"),
        }.get(name)
    elif "meta" in left:
        name = left["meta"].get("key")
        value = {
            "iifname": packet.get("iif"),
            "oifname": packet.get("oif"),
            "l4proto": packet.get("proto"),
        }.get(name)
    elif "ct" in left and left["ct"].get("key") == "state":
        value = packet.get("ct")
    if value is None:
        return None
    holds = _value_in(value, right)
    if holds is None:
        return None
    return holds if op != "!=" else not holds


def _value_in(value: str, right: Any) -> bool | None:
    if isinstance(right, list):
        answers = [_value_in(value, item) for item in right]
        return None if None in answers else any(answers)
    if isinstance(right, dict) and "set" in right:
        return _value_in(value, right["set"])
    if isinstance(right, dict) and "prefix" in right:
        prefix = right["prefix"]
        try:
            network = ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}")
            return ipaddress.ip_address(value) in network
        except ValueError:
            return None
    if not isinstance(right, str):
        return None
    if right.endswith("*"):
        return value.startswith(right[:-1])
    try:
        return ipaddress.ip_address(value) == ipaddress.ip_address(right)
    except ValueError:
        return value == right


RULES = (
    _no_route,
    _misrouted,
    _no_snat,
    _filter_drop,
    _forwarding,
    _rp_filter,
    _neighbour,
    _no_listener,
    _walk,
)
