// SPDX-License-Identifier: GPL-2.0
/* Network collector: TCP/UDP payload bytes and packets by direction, established TCP sockets,
 * active-open connect latency, smoothed RTT and retransmitted segments.
 *
 * Bytes are what sock_sendmsg/sock_recvmsg moved for a process (sock:sock_send_length and
 * sock:sock_recv_length, process context, so filters and sampling apply). Packets are UDP
 * datagrams (one per successful call) and TCP segments: each TCP socket's own segs_out/segs_in
 * counters, credited as deltas whenever an observed process sends or receives on it and once more
 * when the socket reaches CLOSE. The socket table is created when a socket becomes ESTABLISHED, so
 * deltas start at the socket's first segment; sockets older than the collector count from their
 * first observation. The same table holds each socket's srtt for the RTT gauge; it is
 * socket-local storage in tp_btf mode, a hash keyed by socket address otherwise.
 *
 * Three attach modes share one body: tp_btf (preferred: typed pointers, so kernel fields are
 * plain loads; `direct` is true), raw_tp and classic tracepoints (bpf_probe_read_kernel, about
 * 50 ns per field here). `direct` is a constant in each program, so the other branch folds away. */
#include "tcp_state.bpf.h"

#define MSG_PEEK 2
#define MAX_SOCKS 65536
#define SK_UNKNOWN 0  /* no process seen on the socket yet */
#define SK_OBSERVED 1 /* a process passing the filters uses it */
#define SK_IGNORED 2  /* a filtered-out process uses it */

enum { SENT, RECEIVED };
enum { TCP, UDP };

struct traffic {
	__u64 bytes;   /* weighted: TFO_UNIT per byte at 100% sampling */
	__u64 packets; /* weighted likewise */
};

/* Index: direction * 2 + protocol. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, struct traffic);
} traffic SEC(".maps");

/* 64-bit fields: clang's BPF atomics (cmpxchg, xchg) are 64-bit only without -mcpu=v3. */
struct tcp_sk {
	__u64 segs_out;   /* segments already credited (the socket's u32 counters, widened) */
	__u64 segs_in;
	__u64 srtt_us;    /* included in rtt_sum while in_rtt */
	__u64 in_rtt;
	__u64 verdict;    /* SK_* */
	__u64 jiffies;    /* when segments and srtt were last read: at most once per tick */
	__u64 connect_ns; /* SYN_SENT time of an observed active open in flight */
};

/* The socket table: socket-local storage in tp_btf programs (no hashing, freed with the socket),
 * a hash keyed by the struct sock address in the other modes. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tcp_sk);
} tcp_sk_store SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_SOCKS);
	__type(key, __u64);
	__type(value, struct tcp_sk);
} tcp_socks SEC(".maps");

static __always_inline struct tcp_sk *sk_entry(const struct sock *sk, bool direct)
{
	__u64 key = (__u64)sk;

	if (direct)
		return bpf_sk_storage_get(&tcp_sk_store, (void *)sk, 0, 0);
	return bpf_map_lookup_elem(&tcp_socks, &key);
}

/* The socket's entry, created from *init if it has none (NULL when there is no room). */
static __always_inline struct tcp_sk *sk_entry_create(const struct sock *sk, struct tcp_sk *init, bool direct)
{
	__u64 key = (__u64)sk;
	struct tcp_sk *e;

	if (direct) {
		e = bpf_sk_storage_get(&tcp_sk_store, (void *)sk, init, BPF_SK_STORAGE_GET_F_CREATE);
	} else {
		bpf_map_update_elem(&tcp_socks, &key, init, BPF_NOEXIST);
		e = bpf_map_lookup_elem(&tcp_socks, &key);
	}
	if (!e)
		tfo_count_map_full();
	return e;
}

static __always_inline void sk_entry_delete(const struct sock *sk, bool direct)
{
	__u64 key = (__u64)sk;

	if (direct)
		bpf_sk_storage_delete(&tcp_sk_store, (void *)sk);
	else
		bpf_map_delete_elem(&tcp_socks, &key);
}

