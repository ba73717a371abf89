#!/usr/bin/env python3
"""Start, wait for and stop the qemu VMs of the molecule scenario.

Each VM is a qcow2 overlay on the cached base image built by ``build-image.sh``, booted with
one of the image's Debian kernels via ``-kernel``/``-initrd`` (no bootloader): ``--kernel SERIES``
picks one of ``kernels.json`` (6.1, Debian 12's own, by default; 5.10 of Debian 11, 6.12 of
Debian 13), and the VM's ``uname -r`` must be that kernel's release. KVM when ``/dev/kvm`` is
usable and TCG otherwise. Networking is qemu's user-mode network with ``restrict=on``: the guest reaches
nothing but its port forwards, which are bound to 127.0.0.1 only (SSH and the agent's metrics
port). Every wait is bounded.

    vm.py build [--package DEB]                                                     -> image dir
    vm.py up    --state-dir DIR --name NAME [--kernel SERIES] [--memory MiB] [--timeout S]
                [--package DEB]                                                     -> JSON
    vm.py down  --state-dir DIR --name NAME [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("TFO_MOLECULE_CACHE", "/var/cache/tfo-agent-molecule"))
METRICS_PORT = 9435
SSH_OPTS = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=5",
]


def log(msg: str) -> None:
    print(f"vm.py: {msg}", file=sys.stderr, flush=True)


def package_depends(package: Path | None) -> list[str]:
    """Names of a .deb's Depends (first of each alternative), to preinstall in the image."""
    if package is None:
        return []
    field = subprocess.run(
        ["dpkg-deb", "-f", str(package), "Depends"], check=True, stdout=subprocess.PIPE, text=True, timeout=60
    ).stdout
    names = []
    for dep in field.split(","):
        name = dep.split("|")[0].strip().split(" ")[0].split("(")[0].split(":")[0]
        if name:
            names.append(name)
    return sorted(set(names))


def build_image(package: Path | None = None) -> Path:
    """Run build-image.sh (a no-op when cached) and return the image directory.

    The Depends of the package under test are installed in the image, as the VMs have no network.
    """
    cmd = [str(HERE / "build-image.sh"), *package_depends(package)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, timeout=1800)
    return Path(out.stdout.strip().splitlines()[-1])


def image_kernels(image: Path) -> dict[str, dict[str, str]]:
    """The image's bootable kernels by series ("6.1", "5.10", "6.12"), from its kernels.json."""
    kernels: dict[str, dict[str, str]] = json.loads((image / "kernels.json").read_text())
    return kernels


def pick_kernel(image: Path, series: str | None) -> tuple[str, dict[str, str]]:
    """(series, entry) of the kernel to boot: ``series``, else the image's first (its own suite's)."""
    kernels = image_kernels(image)
    if series is None:
        series = next(iter(kernels))
    if series not in kernels:
        raise SystemExit(f"no {series} kernel in {image}/kernels.json (it has {', '.join(kernels)})")
    return series, kernels[series]


