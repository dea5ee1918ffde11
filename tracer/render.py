"""Rendering: a trace result as a tree for people, or as JSON for programs.

The tree groups hops by direction and namespace, in time order, starting a
new group whenever either changes, so that a reader follows the request out
and the reply back ("request · RED", "request · host", "reply · host"...).
Every line is built as a rich ``Text`` (never markup) so that a device or
namespace name cannot be read as styling, and stays within 80 columns for
the addresses the lab uses. rich drops colour by itself when stdout is not a
terminal. rich is imported by the functions that draw, not with this module:
`nstrace ping --json` never loads it, which saved it 10 to 15 ms (`make bench`
conditions, step 6).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from tracer.path import ROUTE_ERRORS, TraceResult

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text
    from rich.tree import Tree

log = logging.getLogger(__name__)

DROP_STYLE = "bold red"
NAT_STYLE = "yellow"
BENIGN_STYLE = "dim"
CAUSE_STYLE = "bold"
FIX_STYLE = "bold cyan"
RULE_STYLE = "green"
OUTCOME_STYLES = {
    "reply": "bold green",
    "dropped": "bold red",
    "unreachable": "bold red",
    "no-reply": "bold yellow",
    "error": "bold red",
}

# ICMP errors that can come back for a probe, by (type, code) then by type
# (RFC 792; codes 9 to 13 from RFC 1812).
ICMP_ERROR_NAMES = {
    (3, 0): "network unreachable",
    (3, 1): "host unreachable",
    (3, 2): "protocol unreachable",
    (3, 3): "port unreachable",
    (3, 4): "fragmentation needed",
    (3, 9): "network administratively prohibited",
    (3, 10): "host administratively prohibited",
    (3, 13): "communication administratively prohibited",
    (11, 0): "TTL exceeded in transit",
    (11, 1): "fragment reassembly time exceeded",
}
ICMP_TYPE_NAMES = {3: "destination unreachable", 11: "time exceeded"}

EVENT_WIDTH = 6  # "bridge", the longest event name, plus nothing


def _text(content: str = "", style: str = "") -> Text:
    """A rich Text of *content*, rich imported on first use (see above)."""
    from rich.text import Text

    return Text(content, style=style)


def console() -> Console:
    """The console nstrace prints results on: stdout, no auto-highlighting."""
    from rich.console import Console

    return Console(highlight=False)


def render_json(result: TraceResult) -> str:
    """The result as schema-1 JSON, two-space indent, keys in schema order."""
    return json.dumps(result.to_json(), indent=2)


def render_text(result: TraceResult, console: Console, full: bool = False) -> None:
    """Print the result as a tree of hops followed by the outcome.

    Unless *full*, the kernel's routine bookkeeping is left out of the tree:
    see :func:`shown_hops`. The JSON always has every hop.
    """
    hops = result.hops if full else shown_hops(result.hops)
    console.print(_tree(result, hops))
    hidden = len(result.hops) - len(hops)
    if hidden:
        console.print(
            _text(
                f"({hidden} routine route and neighbour events not shown; "
                "--all shows them)",
                style=BENIGN_STYLE,
            )
        )
    console.print(outcome_line(result))
    for line in cause_lines(result):
        console.print(line)
    if result.lost_events > 0:
        console.print(
            _text(
                f"warning: {result.lost_events} events were lost (ring buffer "
                "full); the path above may have gaps",
                style="yellow",
            )
        )


# ---- the tree --------------------------------------------------------------


def header(result: TraceResult) -> str:
    probe = result.probe
    line = f"{probe.src_netns} -> {probe.dst} {probe.proto}"
    if probe.proto == "icmp":
        return f"{line} id {probe.ident:#06x}"
    return f"{line} port {probe.dport}" if probe.dport else line


# Neighbour states worth a line of their own: resolution under way or failed.
NEIGH_SHOWN = ("INCOMPLETE", "FAILED")
RT_TABLE_LOCAL = 255


def shown_hops(hops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hops a person needs: without ARP's and the kernel's own look-ups.

    Left out: neighbour updates that only confirm or age an entry (ARP that
    works), successful look-ups in the local table (the kernel asking "is
    this address mine?", e.g. while answering ARP), and a route look-up that
    repeats the previous one in the same namespace with the same result.
    """
    shown: list[dict[str, Any]] = []
    last_route: dict[str, tuple] = {}
    for hop in hops:
        if hop["event"] == "neigh":
            if (hop.get("neigh") or {}).get("state") not in NEIGH_SHOWN:
                continue
        elif hop["event"] == "route":
            if hop.get("table") == RT_TABLE_LOCAL and not hop.get("error"):
                continue
            same = (
                hop["dir"],
                hop["dst"],
                hop.get("dev"),
                hop.get("gateway"),
                hop.get("table"),
                hop.get("error"),
            )
            if last_route.get(hop["netns"]) == same:
                continue
            last_route[hop["netns"]] = same
        shown.append(hop)
    return shown


