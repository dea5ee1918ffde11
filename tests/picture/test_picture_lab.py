"""Pictures of the real lab, as root: `ping --svg/--png` and `lab run --report`.

The namespaces and devices the picture must name are listed independently
of nstrace, with `ip -j addr show` in every namespace of the lab.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.picture import browser, pngfile
from tracer import lab as lab_module
from tracer import picture

pytestmark = pytest.mark.root

SVG = "{http://www.w3.org/2000/svg}"


def nstrace(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def lab_devices(namespaces: list[str]) -> list[str]:
    """Every device of the lab but the loopbacks that own nothing but 127/8."""
    names = []
    for ns in namespaces:
        links = json.loads(
            subprocess.run(
                ["ip", "-n", ns, "-j", "addr", "show"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for link in links:
            v4 = [
                a["local"] for a in link.get("addr_info", []) if a["family"] == "inet"
            ]
            if link["ifname"] == "lo" and all(a.startswith("127.") for a in v4):
                continue
            names.append(link["ifname"])
    return names


def test_step6_picture_names_the_whole_lab_and_the_drop(lab, tmp_path: Path):
    state = lab.goto(6)
    svg, png = tmp_path / "step6.svg", tmp_path / "step6.png"
    done = nstrace("ping", "RED", "8.8.8.8", "--svg", str(svg), "--png", str(png))
    assert done.returncode == 1, done.stderr
    texts = [t.text or "" for t in ET.parse(svg).getroot().iter(f"{SVG}text")]
    assert sorted(state.namespaces) == sorted(
        ["internet", "laptop", "host", "RED", "BLUE"]
    )
    for ns in state.namespaces:
        assert ns in texts
    devices = lab_devices(state.namespaces)
    assert len(devices) >= 11
    for device in devices:
        assert device in texts, device
    assert "✖ reply dropped at FORWARD" in texts
    assert "NETFILTER_DROP" in texts
    width, height = pngfile.size(png)
    assert 800 <= width <= 6000 and 300 <= height <= 3000


def test_tutorial_report_opens_in_chromium(lab, tmp_path: Path):
    out = tmp_path / "report"
    done = nstrace("lab", "run", "tutorial", "--report", str(out), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    index = out / "index.html"
    assert f"report: {index}" in done.stdout
    dom, console = browser.dump_dom(index)
    assert console == []
    for number in range(8):
        assert f'id="step-{number}"' in dom
    assert dom.count("<svg") >= 15  # every probe after, and most before
    shot = tmp_path / "step6.png"
    assert browser.screenshot(index, "step-6", shot) == []
    colours = pngfile.colours(shot, step=2)
    assert len(colours) > 200, "the screenshot of step 6 is (nearly) blank"
    target = bytes.fromhex(picture.REPLY_COLOUR.lstrip("#"))
    assert any(sum(abs(a - b) for a, b in zip(c, target)) <= 40 for c in colours)
    assert lab_module.current() is None  # lab run took its lab down
