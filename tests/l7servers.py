"""Real servers for the DNS and HTTP tests and benchmarks: unbound serving a local zone in a network
namespace of the test's own (port 53, with the namespace's own resolv.conf, so that glibc's
resolver uses it), and nginx serving static files, a 404, a POST target and gzip'ed (chunked)
responses, in plaintext and TLS with a certificate made by the test. Clients are given names of
their own (a symlink named NAME runs with comm NAME) so that the agent's per-process series are
theirs alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.conftest import free_port, wait_for

ZONE = "test14."
REFUSED_ZONE = "refused14."
SLOW_ZONE = "slow14."  # forwarded to an upstream that answers after UPSTREAM_DELAY
UPSTREAM_PORT = 5353
UPSTREAM_DELAY = 0.002
UPSTREAM = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    q, peer = s.recvfrom(4096)
    end = q.index(b"\0", 12) + 5  # the question: name, qtype, qclass
    time.sleep(float(sys.argv[2]))
    answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 0, 4) + bytes([192, 0, 2, 7])
    s.sendto(q[:2] + b"\x81\x80" + struct.pack(">HHHH", 1, 1, 0, 0) + q[12:end] + answer, peer)
"""
UNBOUND_CONF = """server:
  interface: 127.0.0.1
  port: 53
  do-ip6: no
  username: ""
  chroot: ""
  directory: "{dir}"
  pidfile: "{dir}/unbound.pid"
  do-daemonize: no
  use-syslog: no
  logfile: "{dir}/unbound.log"
  num-threads: 1
  module-config: "iterator"
  access-control: 127.0.0.0/8 allow
  extended-statistics: yes
  local-zone: "{zone}" static
  local-data: "a.{zone} 300 IN A 192.0.2.1"
  local-data: "a.{zone} 300 IN AAAA 2001:db8::1"
  local-data: "a.{zone} 300 IN MX 10 mail.{zone}"
  local-data: 'a.{zone} 300 IN TXT "tfo-agent test"'
  local-zone: "{refused}" refuse
  do-not-query-localhost: no
forward-zone:
  name: "{slow}"
  forward-addr: 127.0.0.1@{upstream}
remote-control:
  control-enable: yes
  control-interface: "{dir}/ctl.sock"
  control-use-cert: no
"""


def named(tool: str, name: str, where: Path) -> str:
    """A symlink to ``tool`` called ``name``: what it runs has comm ``name``."""
    link = where / "bin" / name
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(shutil.which(tool) or tool)
    return str(link)


def unique(prefix: str) -> str:
    """A process name no other process has (at most 15 characters, the kernel's comm)."""
    return f"{prefix}{uuid.uuid4().hex[: 14 - len(prefix)]}"


@dataclass
class Resolver:
    """unbound on 127.0.0.1:53 in network namespace ``netns``."""

    netns: str
    dir: Path

    def run(self, *cmd: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace (glibc there reads the namespace's resolv.conf)."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *cmd], text=True, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]

    def stats(self) -> dict[str, int]:
        """unbound's own counters (num.query.type.A, num.answer.rcode.NXDOMAIN, ...), not reset."""
        out = subprocess.run(
            ["unbound-control", "-c", str(self.dir / "unbound.conf"), "stats_noreset"],
            text=True,
            capture_output=True,
            check=True,
        ).stdout
        pairs = (line.split("=", 1) for line in out.splitlines() if "=" in line)
        return {k: int(float(v)) for k, v in pairs}


@contextmanager
def resolver(tmp: Path) -> Iterator[Resolver]:
    """unbound serving ZONE (A, AAAA, MX, TXT of a.ZONE; NXDOMAIN elsewhere) and refusing
    REFUSED_ZONE, in a fresh network namespace whose resolv.conf points at it."""
    netns = unique("tfo14ns")
    etc = Path("/etc/netns") / netns
    d = tmp / "unbound"
    d.mkdir()
    conf = UNBOUND_CONF.format(dir=d, zone=ZONE, refused=REFUSED_ZONE, slow=SLOW_ZONE, upstream=UPSTREAM_PORT)
    (d / "unbound.conf").write_text(conf)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    proc = upstream = None
    try:
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        upstream = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", UPSTREAM, str(UPSTREAM_PORT), str(UPSTREAM_DELAY)]
        )
        proc = subprocess.Popen(["ip", "netns", "exec", netns, "unbound", "-d", "-c", str(d / "unbound.conf")])
        res = Resolver(netns, d)
        control = ("unbound-control", "-c", str(d / "unbound.conf"), "status")
        if not wait_for(lambda: res.run(*control).returncode == 0, 15):
            raise RuntimeError(f"unbound did not start: {(d / 'unbound.log').read_text(errors='replace')}")
        yield res
    finally:
        for p in (proc, upstream):
            if p:
                p.terminate()
                p.wait(10)
        shutil.rmtree(etc, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", netns], check=False)


NGINX_CONF = """daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
  log_format t14 '$request_method $status';
  access_log {dir}/access.log t14;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  default_type text/plain;
  sendfile on;
  keepalive_requests 100000;
  client_max_body_size 16m;
  gzip on;
  gzip_min_length 1;
  gzip_types text/plain;
  server {{
    listen 127.0.0.1:{port};
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {dir}/cert.pem;
    ssl_certificate_key {dir}/key.pem;
    root {dir}/www;
    location = /post {{ return 201 "created\\n"; }}
  }}
}}
"""


@dataclass
class Nginx:
    """A running nginx: plaintext on ``port``, TLS on ``tls_port``; CA file ``ca`` for clients."""

    comm: str
    port: int
    tls_port: int
    dir: Path
    ca: str

    def log(self) -> Counter[tuple[str, str]]:
        """(method, status) of every request in the access log."""
        lines = (self.dir / "access.log").read_text().split()
        return Counter(zip(lines[0::2], lines[1::2]))

    def wait_logged(self, n: int) -> Counter[tuple[str, str]]:
        """The access log once it has n entries (nginx writes an entry after the response)."""
        wait_for(lambda: sum(self.log().values()) >= n, 10)
        return self.log()


@contextmanager
def nginx(tmp: Path, comm: str) -> Iterator[Nginx]:
    """nginx as process ``comm``: /index.html (small), /big.txt (1 MiB), /post (POST target), 404 elsewhere."""
    d = tmp / "nginx"
    (d / "www").mkdir(parents=True)
    (d / "www" / "index.html").write_text("<html>tfo-agent</html>\n")
    (d / "www" / "big.txt").write_text("0123456789abcdef" * 65536)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    port, tls_port = free_port(), free_port()
    (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, port=port, tls_port=tls_port))
    exe = named("nginx", comm, tmp)
    proc = subprocess.Popen([exe, "-p", str(d), "-c", str(d / "nginx.conf")], stderr=subprocess.PIPE)
    try:
        if not wait_for(lambda: (d / "nginx.pid").exists() and _listening(port), 15):
            proc.kill()
            raise RuntimeError(f"nginx did not start: {proc.communicate()[1].decode(errors='replace')}")
        yield Nginx(comm, port, tls_port, d, str(d / "ca.pem"))
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def settle(seconds: float = 0.3) -> None:
    """Let the last responses reach the logs before counting."""
    time.sleep(seconds)


def env_with_path() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
