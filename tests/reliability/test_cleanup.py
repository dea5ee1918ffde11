"""Whatever ends `nstrace ping` or `nstrace watch`, nothing of nstrace stays.

kill -9 runs no cleanup code at all: the kernel must release the probes'
programs, links and maps with the last descriptor, and the nftables tables
with the netlink socket that owns them. SIGINT and SIGTERM go through
nstrace's own cleanup and must end with the same result, and without a
traceback. Each run sends one probe to 8.8.8.8 at step 5, which gets no reply
and is not dropped, so `nstrace ping --timeout 5` is still waiting when the
signal comes.
"""

from __future__ import annotations

import json
import signal

import pytest

from reliability.leftovers import (
    kill_quietly,
    netfilter_links,
    nstrace_tables,
    start,
    wait_for,
    wait_for_no_leftovers,
    wait_until_attached,
)

pytestmark = [pytest.mark.root, pytest.mark.lab]

PING = ("ping", "RED", "8.8.8.8", "--timeout", "5")
WATCH = ("watch", "--host", "8.8.8.8")


def run_and_signal(
    args: tuple[str, ...], signum: int, lab: object = None
) -> tuple[dict, dict, tuple]:
    """Start nstrace, wait for its probes, signal it; what it held and printed.

    The tables that exist while it runs are added to what it held, under
    "tables", so that a test can see that there was something to remove. A
    watch links its hook programs once its flow shows up: given *lab*, one
    ping to 8.8.8.8 makes it link them, and they are counted under
    "netfilter".
    """
    before = nstrace_tables()
    child = start(*args)
    try:
        held = wait_until_attached(child)
        if lab is not None:
            lab.ping("RED", "8.8.8.8")
            assert wait_for(lambda: netfilter_links(child.pid) > 0)
            held = wait_until_attached(child)
        held["netfilter"] = netfilter_links(child.pid)
        held["tables"] = {
            ns: [name for name in names if name not in before.get(ns, [])]
            for ns, names in nstrace_tables().items()
        }
        child.send_signal(signum)
        out, err = child.communicate(timeout=20)
    finally:
        kill_quietly(child)
    return held, before, (child.returncode, out, err)


@pytest.mark.parametrize("args", [PING, WATCH], ids=["ping", "watch"])
def test_kill_9_leaves_no_program_link_map_or_table(lab, args):
    lab.goto(5)
    held, before, (code, _out, _err) = run_and_signal(
        args, signal.SIGKILL, lab if args == WATCH else None
    )
    assert code == -signal.SIGKILL
    assert held["prog"] and held["link"] and held["netfilter"]
    if args == PING:  # rule attribution: owner tables in every lab namespace
        assert held["tables"].get("RED"), held["tables"]
    assert wait_for_no_leftovers(held, before) == {}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_ping_interrupted_ends_cleanly(lab, signum):
    lab.goto(5)
    held, before, (code, out, err) = run_and_signal(PING, signum)
    assert code == 130, err
    assert err.strip() == "nstrace: interrupted"
    assert out == ""
    assert wait_for_no_leftovers(held, before) == {}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_watch_interrupted_ends_cleanly_with_a_summary(lab, signum):
    lab.goto(5)
    before = nstrace_tables()
    child = start(*WATCH, "--json")
    try:
        assert child.stderr.readline().startswith("watching host 8.8.8.8")
        held = wait_until_attached(child)
        lab.ping("RED", "8.8.8.8")  # a packet for the watch to see meanwhile
        child.send_signal(signum)
        out, err = child.communicate(timeout=20)
    finally:
        kill_quietly(child)
    assert child.returncode == 0, err
    assert "Traceback" not in err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1]["summary"] is True
    assert lines[-1]["lost_events"] == 0
    hops = [hop for hop in lines[:-1] if hop.get("event") in ("rx", "tx", "hook")]
    assert hops and all("8.8.8.8" in (hop["src"], hop["dst"]) for hop in hops)
    assert {hop["netns"] for hop in hops} >= {"RED", "host"}
    assert wait_for_no_leftovers(held, before) == {}


def test_ping_interrupted_in_the_same_way_twice_gives_the_same_result(lab):
    # SIGINT and SIGTERM are one path: compare them directly.
    lab.goto(5)
    results = [
        run_and_signal(PING, signum)[2] for signum in (signal.SIGINT, signal.SIGTERM)
    ]
    assert results[0] == results[1]


def test_a_ping_that_ends_normally_leaves_nothing(lab):
    lab.goto(5)
    before = nstrace_tables()
    child = start("ping", "RED", "8.8.8.8", "--timeout", "2")
    try:
        held = wait_until_attached(child)
        child.communicate(timeout=20)
    finally:
        kill_quietly(child)
    assert child.returncode == 1
    assert wait_for_no_leftovers(held, before) == {}


def test_bpftool_sees_the_ids_that_are_checked(lab):
    # The checks above would pass vacuously if ids were read wrongly: while
    # nstrace runs, what it holds must be visible to bpftool.
    from reliability.leftovers import existing_ids

    lab.goto(5)
    child = start(*PING)
    try:
        held = wait_until_attached(child)
        alive = existing_ids()
        assert held["prog"] <= alive["prog"] and held["link"] <= alive["link"]
        assert held["map"] <= alive["map"]
    finally:
        kill_quietly(child)
