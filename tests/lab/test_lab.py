"""The sandbox lab itself, checked with plain ping inside its namespaces.

These tests do not use the tracer: they build the tutorial at each step and
check that ping sees what LAB.md says, that the lab comes and goes cleanly
(also after a crash), and that it never touches a namespace it did not make.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tracer import lab, netns, scenario
from tracer.errors import LabError
from tracer.scenario import Probe

pytestmark = [pytest.mark.root, pytest.mark.lab]

REPO = Path(__file__).resolve().parents[2]
TUTORIAL = scenario.default_scenario()

# What plain ping can tell apart: a reply dropped on its way back looks to it
# like one that never came.
AS_PING_SEES_IT = {"dropped": "no-reply", "error": "no-reply"}


@pytest.fixture(autouse=True, scope="module")
def clean_lab() -> Iterator[None]:
    """Start from no lab and always leave none, whatever the tests did."""
    lab.down()
    try:
        yield
    finally:
        lab.down()


def holds(probe: Probe, seen: str) -> bool:
    """Whether ping's *seen* outcome agrees with the probe's expectation."""
    expect = probe.expect
    if "outcome" in expect and seen != AS_PING_SEES_IT.get(
        expect["outcome"], expect["outcome"]
    ):
        return False
    unwanted = expect.get("outcome_not", [])
    return seen not in (unwanted if isinstance(unwanted, list) else [unwanted])


def check_probes(step: int) -> None:
    for probe in TUTORIAL.step(step).probes:
        dst = probe.dst  # every tutorial probe goes to an address
        seen = lab.ping(probe.src, dst)
        assert holds(probe, seen), f"step {step}: {probe} gave {seen}, {probe.expect}"


def mark_lab() -> None:
    """Leave a trace in the lab that a rebuild would wipe out."""
    lab.run_in_lab("host", ["ip", "addr", "add", "127.0.0.42/8", "dev", "lo"])


def is_marked() -> bool:
    done = lab.run_in_lab("host", ["ip", "-4", "addr", "show", "dev", "lo"])
    return "127.0.0.42" in done.stdout


def forward_counters() -> dict[str, int]:
    """Packets counted by host's filter FORWARD: its policy and each rule."""
    done = lab.run_in_lab("host", ["iptables", "-L", "FORWARD", "-v", "-n", "-x"])
    counts = {"policy": int(re.search(r"policy \w+ (\d+) packets", done.stdout)[1])}
    for line in done.stdout.splitlines()[2:]:
        fields = line.split()
        counts[f"{fields[2]} -s {fields[7]} -d {fields[8]}"] = int(fields[0])
    return counts


@pytest.mark.parametrize("step", range(TUTORIAL.last + 1))
def test_each_step_built_from_scratch_behaves_as_lab_md_says(step: int) -> None:
    state = lab.up(TUTORIAL, step)
    assert (state.step, state.building) == (step, False)
    assert lab.status()["up"]
    check_probes(step)


def test_bridged_traffic_crosses_the_hosts_forward_chain() -> None:
    lab.up(TUTORIAL, 0)
    done = lab.run_in_lab(
        "host", ["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"]
    )
    if done.returncode != 0:
        pytest.skip("br_netfilter is not loaded on this machine")
    assert done.stdout.strip() == "1"
    before = forward_counters()
    assert lab.ping("RED", "11.11.11.3") == "reply"
    after = forward_counters()
    # The request and the reply each pass FORWARD and the source rule.
    rule = "ACCEPT -s 11.11.11.0/24 -d 0.0.0.0/0"
    assert after[rule] - before[rule] == 2


def test_step_6_reply_dies_in_forward_by_policy() -> None:
    lab.goto(TUTORIAL, 6)
    before = forward_counters()
    assert lab.ping("RED", "8.8.8.8") == "no-reply"
    after = forward_counters()
    rule = "ACCEPT -s 11.11.11.0/24 -d 0.0.0.0/0"
    assert after[rule] - before[rule] == 1  # the request went out
    assert after["policy"] - before["policy"] == 1  # the reply was dropped


def test_goto_forward_applies_only_missing_steps() -> None:
    lab.up(TUTORIAL, 2)
    mark_lab()
    state = lab.goto(TUTORIAL, 5)
    assert state.step == 5 and is_marked()
    check_probes(5)


def test_goto_backward_rebuilds() -> None:
    lab.goto(TUTORIAL, 5)
    mark_lab()
    assert lab.goto(TUTORIAL, 3).step == 3
    assert not is_marked()
    check_probes(3)


def test_up_twice_at_the_same_step_is_harmless() -> None:
    first = lab.up(TUTORIAL, 4)
    mark_lab()
    assert lab.up(TUTORIAL, 4) == first
    assert is_marked()
    check_probes(4)


def test_up_at_another_step_rebuilds_exactly() -> None:
    lab.up(TUTORIAL, 4)
    mark_lab()
    assert lab.up(TUTORIAL, 6).step == 6
    assert not is_marked()
    check_probes(6)


def test_apply_step_needs_the_step_before() -> None:
    lab.up(TUTORIAL, 2)
    with pytest.raises(LabError, match="step 4 needs the lab at step 3, it is at 2"):
        lab.apply_step(TUTORIAL, 4)
    assert lab.apply_step(TUTORIAL, 3).step == 3


