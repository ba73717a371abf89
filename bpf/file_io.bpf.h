/* SPDX-License-Identifier: GPL-2.0 */
/* File I/O on regular files, from the syscall layer: bytes read and written by the read/write
 * syscall family, successful opens, and their latency (log2 histogram, ns) per operation.
 * A syscall counts when its file descriptor (for opens: the one returned) refers to a regular
 * file (S_ISREG), so sockets, pipes, ttys and devices are not file I/O.
 * Included by syscalls.bpf.c: file I/O rides on the syscall hooks there (one sys_enter/sys_exit
 * pair for both collectors), with its own maps. */
#ifndef FILE_IO_BPF_H
#define FILE_IO_BPF_H

#define TFO_COMM_VALUES 3 /* read bytes, write bytes, opens (each times the event weight) */
#include "tfo_comm.bpf.h"

enum { FOP_NONE, FOP_READ, FOP_WRITE, FOP_OPEN, FOP_COUNT };
enum { V_READ_BYTES, V_WRITE_BYTES, V_OPENS };

#define S_IFREG 0100000

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

#ifdef TFO_RDONLY_CAST
/* A pointer cast to a BTF type (or, with id 0, to plain memory), whose contents are then read by
 * plain loads. Only in syscalls.cast.bpf.o, whose tp_btf programs the agent tries first: kernels
 * without it (before 6.2; casting to memory, later still) reject that object, and the agent loads
 * syscalls.bpf.o. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;
#endif

/* Does the task's descriptor fd refer to a regular file? The cast build reads the descriptor slot
 * and the file with plain loads, the other through helpers. */
static __always_inline bool fd_is_regular(struct task_struct *task, long fd)
{
#ifdef TFO_RDONLY_CAST
	struct fdtable *fdt = task->files->fdt;
	struct file *f;

	if (fd < 0 || fd >= fdt->max_fds)
		return false;
	f = ((struct file **)bpf_rdonly_cast(fdt->fd, 0))[fd]; /* not a BTF type: plain memory */
	if (!f)
		return false;
	f = bpf_rdonly_cast(f, bpf_core_type_id_kernel(struct file));
	return (f->f_inode->i_mode & TFO_S_IFMT) == S_IFREG;
#else
	struct file *f = tfo_file_of_fd(task, fd);

	return f && (BPF_CORE_READ(f, f_inode, i_mode) & TFO_S_IFMT) == S_IFREG;
#endif
}

/* The file operation syscall id starts with first argument fd, or FOP_NONE when it is not file
 * I/O (another syscall, a 32-bit syscall, a descriptor that is not a regular file). Opens are
 * checked on return, when the descriptor exists. */
static __always_inline __u32 file_op_at_enter(struct task_struct *task, long id, long fd)
{
	__u32 op = file_op(id);

	if (op == FOP_NONE || tfo_in_compat_syscall(task))
		return FOP_NONE;
	return op == FOP_OPEN || fd_is_regular(task, fd) ? op : FOP_NONE;
}

/* Account a file operation of task (storage t) that took ns nanoseconds and returned ret, at weight w. */
static __always_inline void file_io_account(struct task_struct *task, struct tfo_task *t, __u32 op, long ret,
					    __u64 ns, __u32 w)
{
	struct tfo_comm_val *v;
	struct tfo_hist *h;
	__u32 idx = op - 1;

	if (ret < 0 || (op == FOP_OPEN && !fd_is_regular(task, ret)))
		return;
	h = bpf_map_lookup_elem(&file_latency, &idx);
	if (h)
		tfo_hist_add(h, ns, w);
	v = tfo_comm_counters(task, t);
	if (!v)
		return;
	if (op == FOP_READ)
		v->v[V_READ_BYTES] += ret * w;
	else if (op == FOP_WRITE)
		v->v[V_WRITE_BYTES] += ret * w;
	else
		v->v[V_OPENS] += w;
}

#endif /* FILE_IO_BPF_H */
