"""Topology snapshot: what each namespace in play looked like before the probe.

For every namespace, one ``ip -d -j -batch`` process lists links, addresses,
IPv4 routes of every table and neighbours; the JSON of ``nft -j list
ruleset``, read through libnftables in this process (tracer/nft.py), gives the
whole netfilter ruleset (iptables-nft rules included); the sysctls that
decide forwarding and filtering are read from /proc/sys. All of it runs on a
thread that has entered the namespace (``tracer.netns.run_in``): a child
process inherits the calling thread's namespace (fork(2) copies it), and
/proc/sys/net answers for the namespace of the thread that reads it, so no
`ip netns exec` (and its mount namespace work) is needed. Namespaces are read
in parallel; on the tutorial's lab the whole snapshot takes tens of ms.

Parsing is pure: :func:`parse_namespace` turns the raw JSON of one namespace
into a :class:`NetnsState`, so tests build snapshots from recorded or
hand-written raw data without root. :class:`Snapshot` joins the namespaces:
veth peers are matched across namespaces by ifindex, and a networkx graph
holds the layer-2 wiring (veth pairs and bridge ports) that the explanation
walks to find who can hear whom.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx

from tracer import netns
from tracer.errors import UsageError

log = logging.getLogger(__name__)

# One ip process per namespace: `-batch -` runs these in order and prints one
# JSON document per command.
IP_BATCH = "link show\naddr show\nroute show table all\nneigh show\n"
SYSCTLS_GLOBAL = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/rp_filter",
    "net/ipv4/conf/default/rp_filter",
    "net/ipv4/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
)
SYSCTLS_PER_DEVICE = ("rp_filter", "forwarding")
COMMAND_TIMEOUT = 5.0

# Route table ids (include/uapi/linux/rtnetlink.h) and the names ip prints.
TABLE_IDS = {"local": 255, "main": 254, "default": 253}
IPTABLES_TABLES = ("filter", "nat", "mangle", "raw", "security")
IPTABLES_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")


@dataclass
class Link:
    netns: str
    name: str
    ifindex: int
    kind: str | None = None  # veth, bridge, loopback, ...
    admin_up: bool = False
    oper: str = "UNKNOWN"
    carrier: bool = True
    master: str | None = None
    link_index: int | None = None  # a veth's peer ifindex
    link_netnsid: int | None = None  # set when the peer is in another netns
    peer: tuple[str, str] | None = None  # (netns, name), filled by Snapshot


@dataclass
class Address:
    netns: str
    dev: str
    addr: str
    prefixlen: int

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_interface(f"{self.addr}/{self.prefixlen}").network


@dataclass
class Route:
    netns: str
    dst: str  # "default" or a prefix "a.b.c.d/n"
    dev: str | None = None
    gateway: str | None = None
    table: int = 254
    type: str = "unicast"
    prefsrc: str | None = None

    @property
    def network(self) -> ipaddress.IPv4Network:
        if self.dst == "default":
            return ipaddress.ip_network("0.0.0.0/0")
        return ipaddress.ip_network(self.dst, strict=False)


@dataclass
class Neighbour:
    netns: str
    dev: str
    addr: str
    state: str
    lladdr: str | None = None


@dataclass
class NetnsState:
    """One namespace as the snapshot saw it."""

    name: str
    links: dict[str, Link] = field(default_factory=dict)
    addresses: list[Address] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    ruleset: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def sysctl(self, key: str) -> int | None:
        value = self.sysctls.get(key)
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def forwarding(self, dev: str | None = None) -> bool:
        """Whether IPv4 packets arriving on *dev* may be forwarded."""
        if self.sysctl("net/ipv4/ip_forward") == 0:
            return False
        return dev is None or self.sysctl(f"net/ipv4/conf/{dev}/forwarding") != 0

    def rp_filter(self, dev: str) -> int:
        """The effective rp_filter of *dev*: the larger of all and dev.

        ip-sysctl.rst (rp_filter): "The max value from conf/{all,interface}/
        rp_filter is used when doing source validation on the {interface}."
        """
        values = [self.sysctl("net/ipv4/conf/all/rp_filter") or 0]
        values.append(self.sysctl(f"net/ipv4/conf/{dev}/rp_filter") or 0)
        return max(values)

    def owns(self, addr: str) -> Address | None:
        return next((a for a in self.addresses if a.addr == addr), None)

    def addresses_on(self, dev: str) -> list[Address]:
        return [a for a in self.addresses if a.dev == dev]

    def main_routes(self) -> list[Route]:
        return [r for r in self.routes if r.table != TABLE_IDS["local"]]

    def default_route(self) -> Route | None:
        return next((r for r in self.main_routes() if r.dst == "default"), None)

    def lookup(self, addr: str) -> Route | None:
        """Longest-prefix match over the non-local tables (no policy rules)."""
        ip = ipaddress.ip_address(addr)
        best: Route | None = None
        for route in self.main_routes():
            if route.type not in ("unicast", None):
                continue
            if ip in route.network and (
                best is None or route.network.prefixlen > best.network.prefixlen
            ):
                best = route
        return best

    def connected_network(self, addr: str) -> ipaddress.IPv4Network | None:
        """The subnet of a directly connected route holding *addr*."""
        ip = ipaddress.ip_address(addr)
        for route in self.main_routes():
            if route.gateway is None and route.dst != "default" and ip in route.network:
                return route.network
        return None

    def base_chains(self, hook: str, families: tuple[str, ...] = ("ip", "inet")):
        """The nftables base chains registered at *hook* (lower case)."""
        return [
            item["chain"]
            for item in self.ruleset
            if "chain" in item
            and item["chain"].get("hook") == hook
            and item["chain"].get("family") in families
        ]

    def rules_of(self, family: str, table: str, chain: str) -> list[dict[str, Any]]:
        return [
            item["rule"]
            for item in self.ruleset
            if "rule" in item
            and (item["rule"]["family"], item["rule"]["table"], item["rule"]["chain"])
            == (family, table, chain)
        ]


def is_iptables_chain(chain: dict[str, Any]) -> bool:
    """Whether a chain looks like one iptables-nft made (ip family, its names).

    iptables-nft registers tables named after the iptables tables in family
    ip, with upper-case built-in chains (iptables-nft(8)); native nftables
    users rarely mimic both.
    """
    return (
        chain.get("family") == "ip"
        and chain.get("table") in IPTABLES_TABLES
        and chain.get("name") in IPTABLES_CHAINS
    )


class Snapshot:
    """Every namespace in play, their links joined into one layer-2 graph.

    Graph nodes are ``(netns, link name)``; edges join the two ends of a veth
    pair (``kind="veth"``) and a bridge port to its bridge
    (``kind="port"``). Each node carries its :class:`Link` as ``link``.
    """

    def __init__(self, namespaces: dict[str, NetnsState], taken_ms: float = 0.0):
        self.namespaces = namespaces
        self.taken_ms = taken_ms
        self._match_peers()

    @functools.cached_property
    def graph(self) -> nx.Graph:
        # Built on first use: importing networkx took 0.1 to 0.2 s, more than
        # a third of `nstrace ping` on a drop (`make bench`), and only some
        # explanations walk the graph.
        return self._build_graph()

    def __contains__(self, name: object) -> bool:
        return name in self.namespaces

    def ns(self, name: str) -> NetnsState | None:
        return self.namespaces.get(name)

    def link(self, netns_name: str, dev: str | None) -> Link | None:
        state = self.namespaces.get(netns_name)
        return state.links.get(dev) if state and dev else None

    def owner(self, addr: str) -> Address | None:
        """Who has *addr* among the namespaces (loopback addresses last)."""
        found = [
            a for s in self.namespaces.values() for a in s.addresses if a.addr == addr
        ]
        found.sort(key=lambda a: a.dev == "lo")
        return found[0] if found else None

    def segment(self, netns_name: str, dev: str, only_up: bool = False) -> set:
        """The links that hear a broadcast sent on *dev* (its layer-2 segment).

        A walk over :attr:`neighbours` rather than networkx: explanations ask
        this for every route lookup, and importing networkx for it took 0.1
        to 0.2 s of a 0.5 s `nstrace ping` (`make bench`).
        """
        node = (netns_name, dev)
        if node not in self.neighbours:
            return set()
        if only_up and not self.neighbours[node][1].admin_up:
            return {node}
        seen, todo = {node}, [node]
        while todo:
            for other in self.neighbours[todo.pop()][0]:
                if other not in seen and (
                    not only_up or self.neighbours[other][1].admin_up
                ):
                    seen.add(other)
                    todo.append(other)
        return seen

    @functools.cached_property
    def neighbours(self) -> dict[tuple[str, str], tuple[set[tuple[str, str]], Link]]:
        """Each graph node's neighbours and link, as :meth:`_build_graph` joins them."""
        nodes = {
            (state.name, link.name): (set(), link)
            for state in self.namespaces.values()
            for link in state.links.values()
        }
        for state in self.namespaces.values():
            for link in state.links.values():
                node = (state.name, link.name)
                ends = [link.peer] if link.peer and link.peer in nodes else []
                if link.master and link.master in state.links:
                    ends.append((state.name, link.master))
                for end in ends:
                    nodes[node][0].add(end)
                    nodes[end][0].add(node)
        return nodes

    def l2_path(self, a: tuple[str, str], b: tuple[str, str]) -> list | None:
        """A shortest chain of links from *a* to *b*, or None (breadth first)."""
        if a not in self.neighbours or b not in self.neighbours:
            return None
        came_from: dict[tuple[str, str], tuple[str, str] | None] = {a: None}
        todo = [a]
        while todo and b not in came_from:
            following = []
            for node in todo:
                for other in sorted(self.neighbours[node][0]):
                    if other not in came_from:
                        came_from[other] = node
                        following.append(other)
            todo = following
        if b not in came_from:
            return None
        path = [b]
        while came_from[path[-1]] is not None:
            path.append(came_from[path[-1]])
        return path[::-1]

    def summary(self) -> dict[str, Any]:
        """The part that goes into the JSON result (``snapshot``)."""
        out: dict[str, Any] = {"taken_ms": round(self.taken_ms, 1), "namespaces": {}}
        for name, state in sorted(self.namespaces.items()):
            default = state.default_route()
            out["namespaces"][name] = {
                "links": {
                    link.name: _link_summary(link) for link in state.links.values()
                },
                "addresses": [
                    f"{a.addr}/{a.prefixlen} dev {a.dev}" for a in state.addresses
                ],
                "default_route": _route_text(default) if default else None,
                "routes": len(state.main_routes()),
                "ip_forward": state.sysctl("net/ipv4/ip_forward"),
                "rp_filter": state.sysctl("net/ipv4/conf/all/rp_filter"),
                "bridge_nf_call_iptables": state.sysctl(
                    "net/bridge/bridge-nf-call-iptables"
                ),
                "nft_chains": sum(1 for item in state.ruleset if "chain" in item),
                "nft_rules": sum(1 for item in state.ruleset if "rule" in item),
            }
            if state.error:
                out["namespaces"][name]["error"] = state.error
        return out

    def _match_peers(self) -> None:
        # A veth end names its peer's ifindex (IFLA_LINK) and, when the peer
        # lives elsewhere, a netns id that only means something inside this
        # namespace; the pair is found by each end naming the other.
        links = [link for s in self.namespaces.values() for link in s.links.values()]
        by_index: dict[int, list[Link]] = {}
        for link in links:
            by_index.setdefault(link.ifindex, []).append(link)
        for link in links:
            if link.kind != "veth" or link.link_index is None:
                continue
            for other in by_index.get(link.link_index, []):
                if other is link or other.kind != "veth":
                    continue
                same_ns = other.netns == link.netns
                if other.link_index == link.ifindex and same_ns == (
                    link.link_netnsid is None
                ):
                    link.peer = (other.netns, other.name)
                    break

    def _build_graph(self) -> nx.Graph:
        import networkx as nx

        graph = nx.Graph()
        for state in self.namespaces.values():
            for link in state.links.values():
                graph.add_node((state.name, link.name), link=link)
        for state in self.namespaces.values():
            for link in state.links.values():
                if link.peer and link.peer in graph:
                    graph.add_edge((state.name, link.name), link.peer, kind="veth")
                if link.master and link.master in state.links:
                    graph.add_edge(
                        (state.name, link.name), (state.name, link.master), kind="port"
                    )
        return graph