struct rtt_sum {
	__s64 sum_us;  /* sum of srtt over the sockets in the gauge */
	__s64 sockets; /* how many */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rtt_sum);
} rtt_sum SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tfo_hist);
} connect_latency SEC(".maps");

/* Retransmitted segments, weighted TFO_UNIT each. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} retransmits SEC(".maps");

static __always_inline struct traffic *traffic_of(__u32 dir, __u32 proto)
{
	__u32 key = dir * 2 + proto;
	return bpf_map_lookup_elem(&traffic, &key);
}

/* Credit the segments a socket moved since the last credit (monotonic, race-free via CAS). */
static __always_inline void credit_segs(__u64 *seen, __u32 now, __u32 dir)
{
	__u64 old = *seen;
	__u32 d = now - (__u32)old;
	struct traffic *tr;

	if ((__s32)d <= 0 || tfo_cas(seen, old, now) != old)
		return;
	tr = traffic_of(dir, TCP);
	if (tr)
		tr->packets += (__u64)d * TFO_UNIT;
}

static __always_inline void credit_socket(const struct tcp_sock *tp, struct tcp_sk *e, bool direct)
{
	credit_segs(&e->segs_out, RD(direct, tp, segs_out), SENT);
	credit_segs(&e->segs_in, RD(direct, tp, segs_in), RECEIVED);
}

/* The tcp_sock of a TCP socket (NULL if sk is not a full TCP socket, in tp_btf programs). */
static __always_inline const struct tcp_sock *tcp_of(const struct sock *sk, bool direct)
{
	return direct ? bpf_skc_to_tcp_sock((void *)sk) : (const struct tcp_sock *)sk;
}

static __always_inline void rtt_add(__s64 d_sum, __s64 d_n)
{
	__u32 zero = 0;
	struct rtt_sum *r = bpf_map_lookup_elem(&rtt_sum, &zero);

	if (!r)
		return;
	if (d_sum)
		__sync_fetch_and_add(&r->sum_us, d_sum);
	if (d_n)
		__sync_fetch_and_add(&r->sockets, d_n);
}

static __always_inline void rtt_set(const struct tcp_sock *tp, struct tcp_sk *e, bool direct)
{
	__u64 srtt = RD(direct, tp, srtt_us) >> 3;
	__s64 n = 0;
	__u64 old;

	if (e->in_rtt && e->srtt_us == srtt)
		return; /* the common case: no atomic on the shared sum */
	if (!e->in_rtt)
		n = tfo_cas(&e->in_rtt, 0, 1) == 0;
	old = tfo_xchg(&e->srtt_us, srtt);
	rtt_add((__s64)srtt - old, n);
}

static __always_inline void rtt_remove(struct tcp_sk *e)
{
	__s64 n;
	__u64 old;

	if (!e->in_rtt && !e->srtt_us)
		return;
	n = tfo_cas(&e->in_rtt, 1, 0) == 1;
	old = tfo_xchg(&e->srtt_us, 0);
	rtt_add(-(__s64)old, -n);
}

/* A TCP socket used by an observed process: credit its segments and refresh its srtt, at most
 * once per jiffy (a busy socket would otherwise pay atomics on every call; CLOSE credits the rest). */
static __always_inline void tcp_observe(const struct sock *sk, bool direct)
{
	const struct tcp_sock *tp = tcp_of(sk, direct);
	struct tcp_sk *e;
	__u64 jiffies;
	int state;

	if (!tp)
		return;
	state = RD(direct, sk, __sk_common.skc_state);
	e = sk_entry(sk, direct);
	if (!e) {
		/* Established before the collector started: count from now on. */
		struct tcp_sk fresh = {
			.segs_out = RD(direct, tp, segs_out),
			.segs_in = RD(direct, tp, segs_in),
			.verdict = SK_OBSERVED,
		};
		if (state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT)
			return;
		e = sk_entry_create(sk, &fresh, direct);
		if (!e)
			return;
	}
	if (e->verdict != SK_OBSERVED) {
		if (e->verdict != SK_UNKNOWN)
			return;
		e->verdict = SK_OBSERVED;
	}
	jiffies = bpf_jiffies64();
	if (e->jiffies == jiffies)
		return;
	e->jiffies = jiffies;
	credit_socket(tp, e, direct);
	if (state == TCP_ESTABLISHED)
		rtt_set(tp, e, direct);
}

