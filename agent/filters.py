"""Process/container filters and sampling, programmed into every collector's kernel maps.

The kernel side (``bpf/tfo.bpf.h``) decides per task and caches the verdict in task-local storage;
this module turns the config into map contents:

- ``process_filter`` / ``exclude_processes``: process names (the thread group leader's ``comm``,
  at most 15 characters as the kernel keeps them) -> ``tfo_comm_filter``;
- ``container_filter``: cgroup directories whose name starts with an entry, either as written
  (``docker-<id>.scope``) or after a runtime prefix (``docker-``, ``cri-containerd-``, ``crio-``,
  ``libpod-``), found on every mounted cgroup v1 hierarchy and the v2 tree -> their inode numbers
  (the kernel's cgroup ids) in ``tfo_cgroup_filter``; a task matches when its cgroup or an ancestor
  is there;
- ``sample_rate``: each event is kept with that probability and weighs 100/rate events.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from agent.config import EbpfConfig
from agent.libbpf import BpfObject

log = logging.getLogger(__name__)

COMM_LEN = 16
INCLUDE, EXCLUDE = 1, 2
UNIT = 100  # weight of one event at 100% sampling (must match TFO_UNIT)
RUNTIME_PREFIXES = ("docker-", "cri-containerd-", "crio-", "libpod-", "containerd-")
_CFG = struct.Struct("<5I")  # struct tfo_cfg


def comm_key(name: str) -> bytes:
    """A process name as the kernel's 16-byte, NUL-padded ``comm``."""
    return name.encode()[: COMM_LEN - 1].ljust(COMM_LEN, b"\0")


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points of every cgroup v1 hierarchy and cgroup v2 tree."""
    points = []
    with open(mountinfo) as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split(" ", 1)[0] in ("cgroup", "cgroup2"):
                points.append(pre.split(" ")[4].replace("\\040", " "))
    return points


def container_matches(dirname: str, entries: tuple[str, ...]) -> bool:
    names = [dirname] + [dirname[len(p) :] for p in RUNTIME_PREFIXES if dirname.startswith(p)]
    return any(n.startswith(e) for n in names for e in entries)


def container_cgroup_ids(entries: tuple[str, ...]) -> set[int]:
    """Inode numbers (= kernel cgroup ids) of the cgroups matching ``container_filter``."""
    ids: set[int] = set()
    if not entries:
        return ids
    for root in cgroup_mounts():
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                if container_matches(d, entries):
                    try:
                        ids.add(os.stat(os.path.join(dirpath, d)).st_ino)
                    except OSError:
                        continue
    return ids


@dataclass
class Filters:
    """The filter state to program into collectors; ``gen`` changes whenever it does."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]
    containers: tuple[str, ...]
    sample_rate: int
    cgroup_ids: frozenset[int] = frozenset()
    gen: int = 1

    @classmethod
    def from_config(cls, cfg: EbpfConfig) -> Filters:
        f = cls(cfg.process_filter, cfg.exclude_processes, cfg.container_filter, cfg.sample_rate)
        f.cgroup_ids = frozenset(container_cgroup_ids(f.containers))
        return f

    def update(self, cfg: EbpfConfig) -> bool:
        """Take new settings (reload); True when anything changed."""
        new = Filters.from_config(cfg)
        changed = (new.include, new.exclude, new.containers, new.sample_rate, new.cgroup_ids) != (
            self.include,
            self.exclude,
            self.containers,
            self.sample_rate,
            self.cgroup_ids,
        )
        if changed:
            self.include, self.exclude, self.containers = new.include, new.exclude, new.containers
            self.sample_rate, self.cgroup_ids = new.sample_rate, new.cgroup_ids
            self.gen += 1
        return changed

    def rescan(self) -> bool:
        """Look for new or gone container cgroups; True when the set changed."""
        if not self.containers:
            return False
        ids = frozenset(container_cgroup_ids(self.containers))
        if ids == self.cgroup_ids:
            return False
        self.cgroup_ids = ids
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
        _sync_map(obj, "tfo_cgroup_filter", {struct.pack("<Q", i): b"\1" for i in self.cgroup_ids})
        cfg = _CFG.pack(self.gen, self.sample_rate, self.weight, int(bool(self.include)), int(bool(self.containers)))
        obj.map(".data.tfo_cfg").update(b"\0\0\0\0", cfg)


def _sync_map(obj: BpfObject, name: str, wanted: dict[bytes, bytes]) -> None:
    m = obj.map(name)
    for key in m.all_keys():
        if key not in wanted:
            m.delete(key)
    for key, value in wanted.items():
        m.update(key, value)
