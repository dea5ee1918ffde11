"""`nstrace demo` (what `make demo` runs): the tutorial's story, traced."""

from __future__ import annotations

import pytest
from cli_helpers import nstrace

from tracer import lab

pytestmark = pytest.mark.root


def test_demo_tells_every_step_with_its_cause_and_fix():
    done = nstrace("demo", timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    out = done.stdout
    for step in range(8):
        assert f"step {step}:" in out
    # The four failing steps end in the fix LAB.md gives for each.
    for fix in (
        "fix: ip addr add 11.11.11.1/24 dev br0",
        "fix: ip route add default via 11.11.11.1",
        "fix: iptables -t nat -A POSTROUTING -s 11.11.11.0/24 -j MASQUERADE",
        "fix: iptables -t filter -A FORWARD -d 11.11.11.0/24 -j ACCEPT",
    ):
        assert fix in out
    assert out.rstrip().endswith("Every step turned out as the tutorial says.")
    # The demo takes its lab down unless asked to keep it.
    assert not lab.status()["namespaces"]