def _tree(result: TraceResult, hops: list[dict[str, Any]] | None = None) -> Tree:
    from rich.tree import Tree

    tree = Tree(_text(header(result), style="bold"))
    group: Tree | None = None
    key: tuple[str, str] | None = None
    for hop in result.hops if hops is None else hops:
        if (hop["dir"], hop["netns"]) != key:
            key = (hop["dir"], hop["netns"])
            group = tree.add(_text(f"{hop['dir']} · {hop['netns']}", style="bold"))
        assert group is not None
        node = group.add(hop_line(hop))
        if hop.get("rule"):
            node.add(rule_line(hop["rule"]))
    if not result.hops:
        tree.add(_text("no events seen", style=BENIGN_STYLE))
    return tree


def hop_line(hop: dict[str, Any]) -> Text:
    """One hop as one line: event name, then what that event says."""
    kind = hop["event"]
    describe = _DESCRIBE.get(kind, _describe_packet)
    body = describe(hop)
    if kind == "drop":
        return _text(f"{'DROP':<{EVENT_WIDTH}} ", style=DROP_STYLE) + body
    return _text(f"{kind:<{EVENT_WIDTH}} ") + body


def rule_line(rule: dict[str, Any]) -> Text:
    """The netfilter rule (or chain policy) that decided a hop, and its text."""
    verdict = rule.get("verdict") or "?"
    where = f"{rule.get('family')} {rule.get('table')} {rule.get('chain')}"
    if rule.get("policy"):
        where += " policy"
    style = DROP_STYLE if verdict == "drop" else RULE_STYLE
    return _text(f"{verdict:<{EVENT_WIDTH}} ", style=style) + _text(
        f"{where}: {rule.get('text') or '?'}"
    )


def _addresses(hop: dict[str, Any]) -> str:
    if hop.get("src") is None and hop.get("dst") is None:
        return ""
    src, dst = hop.get("src") or "?", hop.get("dst") or "?"
    if hop.get("dport"):
        src, dst = f"{src}:{hop['sport']}", f"{dst}:{hop['dport']}"
    text = f"{src} > {dst}"
    if hop.get("tcp_flags"):
        text += f" {hop['tcp_flags']}"
    icmp = hop.get("icmp_error")
    if icmp:
        text += f" icmp {_icmp_name(icmp['type'], icmp['code'])}"
    return text


def _join(*parts: str) -> str:
    return "  ".join(p for p in parts if p)


def _describe_packet(hop: dict[str, Any]) -> Text:
    # rx, tx, send, recv and anything newer: device, then the packet.
    return _text(_join(hop.get("dev") or "", _addresses(hop)))


def _hook_devices(hop: dict[str, Any]) -> str:
    in_dev, out_dev = hop.get("in_dev"), hop.get("out_dev")
    if in_dev and out_dev:
        return f"{in_dev} -> {out_dev}"
    if in_dev:
        return f"in {in_dev}"
    return f"out {out_dev}" if out_dev else ""


def _describe_hook(hop: dict[str, Any]) -> Text:
    text = _text(_join(hop.get("hook") or "?", _hook_devices(hop)) + "  ")
    after = hop.get("after")
    if after:
        # What changed is the news; the unchanged address is in the group.
        changes = [
            f"{field} {hop[field]} -> {after[field]}"
            for field in ("src", "dst")
            if after.get(field) != hop.get(field)
        ]
        text.append("NAT " + ", ".join(changes), style=NAT_STYLE)
    else:
        text.append(_addresses(hop))
    if hop.get("passed") is False:
        text.append("  (did not pass)", style=DROP_STYLE)
    return text


def _describe_route(hop: dict[str, Any]) -> Text:
    dst = hop.get("dst") or "?"
    table = hop.get("table")
    error = hop.get("error")
    if error == "EAGAIN":
        where = f"table {table}" if table is not None else "this table"
        return _text(f"{dst}: no route in {where}", style=BENIGN_STYLE)
    if error:
        meaning = ROUTE_ERRORS.get(error, "lookup failed")
        suffix = f" (table {table})" if table is not None else ""
        return _text(f"{dst}: {error} {meaning}{suffix}", style=DROP_STYLE)
    parts = [dst]
    if hop.get("gateway"):
        parts.append(f"via {hop['gateway']}")
    if hop.get("dev"):
        parts.append(f"dev {hop['dev']}")
    if table is not None:
        parts.append(f"table {table}")
    return _text(" ".join(parts))


