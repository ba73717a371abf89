"""Every eBPF collector this build has, in start order."""

from __future__ import annotations

from agent.collectors import BpfCollector
from agent.collectors.syscalls import SyscallsCollector

COLLECTORS: tuple[type[BpfCollector], ...] = (SyscallsCollector,)
