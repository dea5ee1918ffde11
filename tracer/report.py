"""The HTML report of a scenario: every step, its commands, its pictures.

One self-contained page (DIR/index.html): the pictures are inline SVG, the
style sheet is inline, there is no script and nothing is fetched, so the
page opens the same from a laptop's disk, a CI artifact or a mail. For each
step it shows the commands that the step applies, the story of the step,
and for each probe the picture before the change and after it (the same
probe traced at the step where it was last traced), what changed, the
explanation (the trace's causes, with their evidence and fix) and whether
the scenario's expectations held.

:func:`write_report` takes plain data (:class:`StepEntry`, :class:`ProbeEntry`)
so that it draws saved traces as well as live ones; :class:`Collector`
turns the runs of `nstrace lab run` (tracer.check.ProbeRun) into that data,
reading each step's topology while the lab stands at that step.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tracer import picture
from tracer.errors import NstraceError, UsageError
from tracer.path import TraceResult

log = logging.getLogger(__name__)

INDEX = "index.html"


@dataclass
class ProbeEntry:
    """One probe of one step: its trace now and the one before the change."""

    label: str  # the command, e.g. "nstrace ping RED 8.8.8.8"
    after: TraceResult | dict[str, Any]
    after_topology: picture.Topology | None = None
    before: TraceResult | dict[str, Any] | None = None
    before_topology: picture.Topology | None = None
    before_step: int | None = None
    changes: list[str] = field(default_factory=list)  # tracer.diff's sentences
    causes: list[dict[str, Any]] | None = None  # None: the trace's own
    verdicts: list[tuple[str, bool]] = field(default_factory=list)  # (text, held)


@dataclass
class StepEntry:
    """One step of a scenario, as the report shows it."""

    number: int
    title: str
    story: str = ""
    commands: list[str] = field(default_factory=list)  # "NS# command"
    probes: list[ProbeEntry] = field(default_factory=list)


def write_report(
    directory: str | Path,
    scenario: str,
    title: str,
    steps: Iterable[StepEntry],
    story: str = "",
) -> Path:
    """Write DIR/index.html for *steps*; return its path."""
    target = Path(directory)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"cannot create report directory {target}: {err.strerror}"
        ) from err
    steps = list(steps)
    page = _page(scenario, title, story, steps)
    index = target / INDEX
    try:
        index.write_text(page, encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {index}: {err.strerror}") from err
    log.info("report of %d steps written to %s", len(steps), index)
    return index


# ---- from `nstrace lab run` --------------------------------------------------


class Collector:
    """Gathers `lab run`'s probe runs, with each step's live topology."""

    def __init__(self, chosen: Any) -> None:
        self.scenario = chosen
        self.steps: dict[int, StepEntry] = {}
        self._topologies: dict[tuple[Any, ...], picture.Topology | None] = {}

    def add(self, run: Any) -> None:
        """Record one tracer.check.ProbeRun; call while the lab is at its step."""
        from tracer import check

        key = check.probe_key(run.probe)
        topology = _live_topology(run.result)
        entry = ProbeEntry(
            label=_probe_label(run.probe),
            after=run.result,
            after_topology=topology,
            before=run.previous,
            before_topology=self._topologies.get(key),
            before_step=run.previous_step,
            changes=run.diff().changes(),
            verdicts=[(f"{v.key} {v.expected}", v.held) for v in run.verdicts],
        )
        self._topologies[key] = topology
        self._step(run.step).probes.append(entry)

    def _step(self, step: Any) -> StepEntry:
        if step.number not in self.steps:
            self.steps[step.number] = StepEntry(
                number=step.number,
                title=step.title,
                story=(step.story or "").strip(),
                commands=[f"{c.netns}# {c.text}" for c in step.apply],
            )
        return self.steps[step.number]

    def write(self, directory: str | Path) -> Path:
        chosen = self.scenario
        steps = [self.steps[n] for n in sorted(self.steps)]
        return write_report(
            directory,
            chosen.name,
            chosen.title or chosen.name,
            steps,
            (chosen.story or "").strip(),
        )


def _live_topology(result: TraceResult) -> picture.Topology | None:
    try:
        return picture.read_topology(picture.trace_namespaces(result))
    except NstraceError as err:
        log.warning("no topology for the report: %s", err)
        return None


def _probe_label(probe: Any) -> str:
    text = f"nstrace ping {probe.src} {probe.dst}"
    if getattr(probe, "proto", "icmp") != "icmp":
        text += f" --proto {probe.proto}"
    if getattr(probe, "port", None):
        text += f" --port {probe.port}"
    return text


# ---- the page ----------------------------------------------------------------

STYLE = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 0;
  color: #1d2330; background: #ffffff; line-height: 1.4; }
header, section { padding: 12px 24px; }
header { background: #f3f6fa; border-bottom: 1px solid #c9d3df; }
h1 { font-size: 22px; margin: 4px 0; }
h2 { font-size: 19px; margin: 8px 0; border-bottom: 2px solid #1f6fd1; }
h3 { font-size: 15px; margin: 14px 0 6px; font-family: "DejaVu Sans Mono", monospace; }
nav a { margin-right: 12px; }
pre { background: #f6f8fa; border: 1px solid #dde3ea; padding: 8px; overflow-x: auto; }
.outcome { font-weight: bold; padding: 1px 8px; border-radius: 4px; color: #fff; }
.outcome.reply { background: #1a7f37; }
.outcome.bad { background: #d62728; }
.outcome.maybe { background: #b35900; }
.pictures { display: grid; grid-template-columns: 1fr; gap: 12px; }
.pictures figure { margin: 0; border: 1px solid #dde3ea; padding: 6px; }
.pictures figcaption { font-size: 13px; color: #55606e; margin-bottom: 4px; }
.pictures svg { max-width: 100%; height: auto; }
.none { color: #7a8594; font-style: italic; padding: 24px; }
.held { color: #1a7f37; } .failed { color: #d62728; font-weight: bold; }
.cause { border-left: 4px solid #d62728; padding: 2px 10px; margin: 6px 0; }
.fix code { background: #fff5d6; padding: 1px 4px; }
/* index.html#step-6 shows step 6 alone, at the top: a link to one step, and
   a page that headless Chromium screenshots without scrolling (a scrolled
   --screenshot came out blank, Chromium 156). */
body:has(section:target) > header, body:has(section:target) > section:not(:target)
  { display: none; }
"""

