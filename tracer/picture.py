"""The picture: the lab's topology with the probe's path drawn on it.

Theory of operation
-------------------

Three stages, each a function of its own, so that a saved JSON trace draws
the same picture as a live one:

1. **Topology** (:class:`Topology`). Devices per namespace, veth peers and
   bridge ports: from tracer.snapshot's graph when drawing live (the trace's
   namespaces, plus the whole lab when one is up, so that RED's trace to
   8.8.8.8 also shows BLUE and the laptop hanging off the host), from the
   ``snapshot`` summary of a saved trace, or from its JSON form. A trace
   without any still draws: its devices come from the hops, and a wire is
   assumed between two devices of different namespaces that the packet went
   straight between.

2. **Graph** (:func:`build_graph`). One networkx ``MultiDiGraph``: a node per
   device, plus a ``local`` node for a namespace's own stack where the packet
   starts or ends, plus a node where it died. Edges are the topology (``veth``
   and ``port``) and the path: each run of hops in one direction becomes a
   chain of arrows between the places the packet was, numbered in order and
   labelled with the netfilter hooks it crossed and the NAT rewrites made
   there. Route lookups and neighbour events say nothing about where the
   packet *is*, so they draw nothing.

3. **Drawing** (:func:`to_dot`, :func:`render`). Graphviz `dot` lays out the
   graph left to right, one cluster per namespace. Only topology edges steer
   the ranks (path arrows have ``constraint=false``), so the pictures of one
   lab before and after a change put its devices in the same order; only
   the room the arrows' labels take moves them apart.
   Ports sit left of their bridge; a namespace hanging off a bridge port sits
   left of it, one reached through a routed interface sits right of it: the
   tutorial's own drawing, with RED and BLUE left, br0, the host, and the
   internet right. `dot` runs as a subprocess and needs no display.
"""

from __future__ import annotations

import html
import logging
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from tracer.errors import CannotTraceError, UsageError
from tracer.path import ROUTE_ERRORS, TraceResult

log = logging.getLogger(__name__)

LOCAL = "(local)"  # a namespace's own stack: sockets, routing, local delivery
DROP = "(drop)"  # where the packet died
END = "(end)"  # where the trace ends without a drop (no reply, unreachable)

REQUEST_COLOUR = "#1f6fd1"
REPLY_COLOUR = "#e07b00"
DROP_COLOUR = "#d62728"
NAT_COLOUR = "#8a6300"
WIRE_COLOUR = "#a0a0a0"
FONT = "DejaVu Sans,Helvetica,Arial,sans-serif"

DOT_TIMEOUT = 30.0  # seconds; the tutorial's lab lays out in about 50 ms
FORMATS = ("svg", "png")
HOOKS_PER_LINE = 2  # a bridged frame crosses five hooks: wrap, not widen


# ---- 1. topology -----------------------------------------------------------


@dataclass
class Device:
    """One network device as the picture needs it."""

    netns: str
    name: str
    kind: str = "device"  # veth, bridge, loopback, ... (IFLA_INFO_KIND)
    addresses: list[str] = field(default_factory=list)
    state: str = "UNKNOWN"  # operstate
    master: str | None = None  # the bridge it is a port of
    peer: tuple[str, str] | None = None  # (netns, name) of its veth peer


@dataclass
class Topology:
    """Devices per namespace with their veth peers and bridge ports."""

    namespaces: list[str] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)

    def find(self, netns: str, name: str) -> Device | None:
        for device in self.devices:
            if device.netns == netns and device.name == name:
                return device
        return None

    def to_json(self) -> dict[str, Any]:
        devices = []
        for device in self.devices:
            item = asdict(device)
            item["peer"] = list(device.peer) if device.peer else None
            devices.append(item)
        return {"namespaces": list(self.namespaces), "devices": devices}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Topology:
        try:
            devices = [
                Device(
                    **{**item, "peer": tuple(item["peer"]) if item["peer"] else None}
                )
                for item in data["devices"]
            ]
            return cls(namespaces=list(data["namespaces"]), devices=devices)
        except (KeyError, TypeError) as err:
            raise UsageError(f"the topology in this trace is malformed: {err}") from err


