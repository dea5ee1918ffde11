"""Two `nstrace ping` at the same time in one lab each get their own result.

Each run loads its own BPF object (its own config map and ring buffer) and
tags its probe with an identifier of its own, so neither may see, or be
stopped by, the other's packets.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from reliability.leftovers import kill_quietly, start

pytestmark = [pytest.mark.root, pytest.mark.lab]


def together(*pings: tuple[str, str]) -> list[tuple[int, dict[str, Any]]]:
    """Start every ping before waiting for any; exit codes and JSON documents."""
    children: list[subprocess.Popen[str]] = []
    try:
        for src, dst in pings:
            children.append(start("ping", src, dst, "--json"))
        done = []
        for child in children:
            out, err = child.communicate(timeout=60)
            assert child.returncode in (0, 1), err
            done.append((child.returncode, json.loads(out)))
        return done
    finally:
        for child in children:
            kill_quietly(child)


def addresses(result: dict[str, Any]) -> set[str]:
    return {
        hop[key] for hop in result["hops"] for key in ("src", "dst") if hop.get(key)
    }


def requests_sent(result: dict[str, Any]) -> int:
    """Echo requests that left the source namespace: one, unless another's leaked in."""
    src = result["probe"]["src_netns"]
    return sum(
        1
        for hop in result["hops"]
        if (hop["netns"], hop["event"], hop["dir"]) == (src, "tx", "request")
    )


@pytest.mark.parametrize("attempt", range(3))
def test_a_drop_and_a_reply_at_once(lab, attempt):
    lab.goto(6)
    (drop_code, dropped), (reply_code, replied) = together(
        ("RED", "8.8.8.8"), ("BLUE", "11.11.11.2")
    )
    assert (drop_code, dropped["outcome"]) == (1, "dropped")
    assert dropped["drop"]["hook"] == "FORWARD" and dropped["drop"]["dir"] == "reply"
    assert (reply_code, replied["outcome"]) == (0, "reply")
    assert replied["drop"] is None
    assert dropped["probe"]["id"] != replied["probe"]["id"]
    assert addresses(dropped) <= {"11.11.11.2", "8.8.8.8", "10.0.2.15"}
    # 11.11.11.1: from step 5 on, MASQUERADE also rewrites bridged frames
    # (br_netfilter hands them to the host's POSTROUTING).
    assert addresses(replied) <= {"11.11.11.1", "11.11.11.2", "11.11.11.3"}
    assert requests_sent(dropped) == requests_sent(replied) == 1


def test_the_same_ping_twice_at_once(lab):
    lab.goto(6)
    results = together(("RED", "8.8.8.8"), ("RED", "8.8.8.8"))
    for code, result in results:
        assert (code, result["outcome"]) == (1, "dropped")
        assert (result["drop"]["netns"], result["drop"]["hook"]) == ("host", "FORWARD")
        assert requests_sent(result) == 1
    assert results[0][1]["probe"]["id"] != results[1][1]["probe"]["id"]
