"""The `lab` fixture that other root tests use, used the way they use it."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.root, pytest.mark.lab]


def test_goto_forward_backward_and_fresh(lab) -> None:
    assert lab.goto(3).step == 3
    assert lab.ping("RED", "192.168.104.2") == "unreachable"
    assert lab.goto(7).step == 7
    assert lab.ping("BLUE", "8.8.8.8") == "reply"
    assert lab.goto(2).step == 2
    assert lab.ping("RED", "11.11.11.1") == "reply"

    lab.run("host", ["ip", "link", "set", "br0", "down"])
    assert lab.goto(2).step == 2  # the same step: left as it is
    assert lab.ping("RED", "11.11.11.1") == "no-reply"
    assert lab.goto(2, fresh=True).step == 2
    assert lab.ping("RED", "11.11.11.1") == "reply"


def test_run_fails_the_test_on_a_failed_command(lab) -> None:
    lab.goto(0)
    assert lab.run("host", ["ip", "link", "show", "nosuch"], check=False).returncode
    with pytest.raises(pytest.fail.Exception, match="host: `ip link show nosuch`"):
        lab.run("host", ["ip", "link", "show", "nosuch"])
