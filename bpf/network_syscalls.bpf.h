/* SPDX-License-Identifier: GPL-2.0 */
/* The network collector's syscall mode (programs sys_*), for kernels without the
 * sock:sock_send_length and sock:sock_recv_length tracepoints (before 6.3): payload bytes are the
 * return values of the socket syscalls, read at raw_syscalls:sys_exit, where the descriptor and
 * the other arguments are still in the task's saved registers. A stable tracepoint with a fixed
 * argument list, and no kernel function that the compiler may inline (sock_sendmsg's callers
 * moved to __sock_sendmsg in 6.6 and in 6.1's stable updates, which left fexit on sock_sendmsg
 * blind to sends).
 *
 * Counted: read, readv, write, writev, sendto, recvfrom, sendmsg, recvmsg, sendmmsg and recvmmsg
 * (the msg_len of each message the call moved), sendfile to a socket and splice to or from one.
 * Not seen here: io_uring and in-kernel senders, which the 6.3+ tracepoints do count.
 * Included by network.bpf.c; socket state and retransmissions come from raw tracepoints (sys_*
 * too), all with CO-RE probe reads, so the socket table is the hash of the raw modes. */
#ifndef TFO_NETWORK_SYSCALLS_BPF_H
#define TFO_NETWORK_SYSCALLS_BPF_H

#define S_IFSOCK 0140000
#define MAX_MMSG 1024 /* UIO_MAXIOV: the most messages one sendmmsg/recvmmsg moves */

enum {
	SC_NONE, SC_SEND, SC_RECV, SC_RECV_FLAGS3, SC_RECV_FLAGS4, SC_SENDMMSG, SC_RECVMMSG, SC_SENDFILE, SC_SPLICE,
};

/* Native syscall number -> how its socket traffic is read. */
static __always_inline int sock_syscall(long id)
{
	switch (id) {
#if defined(__TARGET_ARCH_x86)
	case 1:   /* write */
	case 20:  /* writev */
	case 44:  /* sendto */
	case 46:  /* sendmsg */
		return SC_SEND;
	case 0:   /* read */
	case 19:  /* readv */
		return SC_RECV;
	case 47:  /* recvmsg(fd, msg, flags) */
		return SC_RECV_FLAGS3;
	case 45:  /* recvfrom(fd, buf, len, flags, ...) */
		return SC_RECV_FLAGS4;
	case 307: /* sendmmsg */
		return SC_SENDMMSG;
	case 299: /* recvmmsg(fd, vec, vlen, flags, timeout) */
		return SC_RECVMMSG;
	case 40:  /* sendfile(out_fd, in_fd, ...) */
		return SC_SENDFILE;
	case 275: /* splice(fd_in, off_in, fd_out, ...) */
		return SC_SPLICE;
#elif defined(__TARGET_ARCH_arm64)
	case 64:  /* write */
	case 66:  /* writev */
	case 206: /* sendto */
	case 211: /* sendmsg */
		return SC_SEND;
	case 63:  /* read */
	case 65:  /* readv */
		return SC_RECV;
	case 212: /* recvmsg */
		return SC_RECV_FLAGS3;
	case 207: /* recvfrom */
		return SC_RECV_FLAGS4;
	case 269: /* sendmmsg */
		return SC_SENDMMSG;
	case 243: /* recvmmsg */
		return SC_RECVMMSG;
	case 71:  /* sendfile */
		return SC_SENDFILE;
	case 76:  /* splice */
		return SC_SPLICE;
#endif
	default:
		return SC_NONE;
	}
}

/* The socket behind the current task's descriptor fd, NULL if fd is not a socket. */
static __always_inline const struct sock *sock_of_fd(struct task_struct *task, long fd)
{
	struct file *f = tfo_file_of_fd(task, fd);
	struct socket *sock;

	if (!f || (BPF_CORE_READ(f, f_inode, i_mode) & TFO_S_IFMT) != S_IFSOCK)
		return NULL;
	sock = BPF_CORE_READ(f, private_data);
	return sock ? BPF_CORE_READ(sock, sk) : NULL;
}

/* Payload bytes of the first n messages of a sendmmsg/recvmmsg vector (msg_len, set by the call). */
static __always_inline __u64 mmsg_bytes(const struct mmsghdr *vec, long n)
{
	__u64 total = 0;

	for (int i = 0; i < MAX_MMSG; i++) {
		__u32 len = 0;

		if (i >= n)
			break;
		bpf_probe_read_user(&len, sizeof(len), &vec[i].msg_len);
		total += len;
	}
	return total;
}

SEC("raw_tp/sys_exit")
int BPF_PROG(sys_sys_exit, struct pt_regs *regs, long ret)
{
	struct task_struct *task;
	const struct sock *sk;
	long fd;
	int kind;

	if (ret < 0)
		return 0;
	kind = sock_syscall(BPF_CORE_READ(regs, orig_ax));
	if (kind == SC_NONE)
		return 0;
	task = tfo_current_task();
	if (tfo_in_compat_syscall(task))
		return 0;
	fd = PT_REGS_PARM1_CORE_SYSCALL(regs);
	if (kind == SC_SPLICE) {
		sk = sock_of_fd(task, PT_REGS_PARM3_CORE_SYSCALL(regs)); /* fd_out */
		if (sk)
			return on_traffic(sk, ret, 1, 0, SENT, false);
		return on_traffic(sock_of_fd(task, fd), ret, 1, 0, RECEIVED, false);
	}
	sk = sock_of_fd(task, fd);
	if (!sk)
		return 0;
	switch (kind) {
	case SC_SEND:
	case SC_SENDFILE:
		return on_traffic(sk, ret, 1, 0, SENT, false);
	case SC_RECV:
		return on_traffic(sk, ret, 1, 0, RECEIVED, false);
	case SC_RECV_FLAGS3:
		return on_traffic(sk, ret, 1, PT_REGS_PARM3_CORE_SYSCALL(regs), RECEIVED, false);
	case SC_RECV_FLAGS4:
		return on_traffic(sk, ret, 1, PT_REGS_PARM4_CORE_SYSCALL(regs), RECEIVED, false);
	case SC_SENDMMSG:
		return on_traffic(sk, mmsg_bytes((void *)PT_REGS_PARM2_CORE_SYSCALL(regs), ret), ret, 0, SENT, false);
	case SC_RECVMMSG:
		return on_traffic(sk, mmsg_bytes((void *)PT_REGS_PARM2_CORE_SYSCALL(regs), ret), ret,
				  PT_REGS_PARM4_CORE_SYSCALL(regs), RECEIVED, false);
	}
	return 0;
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(sys_set_state, const struct sock *sk, int oldstate, int newstate)
{
	return on_state(sk, oldstate, newstate, false);
}

SEC("raw_tp/tcp_retransmit_skb")
int sys_retransmit(__u64 *ctx)
{
	return on_retransmit((const struct sk_buff *)ctx[1], retransmit_err(ctx));
}

TFO_FILTER_PROGRAMS_OF(sys_, "raw_tp/task_rename", "raw_tp/cgroup_attach_task", "raw_tp/sched_process_exit")

#endif /* TFO_NETWORK_SYSCALLS_BPF_H */
