"""What the host offers: mounts the agent needs (bpffs, tracefs), memlock, and the seed's requirements."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import resource
from dataclasses import dataclass
from typing import Optional

BPFFS = "/sys/fs/bpf"
TRACEFS = "/sys/kernel/tracing"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
# The oldest kernel the compat build's helpers exist in (bpf_probe_read_user, bpf_jiffies64: 5.5).
# Proven here on 5.10, 6.1, 6.12 and 6.18; 5.5 to 5.9 are expected, not proven (README).
MIN_KERNEL = (5, 5)
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


@dataclass
class Check:
    """One line of ``tfo-agent check``: ``level`` is ok, warn (reported, not fatal) or fail."""

    name: str
    level: str
    found: str
    remedy: str = ""

    @property
    def ok(self) -> bool:
        return self.level != "fail"


def mounts() -> dict[str, str]:
    """Mount point -> filesystem type."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            out[pre.split(" ")[4].replace("\\040", " ")] = post.split(" ", 1)[0]
    return out


def fs_type(path: str) -> Optional[str]:
    """Filesystem type of the mount holding ``path``."""
    table = mounts()
    path = os.path.abspath(path)
    while True:
        if path in table:
            return table[path]
        if path == "/":
            return None
        path = os.path.dirname(path)


def _mount(source: str, target: str, fstype: str) -> Optional[str]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def ensure_mounted(target: str, fstype: str) -> str:
    """Mount ``fstype`` at ``target`` unless it already is; returns what happened."""
    if mounts().get(target) == fstype:
        return "mounted"
    if not os.path.isdir(target):
        return f"{target} does not exist"
    err = _mount(fstype, target, fstype)
    return f"mount failed: {err}" if err else "mounted by the agent"


def raise_memlock() -> None:
    """Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it where allowed."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def set_process_name(name: str) -> None:
    """Name this process (``comm``) so that ``exclude_processes`` can exclude the agent itself."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def kernel_version(release: Optional[str] = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def requirements(btf_custom_path: Optional[str], pin_path: str) -> list[Check]:
    """The seed's requirements table, checked on this host (mounting bpffs/tracefs as the agent would)."""
    checks = []
    release = platform.release()
    ok = kernel_version(release) >= MIN_KERNEL
    checks.append(
        Check(
            f"kernel >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]}",
            "ok" if ok else "fail",
            release,
            "" if ok else "Check kernel version compatibility",
        )
    )
    if btf_custom_path:
        ok = os.access(btf_custom_path, os.R_OK)
        found = f"btf_path {btf_custom_path}" + ("" if ok else " not readable")
    else:
        ok = os.path.exists(BTF_VMLINUX)
        found = BTF_VMLINUX if ok else f"{BTF_VMLINUX} missing"
    checks.append(Check("BTF", "ok" if ok else "fail", found, "" if ok else "Install kernel BTF or provide btf_path"))
    caps = effective_caps()
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    ok = has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))
    names = [
        n for c, n in ((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")) if has(c)
    ]
    checks.append(
        Check(
            "capabilities",
            "ok" if ok else "fail",
            ", ".join(names) or "none",
            "" if ok else "Permission denied: run as root or with CAP_SYS_ADMIN (or CAP_BPF+CAP_PERFMON)",
        )
    )
    state = ensure_mounted(BPFFS, "bpf")
    ok = state.startswith("mounted")
    checks.append(
        Check(f"bpffs at {BPFFS}", "ok" if ok else "fail", state, "" if ok else f"mount -t bpf bpf {BPFFS} (as root)")
    )
    if ok and fs_type(pin_path) != "bpf":
        checks.append(
            Check("pin_path on bpffs", "fail", f"{pin_path} is on {fs_type(pin_path)}", f"set pin_path below {BPFFS}")
        )
    state = ensure_mounted(TRACEFS, "tracefs")
    ok = state.startswith("mounted")
    checks.append(
        Check(
            f"tracefs at {TRACEFS}",
            "ok" if ok else "fail",
            state,
            "" if ok else f"mount -t tracefs tracefs {TRACEFS} (as root)",
        )
    )
    return checks
