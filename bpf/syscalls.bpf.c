// SPDX-License-Identifier: GPL-2.0
/* The syscall hooks: one sys_enter/sys_exit pair serves two collectors, each switched on at run
 * time in tfo_features by userspace:
 *  - syscalls: count, latency (log2 histogram, ns) and errors by errno per syscall, per CPU; with
 *    container labels (tfo_cfg.labels) counts and errors per cgroup and syscall instead of errors
 *    per syscall (syscall_cg, with a per-CPU cache in front for the counts), the histogram staying
 *    per syscall;
 *  - file_io (file_io.bpf.h): bytes and opens on regular files, latency per operation.
 * Every syscall of every task passes here, so both share one storage lookup and one pair of clock
 * reads: the start time of the syscall in flight lives in task-local storage (ts), with the
 * syscall number and the file operation in aux (nr | op << 16). */
#include "tfo.bpf.h"
#include "file_io.bpf.h"

#define MAX_SYSCALLS 1024
#define MAX_ERRNO 4095
#define F_SYSCALLS 1
#define F_FILE_IO 2
#define NR_MASK 0xffff
#define OP_SHIFT 16

#if defined(__TARGET_ARCH_arm64)
#define SYSCALL_NR(regs) ((regs)->syscallno)
#define SYSCALL_NR_CORE(regs) BPF_CORE_READ(regs, syscallno)
#define SYSCALL_ARG0(regs) PT_REGS_PARM1_CORE_SYSCALL(regs)
#else
#define SYSCALL_NR(regs) ((regs)->orig_ax)
#define SYSCALL_NR_CORE(regs) BPF_CORE_READ(regs, orig_ax)
#define SYSCALL_ARG0(regs) ((regs)->di) /* tp_btf: regs is a BTF pointer, a direct load */
#endif

/* Written by userspace: which collectors use the hooks (F_*). */
volatile __u32 tfo_features SEC(".data.features") = 0;

#include "l7.bpf.h"

/* Per syscall number: latency histogram; its count is the syscall count (without labels). */
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

/* With container labels: key {cgroup, nr, 0} counts the calls, {cgroup, nr, errno} the errors.
 * Userspace sizes it to one entry when labels are off, and writes two kinds of keys of its own:
 * cg 0 holds counts folded into "other" by the series cap, cg ~0 those of host cgroups that are
 * gone (they stay in the host's series). */
struct syscall_cg_key {
	__u64 cg;
	__u32 nr;
	__u32 err;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct syscall_cg_key);
	__type(value, __u64);
} syscall_cg SEC(".maps");

/* The counts of syscall_cg go through a direct-mapped per-CPU cache first: a slot holds one
 * (cgroup, syscall) and its count in one u64 (tag << CG_COUNT_BITS | count, tag = cgroup << 10 |
 * syscall), so a repeated syscall costs an array slot instead of a hash lookup. A slot taken by
 * another pair, or whose count would overflow, is rewritten first and its count then added to
 * syscall_cg: userspace, reading syscall_cg and then the slots (each u64 whole), may miss a count
 * in transit until its next read but never sees it twice. Sized to one slot when labels are off. */
#define CG_SLOTS_BITS 12
#define CG_COUNT_BITS 22
#define CG_NR_BITS 10 /* MAX_SYSCALLS */

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1 << CG_SLOTS_BITS);
	__type(key, __u32);
	__type(value, __u64);
} syscall_cg_slots SEC(".maps");

/* Count a call of syscall nr by a task of cgroup cg, at weight w. */
static __always_inline void syscall_cg_count(__u64 cg, __u32 nr, __u32 w)
{
	struct syscall_cg_key key = { .cg = cg, .nr = nr };
	__u64 tag = cg << CG_NR_BITS | nr, old, count;
	__u32 idx = (tag * 0x9E3779B97F4A7C15ULL) >> (64 - CG_SLOTS_BITS);
	__u64 *slot;

	if (cg >> (64 - CG_COUNT_BITS - CG_NR_BITS)) { /* an id too large for a tag: to the hash */
		tfo_counter_add(&syscall_cg, &key, w);
		return;
	}
	slot = bpf_map_lookup_elem(&syscall_cg_slots, &idx);
	if (!slot)
		return;
	old = *slot;
	count = old & ((1ULL << CG_COUNT_BITS) - 1);
	if (old >> CG_COUNT_BITS == tag && count + w < (1ULL << CG_COUNT_BITS)) {
		*slot = old + w;
		return;
	}
	if (old >> CG_COUNT_BITS == tag) { /* full: start again at 0, the whole count to the hash */
		*slot = tag << CG_COUNT_BITS;
		tfo_counter_add(&syscall_cg, &key, count + w);
		return;
	}
	*slot = tag << CG_COUNT_BITS | w;
	if (count) {
		key.cg = old >> (CG_COUNT_BITS + CG_NR_BITS);
		key.nr = (old >> CG_COUNT_BITS) & ((1 << CG_NR_BITS) - 1);
		tfo_counter_add(&syscall_cg, &key, count);
	}
}

