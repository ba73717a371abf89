/* SPDX-License-Identifier: GPL-2.0 */
/* DNS over UDP, client side: queries a process sends to a DNS server port (dns_cfg.ports, 53 by
 * default) and the responses it receives from one, matched by socket and transaction id. Read from
 * the payload of each message at sys_exit (l7.bpf.h): the header and the question, at most
 * DNS_READ bytes, parsed with bounded loops. What cannot be counted right goes to dns_errors. */
#ifndef TFO_DNS_BPF_H
#define TFO_DNS_BPF_H

#define DNS_HDR 12
#define DNS_MAX_NAME 255                           /* RFC 1035: the name in wire format */
#define DNS_READ (DNS_HDR + DNS_MAX_NAME + 4)      /* header, name, qtype and qclass */
#define DNS_MAX_LABELS 128                         /* a name of 255 bytes has at most 127 labels */
#define DNS_MAX_MSGS 8                             /* messages parsed per sendmmsg/recvmmsg */
#define DNS_PORTS 4

enum { DNS_QUERY, DNS_RESPONSE };
/* Parse errors (dns_errors index), named in agent/collectors/dns.py. */
enum { DNS_ERR_TRUNCATED, DNS_ERR_MALFORMED, DNS_ERR_NOT_QUERY, DNS_ERR_UNMATCHED, DNS_ERR_UNPARSED, DNS_ERRORS };

/* Written by userspace: the server ports (host order; 0 = unused). */
struct dns_cfg {
	__u16 ports[DNS_PORTS];
};
volatile struct dns_cfg dns_cfg SEC(".data.dns") = { .ports = { 53 } };

/* Queries in flight (l7_flight: k1 = socket, k2 = transaction id, code = qtype): 16,384 slots. */
#define DNS_PENDING_BITS 12
L7_FLIGHTS(dns_pending, DNS_PENDING_BITS);

/* kind DNS_QUERY: code = qtype; kind DNS_RESPONSE: code = qtype, a = rcode. Weighted counts. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L7_MAX_KEYS);
	__type(key, struct l7_key);
	__type(value, __u64);
} dns_counts SEC(".maps");

/* Query to response, ns, per comm. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L7_MAX_HISTS);
	__type(key, struct l7_key);
	__type(value, struct tfo_hist);
} dns_latency SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DNS_ERRORS);
	__type(key, __u32);
	__type(value, __u64);
} dns_errors SEC(".maps");

static __always_inline bool dns_port(__u16 port)
{
	for (int i = 0; i < DNS_PORTS; i++)
		if (port && dns_cfg.ports[i] == port)
			return true;
	return false;
}

/* The peer's port: from the message's sockaddr when the call has one, else the connected socket's. */
static __always_inline __u16 dns_peer_port(const struct l7_sk *s, unsigned long name)
{
	struct {
		__u16 family;
		__u16 port;
	} sa = {};

	if (name && !bpf_probe_read_user(&sa, sizeof(sa), (void *)name) &&
	    (sa.family == L7_AF_INET || sa.family == L7_AF_INET6))
		return bpf_ntohs(sa.port);
	return s->dport;
}

/* One message of len bytes at buf, sent (a query) or received (a response) on socket sk. A global
 * function (scalar arguments): the verifier checks it once, not once per message of the caller. */
