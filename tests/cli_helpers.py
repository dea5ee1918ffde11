"""Helpers for tests that run the real `nstrace` command and read its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def nstrace(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ping_json(src: str, dst: str, *args: str) -> dict[str, Any]:
    """`nstrace ping SRC DST ARGS --json`, its exit code checked against the outcome."""
    done = nstrace("ping", src, dst, *args, "--json")
    assert done.returncode in (0, 1), done.stderr
    result = json.loads(done.stdout)
    assert done.returncode == (0 if result["outcome"] == "reply" else 1)
    return result


def hooks(result: dict[str, Any], netns: str, direction: str) -> list[str]:
    return [
        hit["hook"]
        for hit in result["hooks_hit"]
        if hit["netns"] == netns and hit["dir"] == direction and hit["family"] == "ip"
    ]


def hops(result: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [
        hop
        for hop in result["hops"]
        if all(hop.get(key) == value for key, value in match.items())
    ]