def read_topology(namespaces: Iterable[str]) -> Topology:
    """The live topology of *namespaces*, and of the whole lab if one is up.

    Read by tracer.snapshot, whose graph already joins veth peers and bridge
    ports. The lab's namespaces are added so that RED's trace to 8.8.8.8
    also shows BLUE and the laptop hanging off the host; a namespace that
    cannot be read is logged there and left out.
    """
    from tracer import lab, snapshot

    names = list(dict.fromkeys(namespaces))
    state = lab.current()
    if state and set(names) & set(state.namespaces):
        names += [ns for ns in state.namespaces if ns not in names]
    return topology_from_snapshot(snapshot.take(names))


def topology_from_snapshot(snap: Any) -> Topology:
    """A :class:`~tracer.snapshot.Snapshot` as the picture's topology."""
    topology = Topology(
        namespaces=[n for n, s in snap.namespaces.items() if not s.error]
    )
    for name in topology.namespaces:
        state = snap.namespaces[name]
        for link in state.links.values():
            addresses = [
                f"{a.addr}/{a.prefixlen}"
                for a in state.addresses
                if a.dev == link.name and not a.addr.startswith("127.")
            ]
            device = _device(name, link.name, link.kind, addresses, link.admin_up)
            if device:
                device.master = link.master
                device.peer = link.peer
                topology.devices.append(device)
    return topology


def topology_from_summary(summary: dict[str, Any]) -> Topology | None:
    """The topology in a saved trace's ``snapshot`` summary, if it has links."""
    spaces = (summary or {}).get("namespaces") or {}
    if not any(isinstance(s, dict) and s.get("links") for s in spaces.values()):
        return None
    topology = Topology()
    for name, state in spaces.items():
        if state.get("error"):
            continue
        topology.namespaces.append(name)
        on: dict[str, list[str]] = {}
        for text in state.get("addresses", []):
            address, _, dev = text.partition(" dev ")
            if not address.startswith("127."):
                on.setdefault(dev, []).append(address)
        for dev, link in state.get("links", {}).items():
            device = _device(
                name, dev, link.get("kind"), on.get(dev, []), link.get("up")
            )
            if device:
                device.master = link.get("master")
                peer_name, _, peer_ns = (link.get("peer") or "").rpartition("@")
                device.peer = (peer_ns, peer_name) if peer_name else None
                topology.devices.append(device)
    return topology


def _device(
    ns: str, name: str, kind: str | None, addresses: list[str], up: bool | None
) -> Device | None:
    # lo is in every namespace; it earns a place only by owning an address
    # that matters (the lab's internet owns 8.8.8.8 on lo).
    if kind == "loopback" and not addresses:
        return None
    return Device(
        netns=ns,
        name=name,
        kind=kind or "device",
        addresses=addresses,
        # Administrative state: a veth's operstate can read DOWN while it
        # carries traffic (seen on the lab's eth0, kernel 6.18).
        state="UP" if up else "DOWN",
    )


def topology_from_hops(result: dict[str, Any]) -> Topology:
    """A topology made of the devices the trace saw, for a trace saved without one."""
    topology = Topology()
    for hop in result.get("hops", []):
        ns = hop.get("netns")
        if not ns:
            continue
        if ns not in topology.namespaces:
            topology.namespaces.append(ns)
        for key in ("dev", "in_dev", "out_dev"):
            name = hop.get(key)
            if name and hop.get("event") != "route" and not topology.find(ns, name):
                topology.devices.append(Device(netns=ns, name=name))
    src = result.get("probe", {}).get("src_netns")
    if src and src not in topology.namespaces:
        topology.namespaces.insert(0, src)
    return topology


# ---- 2. graph --------------------------------------------------------------


@dataclass
class Segment:
    """One arrow of the path: from one place to the next, and what happened."""

    src: tuple[str, str]
    dst: tuple[str, str]
    hooks: list[str] = field(default_factory=list)
    nat: list[str] = field(default_factory=list)


