"""The picture, drawn from saved traces: path walking, SVG, PNG, layout.

step5-live.json and step6-live.json are real traces of the tutorial's lab
with the topology read at that step (see their descriptions), so these tests
need neither root nor a lab, only Graphviz's `dot`.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.picture import pngfile
from tracer import picture
from tracer.errors import UsageError
from tracer.picture import DROP, END, LOCAL, Topology

HERE = Path(__file__).parent
SVG = "{http://www.w3.org/2000/svg}"


def saved(step: int) -> tuple[dict[str, Any], Topology]:
    data = json.loads((HERE / f"step{step}-live.json").read_text())
    return data["result"], Topology.from_json(data["topology"])


def svg_texts(svg: bytes) -> list[str]:
    root = ET.fromstring(svg)
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def places(segments: list[picture.Segment]) -> list[tuple[str, str]]:
    return [segments[0].src] + [s.dst for s in segments] if segments else []


# ---- walking the path ------------------------------------------------------


def test_step6_request_goes_red_bridge_uplink_internet():
    result, _ = saved(6)
    assert places(picture.walk(result["hops"], "request")) == [
        ("RED", LOCAL),
        ("RED", "reth0"),
        ("host", "reth1"),
        ("host", "br0"),
        ("host", "eth0"),
        ("internet", "isp0"),
        ("internet", LOCAL),
    ]


def test_step6_reply_ends_at_the_drop_in_host():
    result, _ = saved(6)
    assert places(picture.walk(result["hops"], "reply")) == [
        ("internet", LOCAL),
        ("internet", "isp0"),
        ("host", "eth0"),
        ("host", DROP),
    ]


def test_nat_is_labelled_on_the_arrow_where_it_happens():
    result, _ = saved(6)
    request = picture.walk(result["hops"], "request")
    routed = next(s for s in request if s.dst == ("host", "eth0"))
    assert routed.src == ("host", "br0")
    assert "POSTROUTING: src 11.11.11.2 → 10.0.2.15" in routed.nat
    assert "FORWARD" in routed.hooks
    reply = picture.walk(result["hops"], "reply")
    assert reply[-1].nat == ["PREROUTING: dst 10.0.2.15 → 11.11.11.2"]
    assert reply[-1].hooks[-1] == "FORWARD"
    assert all(not s.nat for s in request if s is not routed)


def hop(netns: str, event: str, **fields: Any) -> dict[str, Any]:
    return {"netns": netns, "event": event, "dir": "request", **fields}


# A frame bridged from RED to BLUE as br_netfilter shows it: IPv4's hooks run
# with br0 as both devices, between the bridge family's own hooks.
BRIDGED = [
    hop("RED", "hook", hook="OUTPUT", out_dev="reth0"),
    hop("RED", "tx", dev="reth0"),
    hop("host", "rx", dev="reth1"),
    hop("host", "bridge", hook="PREROUTING", in_dev="reth1"),
    hop("host", "hook", hook="PREROUTING", in_dev="br0"),
    hop("host", "bridge", hook="FORWARD", in_dev="reth1", out_dev="beth1"),
    hop("host", "hook", hook="FORWARD", in_dev="br0", out_dev="br0"),
    hop("host", "bridge", hook="POSTROUTING", out_dev="beth1"),
    hop("host", "hook", hook="POSTROUTING", out_dev="br0"),
    hop("host", "tx", dev="beth1"),
    hop("BLUE", "rx", dev="beth0"),
    hop("BLUE", "hook", hook="INPUT", in_dev="beth0"),
]


def test_a_bridged_frame_crosses_the_bridge_once():
    segments = picture.walk(BRIDGED, "request")
    assert places(segments) == [
        ("RED", LOCAL),
        ("RED", "reth0"),
        ("host", "reth1"),
        ("host", "br0"),
        ("host", "beth1"),
        ("BLUE", "beth0"),
        ("BLUE", LOCAL),
    ]
    across = next(s for s in segments if s.dst == ("host", "beth1"))
    assert across.hooks == [
        "PREROUTING",
        "bridge FORWARD",
        "FORWARD",
        "bridge POSTROUTING",
        "POSTROUTING",
    ]


def test_a_probe_refused_before_sending_is_marked_at_its_source():
    result = {
        "schema": 1,
        "probe": {"src_netns": "RED", "dst": "192.168.104.2", "proto": "icmp"},
        "outcome": "unreachable",
        "hops": [
            hop("RED", "route", dst="192.168.104.2", error="EAGAIN", dev=None),
        ],
        "drop": None,
    }
    graph = picture.build_graph(result)
    assert graph.has_edge(("RED", LOCAL), ("RED", END))
    marker = graph.nodes[("RED", END)]["marker"]
    assert marker[0] == "✖ unreachable"
    assert "no route in this table to 192.168.104.2" in marker[1]


# ---- the SVG and the PNG ---------------------------------------------------


def test_svg_is_xml_naming_every_namespace_device_and_the_drop():
    result, topology = saved(6)
    texts = svg_texts(picture.draw(result, topology, "svg"))
    for ns in ("RED", "BLUE", "host", "internet", "laptop"):
        assert ns in texts
    for device in topology.devices:
        assert device.name in texts
    assert len(topology.devices) >= 11
    assert "✖ reply dropped at FORWARD" in texts
    assert "NETFILTER_DROP" in texts
    assert "ip filter FORWARD: policy drop" in texts


def test_png_is_an_image_of_sensible_size(tmp_path: Path):
    result, topology = saved(6)
    target = picture.write(result, tmp_path / "step6.png", topology)
    width, height = pngfile.size(target)
    assert 800 <= width <= 6000
    assert 300 <= height <= 3000
    assert width > height  # left to right, as the tutorial draws it


def position(svg: bytes, label: str) -> float:
    root = ET.fromstring(svg)
    for text in root.iter(f"{SVG}text"):
        if text.text == label:
            return float(text.get("x"))
    raise AssertionError(f"{label} is not in the picture")


def test_layout_reads_like_the_tutorial_red_bridge_host_internet():
    result, topology = saved(6)
    svg = picture.draw(result, topology, "svg")
    x = {
        name: position(svg, name) for name in ("reth0", "reth1", "br0", "eth0", "isp0")
    }
    assert x["reth0"] < x["reth1"] < x["br0"] < x["eth0"] < x["isp0"]


@pytest.mark.parametrize("step", [5, 6])
def test_every_step_keeps_the_lab_in_one_order(step: int):
    result, topology = saved(step)
    svg = picture.draw(result, topology, "svg")
    for chain in (
        ("reth0", "reth1", "br0", "eth0", "isp0"),
        ("beth0", "beth1", "br0", "eth1", "vboxnet0"),
    ):
        x = [position(svg, name) for name in chain]
        assert x == sorted(x), chain


def test_a_saved_trace_without_topology_draws_the_devices_it_saw():
    result, _ = saved(6)
    texts = svg_texts(picture.draw(result, None, "svg"))
    for name in ("RED", "host", "internet", "reth0", "reth1", "br0", "eth0", "isp0"):
        assert name in texts
    assert "BLUE" not in texts  # nothing in the trace says BLUE exists


def test_snapshot_summary_gives_peers_ports_and_addresses():
    summary = {
        "namespaces": {
            "RED": {
                "links": {
                    "lo": {"kind": "loopback", "up": True},
                    "reth0": {"kind": "veth", "up": True, "peer": "reth1@host"},
                },
                "addresses": ["127.0.0.1/8 dev lo", "11.11.11.2/24 dev reth0"],
            },
            "host": {
                "links": {
                    "reth1": {
                        "kind": "veth",
                        "up": True,
                        "master": "br0",
                        "peer": "reth0@RED",
                    },
                    "br0": {"kind": "bridge", "up": False},
                },
                "addresses": [],
            },
        }
    }
    topology = picture.topology_from_summary(summary)
    assert topology is not None
    assert [d.name for d in topology.devices] == ["reth0", "reth1", "br0"]
    reth0, reth1, br0 = topology.devices
    assert reth0.peer == ("host", "reth1") and reth0.addresses == ["11.11.11.2/24"]
    assert reth1.master == "br0" and reth1.peer == ("RED", "reth0")
    assert br0.state == "DOWN"
    assert picture.topology_from_summary({"taken_ms": 3}) is None


def test_names_that_look_like_markup_are_escaped():
    topology = Topology(
        namespaces=['a<b&"c'],
        devices=[
            picture.Device(netns='a<b&"c', name="x<y>&z", addresses=["1.2.3.4/8"])
        ],
    )
    result = {
        "schema": 1,
        "probe": {"src_netns": 'a<b&"c', "dst": "1.2.3.5", "proto": "icmp"},
        "outcome": "no-reply",
        "hops": [hop('a<b&"c', "tx", dev="x<y>&z")],
    }
    texts = svg_texts(picture.draw(result, topology, "svg"))
    assert "x<y>&z" in texts and 'a<b&"c' in texts


def test_topology_json_round_trip():
    _, topology = saved(6)
    assert Topology.from_json(json.loads(json.dumps(topology.to_json()))) == topology


def test_picture_name_decides_the_format_unless_told(tmp_path: Path):
    result, topology = saved(6)
    with pytest.raises(UsageError, match=r"\.svg or \.png"):
        picture.write(result, tmp_path / "step6.gif", topology)
    target = picture.write(result, tmp_path / "picture.out", topology, fmt="svg")
    ET.fromstring(target.read_bytes())