def _passes(data: dict[str, Any]) -> bool:
    link = data.get("link")
    return bool(link and link.admin_up)


def _link_summary(link: Link) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": link.kind, "up": link.admin_up, "oper": link.oper}
    if link.master:
        out["master"] = link.master
    if link.peer:
        out["peer"] = f"{link.peer[1]}@{link.peer[0]}"
    return out


def _route_text(route: Route) -> str:
    text = route.dst
    if route.gateway:
        text += f" via {route.gateway}"
    if route.dev:
        text += f" dev {route.dev}"
    return text


# ---- parsing (pure) --------------------------------------------------------


def parse_namespace(name: str, raw: dict[str, Any]) -> NetnsState:
    """Build a namespace's state from its raw JSON (see :func:`read_raw`).

    *raw* holds ``links``, ``addresses``, ``routes``, ``neighbours`` (the
    ``ip -d -j`` documents), ``sysctls`` (path under /proc/sys -> value) and
    ``nft`` (the ``nft -j list ruleset`` document); any may be missing.
    """
    state = NetnsState(name=name, error=raw.get("error"))
    for item in raw.get("links") or []:
        link = _parse_link(name, item)
        state.links[link.name] = link
    for item in raw.get("addresses") or []:
        for info in item.get("addr_info", []):
            if info.get("family") == "inet":
                state.addresses.append(
                    Address(name, item["ifname"], info["local"], info["prefixlen"])
                )
    for item in raw.get("routes") or []:
        route = _parse_route(name, item)
        if route is not None:
            state.routes.append(route)
    for item in raw.get("neighbours") or []:
        if "dst" in item and ":" not in item["dst"]:
            states = item.get("state") or ["NONE"]
            state.neighbours.append(
                Neighbour(
                    name,
                    item.get("dev", "?"),
                    item["dst"],
                    states[0],
                    item.get("lladdr"),
                )
            )
    state.sysctls = dict(raw.get("sysctls") or {})
    nft = raw.get("nft") or {}
    state.ruleset = [i for i in nft.get("nftables", []) if "metainfo" not in i]
    return state


