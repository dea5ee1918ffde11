"""Names from the command line or a scenario never reach a shell.

nstrace runs programs from argument vectors (subprocess without a shell,
`ip netns exec NS ARGV...`) and checks every namespace name against what
`ip netns` accepts, so a name such as `RED;touch FILE` or `$(id)` is an
error that quotes it back unchanged, and FILE is never created. Scenario
commands are split like a shell would split them, and then run without one:
`;` or `$(...)` reach `ip` as plain words, which it refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability.leftovers import nstrace_argv, run
from tracer import netns
from tracer.lab import STATE_FILE

pytestmark = [pytest.mark.root]


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A file that only a shell, running what a hostile name says, would create."""
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a hostile name reached a shell"


def hostile_names(canary: Path) -> list[str]:
    return [
        f"RED;touch {canary}",
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"RED && touch {canary}",
        f"RED|touch {canary}",
        "../../etc",
        "$(id)",
    ]


def nstrace(*args: str):
    return run(nstrace_argv(*args))


def assert_refused(done, name: str) -> None:
    assert done.returncode == 2, done
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
    assert repr(name) in done.stderr or name in done.stderr  # quoted back unchanged
    assert "uid=" not in done.stderr  # $(id) was not run


@pytest.mark.parametrize(
    "where",
    ["ping-source", "ping-destination", "watch-netns", "host-ns"],
)
def test_hostile_names_on_the_command_line(lab, canary, where):
    lab.goto(0)
    for name in hostile_names(canary):
        args = {
            "ping-source": ("ping", name, "8.8.8.8"),
            "ping-destination": ("ping", "RED", name),
            "watch-netns": ("watch", "--netns", name),
            "host-ns": ("ping", "host", "8.8.8.8", "--host-ns", name),
        }[where]
        done = nstrace(*args)
        assert_refused(done, name)
        assert "not a valid namespace name" in done.stderr


def scenario(tmp_path: Path, namespaces: str, machine: str = "") -> Path:
    path = tmp_path / "hostile.yaml"
    text = f"name: hostile\nnamespaces: {namespaces}\n"
    if machine:
        text += f"machine:\n  - {machine}\n"
    text += "steps:\n  - step: 0\n    title: nothing\n"
    path.write_text(text)
    return path


def test_hostile_namespace_names_in_a_scenario(tmp_path, canary):
    for name in hostile_names(canary):
        quoted = name.replace("'", "''")
        path = scenario(tmp_path, f"['{quoted}']")
        done = nstrace("lab", "up", str(path))
        assert_refused(done, name)
        assert "not a valid namespace name" in done.stderr
    assert not STATE_FILE.exists() or "hostile" not in STATE_FILE.read_text()


@pytest.mark.parametrize(
    "command",
    [
        "ip link set lo up; touch {canary}",
        "ip link set lo up && touch {canary}",
        "ip link set $(touch {canary}) up",
        "ip link set `touch {canary}` up",
        "ip link set lo up | touch {canary}",
    ],
    ids=["semicolon", "and", "dollar", "backticks", "pipe"],
)
def test_shell_syntax_in_a_scenario_command_is_plain_words(tmp_path, canary, command):
    lab_ns = "HOSTILE1"
    text = command.format(canary=canary).replace("'", "''")
    path = scenario(tmp_path, f"[{lab_ns}]", f"{lab_ns}: '{text}'")
    done = nstrace("lab", "up", str(path))
    # ip refuses the extra words; the half-built lab is torn down.
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "the lab was torn down" in done.stderr
    assert not netns.exists(lab_ns)


def test_a_scenario_cannot_run_a_shell(tmp_path, canary):
    path = scenario(tmp_path, "[HOSTILE2]", f"HOSTILE2: 'sh -c \"touch {canary}\"'")
    done = nstrace("lab", "up", str(path))
    assert done.returncode == 2
    assert "runs 'sh'; only ip, iptables, nft, sysctl may run" in done.stderr
    assert not netns.exists("HOSTILE2")
