"""`nstrace watch`: a live trace of every packet that matches a filter.

The probes run in their watch mode (MODE_WATCH in probes/nstrace.bpf.c): the
kernel keeps packets whose protocol, address (source or destination, outer or
quoted) and port match, in one namespace or in all, and sends one record per
observation point. Each record becomes one line, numbered by packet: a packet
is one skb, known by its address, until it is freed, not seen for a while, or
seen again at a point it has passed (the kernel soon reuses an skb's memory
for the next packet; see Grouper). Route lookups and neighbour updates carry
no skb; they are shown under the packet seen last, which is the one they were
made for (the kernel makes them while handling it, on the same CPU). With
--netns, hooks are linked in that namespace only, at once, and devices are
filtered in the kernel; route lookups and frees of other namespaces, tied to
the flow by address and time only, are dropped here. Without it, the hooks of
each named namespace are linked when the flow first shows there (Linker).

Lost records (the ring buffer was full) are counted by the kernel; the count
is printed whenever it grows, so that a gap is never silent. Ctrl-C, SIGTERM
or --duration ends the watch; probes are detached on every way out.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from tracer import netns
from tracer.errors import UsageError
from tracer.events import (
    FREE,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    NEIGH,
    ROUTE,
    Event,
)

log = logging.getLogger(__name__)

PROTOCOLS = {"icmp": IPPROTO_ICMP, "tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
# An skb address not seen for this long names a new packet (the BPF side
# forgets tracked skbs after 100 ms, TRACKED_FRESH_NS, for the same reason).
PACKET_IDLE_NS = 100 * 1000 * 1000
POLL_MS = 200
# One encoder for every line: json.dumps builds one per call with options.
_encode = json.JSONEncoder(check_circular=False).encode
POLL_BUDGET = 4096  # records handled between looks at the clock and at signals
LINKED_ON_FIRST_MATCH = ("on_consume",)  # besides the hooks: see Linker
SHAPES_KEPT = 4096  # distinct record remainders Printer.records() remembers
_HEAD = struct.Struct("<QQ")  # t_ns and skb, the start of every record


@dataclass
class Filter:
    """What to watch; None or 0 matches anything."""

    netns: str | None = None
    host: str | None = None
    proto: int = 0
    port: int = 0

    def describe(self) -> str:
        parts = [
            f"netns {self.netns}" if self.netns else "",
            f"host {self.host}" if self.host else "",
            PROTOCOL_NAMES.get(self.proto, ""),
            f"port {self.port}" if self.port else "",
        ]
        return " ".join(part for part in parts if part) or "every IPv4 packet"


def parse_filter(
    netns_name: str | None = None,
    host: str | None = None,
    proto: str | None = None,
    port: int | None = None,
    host_ns: str = "host",
) -> Filter:
    """Check the command line's filters; UsageError names the bad one."""
    chosen = Filter()
    if netns_name is not None:
        from tracer.trace import source_namespace

        chosen.netns = source_namespace(netns_name, host_ns)
    if host is not None:
        chosen.host = _ipv4(host)
    if proto is not None:
        if proto.lower() not in PROTOCOLS:
            raise UsageError(
                f"unknown protocol {proto!r}; use one of: {', '.join(PROTOCOLS)}"
            )
        chosen.proto = PROTOCOLS[proto.lower()]
    if port is not None:
        if not 1 <= port <= 65535:
            raise UsageError(f"port {port} is out of range; give 1 to 65535")
        if chosen.proto == IPPROTO_ICMP:
            raise UsageError("ICMP has no ports; drop --port or use --proto tcp/udp")
        chosen.port = port
    return chosen


