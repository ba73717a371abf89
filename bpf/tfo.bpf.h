/* SPDX-License-Identifier: GPL-2.0 */
/* Shared kernel-side helpers of every tfo-agent collector:
 *  - the process/container/namespace filter verdict, cached per task in task-local storage, with
 *    the task's cgroup key when per-process families carry container labels;
 *  - sampling, expressed as a per-event weight (1/100 of an event) so that userspace
 *    divides by 100 and gets an estimate scaled back to 100%;
 *  - log2 histograms (bucket s holds 2^(s-1) < v <= 2^s, so le=2^s exactly).
 */
#ifndef TFO_BPF_H
#define TFO_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define TFO_COMM_LEN 16
#define TFO_HIST_SLOTS 40
#define TFO_CGROUP_DEPTH 16
#define TFO_MAX_SUBSYS 16
#define TFO_FILTER_INCLUDE 1
#define TFO_FILTER_EXCLUDE 2
#define TFO_CG_CONTAINER 1 /* tfo_cgroup_filter value bits: matches container_filter, */
#define TFO_CG_NAMESPACE 2 /* is a pod's of a namespace_filter namespace */
#define TFO_UNIT 100 /* weight of one event at 100% sampling */

char LICENSE[] SEC("license") = "GPL";

/* Written by userspace through the mmap'ed .data map; read on every event. */
struct tfo_cfg {
	__u32 gen;          /* bumped by userspace whenever a filter changes */
	__u32 sample_rate;  /* percent, 1..100 */
	__u32 weight;       /* TFO_UNIT * 100 / sample_rate */
	__u32 has_process_filter;
	__u32 has_container_filter;
	__u32 has_namespace_filter;
	__u32 labels;        /* 1: per-process counters are keyed by cgroup too (container labels) */
	__u32 cgroup_subsys; /* whose cgroup is the key: 0 the v2 tree, n the v1 controller of ssid n-1 */
};
volatile struct tfo_cfg tfo_cfg SEC(".data.tfo_cfg") = {
	.gen = 1, .sample_rate = 100, .weight = TFO_UNIT,
};
/* Bumped in the kernel when a task changes cgroup; read by userspace as a self-check. */
volatile __u32 tfo_kgen = 0;
/* Events that could not be recorded because a map was full. */
volatile __u64 tfo_map_full = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, char[TFO_COMM_LEN]);
	__type(value, __u8);
} tfo_comm_filter SEC(".maps");

/* A cgroup: ids are per hierarchy (each v1 hierarchy and the v2 tree number their own). */
struct tfo_cgroup_ref {
	__u64 id;        /* kernfs id, the directory's inode number */
	__u32 hierarchy; /* 0 for the v2 tree, as in /proc/<pid>/cgroup */
	__u32 pad;
};

/* Cgroups of container_filter and namespace_filter -> TFO_CG_* bits. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tfo_cgroup_ref);
	__type(value, __u8);
} tfo_cgroup_filter SEC(".maps");

struct tfo_task {
	__u64 gen;      /* (userspace gen << 32) | kernel gen the verdict was computed at */
	__u64 ts;       /* collector scratch: start time of the operation in flight */
	__u32 verdict;  /* 1 = this task is observed */
	__u32 aux;      /* collector scratch: e.g. the syscall number in flight */
	__u64 cg;       /* with labels: the task's cgroup key (tfo_cgroup_key), as of the verdict */
};

#ifdef TFO_COMPAT
/* The compat build (NAME.compat.bpf.o), for kernels without what 5.11 and 5.12 brought: task-local
 * storage and bpf_get_current_task_btf (5.11), and atomics that return a value (5.12). Per-task
 * state lives in hashes keyed by thread id, preallocated and bounded, and freed when the thread
 * exits (sched_process_exit, attached in every mode through TFO_FILTER_PROGRAMS); the current task
 * is a plain pointer whose fields are read with CO-RE probe reads. */
#define TFO_MAX_TASKS 32768
#define TFO_TASK_MAP(name, value_type)                  \
	struct {                                        \
		__uint(type, BPF_MAP_TYPE_HASH);        \
		__uint(max_entries, TFO_MAX_TASKS);     \
		__type(key, __u32);                     \
		__type(value, value_type);              \
	} name SEC(".maps")
#define tfo_current_task() ((struct task_struct *)bpf_get_current_task())
/* A field reached from the current task: a probe read here (plain pointer), a plain load otherwise. */
#define TFO_RD(task, ...) BPF_CORE_READ(task, __VA_ARGS__)
/* Compare-and-swap and exchange without the 5.12 atomics: plain accesses. Two CPUs updating the
 * same entry at the same instant may lose one update, which the fast build's atomics prevent. */
