"""Which cgroup is whose, on the tree that keys per-container counters (``cgroups.key_hierarchy``).

``CgroupIndex`` maps the kernel's cgroup ids (inode numbers) to what their paths say (pod UID,
container ID), rescanning the tree when it changed (``changed``: a cheap look at the kernel's
count of cgroups) or when asked about an id it does not know, at most once a second. Ids that
disappear are kept for a while with the time they were found gone, so counters of a container
that just ended can still be told apart from the host's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional

from agent.cri.cgroups import PROC_CGROUPS, CgroupRef, Hierarchy, parse_path, scan

GONE_KEEP_SECONDS = 3600.0  # how long a gone cgroup is remembered
MIN_RESCAN_SECONDS = 1.0  # the tree is read at most this often (a big tree costs milliseconds)


@dataclass(frozen=True)
class Workload:
    """The names a cgroup's tasks are labelled with; all empty for the host's processes."""

    namespace: str = ""
    pod: str = ""
    container: str = ""


HOST = Workload()


@dataclass(frozen=True)
class Owner:
    """Whose a cgroup id is: ``instance`` tells one container (or pod) from another with the same
    names ("" for the host), ``gone_at`` when its cgroup was found removed (0: it exists)."""

    workload: Workload
    instance: str
    gone_at: float


@dataclass(frozen=True)
class Known:
    """A cgroup id as last seen: what its path says, and when it was found gone (0: it exists)."""

    ref: CgroupRef
    gone_at: float = 0.0


def tree_generation(tree: Hierarchy, proc_cgroups: str = PROC_CGROUPS) -> str:
    """Something that changes when cgroups are created or removed on ``tree``: the v2 root's
    ``cgroup.stat`` (descendant counts), the v1 controller's line of /proc/cgroups."""
    try:
        if tree.v2:
            with open(f"{tree.mount}/cgroup.stat") as f:
                return f.read()
        with open(proc_cgroups) as f:
            return next((line for line in f if line.split()[:1] == [tree.controllers[0]]), "")
    except (OSError, IndexError):
        return ""


class CgroupIndex:
    """Cgroup id -> ``Known`` for one tree; safe to use from several threads."""

    def __init__(self, tree: Hierarchy) -> None:
        self.tree = tree
        self._known: dict[int, Known] = {}
        self._lock = threading.Lock()
        self._generation: Optional[str] = None
        self._dirty = True
        self._scanned_at = 0.0

    def rescan_if_changed(self) -> bool:
        """Rescan when cgroups were created or removed on the tree since the last scan (and that
        was long enough ago); True when it did."""
        gen = tree_generation(self.tree)
        if gen != self._generation:
            self._generation, self._dirty = gen, True
        if not self._dirty or time.monotonic() - self._scanned_at < MIN_RESCAN_SECONDS:
            return False
        self.rescan()
        return True

    def rescan(self) -> None:
        """Read the tree again; ids no longer there are marked gone."""
        started = time.monotonic()
        self._dirty = False
        paths = scan(self.tree)
        now = time.monotonic()
        with self._lock:
            known = {cg: Known(parse_path(p)) for cg, p in paths.items()}
            for cg, old in self._known.items():
                if cg in known:
                    continue
                if not old.gone_at:
                    known[cg] = Known(old.ref, now)
                elif now - old.gone_at < GONE_KEEP_SECONDS:
                    known[cg] = old
            self._known = known
            self._scanned_at = started

    def get(self, cg: int, seen_before: float) -> Optional[Known]:
        """What ``cg`` is. An id not found by a scan started after ``seen_before`` (a monotonic
        time at which the id was already in use: the end of the map read that found it) is a
        cgroup that came and went unseen: taken as the host's, gone. A miss rescans the tree
        (once per read: the next misses find the scan recent); None when the last scan is too
        recent to repeat and too old to tell: ask at the next read."""
        with self._lock:
            hit = self._known.get(cg)
            scanned_at = self._scanned_at
        if hit is None and scanned_at < seen_before:
            if time.monotonic() - scanned_at < MIN_RESCAN_SECONDS:
                return None
            self.rescan()
            with self._lock:
                hit = self._known.get(cg)
        return hit or Known(CgroupRef(), time.monotonic())

    def live(self) -> dict[int, CgroupRef]:
        """The cgroups that exist, as of the last scan."""
        with self._lock:
            return {cg: k.ref for cg, k in self._known.items() if not k.gone_at}
