"""OpenSSL uprobes for the HTTP collector: the plaintext of TLS connections, at SSL_read/SSL_write.

Uprobes attach to a file (its inode), for every process that maps it, now or later. The libraries
are those processes actually map (``/proc/PID/maps``, reached through ``/proc/PID/root`` so that a
container's own copy counts) plus the system's, found again at each ``scan`` (the collector rescans
at most every ``RESCAN_SECONDS``). Statically linked TLS (Go's crypto/tls, rustls, BoringSSL built
into a binary) has no libssl to probe and is not seen.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from collections.abc import Iterator

from agent.libbpf import BpfObject, LibbpfError, Link

log = logging.getLogger(__name__)

LIBSSL = re.compile(r"/libssl\.so\.3$")
SYSTEM_GLOBS = ("/usr/lib/*/libssl.so.3", "/usr/lib64/libssl.so.3", "/usr/lib/libssl.so.3", "/lib64/libssl.so.3")
# (function, program at its entry); every one returns through up_ssl_return. The _ex forms are
# OpenSSL 1.1.1+; a library without them is probed on the other two.
ENTRIES = (
    ("SSL_read", "up_ssl_read"),
    ("SSL_write", "up_ssl_write"),
    ("SSL_read_ex", "up_ssl_read_ex"),
    ("SSL_write_ex", "up_ssl_write_ex"),
)
RETURN = "up_ssl_return"
RESCAN_SECONDS = 30.0


def _mapped(proc: str = "/proc") -> Iterator[str]:
    """Paths (through /proc/PID/root) of the libssl files processes map."""
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            with open(f"{proc}/{pid}/maps") as f:
                paths = {line.split(None, 5)[5].strip() for line in f if "libssl.so" in line}
        except (OSError, IndexError):
            continue
        for path in paths:
            if LIBSSL.search(path):
                yield f"{proc}/{pid}/root{path}"


def libssl_files() -> dict[tuple[int, int], str]:
    """(device, inode) -> a path to each distinct libssl.so.3: the system's and those mapped."""
    found: dict[tuple[int, int], str] = {}
    for path in [*(p for g in SYSTEM_GLOBS for p in sorted(glob.glob(g))), *_mapped()]:
        try:
            st = os.stat(path)
        except OSError:
            continue
        found.setdefault((st.st_dev, st.st_ino), path)
    return found


class TlsProbes:
    """The uprobes of one loaded object on every libssl found so far."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.links: dict[tuple[int, int], list[Link]] = {}
        self.failed: dict[tuple[int, int], str] = {}  # libraries that cannot be probed, and why
        self._scanned = 0.0

    def scan(self, force: bool = False) -> None:
        """Probe the libraries not probed yet (at most every RESCAN_SECONDS unless ``force``)."""
        if not force and time.monotonic() - self._scanned < RESCAN_SECONDS:
            return
        self._scanned = time.monotonic()
        for key, path in libssl_files().items():
            if key not in self.links and key not in self.failed:
                self._attach(key, path)

    def _attach(self, key: tuple[int, int], path: str) -> None:
        links: list[Link] = []
        try:
            for func, program in ENTRIES:
                try:
                    links.append(self.obj.attach_uprobe(program, path, func))
                except LibbpfError:
                    if func.endswith("_ex"):
                        continue
                    raise
                links.append(self.obj.attach_uprobe(RETURN, path, func, retprobe=True))
        except LibbpfError as exc:
            for link in links:
                link.destroy()
            if os.path.exists(path):  # a process that left takes its path with it: try again later
                self.failed[key] = str(exc)
                log.warning("TLS plaintext of %s is not seen: %s", path, exc)
            return
        self.links[key] = links
        log.info("HTTP over TLS: uprobes on %s", path)

    def close(self) -> None:
        for links in self.links.values():
            for link in links:
                link.destroy()
        self.links.clear()