def _parse_link(name: str, item: dict[str, Any]) -> Link:
    flags = item.get("flags", [])
    info = item.get("linkinfo") or {}
    kind = info.get("info_kind")
    if item.get("link_type") == "loopback":
        kind = "loopback"
    return Link(
        netns=name,
        name=item["ifname"],
        ifindex=item["ifindex"],
        kind=kind,
        admin_up="UP" in flags,
        oper=item.get("operstate", "UNKNOWN"),
        carrier="NO-CARRIER" not in flags,
        master=item.get("master"),
        link_index=item.get("link_index"),
        link_netnsid=item.get("link_netnsid"),
    )


def _parse_route(name: str, item: dict[str, Any]) -> Route | None:
    dst = item.get("dst", "default")
    if ":" in dst:
        return None
    table = item.get("table", "main")
    table_id = TABLE_IDS.get(str(table)) or (int(table) if str(table).isdigit() else 0)
    if dst != "default" and "/" not in dst:
        dst = f"{dst}/32"
    return Route(
        netns=name,
        dst=dst,
        dev=item.get("dev"),
        gateway=item.get("gateway"),
        table=table_id,
        type=item.get("type", "unicast"),
        prefsrc=item.get("prefsrc"),
    )


# ---- reading (needs the namespaces) ----------------------------------------


