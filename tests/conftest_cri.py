"""A real containerd for the pod tests, and pods made over CRI the way kubelet makes them.

``Containerd`` runs Debian's ``containerd`` (1.6) with its own root, state and socket, the CRI
plugin on, the cgroupfs driver and ``runc``, and imports a tiny OCI image built here (busybox-static
and two static C programs, packed as an OCI tarball, also the sandbox image) with ``ctr images
import``. No registry, no kubelet, no CNI: sandboxes run in the node's network namespace.

``Cri.run_pod`` does what kubelet does: RunPodSandbox (metadata name, namespace, UID, and a
kubelet-style ``cgroup_parent`` ``/kubepods/besteffort/pod<uid>``), then CreateContainer and
StartContainer for each container. Each container runs ``/work``: it waits for ``go`` in the pod's
host directory (mounted at /x), makes N ``getppid`` calls, writes M bytes to a file of its own
root filesystem, creates ``done-<name>`` and then sleeps until stopped, so that what it did is
known exactly.

Facts of this VM the configuration answers: no CAP_SYS_RESOURCE (``restrict_oom_score_adj``,
or runc fails with "can't get final child's PID from pipe"); containerd leaves the empty
``kubepods/.../pod<uid>`` cgroups behind (removed here).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
import pytest

from agent.cri.cgroups import hierarchies
from agent.cri.proto import api_pb2 as pb
from agent.cri.proto import api_pb2_grpc as pb_grpc

IMAGE = "docker.io/library/tfo-test:1"
NAMESPACE = "k8s.io"  # containerd namespace of the CRI plugin
WORK = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* usage: work GO DONE N OUT M: wait for GO, N getppid, M bytes written to OUT, create DONE, sleep */
int main(int argc, char **argv) {
    struct stat st;
    struct timespec ts = {0, 10000000};
    static char buf[4096];
    if (argc != 6) return 2;
    while (stat(argv[1], &st) != 0) nanosleep(&ts, 0);
    long n = atol(argv[3]), m = atol(argv[5]);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    int fd = open(argv[4], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    while (m > 0) {
        long w = write(fd, buf, m < (long)sizeof buf ? m : (long)sizeof buf);
        if (w <= 0) return 1;
        m -= w;
    }
    close(fd);
    close(open(argv[2], O_WRONLY | O_CREAT, 0644));
    for (;;) pause();
}
"""
PAUSE = "#include <unistd.h>\nint main(void) { for (;;) pause(); }\n"
CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"""


def _tar_add(tf: tarfile.TarFile, name: str, data: Optional[bytes] = None, link: str = "", mode: int = 0o755) -> None:
    ti = tarfile.TarInfo(name)
    ti.mode = mode
    if link:
        ti.type, ti.linkname = tarfile.SYMTYPE, link
    elif data is None:
        ti.type = tarfile.DIRTYPE
    else:
        ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data) if data is not None else None)


def build_image(out: Path, work: Path) -> Path:
    """An OCI image tarball: busybox-static, /work and /pause (gcc -static); entrypoint /pause."""
    binaries = {}
    for name, source in (("work", WORK), ("pause", PAUSE)):
        (work / f"{name}.c").write_text(source)
        subprocess.run(["gcc", "-static", "-O2", "-o", str(work / name), str(work / f"{name}.c")], check=True)
        binaries[name] = (work / name).read_bytes()
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin", "tmp", "x", "proc", "dev", "sys", "etc"):
            _tar_add(tf, d)
        _tar_add(tf, "bin/busybox", Path("/bin/busybox").read_bytes())
        _tar_add(tf, "bin/sh", link="busybox")
        for name, data in binaries.items():
            _tar_add(tf, name, data)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    layer_desc = blob(layer.getvalue(), "application/vnd.oci.image.layer.v1.tar")
    config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "1"}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
    with tarfile.open(out, "w") as tf:
        _tar_add(tf, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), mode=0o644)
        _tar_add(tf, "index.json", json.dumps(index).encode(), mode=0o644)
        _tar_add(tf, "blobs")
        _tar_add(tf, "blobs/sha256")
        for digest, data in blobs.items():
            _tar_add(tf, f"blobs/sha256/{digest}", data, mode=0o644)
    return out


@dataclass
class Pod:
    """A pod made by ``Cri.run_pod``: its sandbox, containers (name -> id) and host directory."""

    name: str
    namespace: str
    uid: str
    sandbox_id: str
    config: pb.PodSandboxConfig
    hostdir: Path
    containers: dict[str, str] = field(default_factory=dict)

    def go(self) -> None:
        """Let every container of the pod do its work."""
        (self.hostdir / "go").touch()

    def wait_running(self, timeout: float = 30.0) -> None:
        """Until every container runs ``/work`` (runc's own set-up in the container is over)."""
        deadline = time.monotonic() + timeout
        while not all(running_work(cid) for cid in self.containers.values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pod {self.namespace}/{self.name} did not start /work in {timeout}s")
            time.sleep(0.02)

    def wait_done(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not all((self.hostdir / f"done-{c}").exists() for c in self.containers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pod {self.namespace}/{self.name} did not finish its work in {timeout}s")
            time.sleep(0.02)


class Containerd:
    """One containerd process with its own root, state and socket under ``base``."""

    def __init__(self, base: Path, image: Path) -> None:
        self.base = base
        self.socket = str(base / "containerd.sock")
        self.image = image
        self.config = base / "config.toml"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        base.mkdir(parents=True, exist_ok=True)
        self.config.write_text(CONFIG.format(root=base / "root", state=base / "state", socket=self.socket, image=IMAGE))

    def start(self) -> None:
        log = open(self.base / "containerd.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(["containerd", "--config", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start: {(self.base / 'containerd.log').read_text()[-2000:]}")
            time.sleep(0.05)
        ctr = ["ctr", "--address", self.socket, "-n", NAMESPACE, "images", "import", str(self.image)]
        subprocess.run(ctr, check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        """Stop containerd (its containers' shims keep running until removed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def shim_pids(self) -> list[int]:
        """containerd-shim processes of this containerd (their command line names our socket)."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and self.socket.encode() in cmd:
                pids.append(int(d.name))
        return pids

    def cleanup(self) -> None:
        """After ``stop``: no shim, no mount and no file of ours left."""
        for pid in self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with open("/proc/self/mountinfo") as f:
            points = [line.split(" ")[4] for line in f]
        for point in sorted((p for p in points if p.startswith(str(self.base))), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(self.base / "root", ignore_errors=True)
        shutil.rmtree(self.base / "state", ignore_errors=True)


class Cri:
    """The tests' side of the CRI: make, stop and remove pods as kubelet would."""

    def __init__(self, ctd: Containerd, workdir: Path) -> None:
        self.ctd = ctd
        self.workdir = workdir
        self.channel = grpc.insecure_channel(f"unix://{ctd.socket}")
        self.rt = pb_grpc.RuntimeServiceStub(self.channel)
        self.pods: list[Pod] = []

    def run_pod(self, name: str, namespace: str, work: dict[str, tuple[int, int]]) -> Pod:
        """A pod whose containers (name -> (getppid calls, bytes written)) wait for ``Pod.go``."""
        uid = str(uuid.uuid4())
        hostdir = self.workdir / f"{namespace}_{name}_{uid[:8]}"
        hostdir.mkdir(parents=True)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid),
            log_directory=str(hostdir / "logs"),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"/kubepods/besteffort/pod{uid}",
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(network=pb.NODE)),
            ),
        )
        sandbox = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
        pod = Pod(name, namespace, uid, sandbox, config, hostdir)
        self.pods.append(pod)
        for cname, (calls, nbytes) in work.items():
            container = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name=cname),
                image=pb.ImageSpec(image=IMAGE),
                command=["/work"],
                args=["/x/go", f"/x/done-{cname}", str(calls), "/tmp/out", str(nbytes)],
                mounts=[pb.Mount(container_path="/x", host_path=str(hostdir))],
                log_path=f"{cname}.log",
            )
            request = pb.CreateContainerRequest(pod_sandbox_id=sandbox, config=container, sandbox_config=config)
            cid = self.rt.CreateContainer(request, timeout=60).container_id
            self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
            pod.containers[cname] = cid
        return pod

    def stop_container(self, pod: Pod, name: str) -> None:
        self.rt.StopContainer(pb.StopContainerRequest(container_id=pod.containers[name], timeout=0), timeout=60)

    def stop_pod(self, pod: Pod) -> None:
        self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=60)

    def remove_pod(self, pod: Pod) -> None:
        """Stop and remove the pod's containers and sandbox, then the cgroups containerd leaves."""
        for cid in pod.containers.values():
            self.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=60)
            self.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
        self.stop_pod(pod)
        self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=60)
        remove_pod_cgroups(pod.uid)
        self.pods.remove(pod)

    def close(self) -> None:
        for pod in list(self.pods):
            self.remove_pod(pod)
        self.channel.close()