#define tfo_cas(p, old, new) ({ __typeof__(*(p)) __v = *(p); if (__v == (old)) *(p) = (new); __v; })
#define tfo_xchg(p, new) ({ __typeof__(*(p)) __v = *(p); *(p) = (new); __v; })

static __always_inline __u32 tfo_tid_of(struct task_struct *task)
{
	return BPF_CORE_READ(task, pid);
}

/* The entry of task in a per-task hash, created zeroed when `create` (NULL when the map is full). */
static __always_inline void *tfo_task_map_get(void *map, struct task_struct *task, bool create)
{
	static const __u8 zero[64] = {};
	__u32 tid = tfo_tid_of(task);
	void *v = bpf_map_lookup_elem(map, &tid);

	if (v || !create)
		return v;
	bpf_map_update_elem(map, &tid, &zero, BPF_NOEXIST);
	v = bpf_map_lookup_elem(map, &tid);
	if (!v)
		__sync_fetch_and_add(&tfo_map_full, 1);
	return v;
}
#define tfo_task_storage(map, task, create) tfo_task_map_get(map, task, create)
#else
#define TFO_TASK_MAP(name, value_type)                  \
	struct {                                        \
		__uint(type, BPF_MAP_TYPE_TASK_STORAGE); \
		__uint(map_flags, BPF_F_NO_PREALLOC);   \
		__type(key, int);                       \
		__type(value, value_type);              \
	} name SEC(".maps")
#define tfo_current_task() bpf_get_current_task_btf()
#define TFO_RD(task, ...) ___arrow(task, __VA_ARGS__)
#define tfo_cas __sync_val_compare_and_swap
#define tfo_xchg __sync_lock_test_and_set
#define tfo_task_storage(map, task, create) \
	bpf_task_storage_get(map, task, 0, (create) ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0)
#endif

TFO_TASK_MAP(tfo_tasks, struct tfo_task);

static __always_inline __u64 tfo_gen(void)
{
	return ((__u64)tfo_cfg.gen << 32) | tfo_kgen;
}

/* The TFO_CG_* bits of cgroup `cgrp` and its ancestors in one hierarchy, stopping once all of `want`
 * are found. A global function: the verifier checks it once, not once per iteration of the caller's
 * loop over hierarchies (inlined, the two nested loops took 6.1's and 5.10's verifier past its
 * million instructions). */
__noinline __u32 tfo_cgroup_bits(__u64 cgrp, __u32 hierarchy, __u32 have, __u32 want)
{
	struct tfo_cgroup_ref ref = { .hierarchy = hierarchy };
	struct cgroup *cg = (struct cgroup *)cgrp;

	for (int d = 0; d < TFO_CGROUP_DEPTH && cg && (have & want) != want; d++) {
		__u8 *bits;

		ref.id = BPF_CORE_READ(cg, kn, id);
		bits = bpf_map_lookup_elem(&tfo_cgroup_filter, &ref);
		if (bits)
			have |= *bits;
		cg = (struct cgroup *)BPF_CORE_READ(cg, self.parent);
	}
	return have;
}

/* Which of the cgroup filters (`want`, TFO_CG_* bits) the task's cgroups match, on the v2 tree or
 * any v1 hierarchy. */
static __always_inline __u8 tfo_task_cgroup_bits(struct task_struct *task, __u8 want)
{
	struct css_set *cset = BPF_CORE_READ(task, cgroups);
	int n = bpf_core_field_size(cset->subsys) / sizeof(void *);
	__u32 have = tfo_cgroup_bits((__u64)BPF_CORE_READ(cset, dfl_cgrp), 0, 0, want);

	for (int i = 0; i < TFO_MAX_SUBSYS && (have & want) != want; i++) {
		struct cgroup_subsys_state *css = NULL;
		struct cgroup *cg;

		if (i >= n)
			break;
		bpf_core_read(&css, sizeof(css), &cset->subsys[i]);
		if (!css)
			continue;
		cg = BPF_CORE_READ(css, cgroup);
		have = tfo_cgroup_bits((__u64)cg, BPF_CORE_READ(cg, root, hierarchy_id), have, want);
	}
	return have;
}

/* The task's cgroup key for per-process counters with container labels: the id of its cgroup on
 * the v2 tree, or on the v1 hierarchy of controller tfo_cfg.cgroup_subsys - 1. */
