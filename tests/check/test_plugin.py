"""The pytest plugin: the nslab fixture used here, and the README's example run.

The tests marked root use the ``nslab`` fixture exactly as a lab author
would; the README's grading example is run by a pytest of its own, once with
the right fix and once with a wrong one, to show what a grader sees.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tracer import lab

REPO = Path(__file__).resolve().parents[2]


def test_plugin_is_loaded_under_its_entry_point_name(pytestconfig):
    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "entry-points"
    ]["pytest11"]
    (name,) = entry_points
    assert entry_points[name] == "tracer.pytest_plugin"
    assert pytestconfig.pluginmanager.get_plugin(name) is not None
    markers = pytestconfig.getini("markers")
    assert any(line.startswith("nslab(") for line in markers)


@pytest.mark.root
@pytest.mark.nslab("tutorial", step=6)
def test_grade_a_fix_for_step_6(nslab):
    before = nslab.ping("RED", "8.8.8.8")
    assert before.outcome == "dropped"
    assert before.dropped_at("host", "FORWARD", dir="reply", reason="NETFILTER_DROP")
    assert before.crossed("host", "FORWARD", "request")
    assert not before.crossed("host", "FORWARD", "reply")
    assert not before.reached("RED", "reply")

    nslab.run("host", "iptables -t filter -A FORWARD -d 11.11.11.0/24 -j ACCEPT")
    after = nslab.ping("RED", "8.8.8.8")
    assert after.crossed("host", "FORWARD", "reply")
    assert after.reached("RED", "reply")
    assert after.rewrote("dst", "host", hook="PREROUTING", to="11.11.11.2")
    assert not after.has_cause("filter-drop")
    after.expect(outcome="reply", drop=None)
    with pytest.raises(AssertionError, match=r"expected outcome dropped, saw reply"):
        after.expect(outcome="dropped")
    assert "crossed: RED OUTPUT request" in repr(after)


@pytest.mark.root
def test_a_changed_lab_is_torn_down_after_the_test():
    # The test before ran nslab.run(): nobody after it sees its rule.
    assert lab.current() is None


@pytest.mark.root
@pytest.mark.nslab("bridge", step=1)
def test_check_step_asserts_the_scenarios_expectations(nslab):
    traces = nslab.check_step()
    assert [t.outcome for t in traces] == ["reply", "reply"]
    assert nslab.step == 1
    nslab.goto(0)  # backwards: a rebuild
    # A student who opens FORWARD wide "fixes" step 0 the wrong way.
    nslab.run("host", "iptables -t filter -P FORWARD ACCEPT")
    with pytest.raises(
        AssertionError,
        match=r"step 0 .*RED -> 11.11.11.3.* expected outcome dropped, saw reply",
    ):
        nslab.check_step()
    with pytest.raises(pytest.fail.Exception, match=r"exited"):
        nslab.run("host", "ip link set nosuchlink up")


def _readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Grading a lab with pytest", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def _run_pytest(directory: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tracer.pytest_plugin",
            "-p",
            "no:cacheprovider",
            str(directory),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=directory,
        env=env,
    )


@pytest.mark.root
def test_the_readme_example_grades_a_right_and_a_wrong_fix(tmp_path: Path):
    example = _readme_example()
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.mkdir()
    wrong.mkdir()
    (right / "test_grading.py").write_text(example)
    # A wrong fix: the -s rule again, which does not match the reply.
    (wrong / "test_grading.py").write_text(
        example.replace("-d 11.11.11.0/24", "-s 11.11.11.0/24")
    )

    done = _run_pytest(right)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout

    failed = _run_pytest(wrong)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "1 failed, 1 passed" in failed.stdout
    assert "<trace RED -> 8.8.8.8: dropped at host FORWARD, reply direction" in (
        failed.stdout
    )
    assert lab.current() is None
