"""Hubble benchmark: agent CPU per flow, next to receive-only and decode-only, in the same run.

Run: .venv/bin/python -m bench.hubble_bench [--flows 200000] [--rounds 2] [--soak SECONDS --soak-rate 5000]

This process serves demo flows (~330 bytes each, ~216 after the agent's field mask) on loopback
with two feeders: ``grpcio``, the replay relay (a Python grpcio server, one message per write,
20-30k flows/s here), and ``h2``, bench/fast_feeder.py (the same selection, many messages per
HTTP/2 frame at full speed, as a Go server sends). Each measurement is a fresh child process that
streams all flows once with the agent's own GetFlows request (follow, field_mask): ``receive``
only iterates the raw messages, ``receive-nap`` does so the way the agent's reader does (a short
nap after waiting, so messages are read in bursts), ``decode-nap`` also parses them, ``agent``
runs the real HubbleIntegration (reader + aggregator, all metric groups on, cluster scope). CPU
is read from /proc/<child>/stat (utime+stime) between the child's "ready" (imports, channel set
up) and "done" lines, so start-up is not counted; rounds interleave all rows. ``--soak`` feeds
the agent from the grpcio relay at a fixed rate with --loop semantics and reports CPU share,
the rate the relay got out and RSS over time. Children inherit GRPC_EXPERIMENTS: set it empty
to measure with grpcio's EventEngine client instead of the polling one agent.hubble picks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from agent.hubble.client import FIELD_MASK, read_in_bursts
from agent.hubble.demo import demo_flows
from agent.hubble.replay import ReplayRelay, to_records
from bench.fast_feeder import FastFeeder

ROOT = Path(__file__).resolve().parents[1]

TICK = os.sysconf("SC_CLK_TCK")
MODES = {
    "receive": "receive only (SingleThreadedUnaryStream)",
    "receive-nap": "receive only, agent's burst reading",
    "decode-nap": "+ protobuf decode",
    "agent": "agent: reader + aggregator, all groups",
}


def child(mode: str, addr: str, flows: int) -> None:
    """Runs in the measured process: stream ``flows`` flows, say ready/done on stdout."""
    import grpc
    import grpc.experimental

    from agent.hubble.proto import GET_FLOWS, observer_pb2

    if mode == "agent":
        from agent.config import CiliumConfig
        from agent.hubble import HubbleIntegration

        cfg = CiliumConfig(
            enabled=True, hubble_address=addr, hubble_tls_enabled=False, exclude_namespaces=(),
            flow_scope="cluster", aggregation_window=1.0, flow_buffer_size=1_000_000,
            max_flows_per_second=10_000_000,
        )  # fmt: skip
        h = HubbleIntegration(cfg)
        print("ready", flush=True)
        h.start()
        while h.aggregator.stats.flows_processed < flows:
            time.sleep(0.01)
        h.stop()
        print("done", len(h.collect()), flush=True)
    else:
        options = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
        channel = grpc.insecure_channel(addr, options=options)
        req = observer_pb2.GetFlowsRequest(follow=True)
        req.field_mask.paths.extend(FIELD_MASK)
        call = channel.unary_stream(
            GET_FLOWS, request_serializer=observer_pb2.GetFlowsRequest.SerializeToString, response_deserializer=None
        )
        parse = observer_pb2.GetFlowsResponse.FromString
        decode, naps = mode.startswith("decode"), mode.endswith("-nap")
        print("ready", flush=True)
        n = 0
        stream = call(req)
        for raw in read_in_bursts(stream) if naps else stream:  # as the agent's reader reads, or plain
            if decode:
                parse(raw)
            n += 1
            if n >= flows:
                break
        stream.cancel()
        print("done", n, flush=True)
    sys.stdin.read()  # hold still until the parent has read our CPU time


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    return sum(cpu_times(pid))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spawn(mode: str, addr: str, flows: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.hubble_bench", "--child", mode, "--addr", addr, "--flows", str(flows)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def measure(mode: str, addr: str, flows: int) -> tuple[float, float, float]:
    """(CPU µs per flow, of which system µs, wall seconds) of one child streaming ``flows`` flows."""
    proc = spawn(mode, addr, flows)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().startswith("ready")
    (u0, s0), t0 = cpu_times(proc.pid), time.monotonic()
    line = proc.stdout.readline()
    (u1, s1), t1 = cpu_times(proc.pid), time.monotonic()
    proc.stdin.close()
    proc.wait(timeout=30)
    if not line.startswith("done"):
        raise SystemExit(f"{mode}: child failed")
    return (u1 - u0 + s1 - s0) / flows * 1e6, (s1 - s0) / flows * 1e6, t1 - t0


def soak(addr: str, seconds: float, sent: Callable[[], int]) -> list[tuple[float, float, float, float]]:
    """(elapsed s, CPU share of one core, flows/s sent, RSS MiB) per interval of a running agent.

    ``sent`` counts the flows the relay has handed to gRPC; HTTP/2 flow control holds the relay
    back when the agent does not read, so its rate is the rate the agent keeps up with.
    """
    proc = spawn("agent", addr, 10**12)
    assert proc.stdout is not None
    proc.stdout.readline()
    samples = []
    start = last_t = time.monotonic()
    last_cpu, last_sent = cpu_seconds(proc.pid), sent()
    while time.monotonic() - start < seconds:
        time.sleep(min(30.0, seconds / 10))
        now, cpu, n = time.monotonic(), cpu_seconds(proc.pid), sent()
        dt = now - last_t
        samples.append((now - start, (cpu - last_cpu) / dt, (n - last_sent) / dt, rss_mib(proc.pid)))
        last_t, last_cpu, last_sent = now, cpu, n
    proc.kill()
    proc.wait()
    return samples


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flows", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=1, help="repeat each measurement, report the best")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--soak-rate", type=float, default=5000.0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.addr, args.flows)
        return 0
    msgs = demo_flows(args.flows)[: args.flows]
    size = sum(m.ByteSize() for m in msgs) / len(msgs)
    if args.soak:
        relay = ReplayRelay(to_records(msgs), loop=True, rate=args.soak_rate)
        addr = relay.start("127.0.0.1:0")
        relay.service.prepared(FIELD_MASK)
        print(f"soak: {args.soak:.0f}s at {args.soak_rate:.0f} flows/s (loop)")
        for t, share, rate, rss in soak(addr, args.soak, lambda: relay.service.seen):
            print(f"  t={t:6.0f}s  cpu={share * 100:5.1f}% of one core  {rate:6.0f} flows/s  rss={rss:6.1f} MiB")
        relay.stop(0)
        return 0
    relay = ReplayRelay(to_records(msgs))
    feeders = {"h2": FastFeeder(relay.service).start(), "grpcio": relay.start("127.0.0.1:0")}
    masked = relay.service.prepared(FIELD_MASK)  # precompute what both feeders send for the agent's mask
    wire = sum(len(b) for b in masked) / len(masked)
    print(f"{len(msgs)} demo flows, {size:.0f} bytes each on average, {wire:.0f} bytes after the field mask")
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _ in range(args.rounds):  # rounds interleave every row, so a noisy spell does not hit one row only
        for feeder, addr in feeders.items():
            for mode in MODES:
                runs.setdefault((feeder, mode), []).append(measure(mode, addr, len(msgs)))
    head = f"{'CPU µs/flow: best':>18} {'median':>7} {'of it sys':>10} {'flows/s':>9}"
    print(f"{'feeder':7} {'what the process does':40} {head}")
    for (feeder, mode), results in runs.items():
        best = min(results, key=lambda r: r[0])
        median = statistics.median(r[0] for r in results)
        print(f"{feeder:7} {MODES[mode]:40} {best[0]:18.1f} {median:7.1f} {best[1]:10.1f} {len(msgs) / best[2]:9.0f}")
    relay.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
