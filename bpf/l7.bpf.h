/* SPDX-License-Identifier: GPL-2.0 */
/* DNS and HTTP/1.x from the syscall hooks: the part both share. At sys_exit of a socket syscall that
 * moved data (sock_syscalls.bpf.h), the start of the payload is read from user memory and handed to
 * dns.bpf.h (UDP) or http.bpf.h (TCP; TLS plaintext comes from uprobes on OpenSSL there).
 *
 * Counters and histograms are keyed by process name (the group leader's comm) and what was seen, in
 * plain hashes with atomic adds: L7 messages are rare next to syscalls, and per-CPU histograms per
 * process name would cost ncpus times the memory. Userspace folds names over the comm cap into
 * entries of its own (folded = 1), which the kernel never writes.
 * Included by syscalls.bpf.c after tfo_features and the SYSCALL_NR macros. */
#ifndef TFO_L7_BPF_H
#define TFO_L7_BPF_H

#include <bpf/bpf_endian.h>
#include "sock_syscalls.bpf.h"

#define F_DNS 4
#define F_HTTP 8
#define F_L7 (F_DNS | F_HTTP)
#define L7_MSG_PEEK 2
#define L7_AF_INET 2
#define L7_AF_INET6 10
#define L7_MAX_KEYS 8192
#define L7_MAX_HISTS 2048

/* One counter or histogram: whose (comm; folded only in userspace's entries) and what. */
struct l7_key {
	char comm[TFO_COMM_LEN] __attribute__((aligned(8)));
	__u8 folded;
	__u8 kind;  /* per protocol: query/response, request/response */
	__u8 a;     /* dns: rcode; http: direction */
	__u8 b;     /* http: method */
	__u16 code; /* dns: qtype; http: status */
	__u16 pad;
};

#define L7_BUF 512 /* scratch for payload bytes: a power of two, offsets are masked into it */

struct l7_buf {
	__u8 b[L7_BUF];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_buf);
} l7_scratch SEC(".maps");

/* Arguments 0..4 of the syscall. */
struct l7_call {
	unsigned long arg[5];
};

/* Where one message's payload starts. */
struct l7_msg {
	unsigned long buf;  /* user address of the first bytes */
	__u64 len;          /* payload bytes there (the first iovec only) */
	unsigned long name; /* user sockaddr of the peer (unconnected sockets), else 0 */
};

/* Exchanges in flight (a DNS query, an HTTP request), each until its answer: a set-associative
 * table of plain array slots, a set per hash of the key (k1, k2), L7_WAYS slots per set. An exchange
 * takes its own key's slot again, else a free one, else the set's oldest (one never answered ages
 * out that way; a live one lost so has its answer counted as unmatched). Slots are written without
 * locks: a hash map's update and delete took most of the cost of a DNS query here (~0.6 us of ~1.3
 * us with an LRU hash). */
#define L7_WAYS 4

struct l7_flight {
	__u64 k1; /* 0: a free slot */
	__u64 k2;
	__u64 ts;
	__u32 tag;  /* http: the socket's port pair */
	__u16 code; /* dns: qtype; http: method */
	__u8 role;  /* http: HTTP_CLIENT or HTTP_SERVER */
	__u8 pad;
};

struct l7_flight_set {
	struct l7_flight way[L7_WAYS];
};

#define L7_FLIGHTS(name, set_bits)                             \
	struct {                                               \
		__uint(type, BPF_MAP_TYPE_ARRAY);              \
		__uint(max_entries, 1 << (set_bits));          \
		__type(key, __u32);                            \
		__type(value, struct l7_flight_set);           \
	} name SEC(".maps")

static __always_inline struct l7_flight_set *l7_flight_set(void *map, __u32 set_bits, __u64 k1, __u64 k2)
{
	__u32 idx = ((k1 >> 4 ^ k2 * 0xff51afd7ed558ccdULL) * 0x9E3779B97F4A7C15ULL) >> (64 - set_bits);

	return bpf_map_lookup_elem(map, &idx);
}

/* The slot of key (k1, k2), NULL if none. */
static __always_inline struct l7_flight *l7_flight_find(void *map, __u32 set_bits, __u64 k1, __u64 k2)
{
	struct l7_flight_set *set = l7_flight_set(map, set_bits, k1, k2);

	if (!set)
		return NULL;
	for (__u32 w = 0; w < L7_WAYS; w++)
		if (set->way[w].k1 == k1 && set->way[w].k2 == k2)
			return &set->way[w];
	return NULL;
}

