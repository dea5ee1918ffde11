"""pytest plugin: build a scenario's lab and grade it with real traces.

Installed with nstrace (the ``pytest11`` entry point in pyproject.toml), it
gives tests the ``nslab`` fixture: the lab of a scenario, built in network
namespaces of its own (root only), moved to a step, and probed with the same
tracer as `nstrace ping`. A lab author grades a student's setup like this::

    import pytest

    @pytest.mark.nslab("tutorial", step=6)
    def test_reply_comes_back_through_forward(nslab):
        nslab.run("host", "iptables -t filter -A FORWARD -d 11.11.11.0/24 -j ACCEPT")
        trace = nslab.ping("RED", "8.8.8.8")
        assert trace.outcome == "reply"
        assert trace.crossed("host", "FORWARD", "reply")
        trace.expect(nat=[{"netns": "host", "hook": "POSTROUTING", "field": "src"}])

The marker names the scenario (a name in scenarios/ or a YAML path; default
the ``nslab_scenario`` ini option, else ``tutorial``) and the step. The lab
stays up between tests and moves forward by applying steps; a test that
changed it with :meth:`NsLab.run` leaves it to be torn down after the test,
so that no other test sees the change. Everything comes down at the end of
the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

DEFAULT_SCENARIO = "tutorial"


class Trace:
    """One traced probe, with questions a grader asks about its path.

    ``result`` is the :class:`tracer.path.TraceResult` (``result.to_json()``
    is what `nstrace ping --json` prints). The repr lists the outcome and the
    hooks crossed, so that a failed ``assert`` shows what happened.
    """

    def __init__(self, result: Any) -> None:
        self.result = result

    @property
    def outcome(self) -> str:
        return self.result.outcome

    @property
    def drop(self) -> dict[str, Any] | None:
        return self.result.drop

    @property
    def nat(self) -> list[dict[str, Any]]:
        return self.result.nat

    @property
    def causes(self) -> list[dict[str, Any]]:
        return self.result.causes

    def crossed(
        self, netns: str, hook: str, dir: str | None = None, family: str = "ip"
    ) -> bool:
        """Whether the packet got through *hook* in *netns* (in direction *dir*)."""
        from tracer import diff

        return any(
            (c.netns, c.hook, c.family) == (netns, hook.upper(), family)
            and dir in (None, c.dir)
            for c in diff.crossings(self.result)
        )

    def reached(self, netns: str, dir: str | None = None) -> bool:
        """Whether the request or the reply (*dir*) was seen in *netns*."""
        from tracer import diff

        return any(
            ns == netns and dir in (None, d) for ns, d in diff.reached(self.result)
        )

    def dropped_at(self, netns: str, hook: str | None = None, **match: str) -> bool:
        """Whether the packet died in *netns* (at *hook*; dir=, reason= also)."""
        drop = self.result.drop or {}
        wanted = {"netns": netns, **match}
        if hook is not None:
            wanted["hook"] = hook.upper()
        return bool(drop) and all(drop.get(k) == v for k, v in wanted.items())

    def rewrote(self, field: str, netns: str | None = None, **match: str) -> bool:
        """Whether NAT rewrote *field* (src or dst); hook=, dir=, to= narrow it.

        ``from`` is a keyword in Python: give it as ``**{"from": "10.0.2.15"}``.
        """
        wanted = {"field": field, **match}
        if netns is not None:
            wanted["netns"] = netns
        return any(
            all(entry.get(k) == v for k, v in wanted.items())
            for entry in self.result.nat
        )

    def has_cause(self, code: str, netns: str | None = None) -> bool:
        return any(
            c.get("code") == code and netns in (None, c.get("netns"))
            for c in self.result.causes
        )

    def expect(self, **expectation: Any) -> Trace:
        """Assert scenario expectations (the keys of scenarios/README.md).

        Raises AssertionError naming each expectation that did not hold and
        what was seen instead; returns the trace for chaining.
        """
        from tracer import check, scenario

        for key, value in expectation.items():
            if key not in scenario.EXPECT_KEYS:
                known = ", ".join(scenario.EXPECT_KEYS)
                raise TypeError(f"unknown expectation {key!r} (known: {known})")
            problem = scenario.EXPECT_KEYS[key](value)
            if problem:
                raise TypeError(f"expectation {key} {problem}")
        failed = [v for v in check.evaluate(expectation, self.result) if not v.held]
        if failed:
            lines = [f"expected {v.key} {v.expected}, saw {v.seen}" for v in failed]
            raise AssertionError(f"{self!r}: " + "; ".join(lines))
        return self

    def __repr__(self) -> str:
        from tracer import diff

        probe = self.result.probe
        hooks = ", ".join(map(str, diff.crossings(self.result))) or "none"
        where = f" at {diff.describe_drop(self.drop)}" if self.drop else ""
        return (
            f"<trace {probe.src_netns} -> {probe.dst}: {self.outcome}{where}; "
            f"crossed: {hooks}>"
        )


class NsLab:
    """A scenario's lab for one test: move it, change it, probe it."""

    def __init__(self, scenario_name: str) -> None:
        from tracer import scenario

        self.scenario = scenario.load(scenario_name)
        self.dirty = False  # changed by run(): torn down after the test

    def goto(self, step: int, fresh: bool = False) -> NsLab:
        """Bring the lab to *step* (rebuilt if *fresh* or changed by run())."""
        from tracer import check, lab

        if fresh or self.dirty:
            lab.down()
            self.dirty = False
        lab.goto(self.scenario, step)
        check.settle(self.scenario.namespaces)
        return self

    @property
    def step(self) -> int | None:
        from tracer import lab

        state = lab.current()
        return state.step if state and state.matches(self.scenario) else None

    def run(self, netns: str, command: str) -> str:
        """Run a lab command (as a scenario writes it) in *netns*; its stdout.

        The scenario's rules apply (ip, iptables, nft, sysctl; only the lab's
        namespaces). A command that fails fails the test.
        """
        from tracer import check, lab, scenario

        parsed = scenario.command(self.scenario, netns, command)
        self.dirty = True
        done = lab.run_in_lab(parsed.netns, parsed.argv)
        if done.returncode != 0:
            pytest.fail(f"{parsed}: exited {done.returncode}: {done.stderr.strip()}")
        check.settle(self.scenario.namespaces)
        return done.stdout

    def ping(
        self,
        src: str,
        dst: str,
        proto: str = "icmp",
        port: int | None = None,
        timeout: float = 1.0,
    ) -> Trace:
        """Trace one probe from *src* to *dst* (an address or a namespace)."""
        from tracer import check, scenario

        probe = scenario.Probe(src, dst, {}, proto, port)
        return Trace(check.trace_probe(probe, timeout))

    def check_step(self, step: int | None = None) -> list[Trace]:
        """Trace the probes of *step* (default: the current one) and assert
        every expectation the scenario gives them; return their traces."""
        from tracer import check

        if step is not None:
            self.goto(step)
        if self.step is None:
            raise RuntimeError("the lab is not up: call nslab.goto(step) first")
        current = self.scenario.step(self.step)
        traces, failed = [], []
        for probe in current.probes:
            result = check.trace_probe(probe)
            verdicts = check.evaluate(probe.expect, result)
            run = check.ProbeRun(current, probe, result, verdicts)
            failed += [check.failure_line(run, v) for v in verdicts if not v.held]
            traces.append(Trace(result))
        if failed:
            raise AssertionError("\n".join(failed))
        return traces


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "nslab_scenario",
        "scenario the nslab fixture builds when the nslab marker names none",
        default=DEFAULT_SCENARIO,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "nslab(scenario=None, step=None): the scenario and step the nslab "
        "fixture builds (nstrace)",
    )


@pytest.fixture(scope="session")
def _nslab_session() -> Iterator[dict[str, NsLab]]:
    labs: dict[str, NsLab] = {}
    try:
        yield labs
    finally:
        if labs:
            from tracer import lab

            lab.down()


@pytest.fixture
def nslab(
    request: pytest.FixtureRequest, _nslab_session: dict[str, NsLab]
) -> Iterator[NsLab]:
    """The lab of the marker's scenario at the marker's step (root only)."""
    if os.geteuid() != 0:
        pytest.skip("nslab builds network namespaces and traces with eBPF: needs root")
    marker = request.node.get_closest_marker("nslab")
    args = dict(marker.kwargs) if marker else {}
    if marker and marker.args:
        args.setdefault("scenario", marker.args[0])
    name = args.get("scenario") or request.config.getini("nslab_scenario")
    if name not in _nslab_session:
        _nslab_session[name] = NsLab(name)
    current = _nslab_session[name]
    if args.get("step") is not None:
        current.goto(args["step"])
    try:
        yield current
    finally:
        if current.dirty:
            from tracer import lab

            lab.down()
            current.dirty = False
