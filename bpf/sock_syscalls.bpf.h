/* SPDX-License-Identifier: GPL-2.0 */
/* The syscalls that move socket payload, read at raw_syscalls:sys_exit where the descriptor and the
 * other arguments are still in the task's saved registers, and the socket behind a descriptor.
 * Shared by the network collector's syscall mode (network_syscalls.bpf.h: bytes) and the DNS and
 * HTTP parsers (l7.bpf.h: the start of the payload). */
#ifndef TFO_SOCK_SYSCALLS_BPF_H
#define TFO_SOCK_SYSCALLS_BPF_H

#include "tfo.bpf.h"

#define S_IFSOCK 0140000
#define MAX_MMSG 1024 /* UIO_MAXIOV: the most messages one sendmmsg/recvmmsg moves */

/* How a socket syscall's payload is reached: sends, then receives, then the rest. */
enum {
	SC_NONE,
	SC_WRITE,    /* write(fd, buf, count) */
	SC_WRITEV,   /* writev(fd, iov, iovcnt) */
	SC_SENDTO,   /* sendto(fd, buf, len, flags, dest_addr, addrlen) */
	SC_SENDMSG,  /* sendmsg(fd, msg, flags) */
	SC_SENDMMSG, /* sendmmsg(fd, vec, vlen, flags): returns the messages sent */
	SC_READ,     /* read(fd, buf, count) */
	SC_READV,    /* readv(fd, iov, iovcnt) */
	SC_RECVFROM, /* recvfrom(fd, buf, len, flags, src_addr, addrlen) */
	SC_RECVMSG,  /* recvmsg(fd, msg, flags) */
	SC_RECVMMSG, /* recvmmsg(fd, vec, vlen, flags, timeout): returns the messages received */
	SC_SENDFILE, /* sendfile(out_fd, in_fd, ...) */
	SC_SPLICE,   /* splice(fd_in, off_in, fd_out, ...) */
};

static __always_inline bool sc_sends(int kind)
{
	return kind >= SC_WRITE && kind <= SC_SENDMMSG;
}

static __always_inline bool sc_receives(int kind)
{
	return kind >= SC_READ && kind <= SC_RECVMMSG;
}

/* Native syscall number -> SC_*. */
static __always_inline int sock_syscall(long id)
{
	switch (id) {
#if defined(__TARGET_ARCH_x86)
	case 1:   return SC_WRITE;
	case 20:  return SC_WRITEV;
	case 44:  return SC_SENDTO;
	case 46:  return SC_SENDMSG;
	case 307: return SC_SENDMMSG;
	case 0:   return SC_READ;
	case 19:  return SC_READV;
	case 45:  return SC_RECVFROM;
	case 47:  return SC_RECVMSG;
	case 299: return SC_RECVMMSG;
	case 40:  return SC_SENDFILE;
	case 275: return SC_SPLICE;
#elif defined(__TARGET_ARCH_arm64)
	case 64:  return SC_WRITE;
	case 66:  return SC_WRITEV;
	case 206: return SC_SENDTO;
	case 211: return SC_SENDMSG;
	case 269: return SC_SENDMMSG;
	case 63:  return SC_READ;
	case 65:  return SC_READV;
	case 207: return SC_RECVFROM;
	case 212: return SC_RECVMSG;
	case 243: return SC_RECVMMSG;
	case 71:  return SC_SENDFILE;
	case 76:  return SC_SPLICE;
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

/* Payload bytes of the first n messages of the sendmmsg/recvmmsg vector at user address `vecp`
 * (msg_len, set by the call). A global function: the verifier checks the loop once; inlined, 6.1's
 * verifier went through the rest of the program once per possible exit of the loop (past its
 * million instructions). */
__noinline __u64 mmsg_bytes(__u64 vecp, long n)
{
	const struct mmsghdr *vec = (const struct mmsghdr *)vecp;
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

#endif /* TFO_SOCK_SYSCALLS_BPF_H */
