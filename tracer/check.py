"""Expectations: compare a trace with what a scenario says must happen.

A probe of a scenario carries an ``expect`` mapping (scenarios/README.md).
tracer/scenario.py checks its shape when the file is loaded; this module
reads each key against a :class:`~tracer.path.TraceResult` and says whether
it held and, when it did not, what was seen instead. `nstrace check`,
`nstrace lab run`, `nstrace demo` and the pytest plugin all judge traces
here, so that an expectation means the same thing everywhere.

:func:`walk` is the shared engine: build the lab, move it through the steps,
trace every probe and judge it, and tear the lab down at the end.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracer import diff, lab, scenario
from tracer.path import TraceResult
from tracer.scenario import Probe, Scenario, Step

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Verdict:
    """One expectation judged against one trace."""

    key: str
    expected: str  # the expectation as the scenario says it, in words
    held: bool
    seen: str  # what the trace showed (the evidence when it did not hold)

    def __str__(self) -> str:
        mark = "holds" if self.held else f"FAILED, saw {self.seen}"
        return f"{self.key} {self.expected}: {mark}"


# ---- reading one expectation -----------------------------------------------


def _outcome_seen(result: TraceResult) -> str:
    text = result.outcome
    if result.outcome == "dropped" and result.drop:
        return f"{text} at {diff.describe_drop(result.drop)}"
    if result.outcome == "unreachable" and result.send_error:
        return f"{text} ({result.send_error} before sending)"
    if result.outcome == "error" and result.error:
        return f"{text} ({result.error})"
    return text


def _read_outcome(value: str, result: TraceResult) -> tuple[str, bool, str]:
    return value, result.outcome == value, _outcome_seen(result)


def _read_outcome_not(value: Any, result: TraceResult) -> tuple[str, bool, str]:
    unwanted = value if isinstance(value, list) else [value]
    expected = "anything but " + " or ".join(unwanted)
    return expected, result.outcome not in unwanted, _outcome_seen(result)


def _matches(pattern: dict[str, str], item: dict[str, Any] | tuple) -> bool:
    if isinstance(item, tuple):
        item = item._asdict()  # type: ignore[attr-defined]
    return all(str(item.get(key)) == value for key, value in pattern.items())


def _pattern_text(pattern: dict[str, str], keys: tuple[str, ...]) -> str:
    return " ".join(f"{pattern[k]}" for k in keys if k in pattern)


_HOOK_TEXT = ("netns", "hook", "dir", "family")


def _crossings_in(result: TraceResult, netns: str) -> str:
    mine = [c for c in diff.crossings(result) if c.netns == netns]
    if not mine:
        return f"no hook crossed in {netns}"
    return f"crossed in {netns}: " + ", ".join(str(c)[len(netns) + 1 :] for c in mine)


def _hook_patterns(value: Any) -> list[dict[str, str]]:
    # A hook without a family is an IPv4 hook, as in hooks_hit (DESIGN.md):
    # the bridge family's own FORWARD is another hook than iptables' FORWARD.
    return [{"family": "ip", **p} for p in scenario.hook_patterns(value)]


def _hook_text(pattern: dict[str, str]) -> str:
    keys = _HOOK_TEXT if pattern.get("family") != "ip" else _HOOK_TEXT[:3]
    return _pattern_text(pattern, keys)


def _read_crossed(value: Any, result: TraceResult) -> tuple[str, bool, str]:
    patterns = _hook_patterns(value)
    crossed = diff.crossings(result)
    expected = ", ".join(_hook_text(p) for p in patterns)
    missing = [p for p in patterns if not any(_matches(p, c) for c in crossed)]
    if not missing:
        return expected, True, expected
    seen = []
    for pattern in missing:
        text = f"not {_hook_text(pattern)}"
        drop = result.drop
        if drop and _matches({k: v for k, v in pattern.items() if k != "family"}, drop):
            text += f" (dropped there: {drop.get('reason')})"
        seen.append(f"{text}; {_crossings_in(result, pattern['netns'])}")
    return expected, False, "; ".join(seen)


def _read_not_crossed(value: Any, result: TraceResult) -> tuple[str, bool, str]:
    patterns = _hook_patterns(value)
    crossed = diff.crossings(result)
    expected = "none of " + ", ".join(_hook_text(p) for p in patterns)
    hits = [str(c) for c in crossed if any(_matches(p, c) for p in patterns)]
    if hits:
        return expected, False, "crossed " + ", ".join(hits)
    return expected, True, "not crossed"


def _read_drop(value: Any, result: TraceResult) -> tuple[str, bool, str]:
    pattern = scenario.drop_pattern(value)
    drop = result.drop
    seen = (
        f"dropped at {diff.describe_drop(drop)}"
        if drop
        else f"no drop (outcome {result.outcome})"
    )
    if pattern is None:
        return "none", drop is None, seen
    expected = _pattern_text(pattern, ("netns", "hook", "dir", "reason", "dev"))
    return expected, bool(drop) and _matches(pattern, drop), seen


def _nat_seen(result: TraceResult) -> str:
    if not result.nat:
        return "no NAT rewrite"
    return "; ".join(diff.describe_nat(entry) for entry in result.nat)


def _nat_text(pattern: dict[str, str]) -> str:
    where = _pattern_text(pattern, ("netns", "hook", "dir", "field"))
    return f"{where} {pattern.get('from', '*')} -> {pattern.get('to', '*')}"


def _read_nat(value: Any, result: TraceResult) -> tuple[str, bool, str]:
    patterns = scenario.nat_patterns(value)
    if not patterns:
        return "no rewrite", not result.nat, _nat_seen(result)
    expected = "; ".join(map(_nat_text, patterns))
    held = all(any(_matches(p, entry) for entry in result.nat) for p in patterns)
    return expected, held, _nat_seen(result)


def _read_cause(value: Any, result: TraceResult) -> tuple[str, bool, str]:
    pattern = scenario.cause_pattern(value)
    expected = _pattern_text(pattern, ("code", "netns"))
    if not result.causes:
        return expected, False, "no cause was named (the trace has no causes)"
    held = any(_matches(pattern, cause) for cause in result.causes)
    seen = "causes: " + "; ".join(diff.describe_cause(c) for c in result.causes)
    return expected, held, seen


Reader = Callable[[Any, TraceResult], tuple[str, bool, str]]

# One reader per key of scenario.EXPECT_KEYS (a unit test keeps them equal).
READERS: dict[str, Reader] = {
    "outcome": _read_outcome,
    "outcome_not": _read_outcome_not,
    "crossed": _read_crossed,
    "not_crossed": _read_not_crossed,
    "drop": _read_drop,
    "nat": _read_nat,
    "cause": _read_cause,
}


def evaluate(expect: dict[str, Any], result: TraceResult) -> list[Verdict]:
    """Each expectation of *expect* judged against *result*, in file order."""
    verdicts = []
    for key, value in expect.items():
        expected, held, seen = READERS[key](value, result)
        verdicts.append(Verdict(key, expected, held, seen))
    return verdicts


# ---- walking a scenario ----------------------------------------------------


def probe_key(probe: Probe) -> tuple[Any, ...]:
    """What makes two probes of different steps "the same probe"."""
    return probe.src, probe.dst, probe.proto, probe.port


def trace_probe(probe: Probe, timeout_s: float = PROBE_TIMEOUT_S) -> TraceResult:
    """Trace one probe of a scenario in the lab as it stands."""
    from tracer import trace  # loads libbpf and scapy: only when tracing

    request = trace.parse_request(
        probe.src, probe.dst, probe.proto, timeout_s=timeout_s, port=probe.port
    )
    return trace.ping(request)


# Operational states of a link whose carrier is on but that the kernel's
# linkwatch worker has not processed yet. Until it has, the device still has
# the noop qdisc, which drops everything sent (dev_activate() runs from
# linkwatch, net/core/link_watch.c), and linkwatch defers non-urgent events
# by up to a second. A probe sent just after `ip link set ... up` can vanish
# there (measured: RED's first ARP request through a fresh br0).
_NOT_YET_UP = ("DOWN", "LOWERLAYERDOWN", "DORMANT")
SETTLE_TIMEOUT_S = 3.0


def _unsettled(ns: str) -> list[str]:
    done = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show"],
        capture_output=True,
        text=True,
        check=False,
    )
    links = json.loads(done.stdout or "[]") if done.returncode == 0 else []
    return [
        f"{ns}/{link.get('ifname')}"
        for link in links
        if {"UP", "LOWER_UP"} <= set(link.get("flags", []))
        and link.get("operstate") in _NOT_YET_UP
    ]


def settle(namespaces: Iterable[str], timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until every link that has a carrier is operationally up."""
    deadline = time.monotonic() + timeout_s
    names = list(namespaces)
    while True:
        waiting = [link for ns in names for link in _unsettled(ns)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            log.warning("links still not up after %.1fs: %s", timeout_s, waiting)
            return
        time.sleep(0.02)


@dataclass
class ProbeRun:
    """One probe of one step: its trace, its verdicts, the trace before it."""

    step: Step
    probe: Probe
    result: TraceResult
    verdicts: list[Verdict]
    previous_step: int | None = None
    previous: TraceResult | None = None

    @property
    def held(self) -> bool:
        return all(v.held for v in self.verdicts)

    def diff(self) -> diff.TraceDiff:
        return diff.compare(self.previous, self.result)


def walk(
    chosen: Scenario,
    timeout_s: float = PROBE_TIMEOUT_S,
    on_step: Callable[[Step], None] | None = None,
    keep: bool = False,
) -> Iterator[ProbeRun]:
    """Build the lab afresh, then step by step trace and judge every probe.

    *on_step* is called once a step is applied, before its probes. The lab
    comes down at the end (also on an error or an abandoned iteration)
    unless *keep*.
    """
    last: dict[tuple[Any, ...], tuple[int, TraceResult]] = {}
    try:
        # From a fresh build: a lab left up by `nstrace lab up` may have been
        # changed by hand since, and would judge the scenario on other rules.
        lab.down()
        for step in chosen.steps:
            lab.goto(chosen, step.number)
            settle(chosen.namespaces)
            if on_step:
                on_step(step)
            for probe in step.probes:
                result = trace_probe(probe, timeout_s)
                before = last.get(probe_key(probe))
                last[probe_key(probe)] = (step.number, result)
                yield ProbeRun(
                    step,
                    probe,
                    result,
                    evaluate(probe.expect, result),
                    before[0] if before else None,
                    before[1] if before else None,
                )
    finally:
        if not keep:
            lab.down()


@dataclass
class Report:
    """Everything `nstrace check` found, for the table and for JUnit."""

    scenario: Scenario
    runs: list[ProbeRun] = field(default_factory=list)

    @property
    def failures(self) -> list[tuple[ProbeRun, Verdict]]:
        return [(r, v) for r in self.runs for v in r.verdicts if not v.held]

    @property
    def passed(self) -> bool:
        return bool(self.runs) and not self.failures

    def exit_code(self) -> int:
        return 0 if self.passed else 1


def check(chosen: Scenario, timeout_s: float = PROBE_TIMEOUT_S) -> Report:
    """Run every expectation of every step; the lab is torn down afterwards."""
    report = Report(chosen)
    for run in walk(chosen, timeout_s):
        log.info("step %d, %s: %s", run.step.number, run.probe, run.result.outcome)
        report.runs.append(run)
    return report


# ---- showing the report ----------------------------------------------------


def failure_line(run: ProbeRun, verdict: Verdict) -> str:
    """``step 6 (title), RED -> 8.8.8.8 (icmp): expected outcome reply, saw ...``."""
    return (
        f"step {run.step.number} ({run.step.title}), {run.probe}: expected "
        f"{verdict.key} {verdict.expected}, saw {verdict.seen}"
    )


def render_report(report: Report, console: Console) -> None:
    """A table of every expectation, then one line of evidence per failure."""
    table = Table(title=f"nstrace check {report.scenario.name}", title_justify="left")
    for column in ("step", "probe", "expectation", "result"):
        table.add_column(column, overflow="fold")
    for run in report.runs:
        for verdict in run.verdicts:
            mark = Text("pass", "green") if verdict.held else Text("FAIL", "bold red")
            table.add_row(
                str(run.step.number),
                str(run.probe),
                f"{verdict.key}: {verdict.expected}",
                mark,
            )
    console.print(table)
    for run, verdict in report.failures:
        console.print(Text("FAIL " + failure_line(run, verdict), "red"), soft_wrap=True)
    total = sum(len(r.verdicts) for r in report.runs)
    failed = len(report.failures)
    summary = f"{total - failed} of {total} expectations held"
    console.print(Text(summary, "bold green" if not failed else "bold red"))


def write_junit(report: Report, path: str | Path) -> None:
    """One JUnit test case per expectation, for CI systems that read JUnit XML."""
    cases = [(run, verdict) for run in report.runs for verdict in run.verdicts]
    suite = ET.Element(
        "testsuite",
        name=f"nstrace check {report.scenario.name}",
        tests=str(len(cases)),
        failures=str(len(report.failures)),
        errors="0",
    )
    for run, verdict in cases:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"nstrace.{report.scenario.name}.step{run.step.number}",
            name=f"{run.probe}: {verdict.key} {verdict.expected}",
        )
        if not verdict.held:
            failure = ET.SubElement(case, "failure", message=failure_line(run, verdict))
            failure.text = f"saw {verdict.seen}"
    suites = ET.Element("testsuites")
    suites.append(suite)
    ET.ElementTree(suites).write(path, encoding="unicode", xml_declaration=True)