__noinline int dns_message(__u64 sk, int sent, __u64 buf, __u64 len)
{
	struct task_struct *task = tfo_current_task();
	__u32 zero = 0, n, off = DNS_HDR, i;
	struct l7_flight *p, q = {};
	struct l7_key k;
	__u16 qtype, id;
	__u64 sent_at;
	__u8 *b, flags;

	if (!l7_observed())
		return 0;
	b = bpf_map_lookup_elem(&l7_scratch, &zero);
	if (!b)
		return 0;
	n = len < DNS_READ ? len : DNS_READ;
	if (n < DNS_HDR || bpf_probe_read_user(b, n, (void *)buf)) {
		l7_error(&dns_errors, DNS_ERR_TRUNCATED, 1);
		return 0;
	}
	flags = b[2];
	/* QR: 0 in what a client sends, 1 in what it receives; opcode QUERY; one question */
	if (!(flags & 0x80) != !!sent || (flags & 0x78) || b[4] || b[5] != 1) {
		l7_error(&dns_errors, DNS_ERR_NOT_QUERY, 1);
		return 0;
	}
	if (sent && (b[6] | b[7] | b[8] | b[9])) { /* a query carries no answer or authority records */
		l7_error(&dns_errors, DNS_ERR_MALFORMED, 1);
		return 0;
	}
	for (i = 0; i < DNS_MAX_LABELS; i++) {
		__u8 l;

		if (off >= n)
			break;
		barrier_var(off);
		l = b[off & (L7_BUF - 1)];
		if (l == 0)
			break;
		if (l > 63) { /* compression pointers and reserved label types have no place here */
			l7_error(&dns_errors, DNS_ERR_MALFORMED, 1);
			return 0;
		}
		off += l + 1;
	}
	if (off >= n) {
		l7_error(&dns_errors, DNS_ERR_TRUNCATED, 1);
		return 0;
	}
	off++; /* the root label */
	if (i == DNS_MAX_LABELS || off - DNS_HDR > DNS_MAX_NAME) {
		l7_error(&dns_errors, DNS_ERR_MALFORMED, 1);
		return 0;
	}
	if (off + 4 > n) {
		l7_error(&dns_errors, DNS_ERR_TRUNCATED, 1);
		return 0;
	}
	barrier_var(off); /* keep both masks below: the verifier knows nothing of off but its width */
	qtype = (__u16)b[off & (L7_BUF - 1)] << 8 | b[(off + 1) & (L7_BUF - 1)];
	id = (__u16)b[0] << 8 | b[1];
	l7_key_init(&k, task);
	k.code = qtype;
	if (sent) {
		q.ts = bpf_ktime_get_ns();
		q.code = qtype;
		l7_flight_put(&dns_pending, DNS_PENDING_BITS, sk, id, &q);
		k.kind = DNS_QUERY;
		l7_count(&dns_counts, &k);
		return 0;
	}
	p = l7_flight_find(&dns_pending, DNS_PENDING_BITS, sk, id);
	if (!p || p->code != qtype) {
		l7_error(&dns_errors, DNS_ERR_UNMATCHED, 1);
		return 0;
	}
	sent_at = p->ts;
	p->k1 = 0;
	k.kind = DNS_RESPONSE;
	k.a = b[3] & 0xf;
	l7_count(&dns_counts, &k);
	k.kind = 0;
	k.a = 0;
	k.code = 0;
	l7_observe(&dns_latency, &k, bpf_ktime_get_ns() - sent_at);
	return 0;
}

/* Each message of a UDP send or receive that is to or from a DNS server port. */
static __always_inline void dns_on_syscall(struct task_struct *task, const struct sock *sk, const struct l7_sk *s,
					   int kind, const struct l7_call *c, long ret)
{
	long msgs = (kind == SC_SENDMMSG || kind == SC_RECVMMSG) ? ret : 1;
	bool sent = sc_sends(kind), any = false;
	struct l7_msg m = {};

	/* A socket bound to a DNS port is a server's, whose peers are clients: stop before reading the
	 * peer's address from user memory. */
	if (dns_port(s->lport))
		return;
	for (__u32 i = 0; i < DNS_MAX_MSGS; i++) {
		if (i >= msgs)
			break;
		if (l7_message(kind, c, ret, i, &m) || !dns_port(dns_peer_port(s, m.name)))
			continue;
		any = true;
		dns_message((__u64)sk, sent, m.buf, m.len);
	}
	if (any && msgs > DNS_MAX_MSGS)
		l7_error(&dns_errors, DNS_ERR_UNPARSED, msgs - DNS_MAX_MSGS);
}

#endif /* TFO_DNS_BPF_H */
