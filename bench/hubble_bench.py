"""Hubble benchmark: agent CPU per flow from a feeder that frames like Hubble Relay, next to
receive-only and receive+decode in the same run; whole-agent runs, scrape cost and a soak.

Run: .venv/bin/python -m bench.hubble_bench [--flows 200000] [--rounds 5] [--tenants 20]
         [--feeders go,h2] [--scrapes 10] [--soak SECONDS --soak-rate 5000]

Flows: the demo flows with a namespace suffix out of ``--tenants`` per flow (~17k exposition lines
at 20), served with the agent's own GetFlows request (follow, field_mask) by

- ``go``: bench/gofeeder, a grpc-go server (one HTTP/2 DATA frame per message, frames batched into
  socket writes, as Hubble Relay sends), built from Debian's golang packages on first use and fed
  the replay relay's selection (bench/grpc_feeder.py). The headline feeder.
- ``h2``: bench/fast_feeder.py, many messages packed into each DATA frame, which no Hubble server
  does: an upper bound only.
- ``grpcio``: the replay relay itself (a Python grpcio server, one message per write).

Rows, each a fresh process streaming every flow once, rounds interleaving all rows: ``receive``
iterates the messages (grpcio SingleThreadedUnaryStream, the agent's channel options),
``receive-nap`` reads them as the agent's reader does (a nap after a wait), ``decode-nap`` also
parses them, ``agent`` runs HubbleIntegration in a child process (all metric groups, cluster scope),
``run`` is ``tfo-agent run`` (Hubble only, Prometheus on loopback scraped at the start and end,
aggregation_window 1 s) from its first flow to its last (go feeder only). CPU is utime+stime from
/proc; "runq" is the share of the run the process waited for a CPU (the machine's load). Every
``run`` round is listed: the rate shows whether delivery stalled.

``--scrapes N``: N scrapes of an agent holding all the flows' series, each after a window with new
flows (the Hubble text is rendered), each followed by 4 scrapes in the same window (kept text).
``--soak S``: ``tfo-agent run`` at defaults (cluster scope) fed ``--soak-rate`` flows/s for S
seconds by the go feeder, scraped every 15 s; CPU share, rate and RSS every 30 s. Scrape rounds
and the soak repeat the flows as recorded once they run out (the agent counts them again).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from agent.hubble.client import FIELD_MASK, WINDOW_BYTES_PER_FLOW, read_in_bursts, stream_options
from agent.hubble.replay import ReplayRelay, to_records
from bench.fast_feeder import FastFeeder
from bench.grpc_feeder import GoFeeder
from bench.hubble_run import ROOT, FlowRun, cpu_times, flow_run, median, run_queue_wait, scrape_cost, soak, varied_flows

MODES = {
    "receive": "receive only",
    "receive-nap": "receive only, agent's burst reading",
    "decode-nap": "+ protobuf decode",
    "agent": "HubbleIntegration (reader + window thread)",
    "run": "tfo-agent run, whole process",
}
RUN_SETTINGS = {"aggregation_window": "1s", "max_flows_per_second": 10_000_000}
WINDOW = 4096 * WINDOW_BYTES_PER_FLOW  # the default flow_buffer_size's window


def child(mode: str, addr: str, flows: int) -> None:
    """Runs in the measured process: stream ``flows`` flows, say ready/done on stdout."""
    import grpc

    from agent.hubble.proto import GET_FLOWS, observer_pb2

    if mode == "agent":
        from agent.config import CiliumConfig
        from agent.hubble import HubbleIntegration

        h = HubbleIntegration(
            CiliumConfig(
                enabled=True, hubble_address=addr, hubble_tls_enabled=False, exclude_namespaces=(),
                flow_scope="cluster", aggregation_window=1.0, max_flows_per_second=10_000_000,
            )
        )  # fmt: skip
        print("ready", flush=True)
        h.start()
        while h.aggregator.stats.flows_processed < flows:
            time.sleep(0.01)
        h.stop()
        print("done", len(h.collect()), flush=True)
    else:
        channel = grpc.insecure_channel(addr, options=stream_options(WINDOW))
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


def measure(mode: str, addr: str, flows: int) -> FlowRun:
    """One child process streaming ``flows`` flows: CPU from its "ready" to its "done"."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.hubble_bench", "--child", mode, "--addr", addr, "--flows", str(flows)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().startswith("ready")
    (u0, s0), w0, t0 = cpu_times(proc.pid), run_queue_wait(proc.pid), time.monotonic()
    line = proc.stdout.readline()
    (u1, s1), w1, t1 = cpu_times(proc.pid), run_queue_wait(proc.pid), time.monotonic()
    proc.stdin.close()
    proc.wait(timeout=30)
    if not line.startswith("done"):
        raise SystemExit(f"{mode}: child failed")
    wall = t1 - t0
    return FlowRun((u1 - u0 + s1 - s0) / flows * 1e6, (s1 - s0) / flows * 1e6, flows / wall, flows, (w1 - w0) / wall)


def start_feeders(names: list[str], relay: ReplayRelay) -> dict[str, tuple[str, Any]]:
    """name -> (address, feeder) for the feeders asked for, all serving ``relay``'s selection."""
    out: dict[str, tuple[str, Any]] = {}
    for name in names:
        if name == "grpcio":
            out[name] = (relay.start("127.0.0.1:0"), relay)
        else:
            feeder = GoFeeder(relay.service) if name == "go" else FastFeeder(relay.service)
            out[name] = (feeder.start(), feeder)
    return out


