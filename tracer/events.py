"""The decoded events that flow from the probes into path assembly.

An :class:`Event` is what one observation point saw of one packet: a device
receive or transmit, a netfilter hook crossed at its first or last priority, a
route lookup, a neighbour (ARP) update, or an skb being freed. The probe engine
(`tracer.probes`) decodes the kernel's raw records into these; the pure core
(`tracer.path`) and its unit tests only ever see this type, so a recorded trace
can be replayed without a kernel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Event kinds, as they appear in JSON hops (`event`).
RX = "rx"  # netif_receive_skb: the packet entered a device
TX = "tx"  # net_dev_start_xmit: the packet left through a device
HOOK = "hook"  # BPF netfilter program at an IPv4 hook
ROUTE = "route"  # fib_table_lookup: a route lookup and its result
NEIGH = "neigh"  # neigh_update: ARP state of a neighbour changed
FREE = "free"  # kfree_skb: the skb was freed, with the kernel's drop reason
SEND = "send"  # the probe left the injector's socket (user space)
RECV = "recv"  # a reply reached the injector's socket (user space)
BRIDGE = "bridge"  # nftables bridge-family trace (filled by rule attribution)

KINDS = (RX, TX, HOOK, ROUTE, NEIGH, FREE, SEND, RECV, BRIDGE)

# IPv4 netfilter hooks, in the kernel's numbering (enum nf_inet_hooks,
# include/uapi/linux/netfilter.h).
HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")

# The two priorities at which nstrace links its netfilter programs.
FIRST = "first"
LAST = "last"

REQUEST = "request"
REPLY = "reply"

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_ERRORS = (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED)

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17


@dataclass
class Event:
    """One observation of the probe's packet (or its reply) by the kernel.

    Addresses are dotted IPv4 strings as seen at that point: for a hook event
    at its last priority they are the addresses after the hook's NAT, which is
    how address rewrites are found. ``netns`` is the namespace's name as the
    user knows it (``RED``, ``host``, ``root``), or ``netns:<inode>`` when the
    namespace has no name.
    """

    kind: str
    t_ns: int
    netns: str
    skb: int = 0
    dev: str | None = None
    ifindex: int = 0
    # Hook events: which hook, which of our two priorities, and the hook
    # state's devices (at OUTPUT skb->dev is NULL, so these are the truth).
    hook: str | None = None
    stage: str | None = None
    in_dev: str | None = None
    out_dev: str | None = None
    # The packet as parsed at this point.
    src: str | None = None
    dst: str | None = None
    proto: int = 0
    icmp_type: int | None = None
    icmp_code: int | None = None
    ident: int = 0  # ICMP echo identifier (of the inner packet for errors)
    seq: int = 0
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    # The packet is an ICMP error and src/dst/ident describe its outer header;
    # inner_src/inner_dst are the quoted original packet's addresses.
    inner_src: str | None = None
    inner_dst: str | None = None
    # Free events: the kernel's skb_drop_reason name (``NETFILTER_DROP``...).
    reason: str | None = None
    # Route events: the table looked up, the result's device and gateway,
    # and the lookup's error (0, or a negative errno such as -ENETUNREACH).
    table: int | None = None
    gateway: str | None = None
    error: int = 0
    # Neighbour events: the neighbour's address and its new NUD state name.
    neigh_addr: str | None = None
    neigh_state: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict without the empty fields (for recordings)."""
        keep = ("kind", "t_ns", "netns", "icmp_type", "icmp_code")
        out = {}
        for key, value in asdict(self).items():
            if value is None or (value in (0, {}) and key not in keep):
                continue
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        return cls(**data)
