"""scenarios/README.md documents every key, and its example is a working lab."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli_helpers import nstrace
from tracer import scenario
from tracer.errors import UsageError

DOC = scenario.SCENARIO_DIR / "README.md"


def _documented() -> set[str]:
    return set(re.findall(r"^\| `([a-z_]+)` \|", DOC.read_text(), re.MULTILINE))


KEYS = [
    *scenario._TOP_KEYS,
    *scenario._STEP_KEYS,
    *scenario._PROBE_KEYS,
    *scenario.EXPECT_KEYS,
]


@pytest.mark.parametrize("key", KEYS)
def test_every_key_is_documented(key: str):
    assert key in _documented()


def _example(tmp_path: Path) -> Path:
    text = re.search(r"```yaml\n(name: pair.*?)```", DOC.read_text(), re.DOTALL)
    path = tmp_path / "pair.yaml"
    path.write_text(text.group(1))
    return path


def test_the_example_loads(tmp_path: Path):
    pair = scenario.load(_example(tmp_path))
    assert pair.name == "pair" and pair.last == 1
    assert set(pair.step(1).probes[0].expect) == {"outcome", "drop", "crossed", "cause"}


@pytest.mark.parametrize(
    "line",
    [
        "hook 'FORWRD' is not one of PREROUTING, INPUT, FORWARD, OUTPUT, POSTROUTING",
        "`bash -c 'ip link'` runs 'bash'; only ip, iptables, nft, sysctl may run",
        "step 3 is out of order: steps count up from 0, so this one must be `step: 1`",
    ],
)
def test_the_documented_errors_are_the_real_ones(tmp_path: Path, line: str):
    text = _example(tmp_path).read_text()
    broken = {
        "FORWRD": text.replace("crossed: right PREROUTING", "crossed: right FORWRD"),
        "bash": text.replace("left: ip link set lo up", "left: bash -c 'ip link'"),
        "out of order": text.replace("  - step: 1", "  - step: 3"),
    }
    key = next(k for k in broken if k in line)
    path = tmp_path / "broken.yaml"
    path.write_text(broken[key])
    with pytest.raises(UsageError) as caught:
        scenario.load(path)
    assert line in str(caught.value)
    assert re.match(rf"{re.escape(str(path))}:\d+: ", str(caught.value))


def test_check_of_a_bad_file_is_a_one_line_error(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        _example(tmp_path).read_text().replace("outcome: dropped", "outcome: gone")
    )
    done = nstrace("check", str(path))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert re.search(
        r"bad\.yaml:\d+: step 1, probe 1: expect: outcome must be", done.stderr
    )


@pytest.mark.root
def test_nstrace_check_passes_on_the_example(tmp_path: Path):
    done = nstrace("check", str(_example(tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 of 5 expectations held" in done.stdout
