"""Process/container/namespace filters and sampling, programmed into every collector's kernel maps.

The kernel side (``bpf/tfo.bpf.h``) decides per task and caches the verdict in task-local storage;
this module turns the config into map contents:

- ``process_filter`` / ``exclude_processes``: process names (the thread group leader's ``comm``,
  at most 15 characters as the kernel keeps them) -> ``tfo_comm_filter``;
- ``container_filter``: cgroup directories whose name starts with an entry, either as written
  (``docker-<id>.scope``) or after a runtime prefix (``docker-``, ``cri-containerd-``, ``crio-``,
  ``libpod-``), found on every mounted cgroup v1 hierarchy and the v2 tree;
- ``namespace_filter``: every cgroup of the pods in those Kubernetes namespaces, as the container
  runtime reports them (``agent.cri.pods.PodMetadata``), followed as pods come and go.
  Both go into ``tfo_cgroup_filter`` as (hierarchy id, cgroup id) -> bit; a task matches a filter
  when its cgroup or an ancestor, on any hierarchy, carries the bit;
- ``labels`` beyond ``comm``: the kernel keys per-process counters by cgroup too, on the tree
  ``agent.cri.cgroups.key_hierarchy`` picks (``tfo_cfg.labels``, ``tfo_cfg.cgroup_subsys``);
- ``sample_rate``: each event is kept with that probability and weighs 100/rate events.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from agent.config import EbpfConfig
from agent.cri.cgroups import Hierarchy, container_matches, hierarchies, key_hierarchy
from agent.libbpf import BpfObject

if TYPE_CHECKING:
    from agent.cri.pods import PodMetadata

log = logging.getLogger(__name__)

COMM_LEN = 16
INCLUDE, EXCLUDE = 1, 2
CG_CONTAINER, CG_NAMESPACE = 1, 2  # tfo_cgroup_filter bits
UNIT = 100  # weight of one event at 100% sampling (must match TFO_UNIT)
_CFG = struct.Struct("<8I")  # struct tfo_cfg
_CGROUP_REF = struct.Struct("<QII")  # struct tfo_cgroup_ref
CgroupRefs = frozenset[tuple[int, int]]  # (hierarchy id, cgroup id)


def comm_key(name: str) -> bytes:
    """A process name as the kernel's 16-byte, NUL-padded ``comm``."""
    return name.encode()[: COMM_LEN - 1].ljust(COMM_LEN, b"\0")


def container_cgroup_refs(entries: tuple[str, ...]) -> set[tuple[int, int]]:
    """(hierarchy id, inode number = kernel cgroup id) of the cgroups matching ``container_filter``,
    on the trees the kernel's filter walks (v2 and the v1 controllers)."""
    refs: set[tuple[int, int]] = set()
    if not entries:
        return refs
    for tree in hierarchies():
        if not (tree.v2 or tree.controllers):
            continue
        for dirpath, dirnames, _ in os.walk(tree.mount):
            for d in dirnames:
                if container_matches(d, entries):
                    try:
                        refs.add((tree.id, os.stat(os.path.join(dirpath, d)).st_ino))
                    except OSError:
                        continue
    return refs


def cgroup_subsys(tree: Optional[Hierarchy]) -> int:
    """``tfo_cfg.cgroup_subsys`` for a key tree: 0 for v2, ssid + 1 for a v1 controller's."""
    return 0 if tree is None or tree.v2 or tree.ssid is None else tree.ssid + 1


