"""`nstrace ping`: the pipeline from a source and a destination to a result.

resolve the endpoints -> load and attach the probes in every namespace in
play -> send the tagged probe -> collect events until the verdict -> assemble
the path. Each stage is a function of its own; this module only strings them
together and makes sure that whatever was attached is detached again.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
import time
from dataclasses import dataclass, field

from tracer import docker, netns, snapshot
from tracer.collect import collect
from tracer.errors import UsageError
from tracer.events import FREE, Event
from tracer.explain import explain
from tracer.inject import make_probe
from tracer.path import (
    Probe,
    Recording,
    TraceResult,
    is_benign_free,
    save_recording,
)
from tracer.probes import Decoder, Probes
from tracer.rules import Flow, RuleTracer, bridge_events, start_rule_tracer, verdicts

log = logging.getLogger(__name__)

PROTOCOLS = ("icmp", "tcp", "udp")
HOST = "host"


@dataclass
class PingRequest:
    """What the user asked for, checked: see :func:`parse_request`."""

    src_netns: str
    dst: str
    dst_netns: str | None = None
    proto: str = "icmp"
    timeout_s: float = 1.0
    port: int | None = None
    record: str | None = None  # where to save the raw events for replay
    timings: dict[str, float] = field(default_factory=dict)


def parse_request(
    src: str,
    dst: str,
    proto: str = "icmp",
    timeout_s: float = 1.0,
    host_ns: str = HOST,
    port: int | None = None,
) -> PingRequest:
    """Check the command line's endpoints and turn names into namespaces."""
    if proto not in PROTOCOLS:
        raise UsageError(
            f"unknown protocol {proto!r}; use one of: {', '.join(PROTOCOLS)}"
        )
    if proto == "icmp" and port is not None:
        raise UsageError("--port applies to tcp and udp probes; add --proto tcp or udp")
    if proto != "icmp" and port is None:
        raise UsageError(f"a {proto} probe needs a destination port: add --port N")
    if port is not None and not 1 <= port <= 65535:
        raise UsageError(f"port {port} is out of range; give a port from 1 to 65535")
    if not timeout_s > 0:
        raise UsageError(
            f"timeout must be a positive number of seconds, not {timeout_s}"
        )
    src_netns = source_namespace(src, host_ns)
    address, dst_netns = destination(dst, host_ns)
    return PingRequest(src_netns, address, dst_netns, proto, timeout_s, port)


def source_namespace(name: str, host_ns: str = HOST) -> str:
    """The namespace a probe is sent from: a named one, `host`, or `root`."""
    if name == HOST:
        name = host_ns
    if name != netns.ROOT:
        netns.check_name(name)
        if not netns.exists(name):
            # A Docker container's name, or a one-line error saying neither.
            return docker.resolve(name)
    return name


