"""Event collection: wait for the probe's verdict, gathering events meanwhile.

The verdict is whichever comes first: the reply (or an ICMP error) reaches
the probe's socket, the probes see the packet dropped, or the timeout runs
out. A drop is reported as soon as it is seen rather than after the timeout,
which is what makes nstrace quicker than `ping -W1` on a failing path. After
a verdict the ring buffer is read for a few more milliseconds, so that the
events the kernel produced in the same softirq (the reply's benign free, a
neighbour update) are not cut off.
"""

from __future__ import annotations

import logging
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tracer.events import Event
from tracer.inject import Probe, Reply
from tracer.probes import Decoder, Probes

log = logging.getLogger(__name__)

LINGER_S = 0.01


@dataclass
class Collection:
    events: list[Event] = field(default_factory=list)
    reply: Reply | None = None
    send_error: str | None = None
    lost_events: int = 0
    elapsed_s: float = 0.0
    timed_out: bool = False


def collect(
    probes: Probes,
    decoder: Decoder,
    probe: Probe,
    timeout_s: float,
    is_drop: Callable[[Event], bool],
) -> Collection:
    """Send *probe* and gather events until the verdict, then a little longer."""
    result = Collection()
    started = time.monotonic()
    result.send_error = probe.send()
    sent = time.monotonic()
    deadline = sent + (0 if result.send_error else timeout_s)

    with selectors.DefaultSelector() as selector:
        selector.register(probes.fileno(), selectors.EVENT_READ, "ring")
        for fd in probe.filenos():
            selector.register(fd, selectors.EVENT_READ, "socket")
        verdict_at = sent if result.send_error else None
        while True:
            now = time.monotonic()
            if verdict_at is not None and now >= verdict_at + LINGER_S:
                break
            if verdict_at is None and now >= deadline:
                result.timed_out = True
                break
            until = (verdict_at + LINGER_S) if verdict_at is not None else deadline
            for key, _mask in selector.select(max(0.0, until - now)):
                if key.data == "socket" and result.reply is None:
                    result.reply = probe.receive()
                    if result.reply is not None:
                        verdict_at = verdict_at or time.monotonic()
            for event in _drain(probes, decoder, result):
                if verdict_at is None and is_drop(event):
                    log.debug("drop seen: %s", event)
                    verdict_at = time.monotonic()
        _drain(probes, decoder, result)
    result.lost_events = probes.lost()
    result.elapsed_s = time.monotonic() - started
    return result


def _drain(probes: Probes, decoder: Decoder, result: Collection) -> list[Event]:
    """Decode what the ring buffer holds now into *result*; return the new events."""
    new = [decoder.decode(raw) for raw in probes.poll(0)]
    result.events.extend(new)
    return new
