/* SPDX-License-Identifier: GPL-2.0 */
/* HTTP/1.x, both roles: requests a process sends (client) or receives (server), each matched with
 * the response that follows on the same connection. The first bytes of each payload tell a request
 * line ("GET ", "POST ", ...) or a status line ("HTTP/1.1 200 ") from anything else (bodies, other
 * protocols, TLS records); only those two move the per-connection state, one request in flight at a
 * time. Plaintext is read at sys_exit of the socket syscalls (l7.bpf.h), TLS plaintext at the return
 * of OpenSSL's SSL_read/SSL_write (and their _ex forms), attached as uprobes by the agent.
 * What cannot be counted right goes to http_errors. */
#ifndef TFO_HTTP_BPF_H
#define TFO_HTTP_BPF_H

#define HTTP_PEEK 16  /* bytes read from the start of a payload */
#define HTTP_SCAN 256 /* bytes searched for interim responses' ends */
#define HTTP_INTERIMS 4

enum { HTTP_NONE, HTTP_REQ, HTTP_RESP, HTTP_PARTIAL };
enum { HTTP_REQUEST = 1, HTTP_RESPONSE };   /* l7_key.kind */
enum { HTTP_CLIENT = 1, HTTP_SERVER };      /* l7_key.a (direction) and the role in flight */
/* Parse errors (http_errors index), named in agent/collectors/http.py. */
enum { HTTP_ERR_TRUNCATED, HTTP_ERR_UNMATCHED, HTTP_ERR_UNANSWERED, HTTP_ERRORS };

/* The request in flight per connection (l7_flight: k1 = the struct sock's address and k2 = 0 for a
 * socket, k1 = OpenSSL's SSL object's address and k2 = the process's tgid for TLS; role, code =
 * method, tag = a socket's port pair, so that a new socket at a freed address starts afresh): 65,536
 * slots. */
#define HTTP_CONN_BITS 14
L7_FLIGHTS(http_conns, HTTP_CONN_BITS);

/* kind HTTP_REQUEST: a = direction, b = method; HTTP_RESPONSE: also code = status. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L7_MAX_KEYS);
	__type(key, struct l7_key);
	__type(value, __u64);
} http_counts SEC(".maps");

/* Request to response, ns, per comm and direction (a). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L7_MAX_HISTS);
	__type(key, struct l7_key);
	__type(value, struct tfo_hist);
} http_duration SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HTTP_ERRORS);
	__type(key, __u32);
	__type(value, __u64);
} http_errors SEC(".maps");

/* 1: the n bytes at b start with token t (len bytes); 2: they end inside it; 0: neither. */
static __always_inline int http_match(const __u8 *b, __u32 n, const char *t, __u32 len)
{
#pragma unroll
	for (__u32 i = 0; i < 9; i++) {
		if (i >= len)
			return 1;
		if (i >= n)
			return 2;
		if (b[i] != t[i])
			return 0;
	}
	return 1;
}

static __always_inline bool http_digit(__u8 c)
{
	return c >= '0' && c <= '9';
}

/* What the first n bytes (1..HTTP_PEEK) of a payload are; *code is the method (1..9, in the order
 * of agent/collectors/http.py's METHODS) or the status. */
static __always_inline int http_classify(const __u8 *b, __u32 n, __u16 *code)
{
	int m, partial = 0;

#define HTTP_TRY(idx, token)                                    \
	m = http_match(b, n, token, sizeof(token) - 1);         \
	if (m == 1) {                                           \
		*code = idx;                                    \
		return HTTP_REQ;                                \
	}                                                       \
	partial |= m == 2;
	HTTP_TRY(1, "GET ")
	HTTP_TRY(2, "HEAD ")
	HTTP_TRY(3, "POST ")
	HTTP_TRY(4, "PUT ")
	HTTP_TRY(5, "DELETE ")
	HTTP_TRY(6, "CONNECT ")
	HTTP_TRY(7, "OPTIONS ")
	HTTP_TRY(8, "TRACE ")
	HTTP_TRY(9, "PATCH ")
#undef HTTP_TRY
	m = http_match(b, n, "HTTP/1.", 7);
	if (m == 0)
		return partial ? HTTP_PARTIAL : HTTP_NONE;
	if (m == 2 || n < 12) /* "HTTP/1.1 200" is the shortest status line start */
		return HTTP_PARTIAL;
	if ((b[7] != '0' && b[7] != '1') || b[8] != ' ' || !http_digit(b[9]) || !http_digit(b[10]) ||
	    !http_digit(b[11]) || (n > 12 && b[12] != ' ' && b[12] != '\r'))
		return HTTP_NONE;
	*code = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
	return HTTP_RESP;
}

/* What the payload at buf (len bytes) starts with: HTTP_* << 16 | method or status. A global
 * function: the verifier checks the nine token comparisons once, whatever the caller. */
