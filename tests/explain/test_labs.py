"""Root tests: the explanation of every broken lab and of the tutorial.

Each case builds a lab (scenarios/broken/*.yaml, or the tutorial of LAB.md)
at a step, runs the real `nstrace ping --json` and checks the outcome, the
first cause's code, namespace and fix, and the drop point (and the rule
that dropped, when rule attribution filled it in). The same table drives
tests/explain/record.py, which records the unit tests' replays.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from tracer import lab as lab_module
from tracer import scenario

ROOT = Path(__file__).resolve().parents[2]
BROKEN = "scenarios/broken"


@dataclass(frozen=True)
class Case:
    name: str
    scenario: str  # path relative to the repository
    step: int
    argv: tuple[str, ...]  # SRC DST [options]
    outcome: str | tuple[str, ...]
    code: str
    netns: str
    fix: str | None
    drop: tuple[str, str | None, str] | None  # (netns, hook, dir)
    rule: dict[str, Any] | None = None  # expected drop.rule keys, when present
    also: tuple[tuple[str, str], ...] = ()  # (code, netns) of the other causes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def broken(name: str) -> str:
    return f"{BROKEN}/{name}.yaml"


TUTORIAL = "scenarios/tutorial.yaml"
CASES = (
    Case(
        "tutorial-step1",
        TUTORIAL,
        1,
        ("host", "11.11.11.2"),
        "dropped",
        "misrouted",
        "host",
        "ip addr add 11.11.11.1/24 dev br0",
        ("internet", "PREROUTING", "request"),
    ),
    Case(
        "tutorial-step3",
        TUTORIAL,
        3,
        ("RED", "192.168.104.2"),
        "unreachable",
        "no-route",
        "RED",
        "ip route add default via 11.11.11.1",
        None,
    ),
    Case(
        "tutorial-step5",
        TUTORIAL,
        5,
        ("RED", "8.8.8.8"),
        "no-reply",
        "no-snat",
        "host",
        "iptables -t nat -A POSTROUTING -s 11.11.11.0/24 -j MASQUERADE",
        None,
    ),
    Case(
        "tutorial-step6",
        TUTORIAL,
        6,
        ("RED", "8.8.8.8"),
        "dropped",
        "filter-drop",
        "host",
        "iptables -t filter -A FORWARD -d 11.11.11.0/24 -j ACCEPT",
        ("host", "FORWARD", "reply"),
        {"table": "filter", "chain": "FORWARD", "policy": True},
    ),
    Case(
        "fwd-policy-drop",
        broken("fwd-policy-drop"),
        0,
        ("pd-left", "10.61.2.2"),
        "dropped",
        "filter-drop",
        "pd-router",
        "iptables -t filter -A FORWARD -s 10.61.1.0/24 -j ACCEPT",
        ("pd-router", "FORWARD", "request"),
        {"table": "filter", "chain": "FORWARD", "policy": True},
        # The reply will meet the same policy once the request passes.
        also=(("filter-drop", "pd-router"),),
    ),
    Case(
        "fwd-rule-drop",
        broken("fwd-rule-drop"),
        0,
        ("rd-src", "172.22.6.20"),
        "dropped",
        "filter-drop",
        "rd-gw",
        "iptables -t filter -D FORWARD -d 172.22.6.0/24 -j DROP",
        ("rd-gw", "FORWARD", "request"),
        {"table": "filter", "chain": "FORWARD", "policy": False},
    ),
    Case(
        "nft-rule-drop",
        broken("nft-rule-drop"),
        0,
        ("nr-client", "192.168.50.7"),
        "dropped",
        "filter-drop",
        "nr-core",
        "nft delete rule inet guard pass handle",
        ("nr-core", "FORWARD", "reply"),
        {"family": "inet", "table": "guard", "chain": "pass", "policy": False},
    ),
    Case(
        "nft-policy-drop",
        broken("nft-policy-drop"),
        0,
        ("np-a", "10.78.0.5"),
        "dropped",
        "filter-drop",
        "np-hub",
        "nft add rule ip screen pre ip saddr 10.77.0.0/24 accept",
        ("np-hub", "PREROUTING", "request"),
        {"family": "ip", "table": "screen", "chain": "pre", "policy": True},
    ),
    Case(
        "input-drop",
        broken("input-drop"),
        0,
        ("in-app", "10.90.4.4"),
        "dropped",
        "filter-drop",
        "in-db",
        "iptables -t filter -A INPUT -s 10.90.4.0/24 -j ACCEPT",
        ("in-db", "INPUT", "request"),
        {"table": "filter", "chain": "INPUT", "policy": True},
    ),
    Case(
        "forwarding-off",
        broken("forwarding-off"),
        0,
        ("fo-east", "10.44.2.2"),
        "dropped",
        "forwarding-disabled",
        "fo-rtr",
        "sysctl -w net.ipv4.ip_forward=1",
        ("fo-rtr", "PREROUTING", "request"),
    ),
    Case(
        "rp-filter",
        broken("rp-filter"),
        0,
        ("rp-src", "10.55.2.2"),
        "dropped",
        "rp-filter",
        "rp-mid",
        "sysctl -w net.ipv4.conf.m-s.rp_filter=2",
        ("rp-mid", None, "request"),
        # Its route back loops: the reply would come back to it.
        also=(("misrouted", "rp-mid"),),
    ),
    Case(
        "no-route-src",
        broken("no-route-src"),
        0,
        ("ns-lone", "10.13.0.8"),
        "unreachable",
        "no-route",
        "ns-lone",
        "ip route add default via 10.12.0.1",
        None,
    ),
    Case(
        "no-route-back",
        broken("no-route-back"),
        0,
        ("rb-home", "10.102.1.5"),
        "no-reply",
        "no-route",
        "rb-away",
        "ip route add default via 10.102.1.1",
        None,
    ),
    Case(
        "no-snat",
        broken("no-snat"),
        0,
        ("sn-lan", "203.0.113.80"),
        "no-reply",
        "no-snat",
        "sn-nat",
        "iptables -t nat -A POSTROUTING -s 192.168.7.0/24 -j MASQUERADE",
        None,
    ),
    Case(
        "port-down",
        broken("port-down"),
        0,
        ("pdn-one", "10.33.3.2", "--timeout", "4"),
        ("dropped", "unreachable"),
        "link-down",
        "pdn-sw",
        "ip link set p-two up",
        ("pdn-one", "POSTROUTING", "request"),
    ),
    Case(
        "not-bridged",
        broken("not-bridged"),
        0,
        ("nb-web", "172.30.8.3", "--timeout", "4"),
        ("dropped", "unreachable"),
        "not-bridged",
        "nb-host",
        "ip link set q-db master vbr",
        ("nb-web", "POSTROUTING", "request"),
    ),
    Case(
        "nobody-has",
        broken("nobody-has"),
        0,
        ("nh-pc", "10.66.1.99", "--timeout", "4"),
        ("dropped", "unreachable"),
        "neigh-failed",
        "nh-pc",
        None,
        ("nh-pc", "POSTROUTING", "request"),
    ),
    Case(
        "misrouted",
        broken("misrouted"),
        0,
        ("mr-vm", "10.88.8.2"),
        "dropped",
        "misrouted",
        "mr-vm",
        "ip addr add 10.88.8.1/24 dev vmbr",
        ("mr-net", "PREROUTING", "request"),
    ),
    Case(
        "closed-tcp",
        broken("closed-ports"),
        0,
        ("cp-client", "10.140.0.1", "--proto", "tcp", "--port", "8080"),
        "unreachable",
        "no-listener",
        "cp-server",
        "nc -l -p 8080",
        # The SYN (or datagram) ends at the server's INPUT: no socket.
        ("cp-server", "INPUT", "request"),
    ),
    Case(
        "closed-udp",
        broken("closed-ports"),
        0,
        ("cp-client", "10.140.0.1", "--proto", "udp", "--port", "5353"),
        "unreachable",
        "no-listener",
        "cp-server",
        "nc -u -l -p 5353",
        # The SYN (or datagram) ends at the server's INPUT: no socket.
        ("cp-server", "INPUT", "request"),
    ),
    Case(
        "two-faults",
        broken("two-faults"),
        0,
        ("tf-near", "10.152.0.3"),
        "dropped",
        "forwarding-disabled",
        "tf-core",
        "sysctl -w net.ipv4.ip_forward=1",
        ("tf-core", "PREROUTING", "request"),
        also=(("no-route", "tf-far"),),
    ),
    Case(
        "two-faults-half-fixed",
        broken("two-faults"),
        1,
        ("tf-near", "10.152.0.3"),
        "no-reply",
        "no-route",
        "tf-far",
        "ip route add default via 10.152.0.1",
        None,
    ),
    Case(
        "ghost-gateway",
        broken("ghost-gateway"),
        0,
        ("gg-office", "10.172.0.80", "--timeout", "4"),
        ("dropped", "unreachable"),
        "neigh-failed",
        "gg-office",
        "ip route replace default via 10.171.0.1",
        ("gg-office", "POSTROUTING", "request"),
    ),
    Case(
        "arp-rp-filter",
        broken("arp-rp-filter"),
        0,
        ("ar-src", "10.56.2.2", "--timeout", "4"),
        ("dropped", "unreachable"),
        "rp-filter",
        "ar-mid",
        "sysctl -w net.ipv4.conf.m-s.rp_filter=2",
        ("ar-src", "POSTROUTING", "request"),
        # Its route back loops: the reply would come back to it.
        also=(("misrouted", "ar-mid"),),
    ),
)


def nstrace_json(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "ping", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def built():
    """Build a scenario's lab at a step; always torn down afterwards."""

    def build(path: str, step: int) -> None:
        lab_module.up(scenario.load(ROOT / path), step)

    try:
        yield build
    finally:
        lab_module.down()


