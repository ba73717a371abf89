/* SPDX-License-Identifier: GPL-2.0 */
/* TCP state helpers shared by network.bpf.c and tcp_events.bpf.c (each works alone):
 * the established-socket gauge, kept as a signed delta since the object was loaded
 * (userspace adds the count of sockets already established at start). */
#ifndef TFO_TCP_STATE_BPF_H
#define TFO_TCP_STATE_BPF_H

#include "tfo.bpf.h"

/* Sum of (+1 entering ESTABLISHED, -1 leaving it) over every TCP socket of the host, per CPU
 * (a socket may enter on one CPU and leave on another: only the sum over CPUs means anything). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
} tcp_established SEC(".maps");

/* A kernel field: a plain load from a tp_btf program's typed pointer (`direct`, a constant in
 * each program so the other branch folds away), else a CO-RE probe read. */
#define RD(direct, p, f) ((direct) ? (p)->f : BPF_CORE_READ(p, f))
#define RD_BITFIELD(direct, p, f) ((direct) ? (p)->f : BPF_CORE_READ_BITFIELD_PROBED(p, f))

static __always_inline bool tfo_is_tcp_stream(const struct sock *sk, bool direct)
{
	return RD_BITFIELD(direct, sk, sk_protocol) == IPPROTO_TCP && RD_BITFIELD(direct, sk, sk_type) == SOCK_STREAM;
}

static __always_inline void tfo_established_update(int oldstate, int newstate)
{
	__s64 d = (newstate == TCP_ESTABLISHED) - (oldstate == TCP_ESTABLISHED);
	__u32 zero = 0;
	__s64 *v;

	if (!d)
		return;
	v = bpf_map_lookup_elem(&tcp_established, &zero);
	if (v)
		*v += d;
}

#endif /* TFO_TCP_STATE_BPF_H */
