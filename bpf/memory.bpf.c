// SPDX-License-Identifier: GPL-2.0
/* Memory: page faults, page and slab allocations per process, OOM kills per victim.
 *  - page faults: the processor's page-fault exceptions on user-space addresses, whether the
 *    faulting code ran in user mode (exceptions:page_fault_user) or in the kernel touching user
 *    memory, e.g. copy_to_user (exceptions:page_fault_kernel, user addresses only); attributed
 *    to the faulting task, as the kernel's minflt/majflt are;
 *  - page allocations: calls into the buddy allocator (kmem:mm_page_alloc), one per call
 *    whatever its order, attributed to the task running when it happened;
 *  - slab allocations: kmalloc and kmem_cache_alloc calls (kmem:kmalloc, kmem:kmem_cache_alloc);
 *  - OOM kills: tasks the OOM killer marks as victims (oom:mark_victim), by the victim's name.
 */
#define TFO_COMM_VALUES 4 /* faults, page allocs, slab allocs, OOM kills (times the weight) */
#include "tfo_comm.bpf.h"

enum { V_FAULTS, V_PAGE_ALLOCS, V_SLAB_ALLOCS, V_OOM_KILLS };

/* Add one weighted event to the current task's process counter i, if observed and sampled. */
static __always_inline void count_current(__u32 i)
{
	struct task_struct *task = tfo_current_task();
	struct tfo_task *t = tfo_task_observed(task);
	struct tfo_comm_val *v;

	if (!t || !tfo_sampled())
		return;
	v = tfo_comm_counters(task, t);
	if (v && i < TFO_COMM_VALUES)
		v->v[i] += tfo_weight();
}

SEC("tp_btf/page_fault_user")
int BPF_PROG(tpbtf_page_fault_user, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	count_current(V_FAULTS);
	return 0;
}

SEC("tp_btf/page_fault_kernel")
int BPF_PROG(tpbtf_page_fault_kernel, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	if ((long)address >= 0) /* user half of the address space */
		count_current(V_FAULTS);
	return 0;
}

SEC("tp_btf/mm_page_alloc")
int BPF_PROG(tpbtf_mm_page_alloc, struct page *page, unsigned int order, gfp_t gfp, int migratetype)
{
	if (page)
		count_current(V_PAGE_ALLOCS);
	return 0;
}

SEC("tp_btf/kmalloc")
int BPF_PROG(tpbtf_kmalloc, unsigned long call_site, const void *ptr)
{
	if (ptr)
		count_current(V_SLAB_ALLOCS);
	return 0;
}

SEC("tp_btf/kmem_cache_alloc")
int BPF_PROG(tpbtf_kmem_cache_alloc, unsigned long call_site, const void *ptr)
{
	if (ptr)
		count_current(V_SLAB_ALLOCS);
	return 0;
}

/* Not sampled: every OOM kill counts once, under the victim's process name. */
SEC("tp_btf/mark_victim")
int BPF_PROG(tpbtf_mark_victim, struct task_struct *victim)
{
	struct tfo_task *t = tfo_task_observed(victim);
	struct tfo_comm_val *v;

	if (!t)
		return 0;
	v = tfo_comm_counters(victim, t);
	if (v)
		v->v[V_OOM_KILLS] += TFO_UNIT;
	return 0;
}

/* raw_tp mode, for kernels whose tracepoint arguments BTF-typed programs cannot take as declared
 * (6.1: kmalloc's `const void *`, mark_victim's bare pid): arguments are plain u64 here. OOM kills
 * are seen when a victim process's last thread exits (its signal struct carries the OOM mm from
 * mark_oom_victim on), so the victim is the current task and its name is at hand. */
SEC("raw_tp/page_fault_user")
int BPF_PROG(raw_page_fault_user)
{
	count_current(V_FAULTS);
	return 0;
}

SEC("raw_tp/page_fault_kernel")
int BPF_PROG(raw_page_fault_kernel, unsigned long address)
{
	if ((long)address >= 0)
		count_current(V_FAULTS);
	return 0;
}

SEC("raw_tp/mm_page_alloc")
int BPF_PROG(raw_mm_page_alloc, unsigned long page)
{
	if (page)
		count_current(V_PAGE_ALLOCS);
	return 0;
}

SEC("raw_tp/kmalloc")
int BPF_PROG(raw_kmalloc, unsigned long call_site, unsigned long ptr)
{
	if (ptr)
		count_current(V_SLAB_ALLOCS);
	return 0;
}

SEC("raw_tp/kmem_cache_alloc")
int BPF_PROG(raw_kmem_cache_alloc, unsigned long call_site, unsigned long ptr)
{
	if (ptr)
		count_current(V_SLAB_ALLOCS);
	return 0;
}

SEC("raw_tp/sched_process_exit")
int BPF_PROG(raw_process_exit)
{
	struct task_struct *task = tfo_current_task();
	struct signal_struct *sig = TFO_RD(task, signal);
	struct tfo_comm_val *v;
	struct tfo_task *t;

	/* not a victim, or not its last thread */
	if (!sig || !TFO_RD(sig, oom_mm) || TFO_RD(sig, live.counter))
		return 0;
	t = tfo_task_observed(task);
	if (!t)
		return 0;
	v = tfo_comm_counters(task, t);
	if (v)
		v->v[V_OOM_KILLS] += TFO_UNIT;
	return 0;
}

TFO_FILTER_PROGRAMS
