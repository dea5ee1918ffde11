"""The probe engine: load nstrace's BPF object, attach it, decode its records.

One object (probes/nstrace.bpf.c) holds every observation point. Each point
has the same small lifecycle: can it run here (load and attach, tried once),
attach, decode, detach. What the kernel refuses is reported once, on stderr,
and tracing carries on with the rest; :attr:`Probes.unavailable` lists it.

Netfilter programs are linked at the five IPv4 hooks of every namespace in
play, twice: just after the first priority and just before the last one that
the kernel allows for a BPF link (NF_IP_PRI_FIRST and NF_IP_PRI_LAST are
refused with ERANGE, net/netfilter/nf_bpf_link.c). A link is made in the
namespace of the thread that creates it, so each is made on a thread that
entered that namespace (tracer.netns.run_in).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from tracer import bpf, btf, netns
from tracer.errors import CannotTraceError
from tracer.events import (
    FIRST,
    FREE,
    HOOK,
    HOOKS,
    LAST,
    NEIGH,
    ROUTE,
    RX,
    TX,
    Event,
)

log = logging.getLogger(__name__)

PRIORITY_FIRST = -(2**31) + 1
PRIORITY_LAST = 2**31 - 2
PRIORITY_TRIES = 64  # priorities tried inward from each edge when one is taken

TRACEPOINTS = (
    "on_receive",
    "on_transmit",
    "on_free",
    "on_consume",
    "on_route",
    "on_neigh",
)
FEATURES = ("feature_fentry", "feature_kprobe")
NETFILTER = {"on_hook_first": PRIORITY_FIRST, "on_hook_last": PRIORITY_LAST}

MODE_PROBE = 0
MODE_WATCH = 1

# struct event in probes/nstrace.h, 128 bytes, little endian.
RECORD = struct.Struct("<QQIIiIIIBBBBIIIIIHHHHBBBBBB2x16s16s16s")
KINDS = {1: RX, 2: TX, 3: HOOK, 4: ROUTE, 5: NEIGH, 6: FREE}
STAGES = {1: FIRST, 2: LAST}

# include/uapi/linux/neighbour.h
NUD_STATES = {
    0x01: "INCOMPLETE",
    0x02: "REACHABLE",
    0x04: "STALE",
    0x08: "DELAY",
    0x10: "PROBE",
    0x20: "FAILED",
    0x40: "NOARP",
    0x80: "PERMANENT",
}


class Config(ctypes.Structure):
    """struct config in probes/nstrace.h."""

    _fields_ = [
        (name, ctypes.c_uint32)
        for name in (
            "enabled",
            "mode",
            "proto",
            "tag",
            "dst",
            "addr",
            "port",
            "netns",
            "src_netns",
        )
    ]


def default_object_path() -> str:
    """probes/build/nstrace.bpf.o beside the package; NSTRACE_BPF_OBJECT overrides."""
    here = Path(__file__).resolve().parent.parent
    return os.environ.get(
        "NSTRACE_BPF_OBJECT", str(here / "probes" / "build" / "nstrace.bpf.o")
    )


# Cached: a flood repeats the same few addresses and device names, and
# `nstrace watch` decodes every record (a third less decoding time per record).
@functools.lru_cache(maxsize=65536)
def _ip(value: int) -> str | None:
    return socket.inet_ntoa(value.to_bytes(4, "little")) if value else None


@functools.lru_cache(maxsize=65536)
def _name(raw: bytes) -> str | None:
    name = raw.split(b"\0", 1)[0]
    return name.decode(errors="replace") if name else None


def ip_to_u32(address: str) -> int:
    """A dotted address as the u32 that BPF compares (network byte order)."""
    return int.from_bytes(socket.inet_aton(address), "little")


def nud_state(value: int) -> str:
    return NUD_STATES.get(value, "NONE" if value == 0 else hex(value))


class Decoder:
    """Turns raw ring-buffer records into Events with namespace names."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = dict(names)
        self.reasons = btf.drop_reasons()

    def netns_name(self, inode: int) -> str:
        if inode not in self.names:
            self.names.update(netns.names_by_inode())
        return self.names.get(inode, f"netns:{inode}")

    def decode(self, raw: bytes) -> Event:
        (
            t_ns,
            skb,
            inode,
            ifindex,
            value,
            table,
            aux,
            aux2,
            kind,
            hook,
            stage,
            _pad,
            _pad2,
            saddr,
            daddr,
            inner_saddr,
            inner_daddr,
            ident,
            seq,
            sport,
            dport,
            proto,
            _inner_proto,
            icmp_type,
            icmp_code,
            tcp_flags,
            is_error,
            dev,
            in_dev,
            out_dev,
        ) = RECORD.unpack_from(raw)
        event = Event(
            kind=KINDS.get(kind, f"kind{kind}"),
            t_ns=t_ns,
            netns=self.netns_name(inode),
            skb=skb,
            dev=_name(dev),
            ifindex=ifindex,
            src=_ip(saddr),
            dst=_ip(daddr),
            proto=proto,
        )
        if event.kind in (RX, TX, HOOK, FREE) and proto:
            self._fill_packet(
                event, ident, seq, sport, dport, icmp_type, icmp_code, tcp_flags
            )
            if is_error:
                event.inner_src, event.inner_dst = _ip(inner_saddr), _ip(inner_daddr)
        if event.kind == HOOK:
            event.hook = HOOKS[hook] if hook < len(HOOKS) else str(hook)
            event.stage = STAGES.get(stage)
            event.in_dev, event.out_dev = _name(in_dev), _name(out_dev)
        elif event.kind == FREE:
            event.reason = self.reasons.get(value, str(value))
        elif event.kind == ROUTE:
            event.error, event.table, event.gateway = value, table, _ip(aux)
        elif event.kind == NEIGH:
            event.neigh_addr = _ip(aux)
            event.neigh_state = nud_state(value & 0xFF)
            event.extra["old_state"] = nud_state(aux2)
        return event

    @staticmethod
    def _fill_packet(
        event: Event,
        ident: int,
        seq: int,
        sport: int,
        dport: int,
        icmp_type: int,
        icmp_code: int,
        tcp_flags: int,
    ) -> None:
        if event.proto == 1:
            event.icmp_type, event.icmp_code = icmp_type, icmp_code
            event.ident, event.seq = ident, seq
        event.sport, event.dport, event.tcp_flags = sport, dport, tcp_flags
        if event.proto == 1 and (sport or dport):  # an ICMP error quoting TCP/UDP
            event.sport, event.dport = sport, dport


