"""The shortcuts taken for speed (`make bench`) agree with the long way round.

- Snapshot.segment walks its own adjacency instead of importing networkx;
  on every recorded lab it must give networkx's connected components.
- btf.enum finds an enum by its name instead of walking every type; on the
  running kernel's BTF it must give what the walk gives.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import networkx as nx
import pytest

from tracer import btf
from tracer.snapshot import Snapshot, parse_namespace

RECORDINGS = sorted((Path(__file__).parents[1] / "explain" / "data").glob("*.json"))


def recorded_snapshot(path: Path) -> Snapshot:
    data = json.loads(path.read_text())
    states = {ns: parse_namespace(ns, raw) for ns, raw in data["snapshot"].items()}
    return Snapshot(states)


def networkx_segment(snap: Snapshot, node: tuple[str, str], only_up: bool) -> set:
    graph = snap.graph
    if only_up:
        graph = graph.subgraph(
            n for n, d in graph.nodes(data=True) if d["link"].admin_up
        )
        if node not in graph:
            return {node}
    return set(nx.node_connected_component(graph, node))


def test_there_are_recordings_to_compare_on():
    assert len(RECORDINGS) >= 5


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_segment_agrees_with_networkx(path):
    snap = recorded_snapshot(path)
    nodes = list(snap.graph.nodes)
    assert nodes
    for node in nodes:
        for only_up in (False, True):
            assert snap.segment(*node, only_up=only_up) == networkx_segment(
                snap, node, only_up
            ), (node, only_up)
    assert snap.segment("no-such-netns", "eth0") == set()


def test_segment_does_not_need_networkx():
    snap = recorded_snapshot(RECORDINGS[0])
    node = next(iter(snap.neighbours))
    snap.segment(*node)
    assert "graph" not in vars(snap)  # the networkx graph was never built


@pytest.mark.parametrize(
    "name", ["skb_drop_reason", "nf_inet_hooks", "bpf_prog_type", "tcp_ca_state"]
)
def test_enum_by_name_agrees_with_the_walk(name):
    data = Path(btf.BTF_PATH).read_bytes()
    found = btf._find_enum(data, name)
    assert found and found == btf._enums(data)[name]


def test_enum_by_name_of_no_enum_falls_back():
    data = Path(btf.BTF_PATH).read_bytes()
    assert btf._find_enum(data, "sk_buff") is None  # a struct, not an enum
    assert btf._find_enum(data, "no_such_type_anywhere") is None


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_l2_path_is_a_shortest_path_as_networkx_finds_them(path):
    snap = recorded_snapshot(path)
    nodes = list(snap.graph.nodes)
    for a in nodes:
        for b in nodes:
            ours = snap.l2_path(a, b)
            if not nx.has_path(snap.graph, a, b):
                assert ours is None
                continue
            assert ours[0] == a and ours[-1] == b
            assert all(snap.graph.has_edge(x, y) for x, y in itertools.pairwise(ours))
            assert len(ours) - 1 == nx.shortest_path_length(snap.graph, a, b)
    assert snap.l2_path(nodes[0], ("no-such-netns", "eth0")) is None
