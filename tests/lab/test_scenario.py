"""The scenario loader, without root: the tutorial file and every error path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tracer import scenario
from tracer.errors import UsageError

# What LAB.md says each step must produce, as (step, from, to, expectation).
TUTORIAL_EXPECTATIONS = [
    (0, "RED", "11.11.11.3", {"outcome": "reply"}),
    (1, "host", "11.11.11.2", {"outcome_not": "reply"}),
    (2, "host", "11.11.11.2", {"outcome": "reply"}),
    (2, "host", "11.11.11.3", {"outcome": "reply"}),
    (2, "RED", "11.11.11.1", {"outcome": "reply"}),
    (3, "RED", "192.168.104.2", {"outcome": "unreachable"}),
    (4, "RED", "192.168.104.2", {"outcome": "reply"}),
    (5, "RED", "8.8.8.8", {"outcome_not": "reply"}),
    (6, "RED", "8.8.8.8", {"outcome": "dropped"}),
    (7, "RED", "8.8.8.8", {"outcome": "reply"}),
    (7, "BLUE", "8.8.8.8", {"outcome": "reply"}),
]

VALID = """\
namespaces: [alpha, beta]
machine:
  - alpha: ip link set lo up
steps:
  - step: 0
    title: start
    apply:
      - alpha: ip link add a0 type veth peer name b0 netns beta
    probes:
      - {from: alpha, to: 10.0.0.2, expect: {outcome: reply}}
  - step: 1
    title: next
    probes:
      - {from: beta, to: alpha, expect: {outcome_not: [reply, error]}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "case.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_tutorial_by_name_is_the_default() -> None:
    tutorial = scenario.load("tutorial")
    assert tutorial == scenario.default_scenario()
    assert tutorial.path == scenario.SCENARIO_DIR / "tutorial.yaml"
    assert tutorial.last == 7
    assert set(tutorial.namespaces) == {"internet", "laptop", "host", "RED", "BLUE"}


@pytest.mark.parametrize(("step", "src", "dst", "expect"), TUTORIAL_EXPECTATIONS)
def test_tutorial_expects_what_lab_md_says(
    step: int, src: str, dst: str, expect: dict
) -> None:
    probes = scenario.default_scenario().step(step).probes
    # Other keys (hooks, drop, nat) may say more; the outcome must be there.
    assert any(
        (p.src, p.dst) == (src, dst) and expect.items() <= p.expect.items()
        for p in probes
    )


def test_tutorial_steps_apply_the_tutorials_commands() -> None:
    tutorial = scenario.default_scenario()
    applied = {n: [str(c) for c in tutorial.step(n).apply] for n in range(8)}
    assert applied[1] == applied[3] == applied[5] == []  # probe-only steps
    assert applied[2] == ["host: ip addr add 11.11.11.1/24 dev br0"]
    assert applied[4] == [
        "RED: ip route add default via 11.11.11.1",
        "BLUE: ip route add default via 11.11.11.1",
    ]
    assert applied[6] == [
        "host: iptables -t nat -A POSTROUTING -s 11.11.11.0/24 -j MASQUERADE"
    ]
    assert applied[7] == [
        "host: iptables -t filter -A FORWARD -d 11.11.11.0/24 -j ACCEPT"
    ]
    assert all(tutorial.step(n).title and tutorial.step(n).story for n in range(8))


def test_valid_scenario_by_path(tmp_path: Path) -> None:
    loaded = scenario.load(write(tmp_path, VALID))
    assert loaded.name == "case"
    assert loaded.machine[0] == scenario.Command(
        "alpha", "ip link set lo up", ("ip", "link", "set", "lo", "up"), 3
    )
    assert loaded.step(1).probes[0].expect == {"outcome_not": ["reply", "error"]}
    assert loaded.step(1).probes[0].line == 14


def test_missing_file() -> None:
    with pytest.raises(UsageError, match=r"nowhere/x\.yaml: no such scenario file"):
        scenario.load("nowhere/x.yaml")


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(
        UsageError, match=r"no scenario named 'nope' \(known: .*tutorial"
    ):
        scenario.load("nope")


def test_step_out_of_range() -> None:
    with pytest.raises(UsageError, match="scenario tutorial has steps 0 to 7, not 9"):
        scenario.default_scenario().step(9)


# Broken files: (what to change in VALID, message expected with its line).
BROKEN = {
    "not yaml": (
        ("    title: start\n", "    title: [start\n"),
        r"case\.yaml:\d+: not valid YAML",
    ),
    "unknown step key": (
        ("    title: next\n", "    title: next\n    comand: ip link\n"),
        r"case\.yaml:13: step 1 has unknown key 'comand' \(known: step, title, ",
    ),
    "unknown top key": (
        ("machine:", "machines:"),
        r"case\.yaml:2: the scenario has unknown key 'machines'",
    ),
    "unknown expectation": (
        ("{outcome: reply}", "{outcom: reply}"),
        r"case\.yaml:10: step 0, probe 1: expect has unknown key 'outcom'",
    ),
    "bad outcome": (
        ("{outcome: reply}", "{outcome: replied}"),
        r"outcome must be one of reply, dropped, no-reply, unreachable, error",
    ),
    "step out of order": (
        ("  - step: 1\n", "  - step: 3\n"),
        r"case\.yaml:11: step 3 is out of order: .* must be `step: 1`",
    ),
    "step without a number": (
        ("  - step: 1\n    title: next\n", "  - title: next\n"),
        r"case\.yaml:11: step 1 has no number \(add `step: 1`\)",
    ),
    "duplicate key": (
        ("    title: next\n", "    title: next\n    title: again\n"),
        r"case\.yaml:13: not valid YAML: duplicate key 'title'",
    ),
    "unknown namespace": (
        ("  - alpha: ip link set lo up", "  - gamma: ip link set lo up"),
        r"case\.yaml:3: the machine: 'gamma' is not one of the scenario's namespaces",
    ),
    "program not allowed": (
        ("ip link set lo up", "bash -c 'ip link set lo up'"),
        r"runs 'bash'; only ip, iptables, nft, sysctl may run",
    ),
    "ip netns": (
        ("ip link set lo up", "ip netns add gamma"),
        r"manages namespaces",
    ),
    "ip -n": (
        ("ip link set lo up", "ip -n beta link set lo up"),
        r"leaves the namespace",
    ),
    "link to the root namespace": (
        ("netns beta", "netns 1"),
        r"moves a link to '1', not to a lab namespace",
    ),
    "global sysctl": (
        ("ip link set lo up", "sysctl -w kernel.panic=1"),
        r"sets kernel\.panic, which is not a per-namespace setting",
    ),
    "unbalanced quote": (
        ("ip link set lo up", "ip link set 'lo up"),
        r"cannot split",
    ),
    "probe from nowhere": (
        ("{from: alpha,", "{from: root,"),
        r"from must be a namespace of the scenario",
    ),
    "probe to nowhere": (
        ("to: 10.0.0.2", "to: 10.0.0.300"),
        r"to must be an IPv4 address or a namespace",
    ),
    "port on icmp": (
        ("to: 10.0.0.2,", "to: 10.0.0.2, port: 80,"),
        r"port must be 1\.\.65535, for tcp or udp",
    ),
    "no expectation": (
        ("expect: {outcome: reply}", "expect: {}"),
        r"expect is empty",
    ),
    "root as a namespace": (
        ("[alpha, beta]", "[alpha, beta, root]"),
        r"'root' cannot name a lab namespace",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_scenario_is_a_one_line_usage_error(tmp_path: Path, case: str) -> None:
    (old, new), message = BROKEN[case]
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(UsageError, match=message) as raised:
        scenario.load(path)
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith(str(path))
