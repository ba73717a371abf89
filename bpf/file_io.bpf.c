// SPDX-License-Identifier: GPL-2.0
/* File I/O on regular files, from the syscall layer: bytes read and written by the read/write
 * syscall family, successful opens, and their latency (log2 histogram, ns) per operation.
 * A syscall counts when its file descriptor (for opens: the one returned) refers to a regular
 * file (S_ISREG), so sockets, pipes, ttys and devices are not file I/O. The operation in flight
 * lives in task-local storage: ts = start time, aux = operation. */
#define TFO_COMM_VALUES 3 /* read bytes, write bytes, opens (each times the event weight) */
#include "tfo_comm.bpf.h"

enum { FOP_NONE, FOP_READ, FOP_WRITE, FOP_OPEN, FOP_COUNT };
enum { V_READ_BYTES, V_WRITE_BYTES, V_OPENS };

#define S_IFMT 0170000
#define S_IFREG 0100000
#define TS_COMPAT 0x0002 /* x86: the task is in a 32-bit syscall (other numbers) */
#if defined(__TARGET_ARCH_arm64)
#define SYSCALL_NR_FIELD syscallno
#else
#define SYSCALL_NR_FIELD orig_ax
#endif
#define SYSCALL_NR(regs) ((regs)->SYSCALL_NR_FIELD)

/* Latency per operation (index FOP_READ-1 .. FOP_OPEN-1). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FOP_COUNT - 1);
	__type(key, __u32);
	__type(value, struct tfo_hist);
} file_latency SEC(".maps");

/* Native syscall number -> operation. */
static __always_inline __u32 file_op(long id)
{
	switch (id) {
#if defined(__TARGET_ARCH_x86)
	case 0:   /* read */
	case 17:  /* pread64 */
	case 19:  /* readv */
	case 295: /* preadv */
	case 327: /* preadv2 */
		return FOP_READ;
	case 1:   /* write */
	case 18:  /* pwrite64 */
	case 20:  /* writev */
	case 296: /* pwritev */
	case 328: /* pwritev2 */
		return FOP_WRITE;
	case 2:   /* open */
	case 85:  /* creat */
	case 257: /* openat */
	case 437: /* openat2 */
		return FOP_OPEN;
#elif defined(__TARGET_ARCH_arm64)
	case 63:  /* read */
	case 65:  /* readv */
	case 67:  /* pread64 */
	case 69:  /* preadv */
	case 286: /* preadv2 */
		return FOP_READ;
	case 64:  /* write */
	case 66:  /* writev */
	case 68:  /* pwrite64 */
	case 70:  /* pwritev */
	case 287: /* pwritev2 */
		return FOP_WRITE;
	case 56:  /* openat */
	case 437: /* openat2 */
		return FOP_OPEN;
#endif
	default:
		return FOP_NONE;
	}
}

/* task is the current task as a BTF pointer: its fields are plain loads, no helper calls. */
static __always_inline bool in_compat_syscall(struct task_struct *task)
{
#if defined(__TARGET_ARCH_x86)
	if (bpf_core_field_exists(task->thread_info.status))
		return task->thread_info.status & TS_COMPAT;
#endif
	return false;
}

/* Does the task's descriptor fd refer to a regular file? */
static __always_inline bool fd_is_regular(struct task_struct *task, long fd)
{
	struct fdtable *fdt = task->files->fdt;
	struct file *f = NULL;

	if (fd < 0 || fd >= fdt->max_fds)
		return false;
	/* the descriptor array is not a BTF type: read the slot, then the file through helpers */
	bpf_probe_read_kernel(&f, sizeof(f), &fdt->fd[fd]);
	return f && (BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) == S_IFREG;
}

static __always_inline int on_enter(long id, long fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct tfo_task *t;
	__u32 op = file_op(id);

	/* Reads and writes of sockets and pipes stop here, before any storage lookup: t->ts is only
	 * set from here to the matching exit, which always clears it. */
	if (in_compat_syscall(task) || (op != FOP_OPEN && !fd_is_regular(task, fd)))
		return 0;
	t = tfo_task_observed(task);
	if (!t || !tfo_sampled())
		return 0;
	t->aux = op;
	t->ts = bpf_ktime_get_ns();
	return 0;
}

static __always_inline int on_exit(long ret)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct tfo_comm_val *v;
	struct tfo_hist *h;
	struct tfo_task *t;
	__u64 start, w;
	__u32 op, idx;

	t = bpf_task_storage_get(&tfo_tasks, task, 0, 0);
	if (!t || !t->ts)
		return 0;
	start = t->ts;
	t->ts = 0;
	op = t->aux;
	if (ret < 0 || (op == FOP_OPEN && !fd_is_regular(task, ret)))
		return 0;
	idx = op - 1;
	h = bpf_map_lookup_elem(&file_latency, &idx);
	if (h)
		tfo_hist_add(h, bpf_ktime_get_ns() - start, tfo_weight());
	v = tfo_comm_counters(task);
	if (!v)
		return 0;
	w = tfo_weight();
	if (op == FOP_READ)
		v->v[V_READ_BYTES] += ret * w;
	else if (op == FOP_WRITE)
		v->v[V_WRITE_BYTES] += ret * w;
	else
		v->v[V_OPENS] += w;
	return 0;
}

/* Every syscall passes here: the programs test the syscall number before reading anything else. */
SEC("tp_btf/sys_enter")
int BPF_PROG(tpbtf_sys_enter, struct pt_regs *regs, long id)
{
	return file_op(id) ? on_enter(id, PT_REGS_PARM1_CORE_SYSCALL(regs)) : 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(tpbtf_sys_exit, struct pt_regs *regs, long ret)
{
	long id = SYSCALL_NR(regs); /* a direct load: regs is a BTF pointer here */

	return file_op(id) ? on_exit(ret) : 0;
}

SEC("raw_tp/sys_enter")
int BPF_PROG(raw_sys_enter, struct pt_regs *regs, long id)
{
	return file_op(id) ? on_enter(id, PT_REGS_PARM1_CORE_SYSCALL(regs)) : 0;
}

SEC("raw_tp/sys_exit")
int BPF_PROG(raw_sys_exit, struct pt_regs *regs, long ret)
{
	return file_op(BPF_CORE_READ(regs, SYSCALL_NR_FIELD)) ? on_exit(ret) : 0;
}

SEC("tracepoint/raw_syscalls/sys_enter")
int tp_sys_enter(struct trace_event_raw_sys_enter *ctx)
{
	return file_op(ctx->id) ? on_enter(ctx->id, ctx->args[0]) : 0;
}

SEC("tracepoint/raw_syscalls/sys_exit")
int tp_sys_exit(struct trace_event_raw_sys_exit *ctx)
{
	return file_op(ctx->id) ? on_exit(ctx->ret) : 0;
}

TFO_FILTER_PROGRAMS