class _Walk:
    """The places one direction of the packet went through, in order."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.current: tuple[str, str] | None = None
        self.hooks: list[str] = []
        self.nat: list[str] = []
        self.bridging: str | None = None  # namespace whose bridge forwards it

    def visit(self, ns: str, dev: str | None) -> None:
        if not dev or (ns, dev) == self.current:
            return
        place = (ns, dev)
        if self.current and self.current[0] != ns:
            self.bridging = None
        if self.current is not None:
            self.segments.append(Segment(self.current, place, self.hooks, self.nat))
            self.hooks, self.nat = [], []
        self.current = place

    def note(self, hop: dict[str, Any], on_last: bool = False) -> None:
        """The hook and its NAT: on the next arrow, or on the one just drawn."""
        hooks, nat = [hop["hook"]], _nat_text(hop)
        last = self.segments[-1] if self.segments else None
        if (
            on_last
            and last
            and last.dst == self.current
            and last.src[0] == hop["netns"]
        ):
            last.hooks += hooks
            last.nat += nat
        else:
            self.hooks += hooks
            self.nat += nat

    def finish(self) -> None:
        # Hooks crossed after the last move (the packet stopped there) go on
        # the last arrow, so that nothing the trace saw is left off.
        if self.segments and (self.hooks or self.nat):
            self.segments[-1].hooks += self.hooks
            self.segments[-1].nat += self.nat
            self.hooks, self.nat = [], []


def _nat_text(hop: dict[str, Any]) -> list[str]:
    after = hop.get("after") or {}
    return [
        f"{hop['hook']}: {name} {hop.get(name)} → {after[name]}"
        for name in ("src", "dst")
        if name in after and after[name] != hop.get(name)
    ]


def walk(hops: list[dict[str, Any]], direction: str) -> list[Segment]:
    """The arrows of one direction (``request`` or ``reply``) of a trace."""
    trip = _Walk()
    for hop in hops:
        if hop.get("dir") != direction:
            continue
        ns, event = hop["netns"], hop.get("event")
        if event in ("rx", "tx"):
            trip.visit(ns, hop.get("dev"))
        elif event in ("send", "recv"):
            trip.visit(ns, LOCAL)
        elif event == "hook" and hop.get("hook"):
            _walk_hook(trip, hop)
        elif event == "bridge" and hop.get("hook"):
            _walk_bridge_hook(trip, hop)
        elif event == "drop":
            trip.visit(ns, hop.get("dev"))
            trip.visit(ns, DROP)
    trip.finish()
    return trip.segments


def _walk_hook(trip: _Walk, hop: dict[str, Any]) -> None:
    ns, hook = hop["netns"], hop["hook"]
    in_dev, out_dev = hop.get("in_dev"), hop.get("out_dev")
    passed = hop.get("passed", True) is not False
    if trip.bridging == ns:
        # br_netfilter runs IPv4's hooks on a bridged frame with the bridge as
        # both devices (net/bridge/br_netfilter_hooks.c): they say where the
        # frame was checked, not where it went.
        trip.note(hop, on_last=True)
    elif hook == "OUTPUT":
        trip.visit(ns, LOCAL)
        trip.note(hop)
        if passed:
            trip.visit(ns, out_dev)
    elif hook == "POSTROUTING":
        trip.visit(ns, out_dev)
        trip.note(hop, on_last=True)
    else:
        trip.visit(ns, in_dev)
        trip.note(hop)
        if passed and hook == "INPUT":
            trip.visit(ns, LOCAL)


def _walk_bridge_hook(trip: _Walk, hop: dict[str, Any]) -> None:
    # The bridge family's hooks (a port's frame, before br_netfilter hands it
    # to IPv4's hooks on the bridge device) only annotate: moving to the port
    # again would draw the frame going back from br0 to the port.
    note = {**hop, "hook": f"bridge {hop['hook']}", "after": None}
    passed = hop.get("passed", True) is not False
    if hop["hook"] == "FORWARD":
        trip.note(note)
        if passed:
            trip.visit(hop["netns"], hop.get("out_dev"))
            trip.bridging = hop["netns"]
    elif hop["hook"] == "POSTROUTING":
        trip.visit(hop["netns"], hop.get("out_dev"))
        trip.note(note, on_last=True)
    else:
        trip.note(note)


def build_graph(
    result: TraceResult | dict[str, Any], topology: Topology | None = None
) -> nx.MultiDiGraph:
    """The topology and the trace's path as one graph (see the top)."""
    data = result.to_json() if isinstance(result, TraceResult) else result
    topology = (
        topology
        or topology_from_summary(data.get("snapshot") or {})
        or topology_from_hops(data)
    )
    graph = nx.MultiDiGraph(title=_title(data), outcome=data.get("outcome"))
    for ns in topology.namespaces:
        graph.graph.setdefault("namespaces", []).append(ns)
    for device in topology.devices:
        graph.add_node((device.netns, device.name), device=device)
    _add_wires(graph, topology)

    drawn: list[Segment] = []
    for direction in ("request", "reply"):
        for order, segment in enumerate(walk(data.get("hops", []), direction), 1):
            for place in (segment.src, segment.dst):
                _ensure_place(graph, place, data)
            graph.add_edge(
                segment.src,
                segment.dst,
                kind="path",
                dir=direction,
                order=order,
                hooks=segment.hooks,
                nat=segment.nat,
            )
            drawn.append(segment)
    _add_end(graph, data, drawn)
    _infer_wires(graph, drawn)
    return graph


