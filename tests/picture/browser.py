"""Headless Chromium for the report's tests: load a page, screenshot it.

Chromium (Debian's `chromium`) runs with a fresh profile, no sandbox (the
tests run as root, where Chromium refuses its sandbox), and nothing that
phones home. With `--enable-logging=stderr --v=0` every console message of
the page, `console.error` and uncaught exceptions included, is printed as an
`INFO:CONSOLE` line; the report has no script, so any such line is a fault.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

TIMEOUT_S = 90
CONSOLE = re.compile(r":CONSOLE(?:\(\d+\))?[:\]]")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-logging=stderr",
    "--v=0",
)


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "chromium is not installed: run scripts/install-deps.sh"
    return path


def run(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="nstrace-chromium-") as profile:
        return subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, url],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )


def console_lines(stderr: str) -> list[str]:
    """The page's console messages in Chromium's log."""
    return [line for line in stderr.splitlines() if CONSOLE.search(line)]


def dump_dom(page: Path) -> tuple[str, list[str]]:
    """The DOM after load, and the console messages printed on the way."""
    done = run(page.resolve().as_uri(), "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, console_lines(done.stderr)


def screenshot(page: Path, fragment: str, target: Path) -> list[str]:
    """Screenshot *page*#*fragment* at 1200x900 into *target*; console lines."""
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    done = run(url, f"--screenshot={target}", "--window-size=1200,900")
    assert done.returncode == 0, done.stderr[-2000:]
    assert target.exists(), "chromium wrote no screenshot"
    return console_lines(done.stderr)
