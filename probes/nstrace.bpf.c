// SPDX-License-Identifier: GPL-2.0
/*
 * nstrace's observation points, compiled once with clang into one CO-RE
 * object (probes/build/nstrace.bpf.o) and loaded by tracer/bpf.py.
 *
 * Every program parses the packet it sees, keeps only the probe's flow (as
 * configured from user space in the `config` map) and sends one record per
 * observation through one ring buffer. Records that do not fit are counted in
 * `lost`, never silently dropped.
 *
 * No kernel headers: the few kernel structures read here are declared below
 * with only the fields nstrace needs, marked preserve_access_index so that
 * libbpf relocates every field offset against the running kernel's BTF
 * (/sys/kernel/btf/vmlinux) at load time.
 */
#include "nstrace.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} events SEC(".maps");

/* Records that did not fit in the ring buffer, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

/* Namespaces in play (inode -> 1): neighbour events are kept only there. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u8);
} netns_in_play SEC(".maps");

/*
 * skbs of the flow seen so far (address -> when last seen): a free is
 * attributed to the flow by its skb address when its headers can no longer
 * be parsed at that point. An skb that ends normally (consume_skb) leaves the
 * map, and a stale entry is ignored, because the memory of a freed skb is
 * soon reused for an unrelated packet.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} tracked_skbs SEC(".maps");

#define TRACKED_FRESH_NS (100 * 1000 * 1000ULL)

/*
 * The last matching packet seen on this CPU. Route lookups carry no skb and
 * no namespace: a lookup whose addresses are this packet's (either way round)
 * shortly after it was seen belongs to the flow and to that namespace.
 */
struct cursor {
	__u64 t_ns;
	__u32 netns;
	__u32 saddr;
	__u32 daddr;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cursor);
} cursors SEC(".maps");

#define CURSOR_FRESH_NS (5 * 1000 * 1000ULL)
#define LOOPBACK_IFINDEX 1

static __always_inline struct config *get_config(void)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);

	if (!cfg || !cfg->enabled)
		return NULL;
	return cfg;
}

static __always_inline __u32 netns_of_dev(struct net_device *dev)
{
	if (!dev)
		return 0;
	return BPF_CORE_READ(dev, nd_net.net, ns.inum);
}

static __always_inline __u32 netns_of_task(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	return BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
}

/*
 * Packet memory is read in place: bpf_rdonly_cast (kernel 6.2) turns an
 * address into a read-only pointer of a kernel BTF type, which the verifier
 * inlines away; each field is then one load that the JIT guards against
 * faults (a bad address reads as zero). A bpf_probe_read_kernel call per
 * header cost more than everything else a program does for a packet that is
 * not the flow's, and every packet crossing a traced namespace pays it.
 */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

#define packet_cast(ptr, type)                                                 \
	((const struct type *)bpf_rdonly_cast((ptr),                           \
					      bpf_core_type_id_kernel(struct type)))

/* The source and destination ports of a TCP or UDP header at @l4. */
static __always_inline void read_ports(unsigned char *l4, __u8 proto,
				       struct packet *pkt)
{
	if (proto == IPPROTO_TCP) {
		const struct tcphdr *tcp = packet_cast(l4, tcphdr);

		pkt->sport = bpf_ntohs(tcp->source);
		pkt->dport = bpf_ntohs(tcp->dest);
	} else if (proto == IPPROTO_UDP) {
		const struct udphdr *udp = packet_cast(l4, udphdr);

		pkt->sport = bpf_ntohs(udp->source);
		pkt->dport = bpf_ntohs(udp->dest);
	}
}

static __always_inline void read_echo(const struct icmphdr *icmp,
				      struct packet *pkt)
{
	pkt->ident = bpf_ntohs(icmp->un.echo.id);
	pkt->seq = bpf_ntohs(icmp->un.echo.sequence);
}

/* Read the transport bits nstrace filters on, after the IPv4 header @ip. */
static __always_inline void parse_ipv4(unsigned char *l3, const struct iphdr *ip,
				       struct packet *pkt)
{
	unsigned char *l4 = l3 + ip->ihl * 4;
	const struct icmphdr *icmp;
	const struct iphdr *inner;

	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->proto = ip->protocol;
	if (pkt->proto != IPPROTO_ICMP) {
		read_ports(l4, pkt->proto, pkt);
		if (pkt->proto == IPPROTO_TCP)
			pkt->tcp_flags = packet_cast(l4, tcphdr)->flags;
		return;
	}