__noinline int http_peek(__u64 buf, __u64 len)
{
	__u32 n = len < HTTP_PEEK ? len : HTTP_PEEK;
	__u8 b[HTTP_PEEK] = {};
	__u16 code = 0;
	int what;

	if (!n || bpf_probe_read_user(b, n, (void *)buf))
		return HTTP_NONE;
	what = http_classify(b, n, &code);
	return what << 16 | code;
}

#define HTTP_AT(s, i) ((s)[(i) & (L7_BUF - 1)])

/* The offset just past the first empty line ("\r\n\r\n", the end of a head) at or after pos in the
 * first n bytes of the scratch buffer, 0 if none. A global function: verified once, on its own. */
__noinline int http_head_end(__u32 pos, __u32 n)
{
	__u32 zero = 0;
	__u8 *s = bpf_map_lookup_elem(&l7_scratch, &zero);

	if (!s)
		return 0;
	for (__u32 i = 0; i < HTTP_SCAN - 3; i++) {
		__u32 at = pos + i;

		if (at + 4 > n)
			return 0;
		if (HTTP_AT(s, at) == '\r' && HTTP_AT(s, at + 1) == '\n' && HTTP_AT(s, at + 2) == '\r' &&
		    HTTP_AT(s, at + 3) == '\n')
			return at + 4;
	}
	return 0;
}

/* An interim response (100 Continue, 103 Early Hints) started the payload at buf (len bytes): the
 * final response may follow in the same read or write, within its first HTTP_SCAN bytes. What
 * follows the interim heads there: HTTP_RESP << 16 | status, HTTP_PARTIAL when it is cut short,
 * else HTTP_NONE (the final response comes later). */
__noinline int http_after_interims(__u64 buf, __u64 len)
{
	__u32 zero = 0, n = len < HTTP_SCAN ? len : HTTP_SCAN, p = 0, code;
	__u8 *s = bpf_map_lookup_elem(&l7_scratch, &zero);

	if (!s || n < 4 || bpf_probe_read_user(s, n, (void *)buf))
		return HTTP_NONE;
	for (int r = 0; r < HTTP_INTERIMS; r++) {
		p = http_head_end(p, n);
		if (!p || p >= n)
			return HTTP_NONE;
		if (p + 12 > n)
			return HTTP_PARTIAL;
		if (HTTP_AT(s, p) != 'H' || HTTP_AT(s, p + 1) != 'T' || HTTP_AT(s, p + 2) != 'T' ||
		    HTTP_AT(s, p + 3) != 'P' || HTTP_AT(s, p + 4) != '/' || HTTP_AT(s, p + 8) != ' ' ||
		    !http_digit(HTTP_AT(s, p + 9)) || !http_digit(HTTP_AT(s, p + 10)) || !http_digit(HTTP_AT(s, p + 11)))
			return HTTP_NONE;
		code = (HTTP_AT(s, p + 9) - '0') * 100 + (HTTP_AT(s, p + 10) - '0') * 10 + (HTTP_AT(s, p + 11) - '0');
		if (code >= 200 || code == 101)
			return HTTP_RESP << 16 | code;
	}
	return HTTP_NONE;
}

/* len bytes at buf were sent or received on a connection: the socket at address id (tgid 0), or
 * OpenSSL's SSL object at address id in process tgid. A global function (scalar arguments): the
 * verifier checks it once, for both callers. */
__noinline int http_on_payload(__u64 id, __u32 tgid, int sent, __u64 buf, __u64 len)
{
	struct task_struct *task = tfo_current_task();
	const struct sock *sk = tgid ? NULL : (const struct sock *)id;
	int what = http_peek(buf, len);
	__u16 code = what & 0xffff;
	struct l7_flight *c, now = {};
	struct l7_key k;
	__u8 role;

	what >>= 16;
	if (what == HTTP_NONE || !l7_observed())
		return 0;
	if (what == HTTP_PARTIAL) {
		l7_error(&http_errors, HTTP_ERR_TRUNCATED, 1);
		return 0;
	}
	if (sk)
		now.tag = BPF_CORE_READ(sk, __sk_common.skc_portpair);
	now.ts = bpf_ktime_get_ns();
	c = l7_flight_find(&http_conns, HTTP_CONN_BITS, id, tgid);
	if (c && c->tag != now.tag)
		c = NULL; /* a new socket where an old one was */
	l7_key_init(&k, task);
	if (what == HTTP_REQ) {
		if (c) /* a slot in use always holds a request */
			l7_error(&http_errors, HTTP_ERR_UNANSWERED, 1);
		now.role = sent ? HTTP_CLIENT : HTTP_SERVER;
		now.code = code;
		l7_flight_put(&http_conns, HTTP_CONN_BITS, id, tgid, &now);
		k.kind = HTTP_REQUEST;
		k.a = now.role;
		k.b = code;
		l7_count(&http_counts, &k);
		return 0;
	}
	role = sent ? HTTP_SERVER : HTTP_CLIENT;
	if (!c || c->role != role) {
		l7_error(&http_errors, HTTP_ERR_UNMATCHED, 1);
		return 0;
	}
	if (code < 200 && code != 101) { /* interim (100 Continue...): the final response follows */
		what = http_after_interims(buf, len);
		if (what == HTTP_PARTIAL)
			l7_error(&http_errors, HTTP_ERR_TRUNCATED, 1);
		if (what >> 16 != HTTP_RESP)
			return 0;
		code = what & 0xffff;
	}
	k.kind = HTTP_RESPONSE;
	k.a = role;
	k.b = c->code;
	k.code = code;
	now.ts -= c->ts;
	c->k1 = 0;
	l7_count(&http_counts, &k);
	k.kind = 0;
	k.b = 0;
	k.code = 0;
	l7_observe(&http_duration, &k, now.ts);
	return 0;
}

