"""Expectations without root: each key read against kernel recordings."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tracer import check, scenario
from tracer.errors import UsageError

from .helpers import recorded, with_causes

MASQUERADE = {
    "netns": "host",
    "hook": "POSTROUTING",
    "dir": "request",
    "field": "src",
    "from": "11.11.11.2",
    "to": "10.0.2.15",
}
DROP_AT_FORWARD = {"netns": "host", "hook": "FORWARD", "dir": "reply"}

# (step of the recording, expectation, whether it holds)
CASES = [
    (6, {"outcome": "dropped"}, True),
    (6, {"outcome": "reply"}, False),
    (5, {"outcome_not": ["reply", "dropped"]}, True),
    (7, {"outcome_not": "reply"}, False),
    (6, {"crossed": "host FORWARD request"}, True),
    (6, {"crossed": "host FORWARD reply"}, False),  # entered, dropped there
    (7, {"crossed": ["host FORWARD reply", "RED INPUT reply"]}, True),
    (7, {"crossed": {"netns": "host", "hook": "forward"}}, True),
    (7, {"crossed": "host FORWARD reply bridge"}, False),
    (6, {"not_crossed": "host FORWARD reply"}, True),
    (7, {"not_crossed": "host FORWARD reply"}, False),
    (5, {"not_crossed": "host INPUT"}, True),
    (6, {"drop": {**DROP_AT_FORWARD, "reason": "NETFILTER_DROP"}}, True),
    (6, {"drop": {"netns": "host", "hook": "POSTROUTING"}}, False),
    (7, {"drop": None}, True),
    (6, {"drop": None}, False),
    (7, {"drop": DROP_AT_FORWARD}, False),
    (6, {"nat": [MASQUERADE]}, True),
    (7, {"nat": [{"netns": "host", "field": "dst", "to": "11.11.11.2"}]}, True),
    (5, {"nat": []}, True),
    (5, {"nat": [MASQUERADE]}, False),
    (6, {"nat": []}, False),
    (6, {"cause": "filter-drop"}, False),  # nothing filled causes yet
]


@pytest.mark.parametrize(("step", "expect", "held"), CASES)
def test_expectation_against_a_kernel_recording(step, expect, held):
    (verdict,) = check.evaluate(expect, recorded(step))
    assert verdict.held is held, verdict
    assert verdict.seen


def test_every_expectation_key_has_a_reader():
    assert set(check.READERS) == set(scenario.EXPECT_KEYS)


def test_failed_crossing_says_where_it_died_and_what_was_crossed():
    (verdict,) = check.evaluate({"crossed": "host FORWARD reply"}, recorded(6))
    assert "dropped there: NETFILTER_DROP" in verdict.seen
    assert "FORWARD request" in verdict.seen


def test_cause_reads_code_and_namespace():
    result = with_causes(
        recorded(6),
        {"code": "filter-drop", "netns": "host", "summary": "FORWARD policy DROP"},
    )
    assert check.evaluate({"cause": "filter-drop"}, result)[0].held
    assert check.evaluate({"cause": {"code": "filter-drop", "netns": "host"}}, result)[
        0
    ].held
    wrong = check.evaluate({"cause": {"code": "filter-drop", "netns": "RED"}}, result)
    assert not wrong[0].held
    assert "filter-drop in host: FORWARD policy DROP" in wrong[0].seen


def test_empty_causes_say_so():
    (verdict,) = check.evaluate({"cause": "no-snat"}, recorded(5))
    assert not verdict.held
    assert "no cause was named" in verdict.seen


# ---- the schema check: file, line and what is wrong ------------------------

SCENARIO = """\
namespaces: [host, RED]
steps:
  - step: 0
    title: start
    probes:
      - from: RED
        to: 8.8.8.8
        expect:
          outcome: dropped
          EXPECTATION