def take(names: list[str]) -> Snapshot:
    """Read every namespace in *names* in parallel and join them."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        raws = list(pool.map(_read_safely, names))
    states = {name: parse_namespace(name, raw) for name, raw in zip(names, raws)}
    taken_ms = (time.perf_counter() - started) * 1000
    log.debug("snapshot of %d namespaces in %.1f ms", len(names), taken_ms)
    return Snapshot(states, taken_ms)


def _read_safely(name: str) -> dict[str, Any]:
    try:
        return netns.run_in(name, read_raw)
    except (OSError, UsageError) as exc:  # a namespace gone: say so, go on
        log.warning("snapshot of %s failed: %s", name, exc)
        return {"error": str(exc)}


def read_raw() -> dict[str, Any]:
    """The raw state of the calling thread's namespace (see parse_namespace)."""
    raw: dict[str, Any] = {}
    docs = _json_documents(_run(["ip", "-d", "-j", "-4", "-batch", "-"], IP_BATCH))
    for key, doc in zip(("links", "addresses", "routes", "neighbours"), docs):
        raw[key] = doc
    nft = _ruleset_json()
    try:
        raw["nft"] = json.loads(nft) if nft.strip() else {}
    except json.JSONDecodeError:
        raw["nft"] = {}
    raw["sysctls"] = _read_sysctls([link["ifname"] for link in raw.get("links") or []])
    return raw


def _ruleset_json() -> str:
    """`nft -j list ruleset` here, through libnftables rather than a process."""
    from tracer.errors import CannotTraceError
    from tracer.nft import NftError, ruleset_json

    try:
        return ruleset_json()
    except CannotTraceError as exc:  # no libnftables
        log.warning("snapshot: %s", exc)
    except NftError as exc:
        log.debug("snapshot: nft -j list ruleset: %s", exc)
    return ""


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("snapshot: %s failed: %s", argv[0], exc)
        return ""
    if done.returncode != 0:
        log.debug("snapshot: %s: %s", " ".join(argv), done.stderr.strip())
    return done.stdout


def _json_documents(text: str) -> list[Any]:
    """Split `ip -batch` output, one JSON document per command, into a list."""
    decoder = json.JSONDecoder()
    docs, index = [], 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return docs
        try:
            doc, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return docs
        docs.append(doc)


def _read_sysctls(devices: list[str]) -> dict[str, str]:
    keys = list(SYSCTLS_GLOBAL)
    keys += [f"net/ipv4/conf/{d}/{k}" for d in devices for k in SYSCTLS_PER_DEVICE]
    out = {}
    for key in keys:
        try:
            out[key] = Path("/proc/sys", key).read_text().strip()
        except OSError:
            continue  # br_netfilter not loaded, or the device just went away
    return out