/* Store *v under key (k1, k2). */
static __always_inline void l7_flight_put(void *map, __u32 set_bits, __u64 k1, __u64 k2, const struct l7_flight *v)
{
	struct l7_flight_set *set = l7_flight_set(map, set_bits, k1, k2);
	struct l7_flight *p, *best;
	__u32 pick = 0;

	if (!set)
		return;
	for (__u32 w = 0; w < L7_WAYS; w++) {
		p = &set->way[w];
		if (p->k1 == k1 && p->k2 == k2) {
			pick = w;
			break;
		}
		best = &set->way[pick & (L7_WAYS - 1)];
		if (!p->k1 || (best->k1 && p->ts < best->ts))
			pick = w;
	}
	p = &set->way[pick & (L7_WAYS - 1)];
	p->k1 = 0;
	p->ts = v->ts;
	p->tag = v->tag;
	p->code = v->code;
	p->role = v->role;
	p->k2 = k2;
	barrier();
	p->k1 = k1;
}

/* Does the current task pass the filters? Inlined into the parsers (global functions, each verified
 * once): as a function of its own it was one call level too many for the 512-byte limit on the
 * combined stack of a call chain (sys_exit, l7_sys_exit, a parser, the verdict, the cgroup walk). */
static __always_inline bool l7_observed(void)
{
	return tfo_task_observed(tfo_current_task()) != NULL;
}

static __always_inline void l7_key_init(struct l7_key *k, struct task_struct *task)
{
	__builtin_memset(k, 0, sizeof(*k));
	tfo_leader_comm(&k->comm, task);
}

/* The entry of key k in map, created from *zero if missing (NULL when the map is full). */
static __always_inline void *l7_entry(void *map, const struct l7_key *k, const void *zero)
{
	void *v = bpf_map_lookup_elem(map, k);

	if (v)
		return v;
	bpf_map_update_elem(map, k, zero, BPF_NOEXIST);
	v = bpf_map_lookup_elem(map, k);
	if (!v)
		tfo_count_map_full();
	return v;
}

/* L7 messages are not sampled: each counts TFO_UNIT. */
static __always_inline void l7_count(void *map, const struct l7_key *k)
{
	static const __u64 zero = 0;
	__u64 *v = l7_entry(map, k, &zero);

	if (v)
		__sync_fetch_and_add(v, TFO_UNIT);
}

static __always_inline void l7_observe(void *map, const struct l7_key *k, __u64 ns)
{
	static const struct tfo_hist zero = {};
	struct tfo_hist *h = l7_entry(map, k, &zero);

	if (!h)
		return;
	__sync_fetch_and_add(&h->slots[tfo_slot(ns)], TFO_UNIT);
	__sync_fetch_and_add(&h->sum, ns * TFO_UNIT);
}

static __always_inline void l7_error(void *map, __u32 reason, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(map, &reason);

	if (v)
		__sync_fetch_and_add(v, n);
}

static __always_inline int l7_iov0(unsigned long iov, struct l7_msg *m)
{
	struct iovec v = {};

	if (bpf_probe_read_user(&v, sizeof(v), (void *)iov))
		return -1;
	m->buf = (unsigned long)v.iov_base;
	m->len = v.iov_len;
	return 0;
}

static __always_inline int l7_msghdr_iov0(const struct user_msghdr *h, struct l7_msg *m)
{
	if (!h->msg_iovlen)
		return -1;
	m->name = (unsigned long)h->msg_name;
	return l7_iov0((unsigned long)h->msg_iov, m);
}

static __always_inline int l7_msghdr(const void *p, struct l7_msg *m)
{
	struct user_msghdr h = {};

	if (bpf_probe_read_user(&h, sizeof(h), p))
		return -1;
	return l7_msghdr_iov0(&h, m);
}

/* Entry i of a sendmmsg/recvmmsg vector, read whole (a user read costs some 60 ns here): the
 * message and the bytes it moved. */
static __always_inline int l7_mmsghdr(const struct mmsghdr *vec, __u32 i, struct l7_msg *m, __u64 *moved)
{
	struct mmsghdr e = {};

	if (bpf_probe_read_user(&e, sizeof(e), &vec[i]))
		return -1;
	*moved = e.msg_len;
	return l7_msghdr_iov0(&e.msg_hdr, m);
}

/* Message i of a call that returned ret (i > 0 only for sendmmsg/recvmmsg); 0 when found. */
static __always_inline int l7_message(int kind, const struct l7_call *c, long ret, __u32 i, struct l7_msg *m)
{
	const struct mmsghdr *vec = (const void *)c->arg[1];
	__u64 moved = ret;

	m->name = 0;
	switch (kind) {
	case SC_SENDTO:
	case SC_RECVFROM:
		m->name = c->arg[4];
		/* fallthrough */
	case SC_WRITE:
	case SC_READ:
		m->buf = c->arg[1];
		m->len = c->arg[2];
		break;
	case SC_WRITEV:
	case SC_READV:
		if (!c->arg[2] || l7_iov0(c->arg[1], m))
			return -1;
		break;
	case SC_SENDMSG:
	case SC_RECVMSG:
		if (l7_msghdr((const void *)c->arg[1], m))
			return -1;
		break;
	case SC_SENDMMSG:
	case SC_RECVMMSG:
		if (l7_mmsghdr(vec, i, m, &moved))
			return -1;
		break;
	default:
		return -1;
	}
	if (m->len > moved)
		m->len = moved;
	return 0;
}