def _ipv4(text: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(
            f"{text!r} is not an IPv4 address; give one like 11.11.11.2"
        ) from None
    if address.version != 4:
        raise UsageError(f"{text} is not an IPv4 address; nstrace traces IPv4 only")
    return str(address)


@dataclass
class Grouper:
    """Numbers packets by skb address, and remembers what was printed.

    An skb address names one packet from its first sighting until it is
    freed, but a packet that ends normally (consumed) is not reported, and
    the kernel hands the same memory to the next packet at once (a flood
    of one flow reuses a handful of addresses). So an address also starts
    a new packet when it is seen again at a point this packet has passed
    already (same namespace, event, device, hook and priority): no packet
    crosses one point twice in the same state.
    """

    packets: int = 0
    events: int = 0
    current: int = 0
    # skb address -> (packet number, last seen t_ns, points passed)
    last_seen: dict[int, tuple[int, int, set[tuple]]] = field(default_factory=dict)

    def packet_of(self, event: Event) -> tuple[int, bool]:
        """The packet number of *event*, and whether it starts a new packet."""
        return self.number(event.skb, event.t_ns, event.kind, point_of(event))

    def number(self, skb: int, t_ns: int, kind: str, point: tuple) -> tuple[int, bool]:
        """packet_of() for an event known by its skb, time, kind and point."""
        self.events += 1
        if not skb or kind in (ROUTE, NEIGH):
            return self.current, False
        seen = self.last_seen.get(skb)
        new = seen is None or t_ns - seen[1] > PACKET_IDLE_NS or point in seen[2]
        if new:
            self.packets += 1
            seen = (self.packets, t_ns, set())
        seen[2].add(point)
        self.current = seen[0]
        if kind == FREE:
            self.last_seen.pop(skb, None)
        else:
            self.last_seen[skb] = (seen[0], t_ns, seen[2])
        if len(self.last_seen) > 65536:  # skbs whose end was not seen
            self._forget_idle(t_ns)
        return seen[0], new

    def _forget_idle(self, now_ns: int) -> None:
        for skb, (_number, t_ns, _points) in list(self.last_seen.items()):
            if now_ns - t_ns > PACKET_IDLE_NS:
                del self.last_seen[skb]


def point_of(event: Event) -> tuple:
    """Where *event* was seen: no packet passes one point twice in one state."""
    return (event.netns, event.kind, event.dev, event.hook, event.stage)


# Fields a --json line does not show as they are: kind is "event", the first
# three come first, the skb address only numbers packets.
_NOT_COPIED = frozenset({"kind", "t_ns", "netns", "skb", "extra"})


def hop_record(event: Event, packet: int) -> dict[str, Any]:
    """One hop as a JSON-ready dict (the --json line, without empty fields).

    Built from the event's own dict: Event.to_dict() goes through
    dataclasses.asdict, which deep-copies every value and took two thirds of
    the watch's time under a flood (cProfile, `make bench` capacity run).
    """
    record: dict[str, Any] = {
        "packet": packet,
        "event": event.kind,
        "t_ns": event.t_ns,
        "netns": event.netns,
    }
    record.update(
        {
            key: value
            for key, value in vars(event).items()
            if value and key not in _NOT_COPIED
        }
    )
    if event.icmp_type is not None:
        record["icmp_type"], record["icmp_code"] = event.icmp_type, event.icmp_code
    if event.extra:
        record.update(event.extra)
    if event.proto:
        record["proto"] = PROTOCOL_NAMES.get(event.proto, event.proto)
    return record


def hop_text(event: Event, packet: int) -> str:
    """One hop as a line: packet number, namespace, event, device, what it saw."""
    where = event.dev or event.out_dev or event.in_dev or "-"
    parts = [f"#{packet:<5}", f"{event.netns:<10}", f"{event.kind:<5}", f"{where:<8}"]
    if event.hook:
        parts.append(f"{event.hook}/{event.stage}")
    if event.src or event.dst:
        parts.append(f"{event.src or '*'} > {event.dst or '*'}")
    parts.append(_transport(event))
    if event.kind == FREE:
        parts.append(f"freed: {event.reason}")
    elif event.kind == ROUTE:
        parts.append(f"route error {event.error}" if event.error else "route ok")
    elif event.kind == NEIGH:
        parts.append(f"neighbour {event.neigh_addr} {event.neigh_state}")
    return "  ".join(part for part in parts if part).rstrip()


def _transport(event: Event) -> str:
    name = PROTOCOL_NAMES.get(event.proto, str(event.proto) if event.proto else "")
    if event.proto == IPPROTO_ICMP and event.icmp_type is not None:
        return f"{name} type {event.icmp_type} id {event.ident} seq {event.seq}"
    if event.sport or event.dport:
        return f"{name} {event.sport} > {event.dport}"
    return name


@dataclass(frozen=True)
class _Shape:
    """What a record says besides its time and skb, worked out once (records())."""

    kind: str
    point: tuple
    event_json: str  # the kind, as JSON
    rest: str  # the line after the packet number (text) or after t_ns (JSON)


_SKIPPED = _Shape("", (), "", "")  # another namespace's record, under --netns


class Printer:
    """Writes hops, lost counts and the summary as text or JSON lines."""

    def __init__(self, out: TextIO, as_json: bool, netns: str | None = None) -> None:
        self.out = out
        self.as_json = as_json
        # The kernel filters devices and hooks by namespace; route lookups
        # and frees are tied to the flow by address and time only, so other
        # namespaces' ones are dropped here.
        self.netns = netns
        self.grouper = Grouper()
        self.lost = 0
        self._shapes: dict[bytes, _Shape] = {}

    def hops(self, events: Iterable[Event]) -> None:
        """Print events decoded already; records() reads them raw."""
        self._print((self._shape(event), event.t_ns, event.skb) for event in events)

    def records(
        self,
        raws: Iterable[bytes],
        decoder: Any,
        linker: Linker | None = None,
    ) -> None:
        """Print raw ring-buffer records, at the pace of a flood.

        A flood's records of one point differ only in their first 16 bytes,
        the time and the skb address (struct event in probes/nstrace.h): the
        rest of each line is worked out once per distinct remainder and kept,
        which makes a record about five times cheaper to print than decoding
        it and encoding its JSON (`make bench`, capacity). Each record whose
        remainder is new is decoded in full and shown to *linker*.
        """
        self._print(self._shaped(raws, decoder, linker))

    def _shaped(
        self, raws: Iterable[bytes], decoder: Any, linker: Linker | None
    ) -> Iterator[tuple[_Shape, int, int]]:
        shapes = self._shapes
        for raw in raws:
            shape = shapes.get(raw[_HEAD.size :])
            if shape is None:
                event = decoder.decode(raw)
                if linker is not None:
                    linker.saw(event)
                shape = self._shape(event)
                if len(shapes) >= SHAPES_KEPT:
                    shapes.clear()
                shapes[raw[_HEAD.size :]] = shape
            t_ns, skb = _HEAD.unpack_from(raw)
            yield shape, t_ns, skb

    def _print(self, shaped: Iterable[tuple[_Shape, int, int]]) -> None:
        lines = []
        number = self.grouper.number
        for shape, t_ns, skb in shaped:
            if shape is _SKIPPED:
                continue
            packet, new = number(skb, t_ns, shape.kind, shape.point)
            if self.as_json:
                lines.append(
                    f'{{"packet": {packet}, "event": {shape.event_json}, '
                    f'"t_ns": {t_ns}, {shape.rest}'
                )
            else:
                if new:
                    lines.append(f"packet #{packet}")
                lines.append(f"  #{packet:<5}  {shape.rest}")
        if lines:
            self.write("\n".join(lines) + "\n")

    def _shape(self, event: Event) -> _Shape:
        if self.netns and event.netns != self.netns:
            return _SKIPPED
        if self.as_json:
            record = hop_record(event, 0)
            for key in ("packet", "event", "t_ns"):
                del record[key]
            rest = _encode(record)[1:]  # after the brace: the line goes on after t_ns
        else:
            rest = hop_text(event, 0).removeprefix(f"#{0:<5}  ")
        return _Shape(event.kind, point_of(event), _encode(event.kind), rest)

    def write(self, text: str) -> None:
        """Write *text* whole, with os.write when *out* is a file.

        A write to a full pipe that a signal with a Python handler (ours,
        for Ctrl-C) interrupts lost the rest of its data inside io's
        BufferedWriter (CPython 3.11, reproduced with a plain script):
        lines came out cut in half. os.write returns the partial count,
        and the loop writes the rest.
        """
        try:
            fd = self.out.fileno()
        except (AttributeError, OSError, ValueError):  # StringIO and the like
            self.out.write(text)
            return
        self.out.flush()
        data = text.encode()
        while data:
            data = data[os.write(fd, data) :]

    def lost_count(self, lost: int) -> None:
        """Say so whenever the kernel's count of lost records grows."""
        if lost <= self.lost:
            return
        self.lost = lost
        if self.as_json:
            self.write(json.dumps({"lost_events": lost}) + "\n")
        else:
            self.write(f"-- {lost} events lost so far (ring buffer full)\n")

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        done = {
            "summary": True,
            "packets": self.grouper.packets,
            "events": self.grouper.events,
            "lost_events": self.lost,
            "seconds": round(elapsed_s, 3),
        }
        if self.as_json:
            self.write(json.dumps(done) + "\n")
        else:
            self.write(
                f"watched {done['packets']} packets, {done['events']} events, "
                f"{self.lost} lost, in {elapsed_s:.1f} s\n"
            )
        return done


def watch(
    chosen: Filter,
    out: TextIO = sys.stdout,
    as_json: bool = False,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """Trace matching packets until Ctrl-C (or *duration_s*); return the summary."""
    from tracer.probes import MODE_WATCH, Decoder, Probes

    printer = Printer(out, as_json, chosen.netns)
    # Without --netns, hooks and consume_skb wait for the flow (Linker).
    probes = Probes(deferred=() if chosen.netns else LINKED_ON_FIRST_MATCH)
    probes.poll_budget = POLL_BUDGET
    started = time.monotonic()
    try:
        linker = Linker(probes, _namespaces(chosen), eager=bool(chosen.netns))
        probes.configure(
            mode=MODE_WATCH,
            proto=chosen.proto,
            addr=chosen.host,
            port=chosen.port,
            netns_inode=netns.inode_of(chosen.netns) if chosen.netns else 0,
        )
        decoder = Decoder(netns.names_by_inode())
        # Said once the probes are in place, so that a script (`make bench`,
        # the tests) can wait for this line before making traffic.
        print(f"watching {chosen.describe()}; Ctrl-C to stop", file=sys.stderr)
        sys.stderr.flush()
        started = time.monotonic()
        with _stop_signals() as wakeup:
            _loop(probes, decoder, printer, wakeup, started, duration_s, linker)
        printer.records(probes.poll(0), decoder, linker)
        printer.lost_count(probes.lost())
    finally:
        probes.disable()
        probes.close()
    return printer.summary(time.monotonic() - started)


class Linker:
    """Links the hook programs of a namespace when the flow first shows there.

    A BPF netfilter program runs for every packet crossing its hook, matching
    or not, and a namespace without netfilter rules would otherwise skip the
    hook code altogether: linked up front in every lab namespace, nstrace's
    ten programs per namespace ran 14 times for each small UDP packet from
    RED to BLUE, beside the 4 runs of the device tracepoints, whatever the
    filter (bench/README.md). Watching everywhere, they are linked in
    a namespace once a matching packet is seen on one of its devices, or
    dropped, or routed there; consume_skb, which runs for every skb that ends
    well, waits for the first match anywhere. The hooks of the first packet
    through a namespace can be missed; every later one crosses them. With
    --netns the one namespace is linked at once.
    """

    def __init__(self, probes: Any, namespaces: Iterable[str], eager: bool) -> None:
        self.probes = probes
        self.waiting = set(namespaces)
        if eager:
            self._link(set(self.waiting))

    def saw(self, event: Event) -> None:
        """Link the namespace of *event* if it waits for the flow."""
        if event.netns in self.waiting:
            log.info("flow seen in %s: linking its hooks", event.netns)
            self._link({event.netns})

    def _link(self, namespaces: set[str]) -> None:
        self.waiting -= namespaces
        self.probes.attach_deferred()
        for name in sorted(namespaces):
            try:
                self.probes.link_netfilter([name])
            except OSError as exc:  # deleted since the watch began
                log.warning("hooks of %s not linked: %s", name, exc)


def _namespaces(chosen: Filter) -> list[str]:
    """Where to link the hook programs: the chosen namespace, or every named one.

    The namespace nstrace runs in is linked only when asked for by name
    (`--netns root`): the sandbox keeps its hands off it (DESIGN.md).
    """
    if chosen.netns:
        return [chosen.netns]
    return netns.list_named()


@contextlib.contextmanager
def _stop_signals() -> Iterator[socket.socket]:
    """Turn Ctrl-C and SIGTERM into a byte on a socket, for the whole watch.

    Raising KeyboardInterrupt, Python's default, could land inside libbpf's
    ring-buffer callback, where ctypes prints the exception and drops it
    (ctypes documentation, "Callback functions"); a byte written by the
    C-level handler (signal.set_wakeup_fd) wakes the loop without that risk.
    """
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_fd = signal.set_wakeup_fd(writer.fileno())
    try:
        for sig in previous:
            signal.signal(sig, lambda _signum, _frame: None)
            # Restart an interrupted write instead of failing it: a batch of
            # lines cut short by Ctrl-C while stdout was full was seen lost.
            signal.siginterrupt(sig, False)
        yield reader
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_fd)
        reader.close()
        writer.close()


def _loop(
    probes: Any,
    decoder: Any,
    printer: Printer,
    wakeup: socket.socket,
    started: float,
    duration_s: float | None,
    linker: Linker,
) -> None:
    deadline = started + duration_s if duration_s else None
    with selectors.DefaultSelector() as selector:
        selector.register(probes.fileno(), selectors.EVENT_READ, "ring")
        selector.register(wakeup, selectors.EVENT_READ, "signal")
        while True:
            wait_s = POLL_MS / 1000
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    return
            ready = selector.select(wait_s)
            printer.records(probes.poll(0), decoder, linker)
            printer.lost_count(probes.lost())
            if any(key.data == "signal" for key, _mask in ready):
                log.debug("interrupted; detaching")
                return


def main(args: argparse.Namespace) -> int:
    """The `nstrace watch` command."""
    chosen = parse_filter(args.netns, args.host, args.proto, args.port)
    watch(chosen, as_json=args.json, duration_s=args.duration)
    return 0
