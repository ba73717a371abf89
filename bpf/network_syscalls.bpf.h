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

#include "sock_syscalls.bpf.h"

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
	case SC_WRITE:
	case SC_WRITEV:
	case SC_SENDTO:
	case SC_SENDMSG:
	case SC_SENDFILE:
		return on_traffic(sk, ret, 1, 0, SENT, false);
	case SC_READ:
	case SC_READV:
		return on_traffic(sk, ret, 1, 0, RECEIVED, false);
	case SC_RECVMSG:
		return on_traffic(sk, ret, 1, PT_REGS_PARM3_CORE_SYSCALL(regs), RECEIVED, false);
	case SC_RECVFROM:
		return on_traffic(sk, ret, 1, PT_REGS_PARM4_CORE_SYSCALL(regs), RECEIVED, false);
	case SC_SENDMMSG:
		return on_traffic(sk, mmsg_bytes(PT_REGS_PARM2_CORE_SYSCALL(regs), ret), ret, 0, SENT, false);
	case SC_RECVMMSG:
		return on_traffic(sk, mmsg_bytes(PT_REGS_PARM2_CORE_SYSCALL(regs), ret), ret,
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
