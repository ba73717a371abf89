// SPDX-License-Identifier: GPL-2.0
/* TCP connection lifecycle from sock:inet_sock_set_state, tcp:tcp_send_reset and
 * tcp:tcp_receive_reset: opens (active, passive), closes, resets (sent, received) and the
 * established-socket gauge. Only active opens run in a known process (connect()), so only they
 * follow the filters and sampling; the rest happens in softirq context and counts host-wide. */
#include "tcp_state.bpf.h"

enum { ACTIVE_OPEN, PASSIVE_OPEN, CLOSE, RESET_SENT, RESET_RECEIVED, N_EVENTS };

/* Weighted counts (TFO_UNIT per event), indexed by the enum above. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, N_EVENTS);
	__type(key, __u32);
	__type(value, __u64);
} tcp_events SEC(".maps");

static __always_inline void count(__u32 event, __u64 w)
{
	__u64 *v = bpf_map_lookup_elem(&tcp_events, &event);

	if (v)
		*v += w;
}

/* A connection end that had been established: any state from ESTABLISHED on except TIME_WAIT,
 * which a full socket never holds (it reaches CLOSE when its timewait socket takes over). */
static __always_inline bool was_connected(int state)
{
	return state == TCP_ESTABLISHED || state == TCP_FIN_WAIT1 || state == TCP_FIN_WAIT2 ||
	       state == TCP_CLOSE_WAIT || state == TCP_LAST_ACK || state == TCP_CLOSING;
}

static __always_inline int on_state(const struct sock *sk, int oldstate, int newstate, bool direct)
{
	if (!tfo_is_tcp_stream(sk, direct))
		return 0;
	tfo_established_update(oldstate, newstate);
	if (newstate == TCP_SYN_SENT) {
		if (tfo_task_observed(tfo_current_task()) && tfo_sampled())
			count(ACTIVE_OPEN, tfo_weight());
	} else if (newstate == TCP_SYN_RECV) {
		count(PASSIVE_OPEN, TFO_UNIT);
	} else if (newstate == TCP_CLOSE && was_connected(oldstate)) {
		count(CLOSE, TFO_UNIT);
	}
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tpbtf_set_state, const struct sock *sk, int oldstate, int newstate)
{
	return on_state(sk, oldstate, newstate, true);
}

SEC("tp_btf/tcp_send_reset")
int tpbtf_send_reset(void *ctx)
{
	count(RESET_SENT, TFO_UNIT);
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int tpbtf_receive_reset(void *ctx)
{
	count(RESET_RECEIVED, TFO_UNIT);
	return 0;
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(raw_set_state, const struct sock *sk, int oldstate, int newstate)
{
	return on_state(sk, oldstate, newstate, false);
}

SEC("raw_tp/tcp_send_reset")
int raw_send_reset(void *ctx)
{
	count(RESET_SENT, TFO_UNIT);
	return 0;
}

SEC("raw_tp/tcp_receive_reset")
int raw_receive_reset(void *ctx)
{
	count(RESET_RECEIVED, TFO_UNIT);
	return 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int tp_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	return on_state(ctx->skaddr, ctx->oldstate, ctx->newstate, false);
}

SEC("tracepoint/tcp/tcp_send_reset")
int tp_send_reset(void *ctx)
{
	count(RESET_SENT, TFO_UNIT);
	return 0;
}

SEC("tracepoint/tcp/tcp_receive_reset")
int tp_receive_reset(void *ctx)
{
	count(RESET_RECEIVED, TFO_UNIT);
	return 0;
}

TFO_FILTER_PROGRAMS
