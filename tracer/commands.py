"""The lab and demo commands: the sandbox driven from the command line."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.rule import Rule

from tracer import lab as lab_module
from tracer import render, scenario, trace


def lab(args: argparse.Namespace) -> int:
    if args.lab_command == "up":
        return lab_up(args.scenario, args.step)
    if args.lab_command == "down":
        removed = lab_module.down()
        print(f"removed namespaces: {' '.join(removed)}" if removed else "no lab was up")
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
    console.print(f"$ nstrace ping {probe.src} {probe.dst}", style="bold", highlight=False)
    request = trace.parse_request(probe.src, probe.dst, probe.proto, timeout_s=1.0,
                                  port=probe.port)
    result = trace.ping(request)
    render.render_text(result, console)
    expected = probe.expect.get("outcome")
    unexpected = probe.expect.get("outcome_not")
    wrong = (expected and result.outcome != expected) or (
        unexpected and result.outcome == unexpected
    )
    if wrong:
        want = expected or f"anything but {unexpected}"
        console.print(f"[red]expected {want}, got {result.outcome}", highlight=False)
    console.print()
    return 1 if wrong else 0