/* msgs messages carrying nbytes of payload were sent or received on sk (flags: the receive's). */
static __always_inline int on_traffic(const struct sock *sk, __u64 nbytes, __u32 msgs, int flags, __u32 dir,
				      bool direct)
{
	struct task_struct *task = tfo_current_task();
	struct traffic *tr;
	__u16 proto, type;
	__u32 p;

	if (!sk || (dir == RECEIVED && (flags & MSG_PEEK)))
		return 0;
	proto = RD_BITFIELD(direct, sk, sk_protocol);
	type = RD_BITFIELD(direct, sk, sk_type);
	if (proto == IPPROTO_TCP && type == SOCK_STREAM)
		p = TCP;
	else if (proto == IPPROTO_UDP && type == SOCK_DGRAM)
		p = UDP;
	else
		return 0;
	if (!tfo_task_observed(task)) {
		if (p == TCP) {
			struct tcp_sk *e = sk_entry(sk, direct);
			if (e && e->verdict == SK_UNKNOWN)
				e->verdict = SK_IGNORED;
		}
		return 0;
	}
	if (!tfo_sampled())
		return 0;
	tr = traffic_of(dir, p);
	if (!tr)
		return 0;
	tr->bytes += nbytes * tfo_weight();
	if (p == UDP)
		tr->packets += (__u64)msgs * tfo_weight();
	else
		tcp_observe(sk, direct);
	return 0;
}

/* sock_sendmsg/sock_recvmsg returned ret on sk. */
static __always_inline int on_msg(const struct sock *sk, int ret, int flags, __u32 dir, bool direct)
{
	return ret < 0 ? 0 : on_traffic(sk, ret, 1, flags, dir, direct);
}

static __always_inline int on_state(const struct sock *sk, int oldstate, int newstate, bool direct)
{
	struct tcp_sk *e;

	if (!tfo_is_tcp_stream(sk, direct))
		return 0;
	tfo_established_update(oldstate, newstate);

	if (newstate == TCP_SYN_SENT) {
		/* connect(): the caller's context, so the filters apply. */
		if (tfo_task_observed(tfo_current_task()) && tfo_sampled()) {
			struct tcp_sk init = {.connect_ns = bpf_ktime_get_ns()};
			e = sk_entry_create(sk, &init, direct);
			if (e)
				e->connect_ns = init.connect_ns;
		}
		return 0;
	}
	if (newstate == TCP_ESTABLISHED) {
		struct tcp_sk fresh = {}; /* count from the socket's first segment */
		e = sk_entry_create(sk, &fresh, direct);
		if (e && e->connect_ns) {
			__u32 zero = 0;
			struct tfo_hist *h = bpf_map_lookup_elem(&connect_latency, &zero);
			if (h && oldstate == TCP_SYN_SENT)
				tfo_hist_add(h, bpf_ktime_get_ns() - e->connect_ns, tfo_weight());
			e->connect_ns = 0;
		}
		return 0;
	}
	e = sk_entry(sk, direct);
	if (!e)
		return 0;
	if (oldstate == TCP_ESTABLISHED)
		rtt_remove(e);
	if (newstate == TCP_CLOSE) {
		const struct tcp_sock *tp = tcp_of(sk, direct);
		if (tp && e->verdict == SK_OBSERVED)
			credit_socket(tp, e, direct);
		rtt_remove(e);
		sk_entry_delete(sk, direct);
	}
	return 0;
}

