"""What an nstrace process leaves behind: its BPF objects and nftables tables.

A process's BPF programs, links and maps are the ids behind its file
descriptors (/proc/PID/fdinfo shows `prog_id`, `link_id`, `map_id` for each;
Documentation/filesystems/proc.rst). They are read while the process runs,
so that only its own are followed even when other nstrace runs share the
machine; after it ends, none of them may still exist. nftables tables of
nstrace are looked for in every namespace of the (private) lab and in the
namespace the tests run in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tracer import netns

REPO = Path(__file__).resolve().parents[2]
KINDS = ("prog", "link", "map")


def nstrace_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tracer.cli", *args]


def run(argv: list[str], env: dict[str, str] | None = None):
    """Run *argv* to the end from the repository, with *env* added."""
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def start(*args: str) -> subprocess.Popen[str]:
    """`nstrace ARGS` in the background, its output kept in pipes."""
    return subprocess.Popen(
        nstrace_argv(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def held_ids(pid: int) -> dict[str, set[int]]:
    """The BPF program, link and map ids behind the process's descriptors."""
    held: dict[str, set[int]] = {kind: set() for kind in KINDS}
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir() if fdinfo.exists() else ():
        try:
            text = entry.read_text()
        except OSError:
            continue  # closed meanwhile
        for line in text.splitlines():
            key, _, value = line.partition(":")
            kind = key.removesuffix("_id")
            if kind in KINDS and key.endswith("_id"):
                # A link's fdinfo names its program too; count only what the
                # descriptor itself is (the first *_id line).
                held[kind].add(int(value))
                break
    return held


def netfilter_links(pid: int) -> int:
    """How many BPF netfilter links the process holds (fdinfo `link_type`)."""
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    count = 0
    for entry in fdinfo.iterdir() if fdinfo.exists() else ():
        try:
            text = entry.read_text()
        except OSError:
            continue  # closed meanwhile
        count += "link_type:\tnetfilter\n" in text
    return count


def existing_ids() -> dict[str, set[int]]:
    """Every BPF program, link and map id the kernel has now."""
    return {kind: _bpftool_ids(kind) for kind in KINDS}


def _bpftool_ids(kind: str, attempts: int = 10) -> set[int]:
    # bpftool walks ids one by one and fails when one vanishes between the
    # two steps, which other processes' BPF objects do at any moment.
    for _ in range(attempts):
        done = subprocess.run(
            ["bpftool", kind, "list", "-j"], capture_output=True, text=True, check=False
        )
        if done.returncode == 0:
            return {item["id"] for item in json.loads(done.stdout or "[]")}
        time.sleep(0.05)
    raise AssertionError(f"bpftool {kind} list kept failing: {done.stderr.strip()}")


def nstrace_tables() -> dict[str, list[str]]:
    """nftables tables whose name starts with nstrace, by namespace.

    Text, not `nft -j`: nft 1.0.6 (Debian 12) prints `"flags": ` with no value
    for a table with the owner flag, which is not JSON.
    """
    found = {}
    for ns in [*netns.list_named(), netns.ROOT]:
        argv = ["nft", "list", "tables"]
        if ns != netns.ROOT:
            argv = ["ip", "netns", "exec", ns, *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        # Lines read `table FAMILY NAME`.
        names = [
            " ".join(words[1:])
            for words in map(str.split, done.stdout.splitlines())
            if len(words) == 3
            and words[0] == "table"
            and words[2].startswith("nstrace")
        ]
        if names:
            found[ns] = names
    return found


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll *condition* until it holds or *timeout_s* passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_until_attached(child: subprocess.Popen[str], timeout_s: float = 20.0) -> dict:
    """The child's BPF ids once it holds links and has held them for a while."""
    seen: list[dict[str, set[int]]] = []

    def settled() -> bool:
        if child.poll() is not None:
            raise AssertionError(f"nstrace ended early: {child.communicate()}")
        seen.append(held_ids(child.pid))
        if len(seen) < 6 or not seen[-1]["link"]:
            return False
        return all(ids == seen[-1] for ids in seen[-6:])  # 300 ms unchanged

    assert wait_for(settled, timeout_s), "nstrace never attached its probes"
    return seen[-1]


def leftovers(held: dict[str, set[int]], tables_before: dict) -> dict:
    """What of *held* still exists, and nstrace tables that were not there before."""
    alive = existing_ids()
    left = {kind: sorted(held[kind] & alive[kind]) for kind in KINDS}
    now = nstrace_tables()
    new_tables = {
        ns: [name for name in names if name not in tables_before.get(ns, [])]
        for ns, names in now.items()
    }
    return {
        **{kind: ids for kind, ids in left.items() if ids},
        **{f"tables in {ns}": names for ns, names in new_tables.items() if names},
    }


def wait_for_no_leftovers(held: dict, tables_before: dict) -> dict:
    """Leftovers after up to 10 s (the kernel frees programs after an RCU grace)."""
    last: dict = {}

    def clean() -> bool:
        nonlocal last
        last = leftovers(held, tables_before)
        return not last

    wait_for(clean)
    return last


def kill_quietly(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
    child.communicate(timeout=10)
