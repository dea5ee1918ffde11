"""Record the explainer's unit-test data from real labs (run as root).

    scripts/isolated python3 -m tests.explain.record [CASE...]

For each case: build the lab at its step, take the raw snapshot of every
lab namespace, run `nstrace ping --json`, and write both to
tests/explain/data/CASE.json. The unit tests replay them without root.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tracer import lab, netns, scenario, snapshot

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[2]

# The raw keys that snapshot.parse_namespace reads; the rest is left out.
KEEP_LINK = (
    "ifindex",
    "ifname",
    "flags",
    "operstate",
    "master",
    "link_index",
    "link_netnsid",
    "link_type",
)


def cases() -> dict[str, dict[str, Any]]:
    from tests.explain.test_labs import CASES

    return {case.name: case.as_dict() for case in CASES}


def prune(raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    links = []
    for item in raw.get("links") or []:
        link = {k: item[k] for k in KEEP_LINK if k in item}
        kind = (item.get("linkinfo") or {}).get("info_kind")
        if kind:
            link["linkinfo"] = {"info_kind": kind}
        links.append(link)
    out["links"] = links
    out["addresses"] = [
        {
            "ifname": a["ifname"],
            "addr_info": [
                {k: i[k] for k in ("family", "local", "prefixlen") if k in i}
                for i in a.get("addr_info", [])
            ],
        }
        for a in raw.get("addresses") or []
    ]
    nft = raw.get("nft") or {}
    out["nft"] = {
        "nftables": [i for i in nft.get("nftables", []) if "metainfo" not in i]
    }
    return out


def record(name: str, case: dict[str, Any]) -> None:
    chosen = scenario.load(ROOT / case["scenario"])
    lab.up(chosen, case["step"])
    try:
        raws = {
            ns: prune(netns.run_in(ns, snapshot.read_raw)) for ns in chosen.namespaces
        }
        argv = [sys.executable, "-m", "tracer.cli", "ping", *case["argv"], "--json"]
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=ROOT, check=False
        )
        result = json.loads(done.stdout)
    finally:
        lab.down()
    result["causes"] = []  # recorded for their input, not their output
    result["snapshot"] = None
    path = DATA / f"{name}.json"
    path.write_text(json.dumps({"result": result, "snapshot": raws}, indent=1) + "\n")
    print(f"{name}: {result['outcome']} -> {path}")


def main(names: list[str]) -> None:
    table = cases()
    for name in names or sorted(table):
        record(name, table[name])


if __name__ == "__main__":
    main(sys.argv[1:])
