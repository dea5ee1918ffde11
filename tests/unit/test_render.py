"""The text rendering: what a person reads in a terminal."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from eventkit import (
    ECHO_REPLY,
    PROBE,
    Clock,
    free,
    icmp,
    request_to_internet,
    route,
    step6_events,
    step7_events,
)
from rich.console import Console

from tracer import events as ev
from tracer.events import Event
from tracer.path import Probe, TraceResult, assemble, load_recording
from tracer.render import console, header, render_text, shown_hops

DATA = Path(__file__).parent.parent / "data"


def text_of(result: TraceResult, width: int = 100, full: bool = False) -> str:
    out = Console(record=True, width=width, file=io.StringIO())
    render_text(result, out, full=full)
    return out.export_text()


def lines_of(result: TraceResult, width: int = 100) -> list[str]:
    return text_of(result, width).splitlines()


def line_with(lines: list[str], needle: str) -> str:
    found = [line for line in lines if needle in line]
    assert len(found) == 1, (needle, found)
    return found[0]


@pytest.fixture
def step6() -> TraceResult:
    return assemble(PROBE, step6_events(), timeout_s=1.0)


def test_header_names_source_destination_and_id(step6):
    assert lines_of(step6)[0] == "RED -> 8.8.8.8 icmp id 0x1a2b"


def test_header_of_a_tcp_probe_names_the_port():
    probe = Probe(src_netns="BLUE", dst="11.11.11.1", proto="tcp", dport=22)
    assert header(assemble(probe, [])) == "BLUE -> 11.11.11.1 tcp port 22"


def test_groups_follow_direction_and_namespace_in_time_order(step6):
    tops = ("├── ", "└── ")
    groups = [line[4:] for line in lines_of(step6) if line.startswith(tops)]
    assert groups == [
        "request · RED",
        "request · host",
        "request · internet",
        "reply · internet",
        "reply · host",
    ]


def test_drop_line_names_reason_hook_and_device(step6):
    line = line_with(lines_of(step6), "DROP   ")
    assert "NETFILTER_DROP" in line
    assert "at FORWARD" in line
    assert "on eth0" in line


def test_hook_that_was_not_passed_says_so(step6):
    line = line_with(lines_of(step6), "did not pass")
    assert "FORWARD" in line and "eth0 -> br0" in line


def test_nat_lines_show_both_rewrites(step6):
    lines = lines_of(step6)
    masquerade = line_with(lines, "src 11.11.11.2 -> 10.0.2.15")
    assert "POSTROUTING" in masquerade and "out eth0" in masquerade
    reverse = line_with(lines, "dst 10.0.2.15 -> 11.11.11.2")
    assert "PREROUTING" in reverse and "in eth0" in reverse


def test_route_line_with_gateway(step6):
    line_with(lines_of(step6), "route  8.8.8.8 via 10.0.2.2 dev eth0 table 254")


def test_drop_outcome_line(step6):
    assert lines_of(step6)[-1] == (
        "dropped in host at FORWARD (NETFILTER_DROP), reply direction"
    )


def test_drop_is_red_on_a_terminal(step6):
    out = Console(record=True, width=100, file=io.StringIO(), force_terminal=True)
    render_text(step6, out)
    html = out.export_html(inline_styles=True)
    drop_row = next(row for row in html.splitlines() if "NETFILTER_DROP" in row)
    assert "color: #800000" in drop_row  # rich's "red"


def test_no_colour_codes_when_not_a_terminal(step6):
    stream = io.StringIO()
    render_text(step6, Console(file=stream, width=100))
    assert "\x1b[" not in stream.getvalue()
    assert "DROP" in stream.getvalue()


def test_every_hop_fits_on_one_line_of_80_columns(step6):
    lines = text_of(step6, width=80, full=True).splitlines()
    groups = 5
    assert len(lines) == 1 + groups + len(step6.hops) + 1
    assert max(len(line) for line in lines) <= 80


def test_routine_route_and_neighbour_events_are_left_out_unless_asked():
    c = Clock()
    request = request_to_internet(c)
    first_route = next(e for e in request if e.kind == "route")
    events = [
        *request,
        replace(first_route, t_ns=c()),  # the same look-up again
        replace(first_route, t_ns=c(), table=255, gateway=None),  # "is it mine?"
        Event(
            kind="neigh",
            t_ns=c(),
            netns="host",
            dev="eth0",
            neigh_addr="10.0.2.2",
            neigh_state="REACHABLE",
        ),
        Event(
            kind="neigh",
            t_ns=c(),
            netns="host",
            dev="eth0",
            neigh_addr="10.0.2.9",
            neigh_state="FAILED",
        ),
    ]
    base = assemble(PROBE, request)
    result = assemble(PROBE, events)
    shown = shown_hops(result.hops)
    hidden_before = len(base.hops) - len(shown_hops(base.hops))
    assert len(result.hops) - len(shown) == hidden_before + 3
    assert [h["neigh"]["state"] for h in shown if h["event"] == "neigh"] == ["FAILED"]
    brief, full = text_of(result), text_of(result, full=True)
    assert f"{hidden_before + 3} routine route and neighbour events not shown" in brief
    assert "REACHABLE" in full and "REACHABLE" not in brief


def test_reply_outcome_line_gives_the_round_trip_time():
    result = assemble(PROBE, step7_events(), reply=ECHO_REPLY)
    last = lines_of(result)[-1]
    assert last.startswith("reply in ")
    assert last.endswith((" ms", " µs"))
    assert "NO_SOCKET" in line_with(lines_of(result), "(benign)")


@pytest.mark.parametrize(
    ("elapsed_ns", "expected"),
    [
        (400_000, "reply in 0.4 ms"),
        (42_000, "reply in 42 µs"),
        (250_000_000, "reply in 250 ms"),
        (None, "reply"),
    ],
)
def test_reply_duration_formats(elapsed_ns, expected):
    result = TraceResult(probe=PROBE, outcome="reply", elapsed_ns=elapsed_ns)
    assert lines_of(result)[-1] == expected


def test_no_reply_outcome_line_gives_the_timeout():
    result = assemble(PROBE, request_to_internet(Clock()), timeout_s=1.0)
    assert lines_of(result)[-1] == "no reply within 1.0 s"


def test_unreachable_before_sending():
    result = load_recording(DATA / "step3-no-route.json").assemble()
    lines = lines_of(result)
    assert lines[-1] == "unreachable: ENETUNREACH before sending"
    line_with(lines, "route  192.168.104.2: ENETUNREACH no route")


def test_unreachable_by_icmp_error_names_type_and_sender():
    reply = {"src": "10.0.2.2", "dst": "11.11.11.2", "icmp_type": 3, "icmp_code": 1}
    result = assemble(PROBE, [], reply=reply)
    assert lines_of(result)[-1] == ("unreachable: ICMP host unreachable from 10.0.2.2")


def test_route_lookup_without_match_in_a_table_is_not_an_error():
    event = route(5, "RED", "0.0.0.0", "192.168.104.2", table=255, error=-11)
    line = line_with(lines_of(assemble(PROBE, [event])), "route")
    assert "192.168.104.2: no route in table 255" in line


def test_lost_events_warning():
    result = assemble(PROBE, step6_events(), lost_events=7)
    assert "warning: 7 events were lost" in lines_of(result)[-1]
    assert not any("warning" in line for line in lines_of(assemble(PROBE, [])))


def test_error_outcome_line():
    result = TraceResult.failed(PROBE, "the ring buffer could not be read")
    assert lines_of(result)[-1] == "error: the ring buffer could not be read"


def test_names_are_not_read_as_markup():
    c = Clock()
    event = icmp(ev.RX, c(), "[bold]ns", "11.11.11.2", "8.8.8.8", dev="[red]x")
    text = text_of(assemble(PROBE, [event]))
    assert "request · [bold]ns" in text
    assert "[red]x" in text


def test_headerless_drop_renders_without_addresses():
    event = free(5, "host", "NOT_SPECIFIED", skb=1)
    line = line_with(lines_of(assemble(PROBE, [event])), "DROP")
    assert line.endswith("NOT_SPECIFIED")


def test_console_factory_turns_highlighting_off():
    assert console()._highlight is False


def test_ordinary_hops_are_not_red(step6):
    out = Console(record=True, width=100, file=io.StringIO(), force_terminal=True)
    render_text(step6, out)
    rows = out.export_html(inline_styles=True).splitlines()
    red = [row for row in rows if "color: #800000" in row]
    assert any("DROP   " in row for row in red)
    assert not any("tx     eth0" in row or "hook   OUTPUT" in row for row in red)


def test_json_rendering_does_not_load_rich() -> None:
    # `nstrace ping --json` leaves rich unloaded (render.py's docstring): a
    # fresh interpreter renders a recorded result as JSON and lists what came in.
    code = (
        "import sys\n"
        "from tracer.path import load_recording\n"
        "from tracer.render import render_json\n"
        f"recording = load_recording({str(DATA / 'kernel-step6.json')!r})\n"
        "assert render_json(recording.assemble()).startswith('{')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rich'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
