// SPDX-License-Identifier: GPL-2.0
/* Scheduler: CPU time and context switches per process, run-queue latency (log2 histogram, ns).
 *
 * CPU time and context switches are the kernel's own per-task accounting (se.sum_exec_runtime,
 * nvcsw, nivcsw, the figures /proc/<pid>/schedstat and /proc/<pid>/status show), read at every
 * switch-out and added as deltas from the task's previous snapshot: the kernel has already
 * updated them when sched_switch fires, so the counters agree with /proc by construction and
 * sample_rate does not make them estimates. A task first seen after the collector started is
 * counted from its birth (its snapshot starts at zero), an older task from its first switch.
 *
 * Run-queue latency is the time from becoming runnable (woken, newly created, or switched out
 * while still runnable: preempted or yielding) to running on a CPU; tfo_task.ts holds the start.
 */
#define TFO_COMM_VALUES 3 /* CPU ns, voluntary switches, involuntary switches (times TFO_UNIT) */
#define TFO_TASK_EXIT_EXTRA(tid) bpf_map_delete_elem(&sched_snaps, &tid) /* compat build */
#include "tfo_comm.bpf.h"

enum { V_RUNTIME_NS, V_VOLUNTARY, V_INVOLUNTARY };

struct sched_snap {
	__u64 runtime;
	__u64 nvcsw;
	__u64 nivcsw;
};

TFO_TASK_MAP(sched_snaps, struct sched_snap);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tfo_hist);
} runq_latency SEC(".maps");

/* When this collector first saw a switch (CLOCK_MONOTONIC ns, like task->start_time). */
volatile __u64 sched_epoch = 0;

static __always_inline struct sched_snap *snapshot_of(struct task_struct *p)
{
	struct sched_snap *s = tfo_task_storage(&sched_snaps, p, false);

	if (s)
		return s;
	s = tfo_task_storage(&sched_snaps, p, true);
	if (s && p->start_time < sched_epoch) {
		s->runtime = p->se.sum_exec_runtime;
		s->nvcsw = p->nvcsw;
		s->nivcsw = p->nivcsw;
	}
	return s;
}

static __always_inline void switch_out(struct task_struct *prev, bool runnable, __u64 now)
{
	struct tfo_task *t = tfo_task_observed(prev);
	struct tfo_comm_val *v;
	struct sched_snap *s;
	__u64 runtime, nvcsw, nivcsw;

	if (!t)
		return;
	s = snapshot_of(prev);
	if (!s)
		return;
	runtime = prev->se.sum_exec_runtime;
	nvcsw = prev->nvcsw;
	nivcsw = prev->nivcsw;
	v = tfo_comm_counters(prev, t);
	if (v) {
		v->v[V_RUNTIME_NS] += (runtime - s->runtime) * TFO_UNIT;
		v->v[V_VOLUNTARY] += (nvcsw - s->nvcsw) * TFO_UNIT;
		v->v[V_INVOLUNTARY] += (nivcsw - s->nivcsw) * TFO_UNIT;
	}
	s->runtime = runtime;
	s->nvcsw = nvcsw;
	s->nivcsw = nivcsw;
	t->ts = runnable && tfo_sampled() ? now : 0;
}

static __always_inline void switch_in(struct task_struct *next, __u64 now)
{
	struct tfo_task *t = tfo_task_observed(next);
	struct tfo_hist *h;
	__u32 k = 0;

	if (!t)
		return;
	snapshot_of(next);
	if (!t->ts)
		return;
	h = bpf_map_lookup_elem(&runq_latency, &k);
	if (h)
		tfo_hist_add(h, now - t->ts, tfo_weight());
	t->ts = 0;
}

static __always_inline void runnable(struct task_struct *p)
{
	struct tfo_task *t = tfo_task_observed(p);

	if (t)
		t->ts = tfo_sampled() ? bpf_ktime_get_ns() : 0;
}

/* task_struct before 5.14, when `state` became `__state` */
struct task_struct___state {
	long state;
} __attribute__((preserve_access_index));

/* Is p's state TASK_RUNNING, i.e. does it stay on the run queue as it is switched out? Read from the
 * task: sched_switch's prev_state argument only exists since 5.18 (the first three are the same). */
static __always_inline bool still_runnable(struct task_struct *p)
{
	if (bpf_core_field_exists(p->__state))
		return BPF_CORE_READ(p, __state) == 0;
	return BPF_CORE_READ((struct task_struct___state *)p, state) == 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(tpbtf_sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	__u64 now = bpf_ktime_get_ns();

	if (!sched_epoch)
		sched_epoch = now;
	/* pid 0 is the idle task: idle time is not a process's CPU time */
	if (prev->pid)
		switch_out(prev, preempt || still_runnable(prev), now);
	if (next->pid)
		switch_in(next, now);
	return 0;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(tpbtf_sched_wakeup, struct task_struct *p)
{
	runnable(p);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(tpbtf_sched_wakeup_new, struct task_struct *p)
{
	runnable(p);
	return 0;
}

TFO_FILTER_PROGRAMS
