/* SPDX-License-Identifier: GPL-2.0 */
/* Per-process counters keyed by the process name (the thread group leader's comm), shared by the
 * file_io, scheduler and memory collectors. The layout is the one agent/collectors/comm_cap.py reads:
 *  - comm_stats:    per-CPU hash, comm -> TFO_COMM_VALUES u64 counters, bounded;
 *  - comm_overflow: per-CPU, one entry: what arrived while comm_stats was full (also counted in
 *                   tfo_map_full), exported as comm="other";
 *  - comm_folded:   one entry written by userspace only: counters of names it folded into "other"
 *                   (their comm_stats entries are deleted, which keeps room in the hash);
 *  - comm_cg_stats: what comm_stats holds, keyed by name and cgroup (tfo_cgroup_key), used instead
 *                   of it when the families carry container labels (tfo_cfg.labels); userspace
 *                   joins the container's names in at read time, and sizes it to one entry when
 *                   labels are off (comm_stats is then the map, as before).
 * Define TFO_COMM_VALUES before including this file.
 */
#ifndef TFO_COMM_BPF_H
#define TFO_COMM_BPF_H

#include "tfo.bpf.h"

#ifndef TFO_COMM_VALUES
#error "define TFO_COMM_VALUES (counters per process name) before including tfo_comm.bpf.h"
#endif
#define TFO_COMM_MAX 10240

struct tfo_comm_val {
	__u64 v[TFO_COMM_VALUES];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, TFO_COMM_MAX);
	__type(key, char[TFO_COMM_LEN]);
	__type(value, struct tfo_comm_val);
} comm_stats SEC(".maps");

struct tfo_comm_cg_key {
	char comm[TFO_COMM_LEN];
	__u64 cg;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, TFO_COMM_MAX);
	__type(key, struct tfo_comm_cg_key);
	__type(value, struct tfo_comm_val);
} comm_cg_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tfo_comm_val);
} comm_overflow SEC(".maps");

/* The counters at key in stats, created zeroed when missing; NULL when the hash is full. */
static __always_inline struct tfo_comm_val *tfo_comm_lookup(void *stats, const void *key)
{
	static const struct tfo_comm_val zero = {};
	struct tfo_comm_val *v = bpf_map_lookup_elem(stats, key);

	if (v)
		return v;
	bpf_map_update_elem(stats, key, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(stats, key);
}

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tfo_comm_val);
} comm_folded SEC(".maps");

/* The counters of the process (thread group leader's name) ``task`` belongs to, and of its cgroup
 * when labels are on (``t``: the task's storage, from tfo_task_observed); NULL only if even the
 * overflow entry is unavailable. ``task`` must be a BTF pointer (current task, tp_btf argument) but
 * in the compat build. */
static __always_inline struct tfo_comm_val *tfo_comm_counters(struct task_struct *task, struct tfo_task *t)
{
	struct tfo_comm_cg_key key = {};
	struct tfo_comm_val *v;
	__u32 k = 0;

	tfo_leader_comm(&key.comm, task);
	if (tfo_cfg.labels) {
		key.cg = t->cg;
		v = tfo_comm_lookup(&comm_cg_stats, &key);
	} else {
		v = tfo_comm_lookup(&comm_stats, key.comm);
	}
	if (v)
		return v;
	tfo_count_map_full();
	return bpf_map_lookup_elem(&comm_overflow, &k);
}

#endif /* TFO_COMM_BPF_H */