static __always_inline void http_on_syscall(struct task_struct *task, const struct sock *sk, int kind,
					    const struct l7_call *c, long ret)
{
	struct l7_msg m = {};

	if (kind == SC_SENDMMSG || kind == SC_RECVMMSG || l7_message(kind, c, ret, 0, &m))
		return;
	http_on_payload((__u64)sk, 0, sc_sends(kind), m.buf, m.len);
}

/* TLS: SSL_read(ssl, buf, num), SSL_write(ssl, buf, num), SSL_read_ex(ssl, buf, num, &readbytes),
 * SSL_write_ex(ssl, buf, num, &written), or the internal function both forms call, which takes the
 * _ex arguments and returns > 0 on success (agent/collectors/tls.py). The entry keeps the arguments
 * per thread, the return hands the plaintext moved to http_on_payload. */
struct ssl_call {
	__u64 ssl;
	__u64 buf;
	__u64 moved; /* _ex: where the byte count is written */
	__u8 sent;
	__u8 ex;
	__u8 pad[6];
};

/* The call in flight per thread: in task storage (a hash's update and delete per call cost more
 * than the rest of the entry and return programs here); in the compat build, a hash by thread. */
#ifdef TFO_COMPAT
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct ssl_call);
} ssl_calls SEC(".maps");

static __always_inline void ssl_call_put(const struct ssl_call *call)
{
	__u64 id = bpf_get_current_pid_tgid();

	bpf_map_update_elem(&ssl_calls, &id, call, BPF_ANY);
}

/* The thread's call in flight into *call, forgotten there; false if none. */
static __always_inline bool ssl_call_take(struct ssl_call *call)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ssl_call *p = bpf_map_lookup_elem(&ssl_calls, &id);

	if (!p)
		return false;
	*call = *p;
	bpf_map_delete_elem(&ssl_calls, &id);
	return true;
}
#else
TFO_TASK_MAP(ssl_calls, struct ssl_call);

static __always_inline void ssl_call_put(const struct ssl_call *call)
{
	struct ssl_call *p = tfo_task_storage(&ssl_calls, tfo_current_task(), true);

	if (p)
		*p = *call;
}

static __always_inline bool ssl_call_take(struct ssl_call *call)
{
	struct ssl_call *p = tfo_task_storage(&ssl_calls, tfo_current_task(), false);

	if (!p || !p->ssl)
		return false;
	*call = *p;
	p->ssl = 0;
	return true;
}
#endif

static __always_inline int ssl_enter(struct pt_regs *ctx, bool sent, bool ex)
{
	struct ssl_call call = {
		.ssl = PT_REGS_PARM1(ctx), .buf = PT_REGS_PARM2(ctx), .moved = ex ? PT_REGS_PARM4(ctx) : 0,
		.sent = sent, .ex = ex,
	};

	if (!(tfo_features & F_HTTP)) /* the filters apply at the return, to what was moved */
		return 0;
	ssl_call_put(&call);
	return 0;
}

SEC("uprobe")
int up_ssl_read(struct pt_regs *ctx) { return ssl_enter(ctx, false, false); }
SEC("uprobe")
int up_ssl_read_ex(struct pt_regs *ctx) { return ssl_enter(ctx, false, true); }
SEC("uprobe")
int up_ssl_write(struct pt_regs *ctx) { return ssl_enter(ctx, true, false); }
SEC("uprobe")
int up_ssl_write_ex(struct pt_regs *ctx) { return ssl_enter(ctx, true, true); }

SEC("uretprobe")
int up_ssl_return(struct pt_regs *ctx)
{
	struct l7_msg m = {};
	int ret = PT_REGS_RC(ctx);
	struct ssl_call call;

	if (!ssl_call_take(&call))
		return 0;
	if (call.ex) {
		if (ret <= 0 || bpf_probe_read_user(&m.len, sizeof(m.len), (void *)call.moved))
			return 0;
	} else if (ret > 0) {
		m.len = ret;
	}
	return http_on_payload(call.ssl, bpf_get_current_pid_tgid() >> 32, call.sent, call.buf, m.len);
}

#endif /* TFO_HTTP_BPF_H */