static __noinline __u64 tfo_cgroup_key(struct task_struct *task)
{
	struct css_set *cset = BPF_CORE_READ(task, cgroups);
	int n = bpf_core_field_size(cset->subsys) / sizeof(void *);
	struct cgroup_subsys_state *css = NULL;
	__u32 ssid = tfo_cfg.cgroup_subsys;

	if (!ssid)
		return BPF_CORE_READ(cset, dfl_cgrp, kn, id);
	ssid -= 1;
	if (ssid >= TFO_MAX_SUBSYS || ssid >= n)
		return 0;
	bpf_core_read(&css, sizeof(css), &cset->subsys[ssid]);
	return css ? BPF_CORE_READ(css, cgroup, kn, id) : 0;
}

/* Zero a comm's bytes after its terminating NUL. Older kernels (5.10 among them) copy a new name
 * with strlcpy, which leaves the old name's tail there: a process that renames itself from "python3"
 * to "l7py" (prctl PR_SET_NAME) holds "l7py\0n3\0...", which would miss its filter entry and count
 * under a key of its own. The first zero byte of each 8-byte half is found without a loop. */
static __always_inline void tfo_comm_pad(char *comm)
{
	const __u64 ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
	__u64 w[2], z;

	__builtin_memcpy(w, comm, sizeof(w));
	z = (w[0] - ones) & ~w[0] & highs; /* the lowest set bit marks the first zero byte */
	if (z) {
		w[0] &= (z & -z) - 1;
		w[1] = 0;
	} else {
		z = (w[1] - ones) & ~w[1] & highs;
		if (z)
			w[1] &= (z & -z) - 1;
	}
	__builtin_memcpy(comm, w, sizeof(w));
}

/* The name of task's thread group leader (what filters and per-process series name), padded. task
 * must be a BTF pointer (current task, tp_btf argument) but in the compat build. */
static __always_inline void tfo_leader_comm(char (*comm)[TFO_COMM_LEN], struct task_struct *task)
{
#ifdef TFO_COMPAT
	BPF_CORE_READ_INTO(comm, task, group_leader, comm);
#else
	__builtin_memcpy(*comm, task->group_leader->comm, TFO_COMM_LEN); /* plain loads: BTF pointer */
#endif
	tfo_comm_pad(*comm);
}

static __noinline __u32 tfo_compute_verdict(struct task_struct *task)
{
	char comm[TFO_COMM_LEN] __attribute__((aligned(8))) = {};
	__u8 *mark;

	tfo_leader_comm(&comm, task); /* filters name processes */
	mark = bpf_map_lookup_elem(&tfo_comm_filter, &comm);
	if (mark && (*mark & TFO_FILTER_EXCLUDE))
		return 0;
	if (tfo_cfg.has_process_filter && !(mark && (*mark & TFO_FILTER_INCLUDE)))
		return 0;
	if (tfo_cfg.has_container_filter || tfo_cfg.has_namespace_filter) {
		__u8 want = (tfo_cfg.has_container_filter ? TFO_CG_CONTAINER : 0) |
			    (tfo_cfg.has_namespace_filter ? TFO_CG_NAMESPACE : 0);

		if (tfo_task_cgroup_bits(task, want) != want)
			return 0;
	}
	return 1;
}

/* The task's storage if the task passes the filters, else NULL. Creates the storage. */
static __always_inline struct tfo_task *tfo_task_observed(struct task_struct *task)
{
	struct tfo_task *t = tfo_task_storage(&tfo_tasks, task, true);
	__u64 gen;

	if (!t)
		return NULL;
	gen = tfo_gen();
	if (t->gen != gen) {
		t->verdict = tfo_compute_verdict(task);
		t->cg = t->verdict && tfo_cfg.labels ? tfo_cgroup_key(task) : 0;
		t->gen = gen;
	}
	return t->verdict ? t : NULL;
}

#define TFO_S_IFMT 0170000
#define TFO_TS_COMPAT 0x0002 /* x86: the task is in a 32-bit syscall (other numbers) */

/* Is the current task in a 32-bit syscall, whose numbers differ from the native ones? */
static __always_inline bool tfo_in_compat_syscall(struct task_struct *task)
{
#if defined(__TARGET_ARCH_x86)
	if (bpf_core_field_exists(task->thread_info.status))
		return TFO_RD(task, thread_info.status) & TFO_TS_COMPAT;
#endif
	return false;
}

/* The file behind the task's descriptor fd (NULL if none), read through helpers. */
static __always_inline struct file *tfo_file_of_fd(struct task_struct *task, long fd)
{
	struct fdtable *fdt = TFO_RD(task, files, fdt);
	struct file **fds, *f = NULL;

	if (fd < 0 || fd >= TFO_RD(fdt, max_fds))
		return NULL;
	fds = TFO_RD(fdt, fd);
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	return f;
}