def _add_wires(graph: nx.MultiDiGraph, topology: Topology) -> None:
    seen: set[frozenset[tuple[str, str]]] = set()
    for device in topology.devices:
        here = (device.netns, device.name)
        if device.master and topology.find(device.netns, device.master):
            graph.add_edge(here, (device.netns, device.master), kind="port")
        if device.peer and topology.find(*device.peer):
            pair = frozenset((here, device.peer))
            if pair not in seen:
                seen.add(pair)
                graph.add_edge(here, device.peer, kind="veth")


def _infer_wires(graph: nx.MultiDiGraph, drawn: list[Segment]) -> None:
    # Without a topology, a packet that went straight from a device in one
    # namespace to a device in another crossed a wire between them.
    for segment in drawn:
        a, b = segment.src, segment.dst
        if a[0] == b[0] or a[1] in (LOCAL, DROP) or b[1] in (LOCAL, DROP):
            continue
        if not _wired(graph, a, b):
            graph.add_edge(a, b, kind="veth")


def _wired(graph: nx.MultiDiGraph, a: tuple[str, str], b: tuple[str, str]) -> bool:
    edges = list(graph.get_edge_data(a, b, default={}).values())
    edges += list(graph.get_edge_data(b, a, default={}).values())
    return any(edge["kind"] != "path" for edge in edges)


def _ensure_place(graph: nx.MultiDiGraph, place: tuple[str, str], data: dict) -> None:
    if place in graph:
        return
    ns, name = place
    if ns not in graph.graph.setdefault("namespaces", []):
        graph.graph["namespaces"].append(ns)
    if name == DROP:
        graph.add_node(place, marker=_drop_text(data.get("drop")))
    elif name != LOCAL:
        graph.add_node(place, device=Device(netns=ns, name=name))
    else:
        graph.add_node(place, local=True)


def _add_end(
    graph: nx.MultiDiGraph, data: dict[str, Any], drawn: list[Segment]
) -> None:
    """Mark where a trace without a drop stopped: no reply, unreachable."""
    outcome = data.get("outcome")
    if outcome not in ("no-reply", "unreachable", "error") or data.get("drop"):
        return
    src = data.get("probe", {}).get("src_netns", "?")
    last = drawn[-1].dst if drawn else (src, LOCAL)
    _ensure_place(graph, last, data)
    end = (last[0], END)
    graph.add_node(end, marker=_end_text(data))
    graph.add_edge(last, end, kind="end")


def _drop_text(drop: dict[str, Any] | None) -> list[str]:
    if not drop:
        return ["✖ dropped"]
    where = f"at {drop['hook']}" if drop.get("hook") else f"on {drop.get('dev') or '?'}"
    lines = [f"✖ {drop.get('dir', '')} dropped {where}".replace("  ", " ")]
    lines.append(drop.get("reason") or "no reason given")
    rule = drop.get("rule")
    if rule:
        chain = " ".join(str(rule.get(k) or "") for k in ("family", "table", "chain"))
        if rule.get("policy"):
            lines.append(f"{chain.strip()}: policy {rule.get('verdict') or 'drop'}")
        else:
            lines.append(f"{chain.strip()}: {rule.get('text') or rule.get('verdict')}")
    return lines


