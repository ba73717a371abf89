// SPDX-License-Identifier: GPL-2.0
/* Syscall count, latency (log2 histogram, ns) and errors by errno, aggregated per CPU.
 * The start time of the syscall in flight lives in task-local storage. */
#include "tfo.bpf.h"

#define MAX_SYSCALLS 1024
#define MAX_ERRNO 4095

/* Per syscall number: latency histogram; its count is the syscall count. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SYSCALLS);
	__type(key, __u32);
	__type(value, struct tfo_hist);
} syscall_stats SEC(".maps");

/* Key: syscall number << 16 | errno. Value: weighted count. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, __u64);
} syscall_errors SEC(".maps");

static __always_inline int on_enter(long id)
{
	struct tfo_task *t = tfo_task_observed(bpf_get_current_task_btf());

	if (!t)
		return 0;
	if (!tfo_sampled()) {
		t->ts = 0;
		return 0;
	}
	t->aux = (__u32)id;
	t->ts = bpf_ktime_get_ns();
	return 0;
}

static __always_inline int on_exit(long ret)
{
	struct tfo_task *t = bpf_task_storage_get(&tfo_tasks, bpf_get_current_task_btf(), 0, 0);
	struct tfo_hist *h;
	__u64 start;
	__u32 nr, w;

	if (!t || !t->ts)
		return 0;
	start = t->ts;
	t->ts = 0;
	nr = t->aux;
	h = bpf_map_lookup_elem(&syscall_stats, &nr);
	if (!h)
		return 0;
	w = tfo_weight();
	tfo_hist_add(h, bpf_ktime_get_ns() - start, w);
	if (ret < 0 && ret >= -MAX_ERRNO) {
		__u32 key = nr << 16 | (__u32)(-ret);
		tfo_counter_add(&syscall_errors, &key, w);
	}
	return 0;
}

SEC("raw_tp/sys_enter")
int BPF_PROG(raw_sys_enter, struct pt_regs *regs, long id)
{
	return on_enter(id);
}

SEC("raw_tp/sys_exit")
int BPF_PROG(raw_sys_exit, struct pt_regs *regs, long ret)
{
	return on_exit(ret);
}

SEC("tracepoint/raw_syscalls/sys_enter")
int tp_sys_enter(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->id);
}

SEC("tracepoint/raw_syscalls/sys_exit")
int tp_sys_exit(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx->ret);
}

TFO_FILTER_PROGRAMS
