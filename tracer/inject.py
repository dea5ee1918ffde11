"""Injection: build the tagged probe with scapy and send it from the source.

Every probe carries a tag chosen at random per run, which the in-kernel
filter keeps (the request, its reply, and ICMP errors that quote it) and which
ties the reply to the request across NAT:

- ICMP: an echo request whose identifier is the tag; the payload names
  nstrace and a nonce, so that the probe is recognisable in a capture.
- TCP: a SYN from the tag as source port to the chosen port. A SYN-ACK is a
  reply, a reset means nobody listens. The source's own kernel answers the
  SYN-ACK with a reset, as it does for any SYN sent from a raw socket.
- UDP: a datagram from the tag as source port; an answer is a reply, an ICMP
  port unreachable means nobody listens.

Sockets are raw sockets created inside the source namespace: the kernel
routes the probe and adds the IP header exactly as it would for `ping`. A
route lookup that fails makes sendto() (or, for TCP and UDP, finding the
source address first) fail with ENETUNREACH: the tutorial's "connect: Network
is unreachable" (step 3). sendto() runs on a thread inside the namespace, so
that what the kernel does in process context (the first route lookup) is
attributed to that namespace.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import random
import socket
import sys
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass

from tracer import netns
from tracer.events import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_ERRORS,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
)

log = logging.getLogger(__name__)

PAYLOAD_PREFIX = b"nstrace "
# Source ports for TCP and UDP tags: the kernel's default ephemeral range
# (net.ipv4.ip_local_port_range), where a probe looks like any client.
TAG_PORTS = (32768, 60999)
TCP_SYN, TCP_RST, TCP_ACK = 0x02, 0x04, 0x10

_scapy_loader: threading.Thread | None = None
_scapy_tried = threading.Event()  # the loader thread is done with scapy
SWITCH_INTERVAL_S = 0.0005


def load_scapy() -> None:
    """Import the scapy layers that build and read probes, skipping the slow parts.

    A plain `import scapy.layers.inet` took 0.35 s here, most of a whole
    `nstrace ping` (`make bench`). Several parts of it serve nothing nstrace
    does, which builds IPv4 probes and reads IPv4 answers on sockets of its
    own (measured with `python3 -X importtime` and cProfile, scapy 2.8):

    - reading the routing tables into scapy's own (the kernel routes the
      probe): off through `conf.route_autoload` / `conf.route6_autoload`
      ("Disable this if your routing table is too big", scapy/config.py);
    - probing the optional `cryptography` package for TLS and IPsec layers:
      kept from importing while scapy loads (a None entry in sys.modules
      makes an import fail, per the import system's reference);
    - listing the interfaces over rtnetlink, each message dissected by
      scapy's own netlink layers (`conf.ifaces.reload()` at the end of
      scapy/arch/__init__.py): 15 to 35 ms, for scapy's own sockets only;
    - unpickling the MAC vendor and Bluetooth vendor tables from scapy's
      cache (scapy/data.py `scapy_data_cache`): a 2.7 MB pickle, 25 to
      50 ms, for showing MAC addresses with their vendor;
    - the IPv6 layers (`conf.ipv6_enabled`, scapy/layers/inet.py's last
      lines): 15 to 25 ms; nstrace traces IPv4 only, and scapy's IPv4 layers
      look at IPv6 only when a layer's underlayer is not IPv4.

    The first two halved the import; skipping the other three as well took
    it from 150-200 ms down to 80-100 ms.
    """
    if _scapy_loader is not None and _scapy_loader is not threading.current_thread():
        _scapy_tried.wait()
    if "scapy.layers.inet" in sys.modules:
        return
    stubs = _stub_modules()
    try:
        import scapy.main

        cache = scapy.main.SCAPY_CACHE_FOLDER
        # Without a cache folder scapy.data reads the vendor tables from
        # scapy.libs.manuf and scapy.libs.bluetoothids, stubbed here as empty.
        scapy.main.SCAPY_CACHE_FOLDER = None
        try:
            _import_inet()
        finally:
            scapy.main.SCAPY_CACHE_FOLDER = cache
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


def _stub_modules() -> list[str]:
    """Put in sys.modules what scapy's import must not load; return their names."""
    stubs = []
    if "cryptography" not in sys.modules:
        sys.modules["cryptography"] = None  # type: ignore[assignment]
        stubs.append("cryptography")
    for name, data in (("scapy.libs.manuf", ""), ("scapy.libs.bluetoothids", {})):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.DATA = data  # type: ignore[attr-defined]
            sys.modules[name] = module
            stubs.append(name)
    return stubs


