"""Workloads of known size, run on a molecule VM by test_default.py (``ssh … python3 - MODE N < this``).

Each prints one JSON object: what the workload did, as the workload counted it and as the kernel
accounted it (TCP_INFO of its sockets, /proc/self/io, /proc/net/snmp), for the verify step to
compare with the agent's counters.

    tcp N         N payload bytes from a client to a server over 127.0.0.1 (two sockets, threads)
    udp K SIZE    K datagrams of SIZE bytes over 127.0.0.1, paced so that none is dropped
    getppid N     N getppid() calls
    file W        W bytes written to a new regular file, then read back

The process renames itself (prctl PR_SET_NAME) to ``tfo-verify`` once its imports are done, so
the agent's per-process (``comm``) series of the workload hold its own file I/O only; it takes back
the name ``python3`` before reading /proc for its report.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import sys
import threading
import time

COMM = b"tfo-verify"
PR_SET_NAME = 15
CHUNK = 64 * 1024
LIBC = ctypes.CDLL(None, use_errno=True)


def rename(name: bytes) -> None:
    if LIBC.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def tcp_info(sock: socket.socket) -> dict[str, int]:
    """struct tcp_info (linux/tcp.h): unacked, bytes_acked, bytes_received, segs_out, segs_in."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 144)
    unacked = struct.unpack_from("I", raw, 24)[0]
    acked, received = struct.unpack_from("QQ", raw, 120)
    segs_out, segs_in = struct.unpack_from("II", raw, 136)
    return {
        "unacked": unacked,
        "bytes_acked": acked,
        "bytes_received": received,
        "segs_out": segs_out,
        "segs_in": segs_in,
    }


def snmp() -> dict[str, dict[str, int]]:
    """/proc/net/snmp as {"Udp": {"InDatagrams": …}, "Tcp": {…}}: the kernel's own protocol counters."""
    with open("/proc/net/snmp") as f:
        lines = f.read().splitlines()
    out: dict[str, dict[str, int]] = {}
    for head, values in zip(lines[::2], lines[1::2]):
        proto, names = head.split(":", 1)
        out[proto] = dict(zip(names.split(), (int(v) for v in values.split(":", 1)[1].split())))
    return out


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def tcp(n: int) -> dict[str, object]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    result: dict[str, object] = {}

    def serve() -> None:
        conn, _ = server.accept()
        buf = bytearray(CHUNK)
        got = 0
        while got < n:
            r = conn.recv_into(buf)
            if r == 0:
                break
            got += r
        result["server_tcp_info"] = tcp_info(conn)  # before EOF/FIN: payload only
        while True:  # until the client's FIN
            r = conn.recv_into(buf)
            if r == 0:
                break
            got += r
        result["received"] = got
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    client = socket.create_connection(server.getsockname())
    payload = b"\x5a" * CHUNK
    rename(COMM)
    t0 = time.monotonic()
    sent = 0
    while sent < n:
        sent += client.send(memoryview(payload)[: min(CHUNK, n - sent)])
    deadline = time.monotonic() + 60
    info = tcp_info(client)
    while info["bytes_acked"] < sent and time.monotonic() < deadline:
        time.sleep(0.05)
        info = tcp_info(client)
    result["client_tcp_info"] = info
    client.shutdown(socket.SHUT_WR)
    t.join(120)
    client.close()
    server.close()
    rename(b"python3")
    result.update(sent=sent, seconds=round(time.monotonic() - t0, 3))
    return result


def udp(count: int, size: int) -> dict[str, object]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    got = {"datagrams": 0, "bytes": 0}
    cond = threading.Condition()

    def receive() -> None:
        buf = bytearray(size + 1)
        while got["datagrams"] < count:
            try:
                r = rx.recv_into(buf)
            except TimeoutError:
                break
            with cond:
                got["datagrams"] += 1
                got["bytes"] += r
                cond.notify()

    before = snmp()["Udp"]
    t = threading.Thread(target=receive)
    t.start()
    payload = b"\xa5" * size
    rename(COMM)
    sent = datagrams = 0
    for i in range(count):
        sent += tx.send(payload)
        datagrams += 1
        if i % 16 == 15:  # pace: at most 16 datagrams in flight, far below the receive buffer
            with cond:
                cond.wait_for(lambda n=datagrams: got["datagrams"] >= n, timeout=10)
    t.join(30)
    rename(b"python3")
    after = snmp()["Udp"]
    tx.close()
    rx.close()
    return {
        "sent": sent,
        "sent_datagrams": datagrams,
        "received": got["bytes"],
        "received_datagrams": got["datagrams"],
        "snmp_udp_delta": {k: after[k] - before[k] for k in ("InDatagrams", "OutDatagrams", "RcvbufErrors")},
    }


def getppid(n: int) -> dict[str, object]:
    call = os.getppid
    rename(COMM)
    t0 = time.monotonic()
    for _ in range(n):
        call()
    seconds = time.monotonic() - t0
    rename(b"python3")
    return {"calls": n, "seconds": round(seconds, 3)}


def file_io(size: int) -> dict[str, object]:
    path = f"/var/tmp/tfo-verify.{os.getpid()}"
    block = b"\x3c" * CHUNK
    io0 = proc_io()
    rename(COMM)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    written = 0
    while written < size:
        written += os.write(fd, block[: min(CHUNK, size - written)])
    os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    read = 0
    while True:
        r = len(os.read(fd, CHUNK))
        if r == 0:
            break
        read += r
    os.close(fd)
    os.unlink(path)
    rename(b"python3")
    io1 = proc_io()
    # wchar/rchar: the kernel's per-process byte counts of write/read calls (rchar also holds the
    # first /proc/self/io read itself, a hundred bytes)
    return {
        "written": written,
        "read": read,
        "wchar_delta": io1["wchar"] - io0["wchar"],
        "rchar_delta": io1["rchar"] - io0["rchar"],
    }


def main() -> None:
    mode, *args = sys.argv[1:]
    nums = [int(a) for a in args]
    if mode == "tcp":
        out = tcp(*nums)
    elif mode == "udp":
        out = udp(*nums)
    elif mode == "getppid":
        out = getppid(*nums)
    elif mode == "file":
        out = file_io(*nums)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
