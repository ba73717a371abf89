"""The host's cgroup hierarchies, and a task's cgroup path read as a container runtime wrote it.

Kubelet and the runtimes name a pod's and a container's cgroups in a few layouts, on cgroup v1
(one tree per controller) and v2 (one tree), with the cgroupfs or the systemd driver:

- ``/kubepods/besteffort/pod<uid>/<id>`` (cgroupfs; ``/kubepods/pod<uid>/<id>`` for guaranteed pods)
- ``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_with_underscores>.slice/
  cri-containerd-<id>.scope`` (systemd; ``crio-<id>.scope`` for CRI-O, ``docker-<id>.scope``)
- ``/docker/<id>``, ``/system.slice/docker-<id>.scope``, ``libpod-<id>.scope`` outside Kubernetes.

``parse_path`` takes any of them apart; ``Hierarchy`` says where a tree is mounted and which id the
kernel gives it (``/proc/<pid>/cgroup``'s first field; cgroup ids are per hierarchy).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Optional

MOUNTINFO = "/proc/self/mountinfo"
PROC_CGROUP = "/proc/self/cgroup"
PROC_CGROUPS = "/proc/cgroups"
KEY_ENV = "TFO_AGENT_CGROUP_KEY"  # which hierarchy keys per-container counters: "v2" or a v1 controller
RUNTIME_PREFIXES = ("docker-", "cri-containerd-", "crio-", "libpod-", "containerd-")
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD_RE = re.compile(rf"(?:^|-)pod({_UID})(?:\.slice)?$")
_CONTAINER_RE = re.compile(r"^(?:(?:cri-containerd|crio|docker|libpod|containerd)-)?([0-9a-f]{64})(?:\.scope)?$")


@dataclass(frozen=True)
class CgroupRef:
    """What a cgroup path says: the pod's UID and the container's ID, each "" when absent."""

    pod_uid: str = ""
    container_id: str = ""

    @property
    def in_container(self) -> bool:
        return bool(self.pod_uid or self.container_id)


@functools.lru_cache(maxsize=65536)
def parse_path(path: str) -> CgroupRef:
    """The pod UID and container ID of a cgroup path (relative to its hierarchy's root); a cgroup
    below a container's (one the container made) is the container's."""
    pod_uid = container_id = ""
    for part in path.strip("/").split("/"):
        if not pod_uid and (m := _POD_RE.search(part)):
            pod_uid = m.group(1).replace("_", "-")
        elif m := _CONTAINER_RE.match(part):
            container_id = m.group(1)
            break
    return CgroupRef(pod_uid, container_id)


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup tree: ``id`` as the kernel numbers it (0: v2), the v1 ``controllers``
    bound to it, and for v1 the subsystem id (``ssid``) of its first controller, as the kernel's
    ``css_set.subsys[]`` is indexed."""

    id: int
    mount: str
    controllers: tuple[str, ...] = ()
    ssid: Optional[int] = None

    @property
    def v2(self) -> bool:
        return self.id == 0


def _subsys_ids(proc_cgroups: str) -> dict[str, int]:
    """Controller -> ssid: /proc/cgroups lists every subsystem of the kernel in ssid order."""
    with open(proc_cgroups) as f:
        names = [line.split()[0] for line in f if line.strip() and not line.startswith("#")]
    return {name: i for i, name in enumerate(names)}


def hierarchies(
    mountinfo: str = MOUNTINFO, proc_cgroup: str = PROC_CGROUP, proc_cgroups: str = PROC_CGROUPS
) -> list[Hierarchy]:
    """Every mounted cgroup tree (the first mount of each), v2 first."""
    ids: dict[frozenset[str], int] = {}
    with open(proc_cgroup) as f:
        for line in f:
            hid, controllers, _ = line.rstrip("\n").split(":", 2)
            ids[frozenset(c for c in controllers.split(",") if c)] = int(hid)
    ssids = _subsys_ids(proc_cgroups)
    found: dict[int, Hierarchy] = {}
    with open(mountinfo) as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            fstype, _, opts = [*post.split(" "), "", ""][:3]
            mount = pre.split(" ")[4].replace("\\040", " ")
            if fstype == "cgroup2":
                found.setdefault(0, Hierarchy(0, mount))
            elif fstype == "cgroup":
                names = [o for o in opts.split(",") if o in ssids or o.startswith("name=")]
                hid = ids.get(frozenset(names))
                if hid is None or hid in found:
                    continue
                controllers = tuple(n for n in names if n in ssids)
                ssid = min((ssids[c] for c in controllers), default=None)
                found[hid] = Hierarchy(hid, mount, controllers, ssid)
    return sorted(found.values(), key=lambda h: h.id)


def key_hierarchy(trees: list[Hierarchy]) -> Optional[Hierarchy]:
    """The tree whose cgroup ids key per-container counters: $TFO_AGENT_CGROUP_KEY (``v2`` or a v1
    controller) if set, else the v1 memory controller's (hosts on v1 or hybrid: every runtime makes
    a memory cgroup per container), else the v2 tree. None when the host has neither."""
    wanted = os.environ.get(KEY_ENV, "").strip()
    by_name = {c: h for h in trees for c in h.controllers}
    v2 = next((h for h in trees if h.v2), None)
    if wanted:
        return v2 if wanted in ("v2", "unified") else by_name.get(wanted)
    return by_name.get("memory") or v2


def scan(tree: Hierarchy) -> dict[int, str]:
    """Every cgroup of a tree: inode number (the kernel's cgroup id) -> path from the tree's root.
    Directory entries carry the inode numbers, so this reads directories and stats nothing."""
    try:
        out = {os.stat(tree.mount).st_ino: "/"}
    except OSError:
        return {}
    stack = [(tree.mount, "")]
    while stack:
        path, rel = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:  # removed meanwhile
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                out[e.inode()] = f"{rel}/{e.name}"
                stack.append((e.path, f"{rel}/{e.name}"))
    return out


def container_matches(dirname: str, entries: tuple[str, ...]) -> bool:
    """``container_filter``: a cgroup directory named like an entry, as written or after a runtime prefix."""
    names = [dirname] + [dirname[len(p) :] for p in RUNTIME_PREFIXES if dirname.startswith(p)]
    return any(n.startswith(e) for n in names for e in entries)
