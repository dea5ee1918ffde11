"""TCP and UDP probes (`--proto tcp|udp --port N`) on the tutorial's lab.

A SYN-ACK is a reply; a reset or an ICMP port unreachable means nobody
listens (outcome `unreachable`). The listener is a real socket in the lab's
internet namespace, behind the host's MASQUERADE.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from cli_helpers import hops, nstrace, ping_json

pytestmark = pytest.mark.root

LISTENER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
time.sleep(30)
"""


@pytest.fixture
def tcp_listener(lab) -> Iterator[int]:
    lab.goto(7)
    port = 8080
    proc = subprocess.Popen(
        ["ip", "netns", "exec", "internet", sys.executable, "-c", LISTENER, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "listening"
        yield port
    finally:
        proc.kill()
        proc.communicate()


def test_tcp_syn_ack_is_a_reply_through_masquerade(tcp_listener):
    result = ping_json("RED", "8.8.8.8", "--proto", "tcp", "--port", str(tcp_listener))
    assert result["outcome"] == "reply"
    assert result["drop"] is None
    assert result["probe"]["dport"] == tcp_listener
    syn_ack = hops(result, netns="RED", event="rx", dir="reply")
    assert syn_ack and syn_ack[0]["tcp_flags"] == "SYN-ACK"
    assert syn_ack[0]["sport"] == tcp_listener
    nat = [(n["hook"], n["dir"], n["field"]) for n in result["nat"]]
    assert ("POSTROUTING", "request", "src") in nat


def test_tcp_to_closed_port_is_unreachable_by_reset(lab):
    lab.goto(7)
    started = time.monotonic()
    args = ("--proto", "tcp", "--port", "9", "--timeout", "20")
    result = ping_json("RED", "8.8.8.8", *args)
    assert result["outcome"] == "unreachable"
    resets = hops(result, netns="RED", event="rx", dir="reply")
    assert resets and "RST" in resets[0]["tcp_flags"]
    # The reset is the verdict: nstrace does not wait out its 20 s timeout.
    assert time.monotonic() - started < 10


def test_udp_to_closed_port_is_unreachable_by_icmp(lab):
    lab.goto(7)
    result = ping_json("RED", "8.8.8.8", "--proto", "udp", "--port", "53")
    assert result["outcome"] == "unreachable"
    errors = [hop for hop in result["hops"] if hop.get("icmp_error")]
    assert errors and errors[0]["icmp_error"]["code"] == 3  # port unreachable


def test_udp_without_route_is_refused_before_sending(lab):
    lab.goto(3)
    result = ping_json("RED", "192.168.104.2", "--proto", "udp", "--port", "53")
    assert result["outcome"] == "unreachable"
    assert hops(result, netns="RED", event="route")
    assert not hops(result, event="tx")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--proto", "tcp"], "needs a destination port"),
        (["--port", "80"], "--port applies to tcp and udp"),
        (["--proto", "tcp", "--port", "70000"], "out of range"),
        (["--proto", "sctp", "--port", "80"], "unknown protocol"),
    ],
)
def test_bad_port_arguments_are_one_line_errors(args, message):
    done = nstrace("ping", "RED", "8.8.8.8", *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.count("\n") == 1
