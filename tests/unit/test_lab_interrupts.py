"""A signal that comes while the lab runs a command waits for the command.

Otherwise an `ip netns add` cut off inside subprocess.Popen went on alone and
made its namespace after the teardown had looked for it (tracer/lab.py,
_interrupts_held).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tracer import lab


class Interrupted(Exception):
    pass


def _interrupt(_signum: int, _frame: object) -> None:
    raise Interrupted


def test_sigterm_during_a_command_comes_after_it_has_run_whole(tmp_path: Path):
    done = tmp_path / "done"
    previous = signal.signal(signal.SIGTERM, _interrupt)
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        started = time.monotonic()
        timer.start()
        with pytest.raises(Interrupted):
            lab._run(["sh", "-c", f"sleep 0.3; echo yes > {done}"])
        took = time.monotonic() - started
        # The handler the command found is back in place.
        assert signal.getsignal(signal.SIGTERM) is _interrupt
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert done.read_text() == "yes\n"  # not killed half way
    assert took >= 0.3


def test_no_signal_no_interruption():
    assert lab._run(["true"]).returncode == 0