/* One retransmission of skb: as many segments as it carries (TcpRetransSegs counts the same). */
static __always_inline int on_retransmit(const struct sk_buff *skb, int err)
{
	struct tcp_skb_cb *cb = (struct tcp_skb_cb *)&skb->cb[0];
	__u32 zero = 0;
	__u64 *v;
	__u16 segs;

	if (err)
		return 0;
	segs = BPF_CORE_READ(cb, tcp_gso_segs);
	v = bpf_map_lookup_elem(&retransmits, &zero);
	if (v)
		*v += (__u64)(segs ? segs : 1) * TFO_UNIT;
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(tpbtf_send, struct sock *sk, int ret, int flags)
{
	return on_msg(sk, ret, flags, SENT, true);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(tpbtf_recv, struct sock *sk, int ret, int flags)
{
	return on_msg(sk, ret, flags, RECEIVED, true);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tpbtf_set_state, const struct sock *sk, int oldstate, int newstate)
{
	return on_state(sk, oldstate, newstate, true);
}

/* tcp_retransmit_skb(sk, skb) gained a third argument, err, in 6.16 (with its own event struct, which
 * holds it): read only where the running kernel has it, so the program loads on both. */
static __always_inline int retransmit_err(__u64 *ctx)
{
	if (bpf_core_field_exists(((struct trace_event_raw_tcp_retransmit_skb *)0)->err))
		return (int)ctx[2];
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int tpbtf_retransmit(__u64 *ctx)
{
	return on_retransmit((const struct sk_buff *)ctx[1], retransmit_err(ctx));
}

SEC("raw_tp/sock_send_length")
int BPF_PROG(raw_send, struct sock *sk, int ret, int flags)
{
	return on_msg(sk, ret, flags, SENT, false);
}

SEC("raw_tp/sock_recv_length")
int BPF_PROG(raw_recv, struct sock *sk, int ret, int flags)
{
	return on_msg(sk, ret, flags, RECEIVED, false);
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(raw_set_state, const struct sock *sk, int oldstate, int newstate)
{
	return on_state(sk, oldstate, newstate, false);
}

SEC("raw_tp/tcp_retransmit_skb")
int raw_retransmit(__u64 *ctx)
{
	return on_retransmit((const struct sk_buff *)ctx[1], retransmit_err(ctx));
}

SEC("tracepoint/sock/sock_send_length")
int tp_send(struct trace_event_raw_sock_msg_length *ctx)
{
	return on_msg(ctx->sk, ctx->ret, ctx->flags, SENT, false);
}

SEC("tracepoint/sock/sock_recv_length")
int tp_recv(struct trace_event_raw_sock_msg_length *ctx)
{
	return on_msg(ctx->sk, ctx->ret, ctx->flags, RECEIVED, false);
}

SEC("tracepoint/sock/inet_sock_set_state")
int tp_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	return on_state(ctx->skaddr, ctx->oldstate, ctx->newstate, false);
}

/* Before 6.16 tcp_retransmit_skb shares the tcp_event_sk_skb class's event struct. */
struct trace_event_raw_tcp_event_sk_skb___tfo {
	const void *skbaddr;
} __attribute__((preserve_access_index));

SEC("tracepoint/tcp/tcp_retransmit_skb")
int tp_retransmit(void *ctx)
{
	struct trace_event_raw_tcp_retransmit_skb *own = ctx;
	struct trace_event_raw_tcp_event_sk_skb___tfo *shared = ctx;

	if (bpf_core_type_exists(struct trace_event_raw_tcp_retransmit_skb))
		return on_retransmit(BPF_CORE_READ(own, skbaddr),
				     bpf_core_field_exists(own->err) ? BPF_CORE_READ(own, err) : 0);
	return on_retransmit(BPF_CORE_READ(shared, skbaddr), 0);
}

#include "network_syscalls.bpf.h"

TFO_FILTER_PROGRAMS
