"""Before and after: what changed between two traces of the same probe.

A lab is a story of small changes (an address, a route, one iptables rule)
and each one moves the packet: it now crosses a hook it did not reach, the
drop moves or goes away, a NAT rewrite appears. This module compares two
:class:`~tracer.path.TraceResult` of the same probe and says so, in the
lab's words. It is pure: `nstrace diff` feeds it two saved JSON results,
`nstrace lab run` two traces taken one step apart.

What is compared:

- the outcome;
- the hooks the packet got through, as (netns, hook, dir, family): a hook
  that was entered but not left (the packet died there) is not crossed;
- the namespaces each direction reached (the reply "now reaches RED");
- the drop point (netns, hook, dir, reason);
- NAT rewrites (netns, hook, dir, field, from, to);
- the causes the explanation named (code, netns): one that went away is
  what the change fixed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.text import Text

from tracer.errors import UsageError
from tracer.path import SCHEMA, TraceResult

log = logging.getLogger(__name__)


class Crossing(NamedTuple):
    """A hook that a packet got through, in one direction."""

    netns: str
    hook: str
    dir: str
    family: str = "ip"

    def __str__(self) -> str:
        family = "" if self.family == "ip" else f" ({self.family} family)"
        return f"{self.netns} {self.hook} {self.dir}{family}"


def crossings(result: TraceResult) -> list[Crossing]:
    """The hooks the packet got through, in order, each once."""
    found: dict[Crossing, None] = {}
    if result.hops:
        for hop in result.hops:
            if hop.get("event") not in ("hook", "bridge") or hop.get("passed") is False:
                continue
            family = "bridge" if hop["event"] == "bridge" else "ip"
            found[Crossing(hop["netns"], hop["hook"], hop["dir"], family)] = None
        return list(found)
    # A result without hops (hand-written, or trimmed): hooks_hit minus the
    # hook where the packet died.
    dropped = _drop_crossing(result.drop)
    for hit in result.hooks_hit:
        crossing = Crossing(
            hit["netns"], hit["hook"], hit["dir"], hit.get("family") or "ip"
        )
        if crossing != dropped:
            found[crossing] = None
    return list(found)


def _drop_crossing(drop: dict[str, Any] | None) -> Crossing | None:
    if not drop or not drop.get("hook"):
        return None
    return Crossing(drop["netns"], drop["hook"], drop["dir"])


# Events that show the packet itself went through a namespace. A receive
# alone is not enough: a bridge floods a frame to every port, and the copy
# a namespace receives and frees as OTHERHOST never went anywhere; route and
# neighbour events can be the kernel asking about an address, not the packet.
_PASSAGE = frozenset({"tx", "hook", "bridge", "send", "recv", "drop"})


def reached(result: TraceResult) -> list[tuple[str, str]]:
    """(netns, dir) for every namespace each direction went through, in order."""
    found: dict[tuple[str, str], None] = {}
    for hop in result.hops:
        netns, direction = hop.get("netns"), hop.get("dir")
        if hop.get("event") in _PASSAGE and netns and direction and not _unnamed(netns):
            found[(netns, direction)] = None
    return list(found)


def _unnamed(netns: str) -> bool:
    # The decoder calls a namespace it cannot name "netns:INODE" (probes.py):
    # one outside the lab, such as another lab's route lookup for the same
    # address seen while tracing. Not a place the probe went.
    return netns.startswith("netns:")


def nat_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(entry.get(k) for k in ("netns", "hook", "dir", "field", "from", "to"))


def describe_nat(entry: dict[str, Any], hops: list[dict[str, Any]] = ()) -> str:
    """``host POSTROUTING rewrites the request's source 11.11.11.2 -> 10.0.2.15``.

    With the trace's *hops*, it says who did it: the nat rule that rule
    attribution saw at that hook, or conntrack for a reply.
    """
    what = "source" if entry.get("field") == "src" else "destination"
    text = (
        f"{entry.get('netns')} {entry.get('hook')} rewrites the {entry.get('dir')}'s "
        f"{what} {entry.get('from')} -> {entry.get('to')}"
    )
    by = _nat_author(entry, hops)
    return f"{text} ({by})" if by else text


def _nat_author(entry: dict[str, Any], hops: list[dict[str, Any]]) -> str | None:
    # Only a connection's first packet goes through the nat table's chains
    # (Documentation/networking/nf_conntrack-sysctl.rst; iptables-extensions
    # "nat" table): a rewrite of a reply is conntrack undoing the request's.
    if entry.get("dir") == "reply":
        return "conntrack, reversing the request's NAT" if hops else None
    for hop in hops:
        rule = hop.get("rule") or {}
        if (
            hop.get("event") == "hook"
            and (hop.get("netns"), hop.get("hook"), hop.get("dir"))
            == (entry.get("netns"), entry.get("hook"), entry.get("dir"))
            and rule.get("table") == "nat"
            and rule.get("text")
        ):
            return rule["text"]
    return None


def describe_drop(drop: dict[str, Any]) -> str:
    """``host FORWARD, reply direction (NETFILTER_DROP)``."""
    where = drop.get("netns") or "?"
    if drop.get("hook"):
        where += f" {drop['hook']}"
    elif drop.get("dev"):
        where += f" on {drop['dev']}"
    why = drop.get("reason") or "no reason"
    rule = drop.get("rule") or {}
    if rule.get("text"):
        why += f", {rule['text']}"
    return f"{where}, {drop.get('dir')} direction ({why})"


def describe_cause(cause: dict[str, Any]) -> str:
    text = f"{cause.get('code')} in {cause.get('netns')}"
    return f"{text}: {cause['summary']}" if cause.get("summary") else text


@dataclass
class TraceDiff:
    """The changes from *before* to *after*; *before* None means a first trace."""

    before: TraceResult | None
    after: TraceResult
    crossed_new: list[Crossing] = field(default_factory=list)
    crossed_gone: list[Crossing] = field(default_factory=list)
    reached_new: list[tuple[str, str]] = field(default_factory=list)
    reached_gone: list[tuple[str, str]] = field(default_factory=list)
    nat_new: list[dict[str, Any]] = field(default_factory=list)
    nat_gone: list[dict[str, Any]] = field(default_factory=list)
    causes_new: list[dict[str, Any]] = field(default_factory=list)
    causes_gone: list[dict[str, Any]] = field(default_factory=list)

    @property
    def outcome_changed(self) -> bool:
        return self.before is not None and self.before.outcome != self.after.outcome

    @property
    def drop_changed(self) -> bool:
        if self.before is None:
            return False
        return _drop_point(self.before.drop) != _drop_point(self.after.drop)

    @property
    def unchanged(self) -> bool:
        return self.before is not None and not self.changes()

    def changes(self) -> list[str]:
        """Every change as one sentence, the outcome first."""
        if self.before is None:
            return []
        lines = []
        if self.outcome_changed:
            lines.append(f"outcome: {self.before.outcome} -> {self.after.outcome}")
        lines.extend(self._drop_lines())
        lines += [f"now crosses {c}" for c in self.crossed_new]
        lines += [f"no longer crosses {c}" for c in self.crossed_gone]
        lines += [f"the {d} now reaches {ns}" for ns, d in self.reached_new]
        lines += [f"the {d} no longer reaches {ns}" for ns, d in self.reached_gone]
        after, before = self.after.hops, self.before.hops
        lines += [f"NAT appeared: {describe_nat(e, after)}" for e in self.nat_new]
        lines += [f"NAT vanished: {describe_nat(e, before)}" for e in self.nat_gone]
        lines += [f"cause gone: {describe_cause(c)}" for c in self.causes_gone]
        lines += [f"new cause: {describe_cause(c)}" for c in self.causes_new]
        return lines

    def _drop_lines(self) -> list[str]:
        if not self.drop_changed:
            return []
        old, new = self.before.drop, self.after.drop  # type: ignore[union-attr]
        if old and new:
            return [f"the drop moved: {describe_drop(old)} -> {describe_drop(new)}"]
        if old:
            return [f"no longer dropped at {describe_drop(old)}"]
        return [f"now dropped at {describe_drop(new)}"]  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        before = self.before
        return {
            "outcome": {
                "before": before.outcome if before else None,
                "after": self.after.outcome,
            },
            "drop": {
                "before": before.drop if before else None,
                "after": self.after.drop,
            },
            "crossed_new": [c._asdict() for c in self.crossed_new],
            "crossed_gone": [c._asdict() for c in self.crossed_gone],
            "reached_new": [{"netns": n, "dir": d} for n, d in self.reached_new],
            "reached_gone": [{"netns": n, "dir": d} for n, d in self.reached_gone],
            "nat_new": self.nat_new,
            "nat_gone": self.nat_gone,
            "causes_new": self.causes_new,
            "causes_gone": self.causes_gone,
            "changes": self.changes(),
        }


def _drop_point(drop: dict[str, Any] | None) -> tuple[Any, ...] | None:
    if not drop:
        return None
    return tuple(drop.get(k) for k in ("netns", "hook", "dir", "reason"))


def _minus(first: list, second: list, key=lambda item: item) -> list:
    seen = {key(item) for item in second}
    return [item for item in first if key(item) not in seen]


def compare(before: TraceResult | None, after: TraceResult) -> TraceDiff:
    """What changed from *before* to *after* (both traces of one probe)."""
    if before is None:
        return TraceDiff(None, after)
    cause = _cause_key
    return TraceDiff(
        before,
        after,
        crossed_new=_minus(crossings(after), crossings(before)),
        crossed_gone=_minus(crossings(before), crossings(after)),
        reached_new=_minus(reached(after), reached(before)),
        reached_gone=_minus(reached(before), reached(after)),
        nat_new=_minus(after.nat, before.nat, nat_key),
        nat_gone=_minus(before.nat, after.nat, nat_key),
        causes_new=_minus(after.causes, before.causes, cause),
        causes_gone=_minus(before.causes, after.causes, cause),
    )


def _cause_key(cause: dict[str, Any]) -> tuple[Any, Any]:
    return cause.get("code"), cause.get("netns")


def load_result(path: str | Path) -> TraceResult:
    """A result saved by `nstrace ping --json`, or a one-line UsageError."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path}:{exc.lineno}: not JSON ({exc.msg}); save a trace with "
            "`nstrace ping SRC DST --json > FILE`"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not an nstrace result (expected a JSON object)")
    if data.get("schema") != SCHEMA:
        raise UsageError(
            f"{path}: trace has schema {data.get('schema')!r}, this nstrace reads "
            f"schema {SCHEMA} (record it again with `nstrace ping ... --json`)"
        )
    problem = _shape_problem(data)
    if problem:
        raise UsageError(
            f"{path}: not an nstrace result ({problem}); save one with "
            "`nstrace ping SRC DST --json > FILE`"
        )
    try:
        return TraceResult.from_json(data)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(
            f"{path}: not an nstrace result ({type(exc).__name__}: {exc}); save one "
            "with `nstrace ping SRC DST --json > FILE`"
        ) from None