def _describe_neigh(hop: dict[str, Any]) -> Text:
    neigh = hop.get("neigh") or {}
    parts = [neigh.get("addr") or "?", neigh.get("state") or "?"]
    if hop.get("dev"):
        parts.append(f"dev {hop['dev']}")
    return _text(" ".join(parts))


def _describe_free(hop: dict[str, Any]) -> Text:
    where = f"on {hop['dev']}" if hop.get("dev") else ""
    return _text(_join(hop.get("reason") or "?", where, "(benign)"), style=BENIGN_STYLE)


def _describe_drop(hop: dict[str, Any]) -> Text:
    at = f"at {hop['hook']}" if hop.get("hook") else ""
    where = f"on {hop['dev']}" if hop.get("dev") else ""
    return _text(_join(hop.get("reason") or "?", at, where), style=DROP_STYLE)


def _describe_bridge(hop: dict[str, Any]) -> Text:
    return _text(_join(hop.get("hook") or "?", _hook_devices(hop), _addresses(hop)))


_DESCRIBE = {
    "hook": _describe_hook,
    "route": _describe_route,
    "neigh": _describe_neigh,
    "free": _describe_free,
    "drop": _describe_drop,
    "bridge": _describe_bridge,
}


# ---- the outcome -----------------------------------------------------------


def outcome_line(result: TraceResult) -> Text:
    """The verdict in one line: "reply in 0.4 ms", "dropped in host at..."."""
    return _text(_outcome_text(result), style=OUTCOME_STYLES[result.outcome])


def cause_lines(result: TraceResult) -> list[Text]:
    """The causes after the outcome: the first as "cause:", the others "also:".

    Each is its summary, its evidence indented, and the fix as a command
    with the namespace to run it in as a shell comment, so that it can be
    pasted as it is.
    """
    lines = []
    for index, cause in enumerate(result.causes):
        label = "cause" if index == 0 else "also"
        lines.append(_text(f"{label}: {cause['summary']}", style=CAUSE_STYLE))
        lines.extend(_text(f"  {item}") for item in cause.get("evidence", []))
        if cause.get("fix"):
            lines.append(
                _text(f"fix: {cause['fix']}", style=FIX_STYLE)
                + _text(f"  # in {cause['netns']}", style=BENIGN_STYLE)
            )
        else:
            lines.append(_text("fix: none that nstrace can derive; see above"))
    return lines


def _outcome_text(result: TraceResult) -> str:
    outcome = result.outcome
    if outcome == "reply":
        took = _duration(result.elapsed_ns)
        return f"reply in {took}" if took else "reply"
    if outcome == "dropped" and result.drop:
        return _dropped_text(result.drop)
    if outcome == "unreachable":
        return _unreachable_text(result)
    if outcome == "no-reply":
        if result.timeout_s is not None:
            return f"no reply within {result.timeout_s:.1f} s"
        return "no reply"
    if outcome == "error":
        return f"error: {result.error or 'the trace failed'}"
    return outcome


def _dropped_text(drop: dict[str, Any]) -> str:
    place = f"in {drop['netns']}"
    if drop.get("hook"):
        place += f" at {drop['hook']}"
    elif drop.get("dev"):
        place += f" on {drop['dev']}"
    rule = drop.get("rule")
    if rule:
        # The rule names the cause better than the reason (NETFILTER_DROP).
        by = "policy" if rule.get("policy") else "rule"
        family = "" if rule.get("family") == "ip" else f"{rule.get('family')} "
        return (
            f"dropped {place}, {drop['dir']} direction, "
            f"by {family}{rule.get('table')} {rule.get('chain')} {by}"
        )
    return f"dropped {place} ({drop.get('reason') or 'no reason'}), {drop['dir']} direction"


def _unreachable_text(result: TraceResult) -> str:
    if result.send_error:
        return f"unreachable: {result.send_error} before sending"
    reply = result.reply or {}
    sender = reply.get("src") or "?"
    if reply.get("icmp_type") is not None:
        name = _icmp_name(reply["icmp_type"], reply.get("icmp_code"))
        return f"unreachable: ICMP {name} from {sender}"
    return f"unreachable: TCP reset from {sender}"


def _icmp_name(icmp_type: int, icmp_code: int | None) -> str:
    name = ICMP_ERROR_NAMES.get((icmp_type, icmp_code))
    if name:
        return name
    return ICMP_TYPE_NAMES.get(icmp_type, f"type {icmp_type} code {icmp_code}")


def _duration(ns: int | None) -> str | None:
    if ns is None or ns < 0:
        return None
    ms = ns / 1e6
    if ms < 0.1:
        return f"{ns / 1e3:.0f} µs"
    if ms < 100:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms"