	icmp = packet_cast(l4, icmphdr);
	pkt->icmp_type = icmp->type;
	pkt->icmp_code = icmp->code;
	if (icmp->type == ICMP_ECHO || icmp->type == ICMP_ECHOREPLY) {
		read_echo(icmp, pkt);
		return;
	}
	if (icmp->type != ICMP_DEST_UNREACH && icmp->type != ICMP_TIME_EXCEEDED)
		return;
	/* An ICMP error quotes the offending header and 8 bytes. */
	l4 += sizeof(struct icmphdr);
	inner = packet_cast(l4, iphdr);
	pkt->is_error = 1;
	pkt->inner_saddr = inner->saddr;
	pkt->inner_daddr = inner->daddr;
	pkt->inner_proto = inner->protocol;
	l4 += inner->ihl * 4;
	if (pkt->inner_proto == IPPROTO_ICMP)
		read_echo(packet_cast(l4, icmphdr), pkt);
	else
		read_ports(l4, pkt->inner_proto, pkt);
}

static __always_inline int matches(struct config *cfg, struct packet *pkt)
{
	__u8 proto = pkt->is_error ? pkt->inner_proto : pkt->proto;

	if (cfg->mode == MODE_PROBE) {
		if (proto != cfg->proto)
			return 0;
		if (proto == IPPROTO_ICMP)
			return pkt->ident == cfg->tag &&
			       (pkt->is_error || pkt->icmp_type == ICMP_ECHO ||
				pkt->icmp_type == ICMP_ECHOREPLY);
		/* The probe's source port is its tag, at either end. */
		return pkt->sport == cfg->tag || pkt->dport == cfg->tag;
	}

	/* MODE_WATCH: every filter left at zero matches anything. */
	if (cfg->proto && proto != cfg->proto)
		return 0;
	if (cfg->addr && pkt->saddr != cfg->addr && pkt->daddr != cfg->addr &&
	    pkt->inner_saddr != cfg->addr && pkt->inner_daddr != cfg->addr)
		return 0;
	if (cfg->port && pkt->sport != cfg->port && pkt->dport != cfg->port)
		return 0;
	return 1;
}

/*
 * Whether a packet with this IPv4 header can be the flow's at all: most
 * packets are not, and they are let go before their transport header is
 * read. ICMP always goes on: an error quotes another protocol's packet.
 */
static __always_inline int could_match(struct config *cfg, const struct iphdr *ip)
{
	__u8 proto = ip->protocol;

	if (proto == IPPROTO_ICMP)
		return 1;
	if (cfg->mode == MODE_PROBE)
		return proto == cfg->proto;
	if (cfg->proto && proto != cfg->proto)
		return 0;
	return !cfg->addr || ip->saddr == cfg->addr || ip->daddr == cfg->addr;
}

/*
 * Parse the skb's IPv4 packet at @l3 and decide whether it is the flow's:
 * 1 it is, 0 it is another packet, -1 it is IPv4 but could not be parsed
 * here. An skb no longer marked IPv4 is another packet: a freed skb's memory
 * comes back at once for whatever the CPU receives next, IPv6 included
 * (KNOWN_ISSUES.md). The skb's own fields are read directly: tp_btf and
 * netfilter programs get the skb as a BTF pointer, which the verifier lets
 * them dereference.
 */
static __always_inline int classify(struct config *cfg, struct sk_buff *skb,
				    unsigned char *l3, struct packet *pkt)
{
	const struct iphdr *ip;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	if (!l3)
		return -1;
	ip = packet_cast(l3, iphdr);
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	if (!could_match(cfg, ip))
		return 0;
	parse_ipv4(l3, ip, pkt);
	return matches(cfg, pkt);
}

static __always_inline int skb_packet(struct config *cfg, struct sk_buff *skb,
				      unsigned char *l3, struct packet *pkt)
{
	return classify(cfg, skb, l3, pkt) == 1;
}

static __always_inline unsigned char *network_header(struct sk_buff *skb)
{
	__u16 offset = skb->network_header;

	if (offset == (__u16)~0U)
		return NULL;
	return skb->head + offset;
}

static __always_inline void remember(struct sk_buff *skb, __u32 netns,
				     struct packet *pkt)
{
	__u64 key = (__u64)skb;
	__u32 zero = 0;
	struct cursor *cur = bpf_map_lookup_elem(&cursors, &zero);

	__u64 now = bpf_ktime_get_ns();

	bpf_map_update_elem(&tracked_skbs, &key, &now, BPF_ANY);
	if (cur) {
		cur->t_ns = now;
		cur->netns = netns;
		cur->saddr = pkt->saddr;
		cur->daddr = pkt->daddr;
	}
}

static __always_inline struct event *reserve(__u8 kind)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		__u32 zero = 0;
		__u64 *count = bpf_map_lookup_elem(&lost, &zero);

		if (count)
			*count += 1;
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->t_ns = bpf_ktime_get_ns();
	return e;
}