_LISTS = {
    "hops": ("netns", "dir"),
    "hooks_hit": ("netns", "hook", "dir"),
    "nat": ("netns", "hook", "dir", "field"),
    "causes": ("code",),
}


def _shape_problem(data: dict[str, Any]) -> str | None:
    """What keeps *data* from being read as a schema-1 result, or None."""
    for key in ("probe", "outcome"):
        if key not in data:
            return f"it has no {key!r}"
    if not isinstance(data["probe"], dict):
        return "'probe' is not an object"
    for key, needed in _LISTS.items():
        items = data.get(key, [])
        if not isinstance(items, list):
            return f"{key!r} is not a list"
        for number, item in enumerate(items, 1):
            if not isinstance(item, dict):
                return f"{key} item {number} is not an object"
            missing = [k for k in needed if k not in item]
            if missing:
                return f"{key} item {number} has no {missing[0]!r}"
    drop = data.get("drop")
    if drop is not None and not isinstance(drop, dict):
        return "'drop' is neither null nor an object"
    return None


def probe_mismatch(before: TraceResult, after: TraceResult) -> str | None:
    """Why two results are not traces of the same probe, or None if they are."""
    one, two = before.probe, after.probe
    mine = (one.src_netns, one.dst, one.proto, one.dport)
    theirs = (two.src_netns, two.dst, two.proto, two.dport)
    if mine == theirs:
        return None
    return (
        f"the traces are of different probes ({one.src_netns} -> {one.dst} "
        f"{one.proto} and {two.src_netns} -> {two.dst} {two.proto})"
    )


# ---- text ------------------------------------------------------------------


def summary_lines(result: TraceResult) -> list[str]:
    """A first trace in a few lines: where each direction went, NAT, the drop."""
    lines = []
    for direction in ("request", "reply"):
        names = [ns for ns, d in reached(result) if d == direction]
        if names:
            lines.append(f"the {direction} went through {' -> '.join(names)}")
    lines += [describe_nat(entry, result.hops) for entry in result.nat]
    if result.drop:
        lines.append(f"dropped at {describe_drop(result.drop)}")
    lines += [f"cause: {describe_cause(c)}" for c in result.causes]
    return lines


def render_changes(change: TraceDiff, console: Console, since: str) -> None:
    """The changes as an indented list under "since *since*:"."""
    if change.before is None:
        console.print(Text("  first trace of this probe:", style="bold"))
        lines = summary_lines(change.after)
    elif change.unchanged:
        console.print(Text(f"  since {since}: nothing changed", style="dim"))
        return
    else:
        console.print(Text(f"  since {since}:", style="bold"))
        lines = change.changes()
    for line in lines:
        style = "yellow" if line.startswith("NAT") or "rewrites" in line else ""
        console.print(Text(f"    {line}", style=style), soft_wrap=True)