def running_work(container_id: str) -> bool:
    """Is a process named ``work`` running in the container's cgroup?"""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() == "work" and container_id in (d / "cgroup").read_text():
                return True
        except OSError:
            continue
    return False


def remove_pod_cgroups(uid: str) -> None:
    """The empty ``kubepods/besteffort/pod<uid>`` cgroups containerd leaves, on every hierarchy (and
    ``kubepods/besteffort``, ``kubepods`` once empty)."""
    for tree in hierarchies():
        base = Path(tree.mount) / "kubepods"
        for d in (base / "besteffort" / f"pod{uid}", base / "besteffort", base):
            try:
                d.rmdir()
            except OSError:
                break  # not there, or still in use (another pod)


@pytest.fixture(scope="module", name="containerd")
def containerd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """containerd for the module's tests, stopped and cleaned up after them."""
    if not shutil.which("containerd") or not shutil.which("runc"):
        pytest.fail("containerd and runc are needed (apt-packages.txt)")
    work = tmp_path_factory.mktemp("containerd")
    ctd = Containerd(Path(f"/run/tfo-test-ctd-{uuid.uuid4().hex[:8]}"), build_image(work / "image.tar", work))
    ctd.start()
    try:
        yield ctd
    finally:
        ctd.stop()
        ctd.cleanup()
        shutil.rmtree(ctd.base, ignore_errors=True)


@pytest.fixture(name="cri")
def cri_fixture(containerd: Containerd, tmp_path: Path) -> Iterator[Cri]:
    """A CRI client to make pods with; every pod it made is removed after the test."""
    if containerd.proc is None:
        containerd.start()
    c = Cri(containerd, tmp_path / "pods")
    try:
        yield c
    finally:
        c.close()
