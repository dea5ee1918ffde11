"""`nstrace lab up` interrupted half way, then `nstrace lab down`, leaves nothing.

The command is stopped from outside while it is still creating namespaces or
applying steps: by Ctrl-C and SIGTERM, which run its teardown, and by kill -9,
which runs nothing and leaves the state file to `lab down`. The library-level
cases live in tests/lab/test_lab.py (a crash at a chosen command,
test_down_after_a_crash_while_creating_namespaces; `lab up` twice,
test_up_twice_at_the_same_step_is_harmless); these go through the command.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from reliability.leftovers import kill_quietly, nstrace_argv, start, wait_for
from tracer import lab, netns
from tracer.scenario import default_scenario

pytestmark = [pytest.mark.root, pytest.mark.lab]

TUTORIAL = default_scenario()


def root_links() -> list[str]:
    done = subprocess.run(
        ["ip", "-j", "link", "show"], capture_output=True, text=True, check=True
    )
    return sorted(link["ifname"] for link in json.loads(done.stdout))


def building() -> bool:
    """The lab is half built: some namespaces made, the build not finished."""
    status = lab.status()
    made = [ns for ns in TUTORIAL.namespaces if netns.exists(ns)]
    return bool(status.get("building")) and len(made) >= 2


@pytest.mark.parametrize(
    "signum",
    [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
    ids=["INT", "TERM", "KILL"],
)
def test_interrupted_up_then_down_leaves_nothing(signum):
    lab.down()
    links_before = root_links()
    child = start("lab", "up", "--step", "7")
    try:
        assert wait_for(building, 30), "the lab was never seen half built"
        child.send_signal(signum)
        _out, err = child.communicate(timeout=60)
    finally:
        kill_quietly(child)
    assert "Traceback" not in err
    if signum != signal.SIGKILL:
        assert child.returncode == 130, err
    down = subprocess.run(
        nstrace_argv("lab", "down"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert down.returncode == 0, down.stderr
    assert not [ns for ns in TUTORIAL.namespaces if netns.exists(ns)]
    assert not lab.STATE_FILE.exists()
    assert lab.status() == {"up": False, "namespaces": []}
    assert root_links() == links_before


def test_up_after_an_interrupted_up_builds_the_whole_lab():
    lab.down()
    child = start("lab", "up", "--step", "7")
    try:
        assert wait_for(building, 30)
        child.send_signal(signal.SIGKILL)
    finally:
        kill_quietly(child)
    done = subprocess.run(
        nstrace_argv("lab", "up", "--step", "7"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        assert done.returncode == 0, done.stderr
        status = lab.status()
        assert status["up"] and status["step"] == 7
        assert lab.ping("RED", "8.8.8.8") == "reply"
    finally:
        lab.down()
