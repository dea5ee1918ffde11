"""Shared test machinery: markers, the root-namespace guard, the lab fixture.

Root tests are marked ``@pytest.mark.root`` and skipped only when the run is
not root; CI runs as root, so there they run.

The guard: at start-up the root namespace's addresses, routes, policy rules,
netfilter ruleset and forwarding sysctls are recorded, and
tests/test_zz_root_unchanged.py, which this file moves to the end of the run,
compares them with what is there at the end. The sandbox promises that
nothing but the lab's own namespaces is ever changed (DESIGN.md, "Sandbox").

The ``lab`` fixture gives root tests the tutorial lab at any step::

    @pytest.mark.root
    def test_masquerade_reply_dropped(lab):
        lab.goto(6)
        assert lab.ping("RED", "8.8.8.8") == "no-reply"

Moving forward applies only the missing steps; moving backward rebuilds. A
test that changes the lab beyond its step calls ``lab.goto(step, fresh=True)``
first or leaves the lab as it found it. The lab comes down at the end of the
session, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tracer import lab as lab_module
from tracer import netns
from tracer.lab import LabState
from tracer.scenario import Scenario, default_scenario

ROOT_GUARD_FILE = "test_zz_root_unchanged.py"
ROOT_BEFORE = pytest.StashKey[dict[str, Any]]()
NAMESPACES_BEFORE = pytest.StashKey[list[str]]()

# Sysctls of the root namespace that a lab or a tracer could be tempted to set.
GUARDED_SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.default.rp_filter",
    "net.ipv4.conf.all.accept_local",
    "net.ipv4.ping_group_range",
    "net.ipv6.conf.all.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
)
# Fields that change on their own: address lifetimes, route expiry, rule
# counters, timeouts of set elements.
VOLATILE_KEYS = frozenset(
    {"valid_life_time", "preferred_life_time", "expires", "cache", "packets", "bytes"}
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "root: needs root (CAP_NET_ADMIN, CAP_BPF); skipped when not root"
    )
    config.addinivalue_line(
        "markers", "lab: builds the sandbox lab in network namespaces of its own"
    )
    config.stash[ROOT_BEFORE] = root_snapshot()
    config.stash[NAMESPACES_BEFORE] = netns.list_named()


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (run the tests as root)")
        for item in items:
            if item.get_closest_marker("root"):
                item.add_marker(skip)
    # The guard compares the end of the run with its start, so it goes last
    # whatever other test files and directories are called.
    items.sort(key=lambda item: item.path.name == ROOT_GUARD_FILE)


# The root-namespace snapshot.


def root_snapshot() -> dict[str, Any]:
    """What the sandbox must never change in the namespace the tests run in."""
    return {
        "addresses": _ip_json("addr"),
        "routes": _ip_json("-4", "route", "show", "table", "all"),
        "routes6": _ip_json("-6", "route", "show", "table", "all"),
        "rules": _ip_json("-4", "rule"),
        "rules6": _ip_json("-6", "rule"),
        "netfilter": _nft_ruleset(),
        "sysctls": {key: _sysctl(key) for key in GUARDED_SYSCTLS},
    }


def _ip_json(*args: str) -> Any:
    return _without_volatile(_command_json(["ip", "-j", *args]))


def _nft_ruleset() -> Any:
    if shutil.which("nft") is None:
        return "nft is not installed"
    ruleset = _command_json(["nft", "-j", "list", "ruleset"])
    if isinstance(ruleset, dict):
        # metainfo names the nft version, not the ruleset.
        items = [i for i in ruleset.get("nftables", []) if "metainfo" not in i]
        ruleset = {"nftables": items}
    return _without_volatile(ruleset)


def _command_json(argv: list[str]) -> Any:
    """The command's JSON output, or its error text (equal runs compare equal)."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"{' '.join(argv)} failed: {done.stderr.strip()}"
    return json.loads(done.stdout or "null")


def _sysctl(key: str) -> str | None:
    path = Path("/proc/sys", *key.split("."))
    try:
        return " ".join(path.read_text().split())
    except OSError:
        return None  # absent here, e.g. br_netfilter not loaded


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _without_volatile(item)
            for key, item in value.items()
            if key not in VOLATILE_KEYS
        }
    if isinstance(value, list):
        return [_without_volatile(item) for item in value]
    return value


@pytest.fixture(scope="session")
def root_before(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The root-namespace snapshot taken when the run started."""
    return request.config.stash[ROOT_BEFORE]


@pytest.fixture(scope="session")
def take_root_snapshot() -> Callable[[], dict[str, Any]]:
    return root_snapshot


@pytest.fixture(scope="session")
def namespaces_before(request: pytest.FixtureRequest) -> list[str]:
    """The named namespaces (`ip netns list`) when the run started."""
    return request.config.stash[NAMESPACES_BEFORE]


# The lab.


class Lab:
    """A scenario's lab driven by tests; see this module's docstring."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario

    def goto(self, step: int, fresh: bool = False) -> LabState:
        """Bring the lab to *step*; *fresh* rebuilds it even if it is there."""
        if fresh:
            lab_module.down()
        return lab_module.goto(self.scenario, step)

    def run(
        self, ns: str, argv: Sequence[str], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* in lab namespace *ns*; fail the test if it fails."""
        done = lab_module.run_in_lab(ns, argv)
        if check and done.returncode != 0:
            command = " ".join(argv)
            pytest.fail(f"{ns}: `{command}` exited {done.returncode}: {done.stderr}")
        return done

    def ping(self, ns: str, dst: str, timeout: float = 1.0) -> str:
        """reply, no-reply or unreachable for one echo from *ns* to *dst*."""
        return lab_module.ping(ns, dst, timeout)

    def down(self) -> list[str]:
        return lab_module.down()


@pytest.fixture(scope="session")
def tutorial() -> Scenario:
    return default_scenario()


@pytest.fixture(scope="session")
def lab(tutorial: Scenario) -> Iterator[Lab]:
    """The tutorial lab, built on demand by ``lab.goto(step)``; root only."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    try:
        yield Lab(tutorial)
    finally:
        lab_module.down()