def guest_release(key: Path, port: int, deadline: float) -> str | None:
    """The guest's ``uname -r``, asked until ``deadline``: on a loaded host a connection right after
    the first successful one can still fail (ssh exit 255). None if it never answered."""
    cmd = ["ssh", *SSH_OPTS, "-i", str(key), "-p", str(port), "tfo@127.0.0.1", "uname -r"]
    while True:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=60)
        if out.returncode == 0:
            return out.stdout.strip()
        if time.monotonic() > deadline:
            return None
        time.sleep(2)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def choose_accel() -> str:
    """kvm or tcg: $TFO_MOLECULE_ACCEL if set, else KVM when /dev/kvm is usable for a stock kernel.

    A host whose /dev/kvm comes from kvm_pvm (paravirtualised nested KVM) only runs PVM-enabled
    guest kernels; Debian's stock kernel hangs there right after "Probing EDD", so use TCG.
    """
    forced = os.environ.get("TFO_MOLECULE_ACCEL", "auto")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    if Path("/sys/module/kvm_pvm").exists():
        return "tcg"
    return "kvm"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def ssh_ready(key: Path, port: int) -> bool:
    cmd = [
        "ssh",
        *SSH_OPTS,
        "-i",
        str(key),
        "-p",
        str(port),
        "tfo@127.0.0.1",
        "systemctl is-system-running --wait >/dev/null 2>&1; true",
    ]
    try:
        return (
            subprocess.run(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False
            ).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        return False


def up(
    state_dir: Path, name: str, memory: int, timeout: float, package: Path | None, kernel: str | None = None
) -> dict[str, object]:
    image = build_image(package)
    series, boot_kernel = pick_kernel(image, kernel)
    vmdir = state_dir / name
    vmdir.mkdir(parents=True, exist_ok=True)
    pidfile = vmdir / "qemu.pid"
    old = read_pid(pidfile)
    if old is not None and pid_alive(old):
        info: dict[str, object] = json.loads((vmdir / "instance.json").read_text())
        log(f"{name}: already running (pid {old})")
        return info

    overlay = vmdir / "disk.qcow2"
    overlay.unlink(missing_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image / "base.qcow2"), str(overlay)],
        check=True,
        timeout=60,
    )
    ssh_port, metrics_port = free_port(), free_port()
    accel_name = choose_accel()
    # -arch-capabilities: qemu 7.2 aborts on hosts that refuse MSR 0x10a
    accel = (
        ["-enable-kvm", "-cpu", "host,-arch-capabilities"]
        if accel_name == "kvm"
        else ["-accel", "tcg,thread=multi", "-cpu", "max"]
    )
    netdev = (
        f"user,id=n0,restrict=on,hostname={name},"
        f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22,"
        f"hostfwd=tcp:127.0.0.1:{metrics_port}-:{METRICS_PORT}"
    )
    cmd = [
        "qemu-system-x86_64",
        *accel,
        "-m",
        str(memory),
        "-smp",
        "1",
        "-name",
        name,
        "-nodefaults",
        "-display",
        "none",
        "-vga",
        "none",
        "-kernel",
        str(image / boot_kernel["vmlinuz"]),
        "-initrd",
        str(image / boot_kernel["initrd"]),
        "-append",
        f"root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.hostname={name} quiet",
        "-drive",
        f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
        "-netdev",
        netdev,
        "-device",
        "virtio-net-pci,netdev=n0",
        "-serial",
        f"file:{vmdir / 'console.log'}",
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=rng0",
        "-daemonize",
        "-pidfile",
        str(pidfile),
    ]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, timeout=60)
    key = image / "id_ed25519"
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        pid = read_pid(pidfile)
        if pid is None or not pid_alive(pid):
            raise SystemExit(f"{name}: qemu exited during boot; see {vmdir / 'console.log'}")
        if ssh_ready(key, ssh_port):
            break
        time.sleep(1)
    else:
        down(state_dir, name, 30)
        raise SystemExit(f"{name}: no SSH within {timeout:.0f}s; see {vmdir / 'console.log'}")
    boot = round(time.monotonic() - t0, 1)
    release = guest_release(key, ssh_port, max(deadline, time.monotonic() + 60))
    if release is None:
        down(state_dir, name, 30)
        raise SystemExit(f"{name}: SSH answered once, then `uname -r` kept failing; see {vmdir / 'console.log'}")
    if release != boot_kernel["release"]:
        down(state_dir, name, 30)
        raise SystemExit(f"{name}: booted {release!r}, not the {series} kernel {boot_kernel['release']!r}")
    info = {
        "instance": name,
        "address": "127.0.0.1",
        "user": "tfo",
        "port": ssh_port,
        "identity_file": str(key),
        "metrics_port": metrics_port,
        "accel": accel_name,
        "boot_seconds": boot,
        "image": str(image),
        "kernel_series": series,
        "kernel": release,
        "memory_mib": memory,
    }
    (vmdir / "instance.json").write_text(json.dumps(info, indent=2))
    log(
        f"{name}: up in {boot}s ({info['accel']}, kernel {release}), ssh 127.0.0.1:{ssh_port},"
        f" metrics 127.0.0.1:{metrics_port}"
    )
    return info


def down(state_dir: Path, name: str, timeout: float) -> None:
    vmdir = state_dir / name
    pid = read_pid(vmdir / "qemu.pid")
    if pid is not None and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        log(f"{name}: stopped (pid {pid})")
    for f in ("disk.qcow2", "qemu.pid", "instance.json"):
        (vmdir / f).unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "build"])
    ap.add_argument("--state-dir", type=Path, default=Path("/tmp/tfo-molecule"))
    ap.add_argument("--name", default="")
    ap.add_argument("--memory", type=int, default=1024)
    ap.add_argument("--kernel", default=None, help="kernel series to boot (kernels.json: 6.1, 5.10, 6.12)")
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--package", type=Path, default=None, help="the .deb under test (its Depends go in the image)")
    args = ap.parse_args()
    if args.action == "build":
        print(build_image(args.package))
        return 0
    if not args.name:
        ap.error("--name is required")
    if args.action == "up":
        print(json.dumps(up(args.state_dir, args.name, args.memory, args.timeout, args.package, args.kernel or None)))
    else:
        down(args.state_dir, args.name, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
