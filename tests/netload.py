"""Network workloads and throwaway network namespaces for the network/TCP tests and bench.

Each workload is a Python child that renames itself (``prctl(PR_SET_NAME)``) before opening any
socket, so that the agent's ``process_filter`` can select exactly the workload's traffic. Children
print one JSON line with what they did (the test's truth) and exit; every wait is bounded.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

TIMEOUT = 120.0

PRELUDE = """
import ctypes, json, socket, struct, sys, time
ctypes.CDLL(None).prctl(15, NAME.encode(), 0, 0, 0)  # PR_SET_NAME
def out(**kw):
    print(json.dumps(kw), flush=True)
def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET
"""

# Accept `conns` connections on host:port (0: any port; IPv6 when host has a colon), read each
# to EOF; report bytes.
SINK = """
srv = socket.socket(family(ARGS["host"]), socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ARGS["host"], ARGS.get("port", 0)))
srv.listen(1024)
out(port=srv.getsockname()[1])
total, conns = 0, []
for _ in range(ARGS["conns"]):
    c, _ = srv.accept()
    conns.append(c)
    if ARGS.get("hold"):
        continue
    while True:
        try:
            b = c.recv(1 << 20)
        except ConnectionResetError:  # the peer aborted
            break
        if not b:
            break
        total += len(b)
    c.close()
if ARGS.get("hold"):
    sys.stdin.readline()  # released by the test
    for c in conns:
        c.close()
out(received=total)
"""

# Connect `conns` times; on each send `nbytes` (or keep sending for `seconds`), then close
# normally, or abort with RST (`reset`); with `hold`, keep every connection open until stdin
# has a line. Refused connects are counted.
CLIENT = """
payload = b"x" * (1 << 16)
held, sent, refused = [], 0, 0
for _ in range(ARGS["conns"]):
    s = socket.socket(family(ARGS["host"]), socket.SOCK_STREAM)
    try:
        s.connect((ARGS["host"], ARGS["port"]))
    except ConnectionRefusedError:
        refused += 1
        s.close()
        continue
    left, deadline = ARGS.get("nbytes", 0), time.monotonic() + ARGS.get("seconds", 0)
    while left > 0 or time.monotonic() < deadline:
        n = s.send(payload[: min(len(payload), left)] if left > 0 else payload)
        left -= n
        sent += n
    if ARGS.get("hold"):
        held.append(s)
        continue
    if ARGS.get("reset"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
if ARGS.get("hold"):
    out(held=len(held))
    sys.stdin.readline()
    for s in held:
        s.close()
out(sent=sent, refused=refused)
"""

# Send `count` datagrams of `size` bytes to a UDP receiver started in the same child.
UDP = """
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
rx.bind(("127.0.0.1", 0))
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
got = 0
for _ in range(ARGS["count"]):
    tx.sendto(b"u" * ARGS["size"], rx.getsockname())
    rx.recv(65536)
    got += 1
out(sent=ARGS["count"], received=got)
"""


@dataclass
class Workload:
    """A running workload child; ``line()`` reads its next JSON report."""

    proc: subprocess.Popen[str]

    def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            self.proc.wait(5)
            raise RuntimeError(f"workload exited with {self.proc.returncode}: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        return json.loads(text)

    def release(self) -> None:
        """Let a holding workload close its connections."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        report = self.line()
        self.proc.wait(timeout)
        assert self.proc.returncode == 0, self.proc.stderr.read()  # type: ignore[union-attr]
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spawn(name: str, script: str, netns: Optional[str] = None, **args: Any) -> Workload:
    """Run ``script`` in a child named ``name`` (in ``netns`` if given) with ``ARGS = args``."""
    code = f"NAME = {name!r}\nARGS = {args!r}\n{PRELUDE}{script}"
    cmd = [sys.executable, "-c", code]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Workload(proc)


def unique(prefix: str) -> str:
    """A short unique name (process names and interfaces hold 15 characters)."""
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def run(*cmd: str, netns: Optional[str] = None) -> str:
    full: Sequence[str] = ["ip", "netns", "exec", netns, *cmd] if netns else cmd
    return subprocess.run(full, check=True, capture_output=True, text=True, timeout=30).stdout


def nstat(counters: Sequence[str], netns: Optional[str] = None) -> dict[str, int]:
    """Absolute values of kernel SNMP counters (``nstat -asz``) in ``netns`` (default: this one)."""
    text = run("nstat", "-asz", *counters, netns=netns)
    values = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)", text, re.M)}
    return {c: values.get(c, 0) for c in counters}


@dataclass
class NetnsPair:
    """Namespaces ``a`` and ``b`` joined by veth ``dev_a``/``dev_b``: 10.201.0.1 <-> 10.201.0.2."""

    a: str
    b: str
    dev_a: str
    dev_b: str
    addr_a: str = "10.201.0.1"
    addr_b: str = "10.201.0.2"


@contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Create a fresh pair of namespaces (unique names) and always delete it."""
    tag = uuid.uuid4().hex[:6]
    pair = NetnsPair(f"tfo-{tag}-a", f"tfo-{tag}-b", f"tfo{tag}a", f"tfo{tag}b")
    try:
        run("ip", "netns", "add", pair.a)
        run("ip", "netns", "add", pair.b)
        run("ip", "link", "add", pair.dev_a, "netns", pair.a, "type", "veth", "peer", pair.dev_b, "netns", pair.b)
        for ns, dev, addr in ((pair.a, pair.dev_a, pair.addr_a), (pair.b, pair.dev_b, pair.addr_b)):
            run("ip", "addr", "add", f"{addr}/24", "dev", dev, netns=ns)
            run("ip", "link", "set", dev, "up", netns=ns)
            run("ip", "link", "set", "lo", "up", netns=ns)
        yield pair
    finally:
        for ns in (pair.a, pair.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