/* Does sys_enter of syscall id need the first argument (file I/O on, a file syscall)? */
static __always_inline bool wants_fd(long id)
{
	return (tfo_features & F_FILE_IO) && file_op(id) != FOP_NONE;
}

/* op: the file operation (FOP_NONE when not file I/O or file_io is off). */
static __always_inline int on_enter(struct task_struct *task, long id, __u32 op)
{
	struct tfo_task *t;

	/* With syscalls off, other syscalls stop here, before any storage lookup. */
	if (op == FOP_NONE && !(tfo_features & F_SYSCALLS))
		return 0;
	t = tfo_task_observed(task);
	if (!t)
		return 0;
	if (!tfo_sampled()) {
		t->ts = 0;
		return 0;
	}
	t->aux = ((__u32)id & NR_MASK) | op << OP_SHIFT;
	t->ts = bpf_ktime_get_ns();
	return 0;
}

static __always_inline int on_exit(long ret)
{
	struct task_struct *task = tfo_current_task();
	struct tfo_task *t = tfo_task_storage(&tfo_tasks, task, false);
	struct tfo_hist *h;
	__u64 start, ns;
	__u32 nr, op, w;

	if (!t || !t->ts)
		return 0;
	start = t->ts;
	t->ts = 0;
	ns = bpf_ktime_get_ns() - start;
	nr = t->aux & NR_MASK;
	op = t->aux >> OP_SHIFT;
	w = tfo_weight();
	if (tfo_features & F_SYSCALLS) {
		h = bpf_map_lookup_elem(&syscall_stats, &nr);
		if (h)
			tfo_hist_add(h, ns, w);
		if (tfo_cfg.labels) {
			syscall_cg_count(t->cg, nr, w);
			if (ret < 0 && ret >= -MAX_ERRNO) {
				struct syscall_cg_key key = { .cg = t->cg, .nr = nr, .err = -ret };

				tfo_counter_add(&syscall_cg, &key, w);
			}
		} else if (ret < 0 && ret >= -MAX_ERRNO) {
			__u32 key = nr << 16 | (__u32)(-ret);
			tfo_counter_add(&syscall_errors, &key, w);
		}
	}
	if (op != FOP_NONE && (tfo_features & F_FILE_IO))
		file_io_account(task, t, op, ret, ns, w);
	return 0;
}

/* With syscalls off, exits of syscalls that are not file I/O need no storage lookup. */
static __always_inline bool wants_exit(long id)
{
	return (tfo_features & F_SYSCALLS) || file_op(id) != FOP_NONE;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(tpbtf_sys_enter, struct pt_regs *regs, long id)
{
	struct task_struct *task = tfo_current_task();

	return on_enter(task, id, wants_fd(id) ? file_op_at_enter(task, id, SYSCALL_ARG0(regs)) : FOP_NONE);
}

SEC("tp_btf/sys_exit")
int BPF_PROG(tpbtf_sys_exit, struct pt_regs *regs, long ret)
{
	if (wants_exit(SYSCALL_NR(regs)))
		on_exit(ret);
	l7_exit(regs, ret, true);
	return 0;
}

SEC("raw_tp/sys_enter")
int BPF_PROG(raw_sys_enter, struct pt_regs *regs, long id)
{
	struct task_struct *task = tfo_current_task();

	return on_enter(task, id,
			wants_fd(id) ? file_op_at_enter(task, id, PT_REGS_PARM1_CORE_SYSCALL(regs)) : FOP_NONE);
}

SEC("raw_tp/sys_exit")
int BPF_PROG(raw_sys_exit, struct pt_regs *regs, long ret)
{
	/* the syscall number costs a helper call here: read it only when syscalls is off */
	if ((tfo_features & F_SYSCALLS) || wants_exit(SYSCALL_NR_CORE(regs)))
		on_exit(ret);
	l7_exit(regs, ret, false);
	return 0;
}

SEC("tracepoint/raw_syscalls/sys_enter")
int tp_sys_enter(struct trace_event_raw_sys_enter *ctx)
{
	struct task_struct *task = tfo_current_task();

	return on_enter(task, ctx->id,
			wants_fd(ctx->id) ? file_op_at_enter(task, ctx->id, ctx->args[0]) : FOP_NONE);
}

SEC("tracepoint/raw_syscalls/sys_exit")
int tp_sys_exit(struct trace_event_raw_sys_exit *ctx)
{
	return wants_exit(ctx->id) ? on_exit(ctx->ret) : 0;
}

TFO_FILTER_PROGRAMS