/* Sampling decision for one event: true if it is recorded. */
static __always_inline bool tfo_sampled(void)
{
	__u32 rate = tfo_cfg.sample_rate;
	return rate >= 100 || bpf_get_prandom_u32() % 100 < rate;
}

static __always_inline __u32 tfo_weight(void)
{
	return tfo_cfg.weight;
}

/* Bucket index: smallest s with v <= 2^s, clamped to the last slot. */
static __always_inline __u32 tfo_slot(__u64 v)
{
	__u32 s = 0;

	if (v <= 1)
		return 0;
	v -= 1;
	if (v >> 32) { v >>= 32; s += 32; }
	if (v >> 16) { v >>= 16; s += 16; }
	if (v >> 8) { v >>= 8; s += 8; }
	if (v >> 4) { v >>= 4; s += 4; }
	if (v >> 2) { v >>= 2; s += 2; }
	if (v >> 1) { s += 1; }
	s += 1;
	return s < TFO_HIST_SLOTS ? s : TFO_HIST_SLOTS - 1;
}

struct tfo_hist {
	__u64 slots[TFO_HIST_SLOTS]; /* weighted counts */
	__u64 sum;                   /* weighted sum of values */
};

static __always_inline void tfo_hist_add(struct tfo_hist *h, __u64 v, __u32 w)
{
	h->slots[tfo_slot(v)] += w;
	h->sum += v * w;
}

static __always_inline void tfo_count_map_full(void)
{
	__sync_fetch_and_add(&tfo_map_full, 1);
}

/* Add w to a per-CPU u64 counter in a hash map, creating the key when needed. */
static __always_inline void tfo_counter_add(void *map, const void *key, __u64 w)
{
	__u64 *v = bpf_map_lookup_elem(map, key);

	if (v) {
		*v += w;
		return;
	}
	if (bpf_map_update_elem(map, key, &w, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(map, key);
		if (v)
			*v += w;
		else
			tfo_count_map_full();
	}
}

/* Filter cache invalidation, shared by every collector object: a task that renames itself
 * (exec, prctl) recomputes its verdict; any cgroup move makes every task recompute once. */
static __always_inline void tfo_on_rename(void)
{
	struct tfo_task *t = tfo_task_storage(&tfo_tasks, tfo_current_task(), false);
	if (t)
		t->gen = 0;
}

#ifdef TFO_COMPAT
/* A thread exits: free its entries in the per-task hashes (the compat build's task storage). An
 * object with hashes of its own defines TFO_TASK_EXIT_EXTRA(tid) before including this file. */
#ifndef TFO_TASK_EXIT_EXTRA
#define TFO_TASK_EXIT_EXTRA(tid)
#endif
#define TFO_EXIT_PROGRAM(prefix, sec)                                   \
	SEC(sec) int prefix##task_exit(void *ctx)                       \
	{                                                               \
		__u32 tid = (__u32)bpf_get_current_pid_tgid();          \
		bpf_map_delete_elem(&tfo_tasks, &tid);                  \
		TFO_TASK_EXIT_EXTRA(tid);                               \
		return 0;                                               \
	}
#else
#define TFO_EXIT_PROGRAM(prefix, sec)
#endif

/* The filter (and, in the compat build, task exit) programs of one mode, named prefix*. */
#define TFO_FILTER_PROGRAMS_OF(prefix, rename_sec, cgroup_sec, exit_sec)                             \
	SEC(rename_sec) int prefix##task_rename(void *ctx) { tfo_on_rename(); return 0; }           \
	SEC(cgroup_sec) int prefix##cgroup_attach(void *ctx) { __sync_fetch_and_add(&tfo_kgen, 1); return 0; } \
	TFO_EXIT_PROGRAM(prefix, exit_sec)

#define TFO_FILTER_PROGRAMS                                                                          \
	TFO_FILTER_PROGRAMS_OF(raw_, "raw_tp/task_rename", "raw_tp/cgroup_attach_task",              \
			       "raw_tp/sched_process_exit")                                          \
	TFO_FILTER_PROGRAMS_OF(tp_, "tracepoint/task/task_rename", "tracepoint/cgroup/cgroup_attach_task", \
			       "tracepoint/sched/sched_process_exit")                                \
	TFO_FILTER_PROGRAMS_OF(tpbtf_, "tp_btf/task_rename", "tp_btf/cgroup_attach_task",            \
			       "tp_btf/sched_process_exit")

#endif /* TFO_BPF_H */
