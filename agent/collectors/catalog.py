"""Every eBPF collector this build has, in start order."""

from __future__ import annotations

from agent.collectors import BpfCollector
from agent.collectors.dns import DnsCollector
from agent.collectors.file_io import FileIoCollector
from agent.collectors.http import HttpCollector
from agent.collectors.memory import MemoryCollector
from agent.collectors.network import NetworkCollector
from agent.collectors.scheduler import SchedulerCollector
from agent.collectors.syscalls import SyscallsCollector
from agent.collectors.tcp_events import TcpEventsCollector

COLLECTORS: tuple[type[BpfCollector], ...] = (
    SyscallsCollector,
    NetworkCollector,
    TcpEventsCollector,
    FileIoCollector,
    SchedulerCollector,
    MemoryCollector,
    DnsCollector,
    HttpCollector,
)
