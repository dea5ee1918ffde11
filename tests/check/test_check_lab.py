"""`nstrace check` and `nstrace lab run` on the real lab (root).

Each test runs the real command: it builds the scenario's lab in namespaces
of its own, traces with eBPF, judges the expectations and tears the lab
down again.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.cli_helpers import nstrace
from tracer import lab, scenario

pytestmark = pytest.mark.root


@pytest.mark.parametrize("name", ["tutorial", "bridge", "docker"])
def test_check_passes_on_the_shipped_scenario(name: str, tmp_path: Path):
    junit = tmp_path / "junit.xml"
    done = nstrace("check", name, "--junit", str(junit))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout
    held = re.search(r"(\d+) of (\d+) expectations held", done.stdout)
    assert held and held.group(1) == held.group(2)
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("failures") == "0"
    expected = sum(len(p.expect) for s in scenario.load(name).steps for p in s.probes)
    assert int(suite.get("tests")) == expected == int(held.group(2))
    # The lab is torn down afterwards.
    assert lab.current() is None


WRONG = {
    # The -s rule is there, so the ping gets through: "dropped" is wrong.
    "        expect:\n          outcome: reply\n          crossed: [host FORWARD "
    "request, BLUE INPUT request": "        expect:\n          outcome: dropped\n"
    "          crossed: [host FORWARD request, BLUE INPUT request",
    # And the reply does not cross the host's INPUT chain: it is bridged.
    "          crossed: [host FORWARD request, host FORWARD reply]": "          "
    "crossed: [host FORWARD request, host INPUT reply]",
}


def test_a_wrong_expectation_fails_with_step_expectation_and_evidence(
    tmp_path: Path,
):
    text = (scenario.SCENARIO_DIR / "bridge.yaml").read_text()
    for old, new in WRONG.items():
        assert old in text
        text = text.replace(old, new)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(text)
    junit = tmp_path / "junit.xml"

    done = nstrace("check", str(wrong), "--junit", str(junit))

    assert done.returncode == 1, done.stderr
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 2, done.stdout
    first, second = failures
    # The step, the probe, the expectation and what was seen instead.
    assert first == (
        "FAIL step 1 (the -s rule lets the subnet through), RED -> 11.11.11.3 "
        "(icmp): expected outcome dropped, saw reply"
    )
    assert second.startswith(
        "FAIL step 1 (the -s rule lets the subnet through), BLUE -> RED (icmp): "
        "expected crossed host FORWARD request, host INPUT reply, saw not host "
        "INPUT reply; crossed in host: "
    )
    assert "FORWARD reply" in second.split("crossed in host: ")[1]
    assert "10 of 12 expectations held" in done.stdout
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "2"
    messages = [f.get("message") for f in suite.iter("failure")]
    assert messages == [line.removeprefix("FAIL ") for line in failures]
    assert lab.current() is None


def _sections(output: str) -> dict[int, str]:
    """`lab run` output cut at each step's rule line, by step number."""
    parts = re.split(r"^─* step (\d+): .*$", output, flags=re.MULTILINE)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2])}


def test_lab_run_tells_the_tutorial_by_its_traces():
    done = nstrace("lab", "run", "tutorial")
    assert done.returncode == 0, done.stdout + done.stderr
    steps = _sections(done.stdout)
    assert sorted(steps) == list(range(8))

    # 5 -> 6: MASQUERADE now rewrites the source on the way out.
    step6 = steps[6].split("$ nstrace ping")[1]
    assert "since step 5:" in step6
    assert (
        "NAT appeared: host POSTROUTING rewrites the request's source "
        "11.11.11.2 -> 10.0.2.15"
    ) in step6
    assert (
        "NAT appeared: host POSTROUTING rewrites the request's source 11.11.11.2 -> "
        "10.0.2.15 (-A POSTROUTING -s 11.11.11.0/24 -j MASQUERADE)"
    ) in step6
    assert "now dropped at host FORWARD, reply direction (NETFILTER_DROP" in step6

    # 6 -> 7: the reply now crosses the host's FORWARD and reaches RED.
    step7 = steps[7].split("$ nstrace ping BLUE")[0]
    assert "since step 6:" in step7
    assert "outcome: dropped -> reply" in step7
    assert "now crosses host FORWARD reply" in step7
    assert "the reply now reaches RED" in step7
    assert "no longer dropped at host FORWARD" in step7
    assert "cause gone: filter-drop in host" in step7
    assert lab.current() is None


def test_check_builds_afresh_over_a_lab_changed_by_hand():
    assert nstrace("lab", "up", "bridge").returncode == 0
    # By hand, as a student would: this makes step 0's "dropped" false.
    opened = lab.run_in_lab("host", ["iptables", "-P", "FORWARD", "ACCEPT"])
    assert opened.returncode == 0, opened.stderr
    done = nstrace("check", "bridge")
    assert done.returncode == 0, done.stdout
    assert lab.current() is None