def receive_cost(relay: ReplayRelay, flows: int) -> float:
    """µs of CPU per flow to only receive ``flows`` flows from a fresh go feeder (the soak's baseline)."""
    ((addr, feeder),) = start_feeders(["go"], relay).values()
    try:
        return measure("receive", addr, flows).cpu_us
    finally:
        feeder.stop()


def per_flow(feeders: dict[str, tuple[str, Any]], flows: int, rounds: int) -> dict[tuple[str, str], list[FlowRun]]:
    """Every (feeder, mode) row ``rounds`` times, interleaved round by round."""
    runs: dict[tuple[str, str], list[FlowRun]] = {}
    for r in range(rounds):
        for name, (addr, feeder) in feeders.items():
            for mode in MODES:
                if mode != "run":
                    result = measure(mode, addr, flows)
                elif isinstance(feeder, GoFeeder):
                    result = flow_run(feeder, flows, **RUN_SETTINGS)
                    if result.processed != flows:
                        raise SystemExit(f"run: the agent counted {result.processed:.0f} of {flows} flows")
                else:
                    continue
                runs.setdefault((name, mode), []).append(result)
        print(f"  round {r + 1}/{rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    return runs


def report(runs: dict[tuple[str, str], list[FlowRun]]) -> None:
    """The per-flow table, ratios against the same feeder's receive-only row, and every run row."""
    print(f"\n{'feeder':7} {'what the process does':43} {'µs/flow best':>12} {'median':>7} {'x receive':>9} "
          f"{'sys':>5} {'flows/s':>8} {'runq':>5}")  # fmt: skip
    for (feeder, mode), results in runs.items():
        best = min(results, key=lambda r: r.cpu_us)
        med = statistics.median(r.cpu_us for r in results)
        base = statistics.median(r.cpu_us for r in runs[(feeder, "receive")])
        rate = statistics.median(r.rate for r in results)
        runq = statistics.median(r.waiting for r in results)
        print(f"{feeder:7} {MODES[mode]:43} {best.cpu_us:12.1f} {med:7.1f} {med / base:9.2f} {best.sys_us:5.1f} "
              f"{rate:8.0f} {runq * 100:4.0f}%")  # fmt: skip
    for (feeder, mode), results in runs.items():
        if mode == "run":
            print(f"\n{feeder} feeder, tfo-agent run, every round (µs/flow, flows/s, runq):")
            for i, r in enumerate(results, 1):
                print(f"  round {i}: {r.cpu_us:5.1f} µs/flow ({r.sys_us:.1f} sys), {r.rate:7.0f} flows/s, "
                      f"runq {r.waiting * 100:3.0f}%, counted {r.processed:.0f}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flows", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=5, help="repeat every row, interleaved")
    p.add_argument("--tenants", type=int, default=20, help="namespace variants (label variety)")
    p.add_argument("--feeders", default="go,h2", help="go, h2, grpcio (comma-separated)")
    p.add_argument("--scrapes", type=int, default=10, help="scrape rounds (0: none)")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--soak-rate", type=float, default=5000.0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.addr, args.flows)
        return 0
    msgs = varied_flows(args.flows, args.tenants)
    records = to_records(msgs)
    relay = ReplayRelay(records)
    masked = relay.service.prepared(FIELD_MASK)  # what every feeder sends for the agent's mask
    print(f"{len(msgs)} demo flows, {args.tenants} tenants, {sum(len(b) for b in masked) / len(masked):.0f} bytes "
          f"each after the field mask; load average {os.getloadavg()[0]:.1f} at the start")  # fmt: skip
    feeders = start_feeders(args.feeders.split(","), relay)
    report(per_flow(feeders, len(msgs), args.rounds))
    for _, feeder in feeders.values():
        feeder.stop(0) if feeder is relay else feeder.stop()
    if args.scrapes:
        go = GoFeeder(relay.service, repeat=True)
        go.start()
        cost = scrape_cost(go, len(msgs), args.scrapes, kept=4)
        go.stop()
        print(f"\nscrape of {cost.lines} lines ({cost.size / 1e6:.1f} MB), CPU of the agent per scrape:")
        for what, cpu, latency in (
            ("after a window with new flows (rendered)", cost.fresh_cpu_ms, cost.fresh_latency_ms),
            ("again in the same window (kept text)", cost.kept_cpu_ms, cost.kept_latency_ms),
        ):
            print(f"  {what:42} {cpu:6.1f} ms = {cpu * 1e3 / cost.lines:5.2f} µs/line; latency median "
                  f"{median(latency):5.1f} ms, max {max(latency):5.1f} ms")  # fmt: skip
    if args.soak:
        before = receive_cost(relay, len(msgs))
        go = GoFeeder(relay.service, repeat=True)
        go.start()
        print(f"\nsoak: {args.soak:.0f} s at {args.soak_rate:.0f} flows/s, scraped every 15 s, defaults, cluster scope")
        samples, latencies = soak(go, args.soak, args.soak_rate, 15.0, 30.0)
        go.stop()
        base = (before + receive_cost(relay, len(msgs))) / 2 * 1e-6 * args.soak_rate  # share of a core
        for t, share, rate, rss, runq in samples:
            print(f"  t={t:4.0f}s  cpu={share * 100:5.1f}% of one core ({share / base:4.2f}x receive only)  "
                  f"{rate:6.0f} flows/s  rss={rss:6.1f} MiB  runq={runq * 100:3.0f}%")  # fmt: skip
        print(f"  scrape latency median {median(latencies):.0f} ms, max {max(latencies, default=0):.0f} ms")
        print(f"  receive only at this rate, measured just before and after: {base * 100:.1f}% of one core "
              f"(the machine's speed drifts; the ratio is what the agent adds)")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
