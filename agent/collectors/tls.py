"""OpenSSL uprobes for the HTTP collector: the plaintext of TLS connections, at SSL_read/SSL_write.

Uprobes attach to a file (its inode), for every process that maps it, now or later. The libraries
are those processes actually map (``/proc/PID/maps``, reached through ``/proc/PID/root`` so that a
container's own copy counts) plus the system's, found again at each ``scan`` (the collector rescans
at most every ``RESCAN_SECONDS``). Statically linked TLS (Go's crypto/tls, rustls, BoringSSL built
into a binary) has no libssl to probe and is not seen.

Where a library's ``SSL_read_ex`` is only a call of the function that ``SSL_read`` calls too, with
the arguments untouched (OpenSSL 3.0's ``ssl_read_internal``; the same for writes), that one
function is probed instead of the two exported ones. Its arguments and results are those of the _ex
form, and it starts with pushes, which the kernel emulates; the exported functions start with
``sub $n,%rsp``, which a uprobe has to single-step, an extra trap that costs tens of microseconds
in some VMs (bench/RESULTS.md).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import struct
import time
from collections.abc import Iterator
from typing import Optional

from agent.collectors import forced_attach_types
from agent.elf import Elf, ElfError
from agent.libbpf import BpfObject, LibbpfError, Link

log = logging.getLogger(__name__)

LIBSSL = re.compile(r"/libssl\.so\.3$")
SYSTEM_GLOBS = ("/usr/lib/*/libssl.so.3", "/usr/lib64/libssl.so.3", "/usr/lib/libssl.so.3", "/lib64/libssl.so.3")
# Per direction: the _ex function and its entry program, the classic function and its program.
# Every probed function returns through up_ssl_return. The _ex forms are OpenSSL 1.1.1+; a library
# without them is probed on the classic ones only.
DIRECTIONS = (
    ("SSL_read_ex", "up_ssl_read_ex", "SSL_read", "up_ssl_read"),
    ("SSL_write_ex", "up_ssl_write_ex", "SSL_write", "up_ssl_write"),
)
RETURN = "up_ssl_return"
# Instructions an _ex function may start with that leave the argument registers as they came.
PROLOGUE = (b"\xf3\x0f\x1e\xfa", b"\x55", b"\x48\x89\xe5")  # endbr64, push %rbp, mov %rsp,%rbp
SUB_RSP_IMM8 = b"\x48\x83\xec"  # sub $imm8,%rsp
CALL_REL32 = 0xE8
INTERNAL, EXPORTED = "internal", "exported"  # where a library is probed; $TFO_AGENT_FORCE_ATTACH=tls=exported
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


def direct_callee(code: bytes, address: int) -> Optional[int]:
    """The target of the first instruction of ``code`` (at ``address``) if it is a call that only
    PROLOGUE instructions precede, else None."""
    i = 0
    while i + 5 <= len(code):
        if code[i] == CALL_REL32:
            return address + i + 5 + struct.unpack_from("<i", code, i + 1)[0]
        step = next((len(p) for p in PROLOGUE if code.startswith(p, i)), 0)
        if not step and code.startswith(SUB_RSP_IMM8, i):
            step = len(SUB_RSP_IMM8) + 1
        if not step:
            return None
        i += step
    return None


def calls(code: bytes, address: int, target: int) -> bool:
    """Whether ``code`` (at ``address``) holds a direct call of ``target``."""
    return any(
        code[i] == CALL_REL32 and address + i + 5 + struct.unpack_from("<i", code, i + 1)[0] == target
        for i in range(len(code) - 4)
    )


def probe_points(path: str) -> list[tuple[str, Optional[str], int]]:
    """(program, function name, or None and the function's file offset) to probe in one libssl."""
    elf = None
    if forced_attach_types().get("tls") != EXPORTED:
        try:
            elf = Elf(path)
        except (OSError, ElfError) as exc:
            log.debug("%s: %s; probing the exported functions", path, exc)
    points: list[tuple[str, Optional[str], int]] = []
    for ex_func, ex_program, func, program in DIRECTIONS:
        shared = _shared_callee(elf, ex_func, func) if elf else None
        if shared is not None:
            points.append((ex_program, None, shared))
        else:
            points += [(program, func, 0), (ex_program, ex_func, 0)]
    return points


def _shared_callee(elf: Elf, ex_func: str, func: str) -> Optional[int]:
    """The file offset of the function ``ex_func`` only calls and ``func`` calls too, if there is one."""
    if ex_func not in elf.symbols or func not in elf.symbols:
        return None
    try:
        ex_address = elf.symbols[ex_func][0]
        callee = direct_callee(elf.code(ex_address, 16), ex_address)
        address, size = elf.symbols[func]
        if callee is None or not calls(elf.code(address, size), address, callee):
            return None
        return elf.file_offset(callee)
    except ElfError as exc:
        log.debug("%s", exc)
        return None


class TlsProbes:
    """The uprobes of one loaded object on every libssl found so far."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.links: dict[tuple[int, int], list[Link]] = {}
        self.placement: dict[tuple[int, int], str] = {}  # INTERNAL or EXPORTED, per library probed
        self.failed: dict[tuple[int, int], str] = {}  # libraries that cannot be probed, and why
        self._scanned = 0.0

    def placements(self) -> dict[str, int]:
        """Libraries probed only at internal functions, and those probed (also) at exported ones."""
        counts = dict.fromkeys((INTERNAL, EXPORTED), 0)
        for placement in self.placement.values():
            counts[placement] += 1
        return counts

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
        points = probe_points(path)
        try:
            for program, func, offset in points:
                try:
                    links.append(self.obj.attach_uprobe(program, path, func, offset=offset))
                except LibbpfError:
                    if func and func.endswith("_ex"):
                        continue
                    raise
                links.append(self.obj.attach_uprobe(RETURN, path, func, retprobe=True, offset=offset))
        except LibbpfError as exc:
            for link in links:
                link.destroy()
            if os.path.exists(path):  # a process that left takes its path with it: try again later
                self.failed[key] = str(exc)
                log.warning("TLS plaintext of %s is not seen: %s", path, exc)
            return
        self.links[key] = links
        self.placement[key] = EXPORTED if any(func for _, func, _ in points) else INTERNAL
        log.info("HTTP over TLS: uprobes on %s (%s)", path, ", ".join(link.section for link in links))

    def close(self) -> None:
        for links in self.links.values():
            for link in links:
                link.destroy()
        self.links.clear()
        self.placement.clear()
