"""The HTML report from saved traces, opened in headless Chromium.

No root and no lab: steps 5 and 6 of the tutorial come from the saved live
traces beside this file. tests/picture/test_picture_lab.py does the same
with `nstrace lab run tutorial --report` on the real lab.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

from tests.picture import browser, pngfile
from tracer import picture, report
from tracer.path import TraceResult
from tracer.picture import Topology

HERE = Path(__file__).parent


def saved(step: int) -> tuple[dict, Topology]:
    data = json.loads((HERE / f"step{step}-live.json").read_text())
    return data["result"], Topology.from_json(data["topology"])


def tutorial_pages(tmp_path: Path) -> Path:
    step5, topo5 = saved(5)
    step6, topo6 = saved(6)
    steps = [
        report.StepEntry(
            5,
            "RED cannot reach 8.8.8.8 (no NAT)",
            "No reply comes back.",
            probes=[report.ProbeEntry("nstrace ping RED 8.8.8.8", step5, topo5)],
        ),
        report.StepEntry(
            6,
            "MASQUERADE added, the reply is dropped",
            "The reply enters FORWARD & <nothing> accepts it.",
            ["host# iptables -t nat -A POSTROUTING -s 11.11.11.0/24 -j MASQUERADE"],
            [
                report.ProbeEntry(
                    "nstrace ping RED 8.8.8.8",
                    step6,
                    topo6,
                    step5,
                    topo5,
                    5,
                    changes=["outcome: no-reply -> dropped"],
                    causes=[
                        {
                            "code": "filter-drop",
                            "summary": "the reply was dropped by the FORWARD policy",
                            "evidence": ["host FORWARD: policy drop"],
                            "fix": "iptables -t filter -A FORWARD -d 11.11.11.0/24 -j ACCEPT",
                        }
                    ],
                    verdicts=[("outcome dropped", True)],
                )
            ],
        ),
    ]
    return report.write_report(tmp_path / "report", "tutorial", "The tutorial", steps)


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))


def test_report_is_one_self_contained_page(tmp_path: Path):
    index = tutorial_pages(tmp_path)
    assert index == tmp_path / "report" / "index.html"
    assert [p.name for p in index.parent.iterdir()] == ["index.html"]
    page = index.read_text()
    parser = Tags()
    parser.feed(page)
    tags = [tag for tag, _ in parser.tags]
    assert "script" not in tags and "link" not in tags and "img" not in tags
    links = [attrs["href"] for tag, attrs in parser.tags if "href" in attrs]
    assert links and all(link.startswith("#") for link in links)
    assert not re.search(r"url\(|@import|src=", page)
    assert tags.count("svg") == 3  # step 5 has nothing before it
    assert "not traced before this step" in page
    assert "&lt;nothing&gt;" in page  # text is escaped, not markup
    assert "iptables -t filter -A FORWARD -d 11.11.11.0/24 -j ACCEPT" in page


def test_inline_svgs_have_ids_of_their_own(tmp_path: Path):
    page = tutorial_pages(tmp_path).read_text()
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)) > 10


def test_chromium_detects_console_errors_of_a_faulty_page(tmp_path: Path):
    faulty = tmp_path / "faulty.html"
    faulty.write_text('<p>x</p><script>console.error("boom"); nothing();</script>')
    _, console = browser.dump_dom(faulty)
    assert any("boom" in line for line in console)
    assert any("nothing is not defined" in line for line in console)


def test_report_opens_in_chromium_without_console_errors(tmp_path: Path):
    dom, console = browser.dump_dom(tutorial_pages(tmp_path))
    assert console == []
    assert "Step 6: MASQUERADE added, the reply is dropped" in dom
    assert dom.count("<svg") == 3


def near(colour: tuple[int, ...], hex_colour: str, within: int = 40) -> bool:
    target = bytes.fromhex(hex_colour.lstrip("#"))
    return sum(abs(a - b) for a, b in zip(colour[:3], target)) <= within


def test_screenshot_of_step6_shows_the_pictures(tmp_path: Path):
    index = tutorial_pages(tmp_path)
    shot = tmp_path / "step6.png"
    assert browser.screenshot(index, "step-6", shot) == []
    assert pngfile.size(shot) == (1200, 900)
    colours = pngfile.colours(shot, step=2)
    assert len(colours) > 200, "the screenshot is (nearly) blank"
    assert any(near(c, picture.REPLY_COLOUR) for c in colours)
    assert any(near(c, picture.REQUEST_COLOUR) for c in colours)


def test_collector_pairs_each_probe_with_its_last_trace(tmp_path: Path, monkeypatch):
    from tracer import check, scenario

    tutorial = scenario.default_scenario()
    step5, topo5 = saved(5)
    step6, topo6 = saved(6)
    topologies = iter([topo5, topo6])
    monkeypatch.setattr(picture, "read_topology", lambda names: next(topologies))
    probe = tutorial.step(6).probes[0]
    before = TraceResult.from_json(step5)
    after = TraceResult.from_json(step6)
    collector = report.Collector(tutorial)
    collector.add(check.ProbeRun(tutorial.step(5), probe, before, []))
    collector.add(check.ProbeRun(tutorial.step(6), probe, after, [], 5, before))
    entry = collector.steps[6].probes[0]
    assert entry.label == "nstrace ping RED 8.8.8.8"
    assert entry.before is before and entry.before_topology is topo5
    assert entry.after_topology is topo6 and entry.before_step == 5
    assert "outcome: no-reply -> dropped" in entry.changes
    assert collector.steps[6].commands == [
        "host# iptables -t nat -A POSTROUTING -s 11.11.11.0/24 -j MASQUERADE"
    ]
    page = collector.write(tmp_path).read_text()
    assert page.count("<svg") == 3
