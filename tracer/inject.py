"""Injection: build the tagged probe with scapy and send it from the source.

The probe is an ICMP echo request whose identifier is chosen at random per
run; the in-kernel filter keeps only packets that carry it (the request, its
reply, and ICMP errors that quote it), and it is what ties the reply to the
request across NAT. The payload names nstrace and a nonce, so that the probe
is recognisable in a capture.

The socket is a raw ICMP socket created inside the source namespace: the
kernel picks the source address and routes the probe exactly as it would for
`ping`. A route lookup that fails makes sendto() fail with ENETUNREACH, which
is the tutorial's "connect: Network is unreachable" (step 3). sendto() runs
on a thread inside the namespace, so that whatever the kernel does in process
context (the first route lookup) is attributed to that namespace.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
from dataclasses import dataclass

from tracer import netns
from tracer.events import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_ERRORS

log = logging.getLogger(__name__)

PAYLOAD_PREFIX = b"nstrace "


@dataclass
class Reply:
    """What reached the probe's socket: an echo reply or an ICMP error."""

    src: str
    dst: str
    icmp_type: int
    icmp_code: int

    def to_dict(self) -> dict:
        return {"src": self.src, "dst": self.dst, "icmp_type": self.icmp_type,
                "icmp_code": self.icmp_code}


class IcmpProbe:
    """One ICMP echo probe from *src_netns* to *dst*, and its receiving socket."""

    def __init__(self, src_netns: str, dst: str, ident: int | None = None) -> None:
        self.src_netns = src_netns
        self.dst = dst
        self.ident = ident or random.randint(1, 0xFFFF)
        self.seq = 1
        self.nonce = os.urandom(8)
        self.sock = netns.run_in(src_netns, self._open)

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setblocking(False)
        return sock

    def packet(self) -> bytes:
        """The ICMP echo request, built by scapy (the IP header is the kernel's)."""
        from scapy.layers.inet import ICMP  # slow to import: only when sending
        from scapy.packet import Raw

        probe = ICMP(type=ICMP_ECHO_REQUEST, id=self.ident, seq=self.seq)
        return bytes(probe / Raw(PAYLOAD_PREFIX + self.nonce.hex().encode()))

    def send(self) -> str | None:
        """Send the probe; None, or the errno name if the kernel refused it."""
        data = self.packet()
        try:
            netns.run_in(self.src_netns, lambda: self.sock.sendto(data, (self.dst, 0)))
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            log.info("sendto %s refused: %s", self.dst, name)
            return name
        return None

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> Reply | None:
        """Read what is queued; the first packet that answers this probe."""
        from scapy.layers.inet import ICMP, IP, IPerror, ICMPerror

        while True:
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return None
            packet = IP(data)
            icmp = packet.getlayer(ICMP)
            if icmp is None:
                continue
            if icmp.type == ICMP_ECHO_REPLY and icmp.id == self.ident:
                return Reply(packet.src, packet.dst, icmp.type, icmp.code)
            inner = packet.getlayer(ICMPerror)
            if icmp.type in ICMP_ERRORS and inner is not None and inner.id == self.ident:
                if packet.getlayer(IPerror) is not None:
                    return Reply(packet.src, packet.dst, icmp.type, icmp.code)

    def close(self) -> None:
        self.sock.close()
