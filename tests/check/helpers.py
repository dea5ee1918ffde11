"""Traces for the check tests: the kernel recordings of tests/data, assembled."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tracer.path import TraceResult, load_recording

DATA = Path(__file__).resolve().parents[1] / "data"


def recorded(step: int) -> TraceResult:
    """RED -> 8.8.8.8 as the kernel traced it at tutorial step 5, 6 or 7."""
    return load_recording(DATA / f"kernel-step{step}.json").assemble()


def with_causes(result: TraceResult, *causes: dict) -> TraceResult:
    return replace(result, causes=list(causes))