def check_case(case: Case, result: dict[str, Any]) -> None:
    outcomes = case.outcome if isinstance(case.outcome, tuple) else (case.outcome,)
    assert result["outcome"] in outcomes
    assert result["causes"], "a failed probe must have a cause"
    first = result["causes"][0]
    assert (first["code"], first["netns"]) == (case.code, case.netns), first
    assert first["summary"] and first["evidence"]
    if case.fix is None:
        assert first["fix"] is None
    else:
        assert first["fix"] and first["fix"].startswith(case.fix), first
    others = [(cause["code"], cause["netns"]) for cause in result["causes"][1:]]
    assert others == list(case.also), result["causes"]
    drop = result["drop"]
    if case.drop is None:
        assert drop is None
    else:
        netns, hook, direction = case.drop
        assert drop is not None
        assert (drop["netns"], drop["dir"]) == (netns, direction), drop
        if hook is not None:
            assert drop["hook"] == hook, drop
        if case.rule:
            # Rule attribution (tracer/rules.py) names the chain that dropped.
            assert drop.get("rule"), drop
            for key, value in case.rule.items():
                assert drop["rule"][key] == value, drop["rule"]


@pytest.mark.root
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_broken_lab_is_explained(built, case):
    built(case.scenario, case.step)
    check_case(case, nstrace_json(*case.argv))