def _import_inet() -> None:
    from scapy.config import conf

    conf.route_autoload = False
    conf.route6_autoload = False
    conf.ipv6_enabled = False
    import scapy.interfaces

    # An instance attribute shadows the method while scapy.arch loads;
    # deleted afterwards, so that conf.ifaces.reload() still lists them.
    conf.ifaces.reload = _no_interfaces
    try:
        import scapy.layers.inet  # noqa: F401
    finally:
        del conf.ifaces.reload


def _no_interfaces() -> None:
    log.debug("scapy's interface list is left empty: nstrace opens its own sockets")


def preload_scapy(then: Sequence[str] = ()) -> None:
    """Start importing scapy on a thread, while the probes load (kernel time).

    The modules named in *then* are imported next on the same thread, once
    scapy is in: whatever the caller needs only later (the renderer's rich)
    then loads while the main thread waits for the kernel, rather than
    before the probes load.
    """
    global _scapy_loader
    if _scapy_loader is None and "scapy.layers.inet" not in sys.modules:
        # The main thread's libbpf calls each release the GIL and must take it
        # back; at the default 5 ms switch interval each return waited behind
        # the importing thread, and probe loading took 2-3 times as long.
        previous = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        _scapy_loader = threading.Thread(
            target=_load_quietly,
            args=(previous, tuple(then)),
            name="scapy",
            daemon=True,
        )
        _scapy_loader.start()


def _load_quietly(previous: float, then: tuple[str, ...]) -> None:
    # Whatever fails here fails again, and is reported, when prepare() calls
    # load_scapy() (or the caller imports the module) on the main thread.
    try:
        try:
            load_scapy()
        except Exception as exc:  # noqa: BLE001
            log.debug("importing scapy in the background failed: %s", exc)
        finally:
            _scapy_tried.set()
        for name in then:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001
                log.debug("importing %s in the background failed: %s", name, exc)
    finally:
        sys.setswitchinterval(previous)


@dataclass
class Reply:
    """What reached the probe's socket: an answer or an ICMP error."""

    src: str
    dst: str
    icmp_type: int | None = None
    icmp_code: int | None = None
    tcp_flags: int = 0

    def to_dict(self) -> dict:
        return {
            "src": self.src,
            "dst": self.dst,
            "icmp_type": self.icmp_type,
            "icmp_code": self.icmp_code,
            "tcp_flags": self.tcp_flags,
        }