def _link_at_free_priority(
    prog_fd: int, hooknum: int, priority: int, inward: int
) -> int:
    """Link at *priority*, or the nearest free one towards the middle.

    Two BPF netfilter programs may not share a hook's priority: the kernel
    refuses the second with EBUSY (nf_hook_entries_grow, net/netfilter/core.c,
    since BPF netfilter links in 6.4). A second nstrace tracing the same
    namespace at the same time, or another tool, takes the next one.
    """
    for step in range(PRIORITY_TRIES):
        try:
            return bpf.netfilter_link(prog_fd, hooknum, priority + inward * step)
        except bpf.BpfError as exc:
            if exc.errno != errno.EBUSY:
                raise
    raise CannotTraceError(
        f"{PRIORITY_TRIES} BPF netfilter programs already sit at the edge of hook "
        f"{HOOKS[hooknum]}; stop other tracers (see `bpftool link list`)"
    )


class Probes:
    """nstrace's BPF object, loaded and attached; close() detaches everything."""

    def __init__(
        self, object_path: str | None = None, *, deferred: Iterable[str] = ()
    ) -> None:
        """Load and attach all but the tracepoints named in *deferred*.

        Those wait for attach_deferred(): a watch attaches consume_skb only
        once its flow shows up (tracer/watch.py, Linker).
        """
        btf.check_btf()
        if os.geteuid() != 0:
            raise CannotTraceError(
                "nstrace needs root to load BPF programs; run it with sudo"
            )
        self.unavailable: dict[str, str] = {}
        self.netns_linked: list[str] = []
        self.deferred = [name for name in TRACEPOINTS if name in set(deferred)]
        self.records: list[bytes] = []
        # Most records one poll() returns (None: all there are); `nstrace
        # watch` sets it so that a flood cannot keep it from Ctrl-C.
        self.poll_budget: int | None = None
        self.timings: dict[str, float] = {}
        started = time.perf_counter()
        self.obj = self._load(object_path or default_object_path())
        try:
            self.config_fd = self.obj.map_fd("config")
            self.lost_fd = self.obj.map_fd("lost")
            self.netns_fd = self.obj.map_fd("netns_in_play")
            self.cursor_fd = self.obj.map_fd("cursors")
            self.ncpus = bpf.possible_cpus()
            self._attach_tracepoints()
            self.ring = bpf.RingBuffer(self.obj.map_fd("events"), self._on_record)
        except BaseException:
            self.obj.close()
            raise
        self.timings["load_attach_ms"] = (time.perf_counter() - started) * 1000

    def _load(self, path: str) -> bpf.BpfObject:
        obj = bpf.BpfObject(path)
        for name in FEATURES:
            obj.set_autoload(name, False)
        for name in NETFILTER:
            obj.prepare_netfilter(name)
        try:
            obj.load()
            return obj
        except bpf.BpfError as exc:
            obj.close()
            log.warning("netfilter programs refused (%s); hooks will not be seen", exc)
        # Kernels before 6.4 have no BPF_PROG_TYPE_NETFILTER: carry on without.
        obj = bpf.BpfObject(path)
        for name in (*FEATURES, *NETFILTER):
            obj.set_autoload(name, False)
        for name in NETFILTER:
            self.unavailable[name] = "netfilter programs need kernel 6.4 or later"
        try:
            obj.load()
        except bpf.BpfError as exc:
            obj.close()
            raise CannotTraceError(
                f"the kernel refused nstrace's BPF programs ({exc}); "
                "see `nstrace doctor`, and -vv for the verifier's log"
            ) from None
        return obj

    def _attach_tracepoints(self) -> None:
        for name in TRACEPOINTS:
            if name not in self.deferred:
                self._attach(name)

    def attach_deferred(self) -> None:
        """Attach the tracepoints that __init__ was told to leave for later."""
        for name in self.deferred:
            self._attach(name)
        self.deferred.clear()

    def _attach(self, name: str) -> None:
        try:
            self.obj.attach(name)
        except bpf.BpfError as exc:
            self.unavailable[name] = str(exc)
            log.warning(
                "%s cannot attach here (%s); carrying on without it",
                self.obj.programs[name].section,
                exc,
            )

    def link_netfilter(self, namespaces: Iterable[str]) -> None:
        """Link the hook programs at every IPv4 hook of each namespace."""
        if any(name in self.unavailable for name in NETFILTER):
            return
        fds = {name: self.obj.programs[name].fd for name in NETFILTER}
        for ns in namespaces:
            if ns in self.netns_linked:
                continue
            made = netns.run_in(ns, lambda: self._links_here(fds))
            for fd in made:
                self.obj.add_link_fd(fd)
            self.netns_linked.append(ns)
            key, one = ctypes.c_uint32(netns.inode_of(ns)), ctypes.c_uint8(1)
            bpf.map_update(self.netns_fd, key, one)

    @staticmethod
    def _links_here(fds: dict[str, int]) -> list[int]:
        made: list[int] = []
        try:
            for hooknum in range(len(HOOKS)):
                for name, priority in NETFILTER.items():
                    inward = 1 if priority < 0 else -1
                    made.append(
                        _link_at_free_priority(fds[name], hooknum, priority, inward)
                    )
        except BaseException:
            for fd in made:
                os.close(fd)
            raise
        return made

    def configure(
        self,
        *,
        mode: int = MODE_PROBE,
        proto: int = 1,
        tag: int = 0,
        dst: str | None = None,
        addr: str | None = None,
        port: int = 0,
        netns_inode: int = 0,
        src_netns: str | None = None,
    ) -> None:
        """Point the in-kernel filter at one flow and enable the programs.

        *src_netns* is where a probe is sent from: its first route lookup is
        recognised by that (see on_route in probes/nstrace.bpf.c).
        """
        self.reset_cursors()
        cfg = Config(
            enabled=1,
            mode=mode,
            proto=proto,
            tag=tag,
            dst=ip_to_u32(dst) if dst else 0,
            addr=ip_to_u32(addr) if addr else 0,
            port=port,
            netns=netns_inode,
            src_netns=netns.inode_of(src_netns) if src_netns else 0,
        )
        bpf.map_update(self.config_fd, ctypes.c_uint32(0), cfg)

    def disable(self) -> None:
        bpf.map_update(self.config_fd, ctypes.c_uint32(0), Config())

    def reset_cursors(self) -> None:
        zeros = (ctypes.c_uint8 * (24 * self.ncpus))()
        bpf.map_update(self.cursor_fd, ctypes.c_uint32(0), zeros)

    def lost(self) -> int:
        """Records that did not fit in the ring buffer, summed over CPUs."""
        counts = (ctypes.c_uint64 * self.ncpus)()
        if not bpf.map_lookup(self.lost_fd, ctypes.c_uint32(0), counts):
            return 0
        return sum(counts)

    def _on_record(self, raw: bytes) -> bool:
        self.records.append(raw)
        return self.poll_budget is not None and len(self.records) >= self.poll_budget

    def poll(self, timeout_ms: int = 0) -> list[bytes]:
        """Raw records that arrived, waiting up to *timeout_ms* for the first."""
        self.ring.poll(timeout_ms)
        records, self.records[:] = list(self.records), []
        return records

    def fileno(self) -> int:
        return self.ring.fileno()

    def close(self) -> None:
        if hasattr(self, "ring"):  # absent when __init__ failed before it
            self.ring.close()
        self.obj.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
