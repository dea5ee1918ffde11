"""Before and after, without root: kernel recordings of tutorial steps 5-7."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from tests.cli_helpers import nstrace
from tracer import diff

from .helpers import recorded, with_causes


def test_step6_to_7_the_reply_crosses_forward_and_reaches_red():
    change = diff.compare(recorded(6), recorded(7))
    lines = change.changes()
    assert lines[0] == "outcome: dropped -> reply"
    assert (
        "no longer dropped at host FORWARD, reply direction (NETFILTER_DROP)" in lines
    )
    assert "now crosses host FORWARD reply" in lines
    assert "the reply now reaches RED" in lines
    assert diff.Crossing("host", "FORWARD", "reply") in change.crossed_new
    assert not change.crossed_gone and not change.nat_new and not change.nat_gone


def test_step5_to_6_masquerade_appears():
    change = diff.compare(recorded(5), recorded(6))
    assert [(e["hook"], e["field"], e["from"], e["to"]) for e in change.nat_new] == [
        ("POSTROUTING", "src", "11.11.11.2", "10.0.2.15"),
        ("PREROUTING", "dst", "10.0.2.15", "11.11.11.2"),
    ]
    assert (
        "NAT appeared: host POSTROUTING rewrites the request's source "
        "11.11.11.2 -> 10.0.2.15"
    ) in change.changes()
    assert "now dropped at host FORWARD, reply direction (NETFILTER_DROP)" in (
        change.changes()
    )


def test_backwards_everything_vanishes():
    lines = diff.compare(recorded(7), recorded(5)).changes()
    assert "no longer crosses host FORWARD reply" in lines
    assert "the reply no longer reaches RED" in lines
    assert any(line.startswith("NAT vanished: host POSTROUTING") for line in lines)


def test_same_trace_is_unchanged_and_first_trace_has_a_summary():
    assert diff.compare(recorded(6), recorded(6)).unchanged
    first = diff.compare(None, recorded(6))
    assert first.changes() == [] and not first.unchanged
    summary = diff.summary_lines(recorded(6))
    assert summary[0] == "the request went through RED -> host -> internet"
    assert "dropped at host FORWARD, reply direction (NETFILTER_DROP)" in summary


def test_the_cause_that_went_away():
    cause = {"code": "filter-drop", "netns": "host", "summary": "policy DROP"}
    change = diff.compare(with_causes(recorded(6), cause), recorded(7))
    assert change.causes_gone == [cause]
    assert "cause gone: filter-drop in host: policy DROP" in change.changes()


def test_a_moved_drop():
    before = recorded(6)
    after = replace(before, drop={**before.drop, "netns": "RED", "hook": "INPUT"})
    (line,) = [x for x in diff.compare(before, after).changes() if "drop" in x]
    assert line == (
        "the drop moved: host FORWARD, reply direction (NETFILTER_DROP) -> "
        "RED INPUT, reply direction (NETFILTER_DROP)"
    )


def test_crossings_without_hops_come_from_hooks_hit():
    result = replace(recorded(6), hops=[])
    crossed = diff.crossings(result)
    assert diff.Crossing("host", "FORWARD", "request") in crossed
    assert diff.Crossing("host", "FORWARD", "reply") not in crossed  # died there


# ---- nstrace diff ----------------------------------------------------------


def save(tmp_path: Path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_nstrace_diff_of_two_saved_results(tmp_path: Path):
    before = save(tmp_path, "step6.json", recorded(6).to_json())
    after = save(tmp_path, "step7.json", recorded(7).to_json())
    done = nstrace("diff", before, after)
    assert done.returncode == 1, done.stderr  # something changed, as diff(1)
    assert "outcome: dropped -> reply" in done.stdout
    assert "now crosses host FORWARD reply" in done.stdout
    data = json.loads(nstrace("diff", before, after, "--json").stdout)
    assert {"netns": "host", "hook": "FORWARD", "dir": "reply", "family": "ip"} in (
        data["crossed_new"]
    )
    same = nstrace("diff", before, before)
    assert same.returncode == 0
    assert "nothing changed" in same.stdout


BAD_FILES = {
    "not json": ("{oops", r"bad\.json:1: not JSON"),
    "a list": ("[]", r"not an nstrace result \(expected a JSON object\)"),
    "old schema": ({"schema": 0}, r"trace has schema 0"),
    "no outcome": ({"schema": 1, "probe": {}}, r"it has no 'outcome'"),
    "bad hop": (
        {
            "schema": 1,
            "probe": {"src_netns": "RED", "dst": "8.8.8.8"},
            "outcome": "reply",
            "hops": [{"netns": "RED"}],
        },
        r"hops item 1 has no 'dir'",
    ),
    "bad outcome": (
        {
            "schema": 1,
            "probe": {"src_netns": "RED", "dst": "8.8.8.8"},
            "outcome": "maybe",
        },
        r"unknown outcome 'maybe'",
    ),
}


@pytest.mark.parametrize(("content", "message"), BAD_FILES.values(), ids=BAD_FILES)
def test_nstrace_diff_bad_file_is_a_one_line_error(tmp_path: Path, content, message):
    good = save(tmp_path, "good.json", recorded(7).to_json())
    done = nstrace("diff", good, save(tmp_path, "bad.json", content))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr


def test_nstrace_diff_missing_file_and_different_probes(tmp_path: Path):
    good = save(tmp_path, "good.json", recorded(7).to_json())
    missing = nstrace("diff", good, str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "nope.json: cannot read it" in missing.stderr
    other = recorded(7).to_json()
    other["probe"]["dst"] = "1.1.1.1"
    done = nstrace("diff", good, save(tmp_path, "other.json", other))
    assert done.returncode == 2
    assert "different probes" in done.stderr


def test_namespaces_nstrace_cannot_name_are_not_reached():
    result = recorded(7)
    stray = {**result.hops[0], "netns": "netns:4026532311", "dir": "request"}
    assert ("netns:4026532311", "request") not in diff.reached(
        replace(result, hops=[*result.hops, stray])
    )


def test_a_flooded_copy_is_not_a_namespace_reached():
    result = recorded(7)
    base = {**result.hops[0], "netns": "BLUE", "dir": "request"}
    flooded = [
        {**base, "event": "rx"},
        {**base, "event": "free", "reason": "OTHERHOST"},
    ]
    assert ("BLUE", "request") not in diff.reached(
        replace(result, hops=[*result.hops, *flooded])
    )
    sent_on = [*flooded, {**base, "event": "tx"}]
    assert ("BLUE", "request") in diff.reached(
        replace(result, hops=[*result.hops, *sent_on])
    )
