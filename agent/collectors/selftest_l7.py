"""The DNS and HTTP collectors' self-test workloads (``tfo-agent check``): a DNS server and an HTTP
server in threads of the check process, and its own queries and requests to them on loopback,
HTTP both plaintext and over TLS (anonymous ciphers: no certificate is needed), so that the syscall
hooks and the OpenSSL uprobes are both proven."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from typing import Any, Optional

N_QUERIES = 2  # an A query answered NOERROR, an AAAA query answered NXDOMAIN
TLS_CIPHERS = "aNULL:@SECLEVEL=0"


def dns_query(name: str, qtype: int, ident: int) -> bytes:
    """A DNS query message (recursion desired) for ``name``, class IN."""
    qname = b"".join(bytes([len(label)]) + label for label in name.encode().split(b".")) + b"\0"
    return struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", qtype, 1)


class DnsProbe:
    """A UDP server on a free loopback port that the collector is told is a DNS port."""

    def __init__(self) -> None:
        self.server: Optional[socket.socket] = None

    def setup(self, collector: Any) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        collector.set_ports((53, self.server.getsockname()[1]))

    def _serve(self) -> None:
        assert self.server is not None
        for _ in range(N_QUERIES):
            query, peer = self.server.recvfrom(512)
            answer = bytearray(query)
            answer[2] |= 0x80  # QR
            answer[3] = 0x80 | (3 if query[12:].startswith(b"\x02nx") else 0)  # RA; NXDOMAIN for nx.*
            self.server.sendto(bytes(answer), peer)

    def work(self, _: str) -> None:
        """An unconnected sendto/recvfrom query, and a connected send/recv one."""
        assert self.server is not None
        server = threading.Thread(target=self._serve)
        server.start()
        addr = self.server.getsockname()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(5)
                c.sendto(dns_query("ok.check.tfo", 1, 0x1234), addr)
                c.recvfrom(512)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(5)
                c.connect(addr)
                c.send(dns_query("nx.check.tfo", 28, 0x4321))
                c.recv(512)
        finally:
            server.join(10)
            self.server.close()


def _tls_contexts() -> Optional[tuple[ssl.SSLContext, ssl.SSLContext]]:
    """(server, client) contexts with anonymous ciphers, or None where OpenSSL refuses them."""
    server, client = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    try:
        for ctx in (server, client):
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 has no anonymous suites
            ctx.set_ciphers(TLS_CIPHERS)
    except ssl.SSLError:
        return None
    return server, client


RESPONSES = {
    "GET": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "POST": b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
}


def _read_message(sock: socket.socket) -> bytes:
    """One HTTP message with a Content-Length body, however the reads split it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("peer closed mid-message")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"), 0
    )
    while len(body) < length:
        body += sock.recv(4096)
    return data


def _http_exchange(server: socket.socket, client: socket.socket, methods: tuple[str, ...]) -> None:
    """Each request from client answered by server, on one connection."""
    for method in methods:
        body = b"hello" if method == "POST" else b""
        client.sendall(
            f"{method} /check HTTP/1.1\r\nHost: check\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        _read_message(server)
        server.sendall(RESPONSES[method])
        _read_message(client)


class HttpProbe:
    """GET and POST over plaintext, GET over TLS; both ends in this process."""

    PLAIN = ("GET", "POST")

    def __init__(self) -> None:
        self.tls = False  # whether the TLS exchange ran

    def work(self, _: str) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            with socket.create_connection(listener.getsockname()) as client, listener.accept()[0] as server:
                _http_exchange(server, client, self.PLAIN)
            contexts = _tls_contexts()
            if contexts is None:
                return
            with socket.create_connection(listener.getsockname()) as raw, listener.accept()[0] as accepted:
                result: list[ssl.SSLSocket] = []
                handshake = threading.Thread(
                    target=lambda: result.append(contexts[0].wrap_socket(accepted, server_side=True))
                )
                handshake.start()
                with contexts[1].wrap_socket(raw) as client:
                    handshake.join(10)
                    with result[0] as server:
                        _http_exchange(server, client, ("GET",))
            self.tls = True

    def expected(self) -> list[tuple[str, float, dict[str, str]]]:
        gets = 2 if self.tls else 1
        out: list[tuple[str, float, dict[str, str]]] = []
        for d in ("client", "server"):
            out += [
                ("ebpf_http_requests", gets, {"direction": d, "method": "GET", "comm": "{comm}"}),
                ("ebpf_http_requests", 1, {"direction": d, "method": "POST", "comm": "{comm}"}),
                ("ebpf_http_responses", gets, {"direction": d, "status": "200", "comm": "{comm}"}),
                ("ebpf_http_responses", 1, {"direction": d, "status": "404", "comm": "{comm}"}),
                ("ebpf_http_request_duration_seconds", gets + 1, {"direction": d, "comm": "{comm}"}),
            ]
        return out