static __always_inline void fill_packet(struct event *e, struct packet *pkt)
{
	e->pkt = *pkt;
}

static __always_inline void fill_dev(char *name, __u32 *ifindex,
				     struct net_device *dev)
{
	if (!dev)
		return;
	bpf_core_read_str(name, IFNAMSIZ, &dev->name);
	if (ifindex)
		*ifindex = BPF_CORE_READ(dev, ifindex);
}

/* A packet on a device: received (rx) or handed to the driver (tx). */
static __always_inline int on_device(struct sk_buff *skb, struct net_device *dev,
				     unsigned char *l3, __u8 kind)
{
	struct config *cfg = get_config();
	struct packet pkt = {};
	struct event *e;
	__u32 netns;

	if (!cfg || !l3 || !skb_packet(cfg, skb, l3, &pkt))
		return 0;
	netns = netns_of_dev(dev);
	if (cfg->netns && netns != cfg->netns)
		return 0;
	remember(skb, netns, &pkt);
	e = reserve(kind);
	if (!e)
		return 0;
	e->skb = (__u64)skb;
	e->netns = netns;
	fill_packet(e, &pkt);
	fill_dev(e->dev, &e->ifindex, dev);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/netif_receive_skb")
int BPF_PROG(on_receive, struct sk_buff *skb)
{
	/* At receive skb->data is the network header (after eth_type_trans). */
	return on_device(skb, skb->dev, skb->data, KIND_RX);
}

SEC("tp_btf/net_dev_start_xmit")
int BPF_PROG(on_transmit, struct sk_buff *skb, struct net_device *dev)
{
	/* At transmit skb->data is the link-layer header: use network_header. */
	return on_device(skb, dev, network_header(skb), KIND_TX);
}

SEC("tp_btf/kfree_skb")
int BPF_PROG(on_free, struct sk_buff *skb, void *location, int reason)
{
	struct config *cfg = get_config();
	struct packet pkt = {};
	struct net_device *dev;
	struct event *e;
	__u64 key = (__u64)skb;
	__u32 zero = 0;
	__u64 *seen;
	int tracked, match;

	if (!cfg)
		return 0;
	seen = bpf_map_lookup_elem(&tracked_skbs, &key);
	tracked = seen && bpf_ktime_get_ns() - *seen < TRACKED_FRESH_NS;
	if (seen)
		bpf_map_delete_elem(&tracked_skbs, &key);
	match = classify(cfg, skb, network_header(skb), &pkt);
	if (match == 0 || (match < 0 && !tracked))
		return 0;

	e = reserve(KIND_FREE);
	if (!e)
		return 0;
	dev = BPF_CORE_READ(skb, dev);
	e->skb = key;
	e->netns = netns_of_dev(dev);
	if (!e->netns) {
		struct cursor *cur = bpf_map_lookup_elem(&cursors, &zero);

		e->netns = cur ? cur->netns : 0;
	}
	e->value = reason;
	fill_packet(e, &pkt);
	fill_dev(e->dev, &e->ifindex, dev);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* An skb that ended normally is no longer the flow's, whatever it becomes. */
SEC("tp_btf/consume_skb")
int BPF_PROG(on_consume, struct sk_buff *skb)
{
	__u64 key = (__u64)skb;

	/* A lookup takes no lock; a delete on the LRU map does: most skbs that
	 * end here were never the flow's. */
	if (get_config() && bpf_map_lookup_elem(&tracked_skbs, &key))
		bpf_map_delete_elem(&tracked_skbs, &key);
	return 0;
}

static __always_inline int same_flow(struct cursor *cur, __u32 saddr,
				     __u32 daddr, __u64 now)
{
	if (!cur || !cur->t_ns || now - cur->t_ns > CURSOR_FRESH_NS)
		return 0;
	if (daddr == cur->daddr && (!saddr || saddr == cur->saddr))
		return 1;
	return daddr == cur->saddr && (!saddr || saddr == cur->daddr);
}

SEC("tp_btf/fib_table_lookup")
int BPF_PROG(on_route, __u32 table, const struct flowi4 *flp,
	     const struct fib_nh_common *nhc, int err)
{
	struct config *cfg = get_config();
	struct net_device *dev = NULL;
	struct cursor *cur;
	struct event *e;
	__u32 zero = 0;
	__u32 saddr, daddr;
	__u64 now = bpf_ktime_get_ns();
	int fresh;

	if (!cfg)
		return 0;
	saddr = BPF_CORE_READ(flp, saddr);
	daddr = BPF_CORE_READ(flp, daddr);
	cur = bpf_map_lookup_elem(&cursors, &zero);
	fresh = same_flow(cur, saddr, daddr, now);
	/*
	 * The probe's own first lookup happens in sendto(), before any skb: an
	 * output lookup (iif is the loopback device, ip_route_output_key_hash)
	 * for the probe's destination, by a task in the probe's namespace.
	 * Another flow's lookup for the same address fails one of the three.
	 */
	if (!fresh && !(cfg->dst && daddr == cfg->dst &&
			BPF_CORE_READ(flp, __fl_common.flowic_iif) == LOOPBACK_IFINDEX &&
			netns_of_task() == cfg->src_netns))
		return 0;

	e = reserve(KIND_ROUTE);
	if (!e)
		return 0;
	if (nhc)
		dev = BPF_CORE_READ(nhc, nhc_dev);
	e->netns = netns_of_dev(dev);
	if (!e->netns)
		e->netns = fresh ? cur->netns : netns_of_task();
	e->pkt.saddr = saddr;
	e->pkt.daddr = daddr;
	e->pkt.proto = BPF_CORE_READ(flp, __fl_common.flowic_proto);
	e->value = err;
	e->table = table;
	if (nhc && BPF_CORE_READ(nhc, nhc_gw_family) == AF_INET)
		e->aux = BPF_CORE_READ(nhc, nhc_gw.ipv4);
	fill_dev(e->dev, &e->ifindex, dev);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/neigh_update")
int BPF_PROG(on_neigh, struct neighbour *n, const __u8 *lladdr, __u8 new_state)
{
	struct config *cfg = get_config();
	struct net_device *dev;
	struct event *e;
	__u32 netns;

	if (!cfg)
		return 0;
	dev = BPF_CORE_READ(n, dev);
	netns = netns_of_dev(dev);
	if (!bpf_map_lookup_elem(&netns_in_play, &netns))
		return 0;
	if (BPF_CORE_READ(n, tbl, family) != AF_INET)
		return 0;

	e = reserve(KIND_NEIGH);
	if (!e)
		return 0;
	e->netns = netns;
	e->value = new_state;
	e->aux2 = BPF_CORE_READ(n, nud_state);
	bpf_probe_read_kernel(&e->aux, 4, &n->primary_key);
	fill_dev(e->dev, &e->ifindex, dev);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/*
 * BPF_PROG_TYPE_NETFILTER (kernel 6.4): linked twice at each IPv4 hook of
 * each namespace in play, at the first and the last priority, so that the
 * difference between the two records of one skb is what the hook's tables
 * (NAT, conntrack) did to it. Always NF_ACCEPT: nstrace only watches.
 */
static __always_inline int on_hook(struct bpf_nf_ctx *ctx, __u8 stage)
{
	struct config *cfg = get_config();
	const struct nf_hook_state *state = ctx->state;
	struct sk_buff *skb = ctx->skb;
	struct packet pkt = {};
	struct event *e;
	__u32 netns;

	if (!cfg || !skb_packet(cfg, skb, skb->data, &pkt))
		return NF_ACCEPT;
	netns = BPF_CORE_READ(state, net, ns.inum);
	remember(skb, netns, &pkt);
	e = reserve(KIND_HOOK);
	if (!e)
		return NF_ACCEPT;
	e->skb = (__u64)skb;
	e->netns = netns;
	e->hook = BPF_CORE_READ(state, hook);
	e->stage = stage;
	fill_packet(e, &pkt);
	fill_dev(e->dev, &e->ifindex, BPF_CORE_READ(skb, dev));
	fill_dev(e->in_dev, NULL, BPF_CORE_READ(state, in));
	fill_dev(e->out_dev, NULL, BPF_CORE_READ(state, out));
	bpf_ringbuf_submit(e, 0);
	return NF_ACCEPT;
}

SEC("netfilter")
int on_hook_first(struct bpf_nf_ctx *ctx)
{
	return on_hook(ctx, STAGE_FIRST);
}

SEC("netfilter")
int on_hook_last(struct bpf_nf_ctx *ctx)
{
	return on_hook(ctx, STAGE_LAST);
}

/*
 * Feature probes for `nstrace doctor`: never loaded while tracing (their
 * autoload is switched off), loaded one at a time to learn whether this
 * kernel allows fentry and kprobes. Some kernels refuse one or both (the CI
 * machines' 6.18 has no kprobes and refuses fentry with EPERM).
 */
SEC("fentry/nf_hook_slow")
int BPF_PROG(feature_fentry)
{
	return 0;
}

SEC("kprobe/nf_hook_slow")
int BPF_KPROBE(feature_kprobe)
{
	return 0;
}
