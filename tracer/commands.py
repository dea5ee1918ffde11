"""The lab and demo commands: the sandbox driven from the command line."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.rule import Rule

from tracer import check, render, scenario
from tracer import lab as lab_module


def lab(args: argparse.Namespace) -> int:
    if args.lab_command == "up":
        return lab_up(args.scenario, args.step)
    if args.lab_command == "run":
        return lab_run(args)
    if args.lab_command == "down":
        removed = lab_module.down()
        print(
            f"removed namespaces: {' '.join(removed)}" if removed else "no lab was up"
        )
        return 0
    if args.lab_command == "status":
        status = lab_module.status()
        if args.json:
            print(json.dumps(status, indent=2))
        elif not status["namespaces"]:
            print("no lab is up; build one with `nstrace lab up`")
        else:
            state = "up" if status["up"] else "broken (run `nstrace lab down`)"
            print(f"lab {status['scenario']} at step {status['step']}: {state}")
            print(f"namespaces: {' '.join(status['namespaces'])}")
            if status["missing"]:
                print(f"missing: {' '.join(status['missing'])}")
        return 0 if status["up"] or not status["namespaces"] else 1
    raise AssertionError(args.lab_command)


def lab_up(name: str, step: int | None) -> int:
    chosen = scenario.load(name)
    state = lab_module.up(chosen, step)
    current = chosen.step(state.step)
    print(f"lab {chosen.name} is up at step {current.number}: {current.title}")
    print(f"namespaces: {' '.join(state.namespaces)}")
    for probe in current.probes:
        print(f"  try: nstrace ping {probe.src} {probe.dst}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Build the tutorial's lab and trace every step's probes, in order."""
    console = render.console()
    tutorial = scenario.default_scenario()
    failures = 0
    try:
        for step in tutorial.steps:
            lab_module.goto(tutorial, step.number)
            _show_step(console, step)
            for probe in step.probes:
                failures += _demo_probe(console, probe)
    finally:
        if not args.keep:
            lab_module.down()
    if failures:
        console.print(f"[red]{failures} probe(s) did not turn out as the tutorial says")
        return 1
    console.print("Every step turned out as the tutorial says.")
    return 0


def _show_step(console: Console, step: scenario.Step) -> None:
    console.print(Rule(f"step {step.number}: {step.title}"))
    if step.story:
        console.print(step.story.strip(), highlight=False)
    for command in step.apply:
        console.print(f"  [dim]{command.netns}#[/dim] {command.text}", highlight=False)
    console.print()


def _demo_probe(console: Console, probe: scenario.Probe) -> int:
    """Trace one probe; 1 if its outcome is not what the scenario expects."""
    console.print(
        f"$ nstrace ping {probe.src} {probe.dst}", style="bold", highlight=False
    )
    result = check.trace_probe(probe)
    render.render_text(result, console)
    failed = [v for v in check.evaluate(probe.expect, result) if not v.held]
    for verdict in failed:
        console.print(
            f"[red]expected {verdict.key} {verdict.expected}, saw {verdict.seen}",
            highlight=False,
        )
    console.print()
    return 1 if failed else 0


def lab_run(args: argparse.Namespace) -> int:
    """Walk every step of a scenario: trace its probes, show what changed."""
    from tracer import diff

    console = render.console()
    chosen = scenario.load(args.scenario)
    runs = []
    walk = check.walk(
        chosen,
        args.timeout,
        on_step=None if args.json else (lambda step: _show_step(console, step)),
        keep=args.keep,
    )
    from tracer import report

    collector = report.Collector(chosen) if args.report else None
    for run in walk:
        runs.append(run)
        if collector:
            collector.add(run)  # now, while the lab stands at the run's step
        if args.json:
            continue
        console.print(
            f"$ nstrace ping {run.probe.src} {run.probe.dst}",
            style="bold",
            highlight=False,
        )
        console.print(render.outcome_line(run.result))
        since = f"step {run.previous_step}"
        diff.render_changes(run.diff(), console, since)
        for verdict in run.verdicts:
            style = "green" if verdict.held else "bold red"
            mark = "holds" if verdict.held else f"FAILED, saw {verdict.seen}"
            console.print(
                f"  expect {verdict.key} {verdict.expected}: {mark}",
                style=style,
                highlight=False,
                soft_wrap=True,
            )
        console.print()
    if args.json:
        print(json.dumps([_run_json(run) for run in runs], indent=2))
    if collector:
        index = collector.write(args.report)
        print(f"report: {index}", file=sys.stderr if args.json else sys.stdout)
    return 0 if runs and all(run.held for run in runs) else 1


def _run_json(run: check.ProbeRun) -> dict:
    return {
        "step": run.step.number,
        "title": run.step.title,
        "probe": {
            "from": run.probe.src,
            "to": run.probe.dst,
            "proto": run.probe.proto,
            "port": run.probe.port,
        },
        "outcome": run.result.outcome,
        "expectations": [vars(v) for v in run.verdicts],
        "previous_step": run.previous_step,
        "changes": run.diff().to_json() if run.previous else None,
        "result": run.result.to_json(),
    }


def check_scenario(args: argparse.Namespace) -> int:
    """`nstrace check`: every expectation of a scenario, as a table."""
    chosen = scenario.load(args.scenario)
    report = check.check(chosen, args.timeout)
    check.render_report(report, render.console())
    if args.junit:
        check.write_junit(report, args.junit)
    return report.exit_code()


def diff_results(args: argparse.Namespace) -> int:
    """`nstrace diff`: what changed between two saved `nstrace ping --json`."""
    from tracer import diff
    from tracer.errors import UsageError

    before, after = diff.load_result(args.before), diff.load_result(args.after)
    mismatch = diff.probe_mismatch(before, after)
    if mismatch:
        raise UsageError(f"{mismatch}; compare two traces of the same probe")
    change = diff.compare(before, after)
    if args.json:
        print(json.dumps(change.to_json(), indent=2))
        return 0 if change.unchanged else 1
    console = render.console()
    console.print(f"{render.header(before)}  (before: {args.before})", highlight=False)
    console.print(render.outcome_line(before))
    console.print(f"{render.header(after)}  (after: {args.after})", highlight=False)
    console.print(render.outcome_line(after))
    diff.render_changes(change, console, args.before)
    return 0 if change.unchanged else 1
