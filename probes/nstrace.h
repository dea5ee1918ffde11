/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Declarations shared by nstrace's BPF programs: the record layout that
 * tracer/probes.py decodes (keep both in step), and the slices of kernel
 * structures that the programs read. The kernel structures carry
 * preserve_access_index: clang records each field access as a CO-RE
 * relocation and libbpf resolves it against the running kernel's BTF, so
 * only the names below must exist in the kernel, not these layouts.
 */
#ifndef NSTRACE_H
#define NSTRACE_H

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#define IFNAMSIZ 16
#define AF_INET 2
#define ETH_P_IP 0x0800
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define NF_ACCEPT 1

/* ---- what user space configures (map `config`, tracer/probes.py) ---- */

enum mode {
	MODE_PROBE = 0, /* one probe's flow, tagged by ICMP id or source port */
	MODE_WATCH = 1, /* a live filter: protocol, address, port, namespace */
};

struct config {
	__u32 enabled;
	__u32 mode;
	__u32 proto;
	__u32 tag;   /* MODE_PROBE: ICMP echo id, or the TCP/UDP source port */
	__u32 dst;   /* MODE_PROBE: the probe's destination, network order */
	__u32 addr;  /* MODE_WATCH: source or destination, network order */
	__u32 port;  /* MODE_WATCH: source or destination port */
	__u32 netns; /* MODE_WATCH: a namespace inode, 0 for all */
	__u32 src_netns; /* MODE_PROBE: the namespace the probe is sent from */
};

/* ---- what the programs send (ring buffer `events`) ---- */

enum kind {
	KIND_RX = 1,
	KIND_TX = 2,
	KIND_HOOK = 3,
	KIND_ROUTE = 4,
	KIND_NEIGH = 5,
	KIND_FREE = 6,
};

enum stage {
	STAGE_FIRST = 1,
	STAGE_LAST = 2,
};

struct packet {
	__u32 saddr;
	__u32 daddr;
	__u32 inner_saddr;
	__u32 inner_daddr;
	__u16 ident;
	__u16 seq;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 inner_proto;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 tcp_flags;
	__u8 is_error;
	__u8 pad[2];
};

/* 128 bytes; tracer/probes.py's RawEvent mirrors this layout. */
struct event {
	__u64 t_ns;
	__u64 skb;
	__u32 netns;
	__u32 ifindex;
	__s32 value; /* free: drop reason; route: error; neigh: new state */
	__u32 table; /* route: the table looked up */
	__u32 aux;   /* route: gateway; neigh: the neighbour's address */
	__u32 aux2;  /* neigh: the state before the update */
	__u8 kind;
	__u8 hook;
	__u8 stage;
	__u8 pad;
	__u32 pad2;
	struct packet pkt;
	char dev[IFNAMSIZ];
	char in_dev[IFNAMSIZ];
	char out_dev[IFNAMSIZ];
};

/* ---- kernel structures, the fields nstrace reads ---- */

struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} possible_net_t;

struct net_device {
	char name[IFNAMSIZ];
	int ifindex;
	possible_net_t nd_net;
} __attribute__((preserve_access_index));

struct sock;

struct sk_buff {
	struct net_device *dev;
	unsigned char *head;
	unsigned char *data;
	__u16 network_header;
	__be16 protocol;
} __attribute__((preserve_access_index));

struct nf_hook_state {
	__u8 hook;
	__u8 pf;
	struct net_device *in;
	struct net_device *out;
	struct net *net;
} __attribute__((preserve_access_index));

struct bpf_nf_ctx {
	const struct nf_hook_state *state;
	struct sk_buff *skb;
} __attribute__((preserve_access_index));

struct flowi_common {
	int flowic_oif;
	int flowic_iif;
	__u8 flowic_proto;
} __attribute__((preserve_access_index));

struct flowi4 {
	struct flowi_common __fl_common;
	__be32 saddr;
	__be32 daddr;
} __attribute__((preserve_access_index));

struct fib_nh_common {
	struct net_device *nhc_dev;
	__u8 nhc_gw_family;
	union {
		__be32 ipv4;
	} nhc_gw;
} __attribute__((preserve_access_index));

struct neigh_table {
	int family;
} __attribute__((preserve_access_index));

struct neighbour {
	struct neigh_table *tbl;
	__u8 nud_state;
	struct net_device *dev;
	__u8 primary_key[0];
} __attribute__((preserve_access_index));

struct nsproxy {
	struct net *net_ns;
} __attribute__((preserve_access_index));

struct task_struct {
	struct nsproxy *nsproxy;
} __attribute__((preserve_access_index));

/*
 * Packet headers. Their layouts are fixed by the RFCs, so they are not
 * relocated; the programs read them in place through bpf_rdonly_cast
 * (packet_cast below), which needs only the kernel's BTF type of the same
 * name. The verifier then checks each load against the kernel's own type,
 * so every field is read with its own size, never as one block.
 */
struct iphdr {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	__u8 ihl : 4, version : 4;
#else
	__u8 version : 4, ihl : 4;
#endif
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	union {
		struct {
			__be16 id;
			__be16 sequence;
		} echo;
	} un;
};

struct udphdr {
	__be16 source;
	__be16 dest;
	__be16 len;
	__sum16 check;
};

/* The kernel's tcphdr spells byte 13 as one-bit fields; one byte is read. */
struct tcphdr {
	__be16 source;
	__be16 dest;
	__be32 seq;
	__be32 ack_seq;
	__u8 doff_res;
	__u8 flags;
};

#endif /* NSTRACE_H */