/* recvfrom/recvmsg/recvmmsg with MSG_PEEK: the data is read again later, so it is not seen here. */
static __always_inline bool l7_peeks(int kind, const struct l7_call *c)
{
	if (kind == SC_RECVMSG)
		return c->arg[2] & L7_MSG_PEEK;
	if (kind == SC_RECVFROM || kind == SC_RECVMMSG)
		return c->arg[3] & L7_MSG_PEEK;
	return false;
}

/* What l7_sock tells of a socket: family, protocol, type, and (UDP only) its local and peer ports, host order. */
struct l7_sk {
	__u16 family;
	__u16 proto;
	__u16 type;
	__u16 lport;
	__u16 dport;
};

#include "dns.bpf.h"
#include "http.bpf.h"

/* The socket behind descriptor fd (NULL if none), and its facts. The cast build (kernel 6.2+) reads
 * the descriptor table, file, socket and sock with plain loads, as file I/O does; the others with
 * CO-RE probe reads. */
static __always_inline const struct sock *l7_sock(struct task_struct *task, long fd, struct l7_sk *s)
{
#ifdef TFO_RDONLY_CAST
	struct fdtable *fdt = task->files->fdt;
	struct socket *so;
	struct sock *sk;
	struct file *f;

	if (fd < 0 || fd >= fdt->max_fds)
		return NULL;
	f = ((struct file **)bpf_rdonly_cast(fdt->fd, 0))[fd]; /* not a BTF type: plain memory */
	if (!f)
		return NULL;
	f = bpf_rdonly_cast(f, bpf_core_type_id_kernel(struct file));
	if ((f->f_inode->i_mode & TFO_S_IFMT) != S_IFSOCK || !f->private_data)
		return NULL;
	so = bpf_rdonly_cast(f->private_data, bpf_core_type_id_kernel(struct socket));
	sk = so->sk;
	if (!sk)
		return NULL;
	s->family = sk->__sk_common.skc_family;
	s->proto = sk->sk_protocol;
	s->type = sk->sk_type;
	if (s->proto == IPPROTO_UDP) {
		s->lport = sk->__sk_common.skc_num;
		s->dport = bpf_ntohs(sk->__sk_common.skc_dport);
	}
	/* its address as a plain number (a load through an untyped cast), which the parsers (global
	 * functions) take and key state by */
	return ((struct socket *)bpf_rdonly_cast(f->private_data, 0))->sk;
#else
	const struct sock *sk = sock_of_fd(task, fd);

	if (!sk)
		return NULL;
	s->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	s->proto = BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol);
	s->type = BPF_CORE_READ_BITFIELD_PROBED(sk, sk_type);
	if (s->proto == IPPROTO_UDP) {
		s->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
		s->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	}
	return sk;
#endif
}

/* A socket syscall of kind moved data (ret > 0): hand UDP to DNS and TCP to HTTP. */
static __noinline int l7_sys_exit(int kind, struct l7_call *c, long ret)
{
	struct task_struct *task = tfo_current_task();
	const struct sock *sk;
	struct l7_sk s = {};

	if (tfo_in_compat_syscall(task) || l7_peeks(kind, c))
		return 0;
	sk = l7_sock(task, c->arg[0], &s);
	if (!sk || (s.family != L7_AF_INET && s.family != L7_AF_INET6))
		return 0;
	if (s.proto == IPPROTO_UDP && s.type == SOCK_DGRAM && (tfo_features & F_DNS))
		dns_on_syscall(task, sk, &s, kind, c, ret);
	else if (s.proto == IPPROTO_TCP && s.type == SOCK_STREAM && (tfo_features & F_HTTP))
		http_on_syscall(task, sk, kind, c, ret);
	return 0;
}

/* The call site in each sys_exit program: regs are the task's saved registers; direct (tp_btf) reads
 * them with plain loads, else with CO-RE probe reads. Nothing but a flag test when DNS and HTTP are
 * off, and a switch on the syscall number for syscalls that move no socket data. */
#define L7_ARG(regs, n, direct) ((direct) ? PT_REGS_PARM##n##_SYSCALL(regs) : PT_REGS_PARM##n##_CORE_SYSCALL(regs))
static __always_inline void l7_exit(struct pt_regs *regs, long ret, bool direct)
{
	struct l7_call c;
	int kind;

	if (!(tfo_features & F_L7) || ret <= 0)
		return;
	kind = sock_syscall(direct ? SYSCALL_NR(regs) : SYSCALL_NR_CORE(regs));
	if (!sc_sends(kind) && !sc_receives(kind))
		return;
	c.arg[0] = L7_ARG(regs, 1, direct);
	c.arg[1] = L7_ARG(regs, 2, direct);
	c.arg[2] = L7_ARG(regs, 3, direct);
	c.arg[3] = L7_ARG(regs, 4, direct);
	c.arg[4] = L7_ARG(regs, 5, direct);
	l7_sys_exit(kind, &c, ret);
}

#endif /* TFO_L7_BPF_H */
