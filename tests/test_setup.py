"""Checks on packaging and on the two commands a newcomer types.

They need no root and no network: they read pyproject.toml, ask make for the
commands it would run (`make -n`), and run `make test` with a stand-in for
Python to see what it does with pytest's exit codes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")

# make -o TARGET: take TARGET as done, so that only the recipe asked for runs.
PREREQUISITES_DONE = ("-o", "deps", "-o", "venv", "-o", "probes")


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def requirement_names(requirements: list[str]) -> set[str]:
    """The distribution names in PEP 508 strings, normalised (PEP 503)."""
    names = (re.match(r"[A-Za-z0-9._-]+", r).group() for r in requirements)
    return {re.sub(r"[-_.]+", "-", name).lower() for name in names}


def make(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        check=check,
    )


def test_pyproject_declares_the_command_and_the_package():
    project = pyproject()["project"]

    assert project["name"] == "nstrace"
    assert project["scripts"] == {"nstrace": "tracer.cli:run"}
    assert project["requires-python"] == ">=3.11"
    assert pyproject()["tool"]["setuptools"]["packages"] == ["tracer"]


def test_pyproject_declares_the_dependencies():
    project = pyproject()["project"]

    assert requirement_names(project["dependencies"]) >= {
        "pyroute2",
        "scapy",
        "rich",
        "networkx",
        "pyyaml",
    }
    assert requirement_names(project["optional-dependencies"]["test"]) >= {
        "pytest",
        "ruff",
    }


def test_pytest_turns_warnings_into_errors_and_knows_the_markers():
    options = pyproject()["tool"]["pytest"]["ini_options"]
    markers = {marker.split(":")[0] for marker in options["markers"]}

    assert "error" in options["filterwarnings"]
    assert markers >= {"root", "lab"}


@needs_make
def test_probe_rule_uses_libbpf_headers_only(tmp_path):
    source = tmp_path / "probe.bpf.c"
    source.write_text("")
    target = tmp_path / "probe.bpf.o"

    dry_run = make(
        "-n", *PREREQUISITES_DONE, f"BPF_SRC={source}", f"BPF_OBJ={target}", str(target)
    ).stdout
    compile_line = next(line for line in dry_run.splitlines() if f"-o {target}" in line)
    words = shlex.split(compile_line)

    assert "-target" in words and words[words.index("-target") + 1] == "bpf"
    assert any(w.startswith("-D__TARGET_ARCH_") for w in words)
    assert any(re.fullmatch(r"-I/usr/include/\w+-linux-gnu\w*", w) for w in words)
    for forbidden in ("/lib/modules", "/usr/src", "bpftool", "vmlinux.h"):
        assert forbidden not in dry_run, f"the probe build uses {forbidden}"


@needs_make
@pytest.mark.parametrize(
    ("pytest_exit", "make_fails"), [(0, False), (1, True), (5, True)]
)
def test_make_test_fails_when_pytest_collects_nothing(
    tmp_path, pytest_exit, make_fails
):
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\nexit {pytest_exit}\n")
    fake_python.chmod(0o755)

    result = make(*PREREQUISITES_DONE, "test", f"VENV_PY={fake_python}", check=False)

    assert (result.returncode != 0) == make_fails, result.stderr


def test_ci_runs_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [
        line.strip()
        for line in script.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]

    assert "set -euo pipefail" in commands
    assert any(re.match(r"make test\b", command) for command in commands)