FIXED = [
    (path.name, chosen.last, probe)
    for path in sorted((ROOT / BROKEN).glob("*.yaml"))
    for chosen in [scenario.load(path)]
    if chosen.last >= 1
    for probe in chosen.steps[chosen.last].probes
    if probe.expect.get("outcome") == "reply"
]


@pytest.mark.root
@pytest.mark.parametrize("name,step,probe", FIXED, ids=[f[0] for f in FIXED])
def test_fixed_lab_replies_without_cause_or_drop(built, name, step, probe):
    # The last step of a broken lab applies the fixes the explanation gives.
    built(f"{BROKEN}/{name}", step)
    result = nstrace_json(probe.src, probe.dst)
    assert result["outcome"] == "reply"
    assert result["causes"] == []
    assert result["drop"] is None


TUTORIAL_REPLIES = [
    (step.number, probe)
    for step in scenario.load(ROOT / TUTORIAL).steps
    for probe in step.probes[:1]
    if probe.expect.get("outcome") == "reply"
]


@pytest.mark.root
@pytest.mark.parametrize(
    "step,probe", TUTORIAL_REPLIES, ids=[f"step{s}" for s, _ in TUTORIAL_REPLIES]
)
def test_tutorial_replies_have_no_cause_and_a_snapshot(built, step, probe):
    built(TUTORIAL, step)
    result = nstrace_json(probe.src, probe.dst)
    assert result["outcome"] == "reply"
    assert result["causes"] == []
    assert result["drop"] is None
    # The snapshot summary covers every lab namespace, with what it saw.
    spaces = result["snapshot"]["namespaces"]
    assert set(spaces) >= {"host", "RED", "BLUE", "internet"}
    assert spaces["host"]["ip_forward"] == 1
    assert "11.11.11.2/24 dev reth0" in spaces["RED"]["addresses"]


@pytest.mark.root
@pytest.mark.parametrize(
    "path", sorted((ROOT / BROKEN).glob("*.yaml")), ids=lambda p: p.stem
)
def test_nstrace_check_holds_every_broken_labs_expectations(path):
    # Each lab's probes expect their outcome and cause (with check's own
    # timeout of 1 s: ARP failures are then named from the snapshot).
    done = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