_BAD = ("dropped", "unreachable", "error")


def _page(scenario: str, title: str, story: str, steps: list[StepEntry]) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = " ".join(f'<a href="#step-{s.number}">step {s.number}</a>' for s in steps)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>nstrace: {_e(scenario)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<header><h1>{_e(title)}</h1>",
        f"<p>{_e(story)}</p>" if story else "",
        f"<p>scenario <b>{_e(scenario)}</b>, traced {stamp} by nstrace</p>",
        f"<nav>{nav}</nav></header>",
    ]
    parts.extend(_step_html(step) for step in steps)
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p) + "\n"


def _step_html(step: StepEntry) -> str:
    out = [
        f'<section id="step-{step.number}">',
        f"<h2>Step {step.number}: {_e(step.title)}</h2>",
    ]
    if step.story:
        out.append(f"<p>{_e(step.story)}</p>")
    if step.commands:
        out.append("<pre>" + "\n".join(_e(c) for c in step.commands) + "</pre>")
    else:
        out.append("<p><i>no commands: the lab as the step before left it</i></p>")
    for index, probe in enumerate(step.probes):
        out.append(_probe_html(probe, f"s{step.number}p{index}"))
    out.append("</section>")
    return "\n".join(out)


def _probe_html(entry: ProbeEntry, ident: str) -> str:
    after = _as_result(entry.after)
    outcome = after.outcome
    kind = "reply" if outcome == "reply" else "bad" if outcome in _BAD else "maybe"
    out = [
        f'<h3>$ {_e(entry.label)} <span class="outcome {kind}">{_e(outcome)}</span></h3>',
        f"<p>{_e(_outcome_text(after))}</p>",
    ]
    if entry.verdicts:
        out.append("<ul>")
        for text, held in entry.verdicts:
            mark = (
                '<span class="held">holds</span>'
                if held
                else ('<span class="failed">FAILED</span>')
            )
            out.append(f"<li>expect {_e(text)}: {mark}</li>")
        out.append("</ul>")
    before_caption = (
        f"before: at step {entry.before_step}"
        if entry.before_step is not None
        else "before"
    )
    out.append('<div class="pictures">')
    out.append(
        _figure(entry.before, entry.before_topology, before_caption, ident + "b")
    )
    out.append(_figure(entry.after, entry.after_topology, "after", ident + "a"))
    out.append("</div>")
    out.append(_changes_html(entry))
    causes = entry.causes if entry.causes is not None else after.causes
    out.append(_causes_html(causes))
    return "\n".join(out)


def _figure(
    result: TraceResult | dict[str, Any] | None,
    topology: picture.Topology | None,
    caption: str,
    ident: str,
) -> str:
    if result is None:
        body = '<div class="none">not traced before this step</div>'
    else:
        try:
            body = inline_svg(picture.draw(result, topology, "svg"), ident)
        except NstraceError as err:
            body = f'<div class="none">no picture: {_e(err)}</div>'
    return f"<figure><figcaption>{_e(caption)}</figcaption>{body}</figure>"


def _changes_html(entry: ProbeEntry) -> str:
    if entry.before is None:
        return ""
    if not entry.changes:
        return "<p><b>What changed:</b> nothing in the path.</p>"
    items = "".join(f"<li>{_e(line)}</li>" for line in entry.changes)
    return f"<p><b>What changed:</b></p><ul>{items}</ul>"


def _causes_html(causes: list[dict[str, Any]]) -> str:
    out = []
    for cause in causes:
        evidence = "".join(f"<li>{_e(e)}</li>" for e in cause.get("evidence", []))
        fix = cause.get("fix")
        out.append(
            '<div class="cause">'
            f"<p><b>Why:</b> {_e(cause.get('summary') or cause.get('code'))}</p>"
            + (f"<ul>{evidence}</ul>" if evidence else "")
            + (f'<p class="fix"><b>Fix:</b> <code>{_e(fix)}</code></p>' if fix else "")
            + "</div>"
        )
    return "\n".join(out)


def _outcome_text(result: TraceResult) -> str:
    from tracer import render

    return render.outcome_line(result).plain


def _as_result(result: TraceResult | dict[str, Any]) -> TraceResult:
    return result if isinstance(result, TraceResult) else TraceResult.from_json(result)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


_PROLOG = re.compile(r"<\?xml.*?\?>|<!DOCTYPE.*?>|<!--.*?-->", re.DOTALL)
_ID = re.compile(r'\bid="([^"]*)"')


def inline_svg(svg: bytes, prefix: str) -> str:
    """Graphviz's SVG made fit to sit inside HTML, its ids made unique by *prefix*."""
    text = _PROLOG.sub("", svg.decode("utf-8")).strip()
    return _ID.sub(lambda m: f'id="{prefix}-{m.group(1)}"', text)