def _open(proto: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    sock.setblocking(False)
    return sock


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


class Probe:
    """One tagged probe from *src_netns* to *dst*, and the sockets that hear back."""

    proto = IPPROTO_ICMP
    name = "icmp"

    def __init__(self, src_netns: str, dst: str) -> None:
        self.src_netns = src_netns
        self.dst = dst
        self.tag = self.new_tag()
        self.nonce = os.urandom(8)
        # Every probe listens for ICMP: errors quoting it can come from anywhere.
        self.icmp_sock = netns.run_in(src_netns, lambda: _open(IPPROTO_ICMP))
        self.sockets = [self.icmp_sock]
        self.data: bytes | None = None
        self.refused: str | None = None

    def new_tag(self) -> int:
        return random.randint(1, 0xFFFF)

    def packet(self) -> bytes:
        raise NotImplementedError

    def prepare(self) -> str | None:
        """Build the packet before tracing starts; None, or why it cannot be."""
        load_scapy()
        self.data = self.packet()
        return None

    def send(self) -> str | None:
        """Send the prepared probe; None, or the errno name if the kernel refused it."""
        if self.data is None:
            return self.refused
        sock = self.sockets[-1]
        try:
            netns.run_in(self.src_netns, lambda: sock.sendto(self.data, (self.dst, 0)))
        except OSError as exc:
            log.info("sending to %s refused: %s", self.dst, _errno_name(exc))
            return _errno_name(exc)
        return None

    def filenos(self) -> list[int]:
        return [sock.fileno() for sock in self.sockets]

    def receive(self) -> Reply | None:
        """Read what is queued; the first packet that answers this probe."""
        from scapy.layers.inet import IP

        for sock in self.sockets:
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                reply = self.answer(IP(data))
                if reply is not None:
                    return reply
        return None

    def answer(self, packet: object) -> Reply | None:
        """The reply, if *packet* (a scapy IP packet) answers this probe."""
        return self._icmp_error(packet)

    def _icmp_error(self, packet: object) -> Reply | None:
        from scapy.layers.inet import ICMP, ICMPerror, IPerror, TCPerror, UDPerror

        icmp = packet.getlayer(ICMP)
        if icmp is None or icmp.type not in ICMP_ERRORS:
            return None
        quoted = packet.getlayer(IPerror)
        if quoted is None or quoted.proto != self.proto:
            return None
        inner = {IPPROTO_ICMP: ICMPerror, IPPROTO_TCP: TCPerror, IPPROTO_UDP: UDPerror}
        layer = packet.getlayer(inner[self.proto])
        if layer is None or not self._quotes_tag(layer):
            return None
        return Reply(packet.src, packet.dst, icmp.type, icmp.code)

    def _quotes_tag(self, layer: object) -> bool:
        return getattr(layer, "sport", None) == self.tag

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class IcmpProbe(Probe):
    """An ICMP echo request whose identifier is the tag."""

    def packet(self) -> bytes:
        from scapy.layers.inet import ICMP  # slow to import: only when sending
        from scapy.packet import Raw

        probe = ICMP(type=ICMP_ECHO_REQUEST, id=self.tag, seq=1)
        return bytes(probe / Raw(PAYLOAD_PREFIX + self.nonce.hex().encode()))

    def answer(self, packet: object) -> Reply | None:
        from scapy.layers.inet import ICMP

        icmp = packet.getlayer(ICMP)
        if icmp is not None and icmp.type == ICMP_ECHO_REPLY and icmp.id == self.tag:
            return Reply(packet.src, packet.dst, icmp.type, icmp.code)
        return self._icmp_error(packet)

    def _quotes_tag(self, layer: object) -> bool:
        return getattr(layer, "id", None) == self.tag


class PortProbe(Probe):
    """TCP or UDP: the tag is the source port; needs the source address first."""

    def __init__(self, src_netns: str, dst: str, port: int) -> None:
        super().__init__(src_netns, dst)
        self.port = port
        self.sockets.append(netns.run_in(src_netns, lambda: _open(self.proto)))

    def new_tag(self) -> int:
        return random.randint(*TAG_PORTS)

    def source_address(self) -> str:
        """The address the kernel would send from (a route lookup, no packet)."""

        def lookup() -> str:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.connect((self.dst, self.port))
                return sock.getsockname()[0]

        return netns.run_in(self.src_netns, lookup)

    def prepare(self) -> str | None:
        try:
            self.src = self.source_address()
        except OSError as exc:
            log.info(
                "no route from %s to %s: %s", self.src_netns, self.dst, _errno_name(exc)
            )
            self.refused = _errno_name(exc)
            return self.refused
        return super().prepare()

    def send(self) -> str | None:
        if self.refused:
            # Ask again now that tracing is on, so that the failing route
            # lookup is seen; nothing is sent either way.
            try:
                self.source_address()
            except OSError as exc:
                return _errno_name(exc)
        return super().send()

    def transport(self) -> object:
        raise NotImplementedError

    def packet(self) -> bytes:
        from scapy.layers.inet import IP

        # The checksum covers a pseudo-header with both addresses: build the
        # whole datagram, then hand the kernel the transport part only.
        datagram = IP(src=self.src, dst=self.dst) / self.transport()
        return bytes(datagram)[20:]

    def answer(self, packet: object) -> Reply | None:
        layer = packet.getlayer(self.layer_name())
        if layer is not None and layer.dport == self.tag and layer.sport == self.port:
            flags = int(layer.flags) if self.proto == IPPROTO_TCP else 0
            return Reply(packet.src, packet.dst, tcp_flags=flags)
        return self._icmp_error(packet)

    def layer_name(self) -> str:
        return self.name.upper()


class TcpProbe(PortProbe):
    proto = IPPROTO_TCP
    name = "tcp"

    def transport(self) -> object:
        from scapy.layers.inet import TCP

        return TCP(
            sport=self.tag,
            dport=self.port,
            flags="S",
            seq=int.from_bytes(self.nonce[:4], "big"),
        )


class UdpProbe(PortProbe):
    proto = IPPROTO_UDP
    name = "udp"

    def transport(self) -> object:
        from scapy.layers.inet import UDP
        from scapy.packet import Raw

        payload = PAYLOAD_PREFIX + self.nonce.hex().encode()
        return UDP(sport=self.tag, dport=self.port) / Raw(payload)


def make_probe(proto: str, src_netns: str, dst: str, port: int | None) -> Probe:
    """The probe for *proto* ('icmp', 'tcp' or 'udp')."""
    if proto == "icmp":
        return IcmpProbe(src_netns, dst)
    kind = TcpProbe if proto == "tcp" else UdpProbe
    return kind(src_netns, dst, port or 0)