@dataclass
class Filters:
    """The filter state to program into collectors; ``gen`` changes whenever it does."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]
    containers: tuple[str, ...]
    sample_rate: int
    namespaces: tuple[str, ...] = ()
    labels: bool = False
    subsys: int = 0
    cgroup_refs: CgroupRefs = frozenset()
    namespace_refs: CgroupRefs = frozenset()
    pods: Optional[PodMetadata] = None
    gen: int = 1

    @classmethod
    def from_config(cls, cfg: EbpfConfig, pods: Optional[PodMetadata] = None) -> Filters:
        """``pods`` gives the namespaces' cgroups and the key tree (when absent, the host's is used)."""
        tree = pods.index.tree if pods is not None and pods.index else key_hierarchy(hierarchies())
        f = cls(
            cfg.process_filter,
            cfg.exclude_processes,
            cfg.container_filter,
            cfg.sample_rate,
            cfg.namespace_filter,
            cfg.container_labels,
            cgroup_subsys(tree),
            pods=pods,
        )
        f.cgroup_refs = frozenset(container_cgroup_refs(f.containers))
        f.namespace_refs = f._namespace_refs()
        return f

    def _namespace_refs(self) -> CgroupRefs:
        return self.pods.namespace_cgroups() if self.pods is not None and self.namespaces else frozenset()

    def _state(self) -> tuple[object, ...]:
        return (
            self.include,
            self.exclude,
            self.containers,
            self.sample_rate,
            self.namespaces,
            self.labels,
            self.subsys,
            self.cgroup_refs,
            self.namespace_refs,
        )

    def update(self, cfg: EbpfConfig) -> bool:
        """Take new settings (reload); True when anything changed."""
        new = Filters.from_config(cfg, self.pods)
        changed = new._state() != self._state()
        if changed:
            self.include, self.exclude, self.containers = new.include, new.exclude, new.containers
            self.sample_rate, self.namespaces, self.labels, self.subsys = (
                new.sample_rate,
                new.namespaces,
                new.labels,
                new.subsys,
            )
            self.cgroup_refs, self.namespace_refs = new.cgroup_refs, new.namespace_refs
            self.gen += 1
        return changed

    def rescan(self) -> bool:
        """Look for new or gone container cgroups; True when the set changed."""
        if not self.containers:
            return False
        refs = frozenset(container_cgroup_refs(self.containers))
        if refs == self.cgroup_refs:
            return False
        self.cgroup_refs = refs
        self.gen += 1
        return True

    def pods_changed(self) -> bool:
        """Take the namespaces' cgroups as the runtime now reports them; True when they changed."""
        refs = self._namespace_refs()
        if refs == self.namespace_refs:
            return False
        self.namespace_refs = refs
        self.gen += 1
        return True

    @property
    def weight(self) -> int:
        return round(UNIT * 100 / self.sample_rate)

    def program(self, obj: BpfObject) -> None:
        """Write the filters into one loaded collector object (maps first, then the generation)."""
        marks: dict[bytes, int] = {}
        for name in self.include:
            marks[comm_key(name)] = marks.get(comm_key(name), 0) | INCLUDE
        for name in self.exclude:
            marks[comm_key(name)] = marks.get(comm_key(name), 0) | EXCLUDE
        _sync_map(obj, "tfo_comm_filter", {k: bytes([v]) for k, v in marks.items()})
        bits: dict[tuple[int, int], int] = {}
        for ref in self.cgroup_refs:
            bits[ref] = bits.get(ref, 0) | CG_CONTAINER
        for ref in self.namespace_refs:
            bits[ref] = bits.get(ref, 0) | CG_NAMESPACE
        _sync_map(obj, "tfo_cgroup_filter", {_CGROUP_REF.pack(i, h, 0): bytes([b]) for (h, i), b in bits.items()})
        cfg = _CFG.pack(
            self.gen,
            self.sample_rate,
            self.weight,
            int(bool(self.include)),
            int(bool(self.containers)),
            int(bool(self.namespaces)),
            int(self.labels),
            self.subsys,
        )
        obj.map(".data.tfo_cfg").update(b"\0\0\0\0", cfg)


def _sync_map(obj: BpfObject, name: str, wanted: dict[bytes, bytes]) -> None:
    m = obj.map(name)
    for key in m.all_keys():
        if key not in wanted:
            m.delete(key)
    for key, value in wanted.items():
        m.update(key, value)