def _end_text(data: dict[str, Any]) -> list[str]:
    outcome = data.get("outcome")
    if outcome == "no-reply":
        return ["? no reply seen", "after this point"]
    lines = [f"✖ {outcome}"]
    for hop in data.get("hops", []):
        if hop.get("event") == "route" and hop.get("error"):
            meaning = ROUTE_ERRORS.get(hop["error"], hop["error"])
            lines.append(f"{hop['netns']}: {meaning} to {hop.get('dst')}")
            break
    if data.get("error"):
        lines.append(str(data["error"]))
    return lines


def _title(data: dict[str, Any]) -> str:
    probe = data.get("probe", {})
    src, dst = probe.get("src_netns", "?"), probe.get("dst", "?")
    return f"{src} → {dst} ({probe.get('proto', 'icmp')})"


# ---- 3. drawing ------------------------------------------------------------


def to_dot(graph: nx.MultiDiGraph) -> str:
    """The graph in Graphviz's language, laid out left to right."""
    ids = {node: f"n{i}" for i, node in enumerate(graph.nodes)}
    lines = [
        "digraph nstrace {",
        (
            f'  graph [rankdir=LR, nodesep=0.25, ranksep=0.55, fontname="{FONT}",'
            ' bgcolor="white", labelloc=t, labeljust=l, newrank=true,'
            f" label=<{_caption(graph)}>];"
        ),
        (
            f'  node [fontname="{FONT}", fontsize=11, shape=box,'
            ' style="rounded,filled", fillcolor="white", color="#55606e",'
            ' margin="0.12,0.05"];'
        ),
        f'  edge [fontname="{FONT}", fontsize=9, arrowsize=0.7];',
    ]
    for i, ns in enumerate(graph.graph.get("namespaces", [])):
        members = [n for n in graph.nodes if n[0] == ns]
        if not members:
            continue
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(
            f'    label=<<B>{_html(ns)}</B>>; fontsize=13; style="rounded,filled";'
            ' fillcolor="#f3f6fa"; color="#8a9bb0"; margin=10;'
        )
        lines.extend(f"    {ids[n]} [{_node_attrs(graph, n)}];" for n in members)
        lines.extend(_same_rank(graph, ids, ns))
        lines.append("  }")
    for u, v, attrs in _layout_edges(graph):
        lines.append(f"  {ids[u]} -> {ids[v]} [{attrs}];")
    for u, v, edge in graph.edges(data=True):
        if edge["kind"] == "path":
            lines.append(f"  {ids[u]} -> {ids[v]} [{_path_attrs(edge)}];")
        elif edge["kind"] == "end":
            lines.append(
                f'  {ids[u]} -> {ids[v]} [color="{DROP_COLOUR}", style=dashed,'
                " arrowhead=none];"
            )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _html(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _caption(graph: nx.MultiDiGraph) -> str:
    title = _html(graph.graph.get("title", ""))
    outcome = graph.graph.get("outcome_text") or graph.graph.get("outcome") or ""
    colour = "#1a7f37" if graph.graph.get("outcome") == "reply" else DROP_COLOUR
    legend = (
        f'<FONT COLOR="{REQUEST_COLOUR}">━▶ request</FONT>   '
        f'<FONT COLOR="{REPLY_COLOUR}">━▶ reply</FONT>   '
        f'<FONT COLOR="{NAT_COLOUR}">NAT rewrite</FONT>   '
        f'<FONT COLOR="{WIRE_COLOUR}">── veth / bridge port</FONT>'
    )
    return (
        f'<B>{title}</B>   <FONT COLOR="{colour}">{_html(outcome)}</FONT>'
        f'<BR ALIGN="LEFT"/><FONT POINT-SIZE="10">{legend}</FONT><BR ALIGN="LEFT"/>'
    )


def _node_attrs(graph: nx.MultiDiGraph, node: tuple[str, str]) -> str:
    data = graph.nodes[node]
    if "marker" in data:
        lines = "<BR/>".join(_html(line) for line in data["marker"])
        return (
            f'shape=octagon, style=filled, fillcolor="#fdecec", color="{DROP_COLOUR}",'
            f' fontcolor="{DROP_COLOUR}", penwidth=2, label=<{lines}>'
        )
    if data.get("local"):
        return (
            'shape=ellipse, style="filled,dashed", fillcolor="#ffffff",'
            ' label=<<I>local</I>>, tooltip="the namespace\'s own stack"'
        )
    device: Device = data["device"]
    small = [*device.addresses]
    if device.kind == "bridge":
        small.insert(0, "bridge")
    if device.state == "DOWN":
        small.append("down")
    label = f"<B>{_html(device.name)}</B>"
    label += "".join(f'<BR/><FONT POINT-SIZE="9">{_html(s)}</FONT>' for s in small)
    style = "filled,bold" if device.kind == "bridge" else "rounded,filled"
    if device.state == "DOWN":
        style += ",dashed"
    fill = "#e6f2e6" if device.kind == "bridge" else "white"
    return f'style="{style}", fillcolor="{fill}", label=<{label}>'


def _path_attrs(edge: dict[str, Any]) -> str:
    colour = REQUEST_COLOUR if edge["dir"] == "request" else REPLY_COLOUR
    parts = [f"<B>{edge['order']}</B>"]
    hooks = edge["hooks"]
    for start in range(0, len(hooks), HOOKS_PER_LINE):
        line = _html(" · ".join(hooks[start : start + HOOKS_PER_LINE]))
        parts.append(f" {line}" if start == 0 else f"<BR/>{line}")
    label = "".join(parts)
    for nat in edge["nat"]:
        label += f'<BR/><FONT COLOR="{NAT_COLOUR}"><B>NAT</B> {_html(nat)}</FONT>'
    tip = f"{edge['dir']} {edge['order']}"
    return (
        f'color="{colour}", fontcolor="{colour}", penwidth=2.2, constraint=false,'
        f' label=<{label}>, tooltip="{tip}"'
    )


def _layout_edges(graph: nx.MultiDiGraph) -> list[tuple[Any, Any, str]]:
    """Wires, oriented so that the layout reads like the tutorial (see the top)."""
    wire = f'dir=none, color="{WIRE_COLOUR}", penwidth=1.6'
    out: list[tuple[Any, Any, str]] = []
    crossing: dict[tuple[str, str], str] = {}  # device -> "tail" or "head"
    ports = {n for n, _, e in graph.edges(data=True) if e["kind"] == "port"}
    sizes: dict[str, int] = {}
    for node in graph.nodes:
        sizes[node[0]] = sizes.get(node[0], 0) + ("device" in graph.nodes[node])
    for u, v, edge in graph.edges(data=True):
        if edge["kind"] == "port":
            out.append((u, v, f"{wire}, weight=4"))
        elif edge["kind"] == "veth":
            u, v = _orient(u, v, ports, sizes)
            crossing.setdefault(u, "tail")
            crossing.setdefault(v, "head")
            out.append((u, v, f"{wire}, weight=3"))
    bridges = {
        node
        for node, data in graph.nodes(data=True)
        if "device" in data and data["device"].kind == "bridge"
    }
    bridges |= {v for _, v, e in graph.edges(data=True) if e["kind"] == "port"}
    for bridge in bridges:
        for dev in crossing:
            if dev[0] == bridge[0] and dev not in ports and dev != bridge:
                out.append((bridge, dev, "style=invis, weight=1"))
    out.extend(_place_loose(graph, crossing, bridges | ports))
    return out


def _place_loose(
    graph: nx.MultiDiGraph, crossing: dict[tuple[str, str], str], wired: set
) -> list[tuple[Any, Any, str]]:
    """Nodes without wires (a namespace's local stack, lo with 8.8.8.8) on the
    outer side of their namespace: left of a wire that leaves it rightwards,
    right of one that comes in from the left."""
    out = []
    for node, data in graph.nodes(data=True):
        if "marker" in data or node in crossing or node in wired:
            continue
        for dev, role in crossing.items():
            if dev[0] == node[0]:
                pair = (node, dev) if role == "tail" else (dev, node)
                out.append((*pair, "style=invis, weight=1"))
    return out


def _same_rank(graph: nx.MultiDiGraph, ids: dict[Any, str], ns: str) -> list[str]:
    """A drop or end marker sits beside the first place that leads to it."""
    beside: dict[Any, Any] = {}
    for u, v in graph.edges():
        if (
            u[0] == v[0] == ns
            and "marker" in graph.nodes[v]
            and "marker" not in graph.nodes[u]
        ):
            beside.setdefault(v, u)
    return [f"    {{rank=same; {ids[u]}; {ids[v]}}}" for v, u in beside.items()]


def _orient(
    u: tuple[str, str], v: tuple[str, str], ports: set, sizes: dict[str, int]
) -> tuple[tuple[str, str], tuple[str, str]]:
    if u[0] == v[0]:
        return u, v
    if v in ports and u not in ports:
        return u, v  # a namespace behind a bridge port sits left of the bridge
    if u in ports and v not in ports:
        return v, u
    # Routed: the bigger namespace (the host) left, what it reaches right.
    if (sizes.get(u[0], 0), v[0]) >= (sizes.get(v[0], 0), u[0]):
        return u, v
    return v, u


def render(graph: nx.MultiDiGraph, fmt: str = "svg") -> bytes:
    """The picture as SVG or PNG bytes, laid out by Graphviz `dot`."""
    if fmt not in FORMATS:
        raise UsageError(f"cannot draw {fmt!r}; use one of: {', '.join(FORMATS)}")
    dot = shutil.which("dot")
    if dot is None:
        raise CannotTraceError(
            "Graphviz `dot` is not installed; install it with `apt-get install graphviz`"
        )
    # PNG at 2x so that 9-point labels stay legible on a README page.
    argv = [dot, f"-T{fmt}"] + (["-Gdpi=144"] if fmt == "png" else [])
    try:
        done = subprocess.run(
            argv,
            input=to_dot(graph).encode(),
            capture_output=True,
            timeout=DOT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise CannotTraceError(f"Graphviz `dot` took over {DOT_TIMEOUT:.0f} s") from err
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise CannotTraceError(
            f"Graphviz `dot` failed: {message[-1] if message else done.returncode}"
        )
    return done.stdout


def draw(
    result: TraceResult | dict[str, Any],
    topology: Topology | None = None,
    fmt: str = "svg",
) -> bytes:
    """The trace drawn on its topology (hop-derived when *topology* is None)."""
    from tracer import render as text_render

    live = isinstance(result, TraceResult)
    trace = result if live else TraceResult.from_json(result)
    graph = build_graph(trace, topology)
    # A saved trace lacks what the outcome line says of an unreachable one
    # (send error, ICMP sender): the end marker says it instead.
    if live or trace.outcome != "unreachable":
        graph.graph["outcome_text"] = text_render.outcome_line(trace).plain
    return render(graph, fmt)


def write(
    result: TraceResult | dict[str, Any],
    path: str | Path,
    topology: Topology | None = None,
    fmt: str | None = None,
) -> Path:
    """Draw into *path*, as *fmt* or else as its suffix says (.svg, .png)."""
    target = Path(path)
    fmt = fmt or target.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise UsageError(f"{target}: name the picture .svg or .png")
    picture = draw(result, topology, fmt)
    try:
        target.write_bytes(picture)
    except OSError as err:
        raise UsageError(f"cannot write {target}: {err.strerror}") from err
    log.info("wrote %s (%d bytes)", target, len(picture))
    return target


def trace_namespaces(result: TraceResult | dict[str, Any]) -> list[str]:
    """The namespaces a trace touched, its source first."""
    data = result.to_json() if isinstance(result, TraceResult) else result
    names = [data.get("probe", {}).get("src_netns")]
    names += [hop.get("netns") for hop in data.get("hops", [])]
    return [n for n in dict.fromkeys(names) if n]


def save(
    result: TraceResult, svg: str | Path | None = None, png: str | Path | None = None
) -> None:
    """Draw a live trace on the live topology of the namespaces it touched."""
    topology = read_topology(trace_namespaces(result))
    for path, fmt in ((svg, "svg"), (png, "png")):
        if path:
            write(result, path, topology, fmt)