def destination(text: str, host_ns: str = HOST) -> tuple[str, str | None]:
    """An IPv4 address, or a namespace name standing for its first address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is not None:
        if address.version != 4:
            raise UsageError(f"{text} is not an IPv4 address; nstrace traces IPv4 only")
        return str(address), None
    if any(ch.isdigit() for ch in text) and all(
        ch.isdigit() or ch == "." for ch in text
    ):
        raise UsageError(f"{text} is not a valid IPv4 address (expected a.b.c.d)")
    ns = source_namespace(text, host_ns)
    return first_address(ns), ns


def first_address(ns: str) -> str:
    """The namespace's first global IPv4 address, preferring non-loopback devices."""
    argv = ["ip", "-j", "-4", "addr", "show"]
    if ns != netns.ROOT:
        argv[:0] = ["nsenter", f"--net={netns.path_of(ns)}"]  # a container too
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    found = []
    for link in json.loads(out.stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("scope") == "global":
                found.append((link.get("ifname") == "lo", info["local"]))
    if not found:
        raise UsageError(
            f"namespace {ns} has no IPv4 address to send to; give an address"
        )
    return min(found)[1]


def namespaces_in_play(request: PingRequest) -> list[str]:
    """Every named namespace, and the root one only when the probe touches it."""
    names = netns.list_named()
    if netns.ROOT in (request.src_netns, request.dst_netns):
        names.append(netns.ROOT)
    # A container is in play when it is an endpoint (see tracer/docker.py),
    # unless its namespace is listed already under another name: a second
    # netfilter link at the same hook and priority is refused (EBUSY).
    listed = {netns.inode_of(name) for name in names if netns.exists(name)}
    for ns in (request.src_netns, request.dst_netns):
        if ns and ns not in names and netns.inode_of(ns) not in listed:
            names.append(ns)
    return names


def ping(request: PingRequest, probes: Probes | None = None) -> TraceResult:
    """Trace one probe; *probes* may be given already loaded (benchmarks, tests)."""
    timings = request.timings
    started = time.perf_counter()
    own = probes is None
    probes = probes or Probes()
    try:
        timings["attach_ms"] = (time.perf_counter() - started) * 1000
        names = namespaces_in_play(request)
        probes.link_netfilter(names)
        timings["link_ms"] = (time.perf_counter() - started) * 1000 - timings[
            "attach_ms"
        ]
        # Before the probe, and before nstrace's own nftables tables exist.
        snap = snapshot.take(names)
        timings["snapshot_ms"] = snap.taken_ms
        result = _trace(request, probes)
        explaining = time.perf_counter()
        result = explained(result, snap)
        timings["explain_ms"] = (time.perf_counter() - explaining) * 1000
        return result
    finally:
        detaching = time.perf_counter()
        probes.disable()
        if own:
            probes.close()
        timings["detach_ms"] = (time.perf_counter() - detaching) * 1000


def explained(result: TraceResult, snap: snapshot.Snapshot) -> TraceResult:
    """*result* with its causes and the snapshot's summary filled in."""
    result.causes = explain(result, snap)
    result.snapshot = snap.summary()
    return result


def _trace(request: PingRequest, probes: Probes) -> TraceResult:
    injector = make_probe(request.proto, request.src_netns, request.dst, request.port)
    rule_tracer: RuleTracer | None = None
    try:
        ports = {"dport": request.port, "sport": injector.tag} if request.port else {}
        probe = Probe(
            src_netns=request.src_netns,
            src=None,
            dst=request.dst,
            proto=request.proto,
            ident=injector.tag,
            **ports,
        )
        # Built before the probes are enabled: TCP and UDP look up their
        # source address first, and scapy is slow to import the first time.
        building = time.perf_counter()
        injector.prepare()
        request.timings["build_ms"] = (time.perf_counter() - building) * 1000
        probes.configure(
            proto=injector.proto,
            tag=injector.tag,
            dst=request.dst,
            src_netns=request.src_netns,
        )
        decoder = Decoder(netns.names_by_inode())

        def is_drop(event: Event) -> bool:
            # NOT_SPECIFIED is also how some protocols end a packet they
            # handled (a TCP listener's SYN): not a verdict worth stopping at.
            return (
                event.kind == FREE
                and event.reason != "NOT_SPECIFIED"
                and not is_benign_free(event, probe)
            )

        # Rule attribution: nstrace's nftables tables mark the probe's flow
        # for tracing; they go when the tracer is closed, or with the process.
        started = time.perf_counter()
        rule_tracer = start_rule_tracer(
            namespaces_in_play(request), Flow(request.proto, injector.tag)
        )
        request.timings["rules_ms"] = (time.perf_counter() - started) * 1000

        started = time.perf_counter()
        got = collect(probes, decoder, injector, request.timeout_s, is_drop)
        request.timings["collect_ms"] = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        crossings = rule_tracer.crossings() if rule_tracer else []
        request.timings["rules_read_ms"] = (time.perf_counter() - started) * 1000
    finally:
        injector.close()
        if rule_tracer is not None:
            rule_tracer.close()
    recording = Recording(
        probe,
        got.events + bridge_events(crossings, got.events),
        send_error=got.send_error,
        reply=got.reply.to_dict() if got.reply else None,
        lost_events=got.lost_events,
        timeout_s=request.timeout_s,
        description=f"nstrace ping {request.src_netns} {request.dst} ({request.proto})",
        verdicts=tuple(verdicts(crossings)),
    )
    if request.record:
        save_recording(request.record, recording)
    return recording.assemble()