def test_down_leaves_no_namespace_and_no_state() -> None:
    lab.up(TUTORIAL, 1)
    assert sorted(lab.down()) == sorted(TUTORIAL.namespaces)
    assert not any(map(netns.exists, TUTORIAL.namespaces))
    assert not lab.STATE_FILE.exists()
    assert lab.status() == {"up": False, "namespaces": []}
    assert lab.down() == []


def test_foreign_namespace_of_the_same_name_is_refused() -> None:
    subprocess.run(["ip", "netns", "add", "BLUE"], check=True)
    try:
        with pytest.raises(LabError, match=r"namespace BLUE exists but the lab did"):
            lab.up(TUTORIAL, 0)
        assert netns.exists("BLUE")
        assert lab.current() is None
        assert not any(map(netns.exists, set(TUTORIAL.namespaces) - {"BLUE"}))
        assert lab.down() == []  # and down leaves it alone too
        assert netns.exists("BLUE")
    finally:
        subprocess.run(["ip", "netns", "del", "BLUE"], check=False)


def test_run_in_lab_refuses_namespaces_outside_the_lab() -> None:
    lab.up(TUTORIAL, 0)
    for name in (netns.ROOT, "elsewhere"):
        with pytest.raises(LabError, match=f"{name} is not a namespace of the lab"):
            lab.run_in_lab(name, ["true"])


@pytest.mark.skipif(not shutil.which("ping"), reason="iputils ping not installed")
def test_raw_echo_agrees_with_ping() -> None:
    lab.up(TUTORIAL, 1)
    cases = [("RED", "11.11.11.3"), ("RED", "192.168.104.2"), ("host", "11.11.11.2")]
    seen = [lab.ping(ns, dst) for ns, dst in cases]
    assert seen == ["reply", "unreachable", "no-reply"]
    raw = [netns.run_in(ns, lambda dst=dst: lab.raw_echo(dst)) for ns, dst in cases]
    assert raw == seen


def test_failed_up_tears_down_and_names_the_command(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(TUTORIAL.path.read_text().replace("dev br0\n", "dev br9\n", 1))
    with pytest.raises(LabError) as raised:
        lab.up(scenario.load(broken), 3)
    message = str(raised.value)
    assert "step 2, host: ip addr add 11.11.11.1/24 dev br9 failed" in message
    assert 'Cannot find device "br9"' in message
    assert message.endswith("the lab was torn down") and "\n" not in message
    assert not any(map(netns.exists, TUTORIAL.namespaces))
    assert lab.current() is None


# A process that dies (os._exit, as with kill -9: no finally, no cleanup) at
# its Nth lab command, in the middle of `lab up` from no lab.
CRASH_AT = """
import os, sys
from tracer import lab, scenario
lab.down()
calls = 0
real_check = lab._check
def check(argv, what):
    global calls
    calls += 1
    if calls == int(sys.argv[1]):
        os._exit(9)
    real_check(argv, what)
lab._check = check
lab.up(scenario.default_scenario(), 7)
"""
NAMESPACES = len(TUTORIAL.namespaces)


def crash_at(command: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", CRASH_AT, str(command)]
    done = subprocess.run(argv, env=env, check=False)
    assert done.returncode == 9


@pytest.mark.parametrize(
    "command",
    [3, NAMESPACES + len(TUTORIAL.machine) + 5],
    ids=["creating namespaces", "applying step 0"],
)
def test_up_after_a_crash_half_way_rebuilds(command: int) -> None:
    crash_at(command)
    status = lab.status()
    assert status["building"] and not status["up"]
    assert lab.up(TUTORIAL, 2).step == 2
    check_probes(2)


def test_down_after_a_crash_while_creating_namespaces() -> None:
    crash_at(3)
    # The third namespace was listed before it was to be made; the crash came
    # first, so two exist, and down removes exactly those.
    assert lab.current().namespaces == list(TUTORIAL.namespaces[:3])
    assert lab.down() == list(reversed(TUTORIAL.namespaces[:2]))
    assert not any(map(netns.exists, TUTORIAL.namespaces))


def test_guard_sees_what_it_guards(
    take_root_snapshot: Callable[[], dict[str, Any]],
) -> None:
    # The root-namespace guard, pointed at a lab namespace so that it can be
    # shown a change: it must notice one and ignore counters.
    lab.up(TUTORIAL, 0)
    count = ["iptables", "-A", "INPUT", "-s", "192.168.104.2", "-j", "ACCEPT"]
    lab.run_in_lab("laptop", count).check_returncode()
    before = netns.run_in("laptop", take_root_snapshot)
    assert lab.ping("laptop", "192.168.104.2") == "reply"  # counts the reply
    assert netns.run_in("laptop", take_root_snapshot) == before
    for argv in (
        ["ip", "addr", "add", "192.168.104.9/24", "dev", "vboxnet0"],
        ["iptables", "-A", "INPUT", "-s", "192.168.104.3", "-j", "DROP"],
        ["sysctl", "-w", "net.ipv4.ip_forward=1"],
    ):
        lab.run_in_lab("laptop", argv).check_returncode()
    after = netns.run_in("laptop", take_root_snapshot)
    changed = {part for part in before if before[part] != after[part]}
    assert changed == {"addresses", "routes", "netfilter", "sysctls"}