"""

BAD = [
    ("crossed: host FORWRD reply", r"case\.yaml:10: .*crossed item 1: hook 'FORWRD'"),
    ("crossed: host", r"case\.yaml:10: .*'host' is not `NETNS HOOK"),
    ("crossed: []", r"case\.yaml:10: .*crossed is an empty list"),
    ("not_crossed: BLUE FORWARD", r"case\.yaml:10: .*names 'BLUE', which is not"),
    ("crossed: host FORWARD sideways", r"dir 'sideways' is not one of request, reply"),
    ("drop: {netns: host, hok: FORWARD}", r"case\.yaml:10: .*unknown key 'hok'"),
    ("drop: yes", r"drop must be a mapping of netns, hook, dir, reason, or null"),
    ("nat: [{field: source}]", r"nat item 1: field 'source' is not one of src, dst"),
    ("nat: [{field: src, to: nowhere}]", r"to 'nowhere' is not an IPv4 address"),
    ("cause: Filter Drop", r"code 'Filter Drop' is not a cause code"),
    ("cause: {code: no-snat, netns: laptop}", r"names 'laptop', which is not"),
    ("outcomes: reply", r"case\.yaml:10: .*expect has unknown key 'outcomes'"),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_bad_expectation_names_file_line_and_problem(tmp_path: Path, line, message):
    path = tmp_path / "case.yaml"
    path.write_text(SCENARIO.replace("EXPECTATION", line))
    with pytest.raises(UsageError, match=message):
        scenario.load(path)


def test_every_key_loads(tmp_path: Path):
    expectation = textwrap.indent(
        textwrap.dedent(
            """\
            crossed: [host FORWARD request, {netns: host, hook: PREROUTING}]
            not_crossed: host FORWARD reply
            drop: {netns: host, hook: FORWARD, dir: reply, reason: NETFILTER_DROP}
            nat: [{netns: host, hook: POSTROUTING, field: src, to: 10.0.2.15}]
            cause: {code: filter-drop, netns: host}"""
        ),
        " " * 10,
    ).lstrip()
    path = tmp_path / "case.yaml"
    path.write_text(SCENARIO.replace("EXPECTATION", expectation))
    (probe,) = scenario.load(path).step(0).probes
    assert set(probe.expect) == set(scenario.EXPECT_KEYS) - {"outcome_not"}
    verdicts = check.evaluate(probe.expect, recorded(6))
    assert [v.key for v in verdicts if not v.held] == ["cause"]


def test_shipped_scenarios_load():
    for name in ("tutorial", "bridge", "docker"):
        loaded = scenario.load(name)
        assert all(step.probes for step in loaded.steps), name


def test_a_command_for_a_lab_is_checked_like_a_scenarios():
    tutorial = scenario.default_scenario()
    command = scenario.command(tutorial, "host", "iptables -A FORWARD -j ACCEPT")
    assert command.argv == ("iptables", "-A", "FORWARD", "-j", "ACCEPT")
    with pytest.raises(UsageError, match=r"^command: `sh -c id` runs 'sh'"):
        scenario.command(tutorial, "host", "sh -c id")


def test_a_bad_item_of_a_block_list_is_reported_at_its_own_line(tmp_path: Path):
    nat = textwrap.indent(
        textwrap.dedent(
            """\
            nat:
              - {netns: host, field: src}
              - {netns: host, field: sauce}"""
        ),
        " " * 10,
    ).lstrip()
    path = tmp_path / "case.yaml"
    path.write_text(SCENARIO.replace("EXPECTATION", nat))
    with pytest.raises(UsageError, match=r"case\.yaml:12: .*nat item 2: field 'sauce'"):
        scenario.load(path)


def test_report_table_and_junit_without_a_lab(tmp_path: Path):
    import io
    import xml.etree.ElementTree as ET

    from rich.console import Console

    tutorial = scenario.default_scenario()
    step6 = tutorial.step(6)
    (probe,) = step6.probes
    result = recorded(7)  # step 7's trace judged by step 6's expectations
    run = check.ProbeRun(step6, probe, result, check.evaluate(probe.expect, result))
    report = check.Report(tutorial, [run])
    assert report.exit_code() == 1

    out = io.StringIO()
    check.render_report(report, Console(file=out, width=100))
    text = out.getvalue()
    assert (
        "FAIL step 6 (MASQUERADE added, the reply is dropped), RED -> 8.8.8.8 (icmp): "
        "expected outcome dropped, saw reply"
    ) in text
    failed = len(report.failures)
    assert (
        f"{len(run.verdicts) - failed} of {len(run.verdicts)} expectations held" in text
    )

    junit = tmp_path / "junit.xml"
    check.write_junit(report, junit)
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == str(len(run.verdicts))
    assert suite.get("failures") == str(failed)
    cases = suite.findall("testcase")
    assert cases[0].get("classname") == "nstrace.tutorial.step6"
    assert cases[0].find("failure").get("message").endswith("saw reply")
