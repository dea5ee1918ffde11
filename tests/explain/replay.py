"""Load a recorded case (tests/explain/data) as a result and a snapshot."""

from __future__ import annotations

import json
from pathlib import Path

from tracer.path import TraceResult
from tracer.snapshot import Snapshot, parse_namespace

DATA = Path(__file__).parent / "data"


def load(name: str) -> tuple[TraceResult, Snapshot]:
    data = json.loads((DATA / f"{name}.json").read_text())
    result = TraceResult.from_json(data["result"])
    states = {ns: parse_namespace(ns, raw) for ns, raw in data["snapshot"].items()}
    return result, Snapshot(states)
