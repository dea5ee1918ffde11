"""libbpf's print function is set only at debug level (tracer/bpf.py).

Each call into a Python callback takes the GIL; hundreds of them while the
probes load made `nstrace ping` wait on its own scapy thread.
"""

from __future__ import annotations

import logging

import pytest

from tracer import bpf
from tracer.probes import Probes

pytestmark = pytest.mark.root


def test_libbpf_prints_through_nstrace_only_at_debug_level(caplog):
    levels: list[int] = []

    @bpf._PRINT_FN
    def counting(level: int, _fmt: bytes, _args: int) -> int:
        levels.append(level)
        return 0

    original = bpf._libbpf_print
    bpf._libbpf_print = counting
    try:
        caplog.set_level(logging.INFO, logger="tracer.bpf")
        Probes().close()
        assert levels == []
        caplog.set_level(logging.DEBUG, logger="tracer.bpf")
        Probes().close()
        assert len(levels) > 100 and set(levels) <= {0, 1, 2}
    finally:
        bpf._libbpf_print = original
        caplog.set_level(logging.WARNING, logger="tracer.bpf")
        bpf._follow_log_level()  # libbpf must not keep `counting`
