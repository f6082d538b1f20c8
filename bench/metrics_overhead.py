"""Benchmark: what the worker's metrics cost per batch, without Kafka.

1. **The worker's processing path** (``MonitorProcessor.process``: decode, check with the flow
   policy on the incremental engine, state writes to an in-memory changelog table, verdicts to a
   sink that drops them) over the live benchmark's traffic (bench/traffic.py: turns of 3 events over
   2,000 sessions), with and without ``WorkerMetrics``, in alternating rounds, in CPU time: the
   difference is what the metrics add to a batch.
2. **The metric calls alone** for one batch (a verdict with its latency): ``WorkerMetrics`` against
   the same calls on prometheus-client's own Counter and Histogram, which the worker used before.
3. With ``--live``: **a worker process on a real broker** (bench/live.py's backlog: ``--batches``
   produced first, then timed from the worker's ready line to the last verdict), alternately with
   and without ``--metrics-port``, ``--rounds`` pairs; batches/s and the worker's CPU per batch.

Run: ``.venv/bin/python bench/metrics_overhead.py [--batches 20000] [--rounds 5] [--live
[--bootstrap-servers HOST:PORT]]``; prints the figures and writes
``bench/results/metrics_overhead.json``. On a machine shared with other work, compare the medians of
one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import time
import timeit
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("LOCAL_POLICY", "1")

from traffic import POLICY, Sessions  # noqa: E402

from monitor.changelog import ChangelogTable  # noqa: E402
from monitor.config import WorkerSettings  # noqa: E402
from monitor.metrics import LATENCY_BUCKETS, WorkerMetrics  # noqa: E402
from monitor.models import Verdict  # noqa: E402
from monitor.policy import PolicySet, load_policy_text  # noqa: E402
from monitor.worker import MonitorProcessor  # noqa: E402

PARTITIONS = 12


class Record:
    """What the processor reads of a confluent-kafka message."""

    __slots__ = ("_key", "_value", "_partition", "_offset", "_ts")

    def __init__(self, key: bytes, value: bytes, partition: int, offset: int, ts_ms: int) -> None:
        self._key, self._value, self._partition, self._offset, self._ts = key, value, partition, offset, ts_ms

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return 1, self._ts


class Sink:
    def produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        pass


def processor(with_metrics: bool) -> MonitorProcessor:
    policies = PolicySet.single(load_policy_text(POLICY, "flow"))
    settings = WorkerSettings(policy_path="-", bootstrap_servers="127.0.0.1:1")
    proc = MonitorProcessor(policies, settings, WorkerMetrics(engine="incremental") if with_metrics else None)
    table = ChangelogTable("bench.changelog", lambda key, p, value: None)
    for p in range(PARTITIONS):
        table.add_partition(p)
    proc.attach(table, SimpleNamespace(assignment=list(range(PARTITIONS)), rebalances=1, commits=0, aborts=0,
                                       lag=lambda: {}))
    return proc


def records(n: int) -> list[list[Record]]:
    """``n`` batches as the runtime hands them over: micro-batches of up to 500 records."""
    sessions = Sessions(2000)
    now_ms = int(time.time() * 1000)
    out = []
    for i in range(n):
        b = sessions.batch()
        p = hash(b.session_id) % PARTITIONS
        out.append(Record(b.session_id.encode(), b.value, p, i, now_ms))
    return [out[i:i + 500] for i in range(0, n, 500)]


def run(with_metrics: bool, n: int) -> float:
    """CPU seconds per batch through ``MonitorProcessor.process`` (CPU time, not wall time: other
    processes on a shared machine slow the clock, not the count)."""
    proc = processor(with_metrics)
    chunks = records(n)
    sink = Sink()
    loop = asyncio.new_event_loop()
    try:
        started = time.process_time()
        for chunk in chunks:
            loop.run_until_complete(proc.process(chunk, sink))
        return (time.process_time() - started) / n
    finally:
        loop.close()
        proc.close()


def calls_per_batch(number: int = 200_000) -> dict[str, float]:
    """Nanoseconds of the metric calls of one new verdict: ours, and prometheus-client's."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    ours = WorkerMetrics(engine="incremental")
    verdict = Verdict(session_id="s", batch_id="b", decision="allow", engine="incremental", eval_ms=0.4)

    def with_ours() -> None:
        ours.batch_consumed(3)
        ours.observe_verdict(verdict, 0.0004, engine="incremental")
        ours.observe_verdict_latency(0.004)

    r = CollectorRegistry()
    batches = Counter("b", "b", registry=r)
    events = Counter("e", "e", registry=r)
    verdicts = Counter("v", "v", ["decision"], registry=r)
    check = Histogram("c", "c", ["engine"], buckets=LATENCY_BUCKETS, registry=r)
    latency = Histogram("l", "l", registry=r)

    def with_client() -> None:
        batches.inc()
        events.inc(3)
        verdicts.labels(decision=verdict.decision).inc()
        check.labels(engine="incremental").observe(0.0004)
        latency.observe(0.004)

    out: dict[str, float] = {}
    for name, fn in (("worker_metrics_ns", with_ours), ("prometheus_client_ns", with_client)):
        out[name] = round(min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9)
    return out


def scrape_ms() -> float:
    """Milliseconds to render /metrics of a worker with 12 partitions and 50 rules (every 15 s in
    production, on the server's thread)."""
    from prometheus_client import generate_latest

    from monitor.models import Match, Violation

    m = WorkerMetrics(engine="incremental")
    for p in range(PARTITIONS):
        m.set_consumer_lag(p, p, 0.1)
    m.set_state_keys({p: 1000 for p in range(PARTITIONS)})
    for i in range(50):
        v = Violation.from_match(Match(rule_index=i, message=f"rule {i}", key="(0,)"), "s", "a" * 64)
        m.observe_verdict(Verdict(session_id="s", batch_id="b", decision="deny", violations=[v]))
        m.alert_published(v)
    return round(min(timeit.repeat(lambda: generate_latest(m.registry), number=200, repeat=3)) / 200 * 1e3, 3)


def live_rounds(bootstrap: str, n: int, rounds: int) -> dict[str, Any]:
    """Backlog runs of a worker process, alternately with and without /metrics."""
    import tempfile
    import uuid

    import live

    from monitor.config import TopicNames
    from monitor.topics import create_topics

    work = Path(tempfile.mkdtemp(prefix="metrics-overhead-"))
    policy = work / "flow.gr"
    policy.write_text(POLICY)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for i in range(rounds):
        for flag in ((False, True) if i % 2 == 0 else (True, False)):
            prefix = f"overhead-{uuid.uuid4().hex[:6]}"
            create_topics(bootstrap, prefix, partitions_override=live.PARTITIONS)
            topics = TopicNames.for_prefix(prefix)
            settings = live.worker_settings(bootstrap, prefix, policy, "at-least-once", flag)
            got = live.backlog(bootstrap, prefix, n, [sys.executable, "-m", "monitor.worker", settings.model_dump_json()],
                               work / f"{prefix}.log", topics.verdicts, topics.events)
            got["cpu_us_per_batch"] = round(got["cpu_percent"] / 100 / got["batches_per_s"] * 1e6, 1)
            runs[flag].append(got)
            print(f"live round {i + 1} {'with' if flag else 'without'} metrics: {got['batches_per_s']:,} batches/s, "
                  f"{got['cpu_us_per_batch']} µs CPU a batch, load {os.getloadavg()[0]:.1f}", flush=True)
    out: dict[str, Any] = {}
    for flag, name in ((False, "without"), (True, "with")):
        rates = [r["batches_per_s"] for r in runs[flag]]
        cpu = [r["cpu_us_per_batch"] for r in runs[flag]]
        out[name] = {"batches_per_s": rates, "cpu_us_per_batch": cpu,
                     "median_batches_per_s": round(statistics.median(rates)),
                     "median_cpu_us_per_batch": round(statistics.median(cpu), 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=20_000, help="batches per round (default 20,000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds with and without metrics (default 5)")
    ap.add_argument("--live", action="store_true", help="also a worker process on a real broker (see above)")
    ap.add_argument("--bootstrap-servers", help="--live: this broker (default: one started from Kafka's jars)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "metrics_overhead.json"))
    args = ap.parse_args(argv)

    run(True, 2000)  # warm-up: imports, the policy's compilation
    without, with_ = [], []
    for i in range(args.rounds):
        # alternate which goes first: drift on a shared machine hits both alike
        for flag in ((False, True) if i % 2 == 0 else (True, False)):
            (with_ if flag else without).append(run(flag, args.batches))
        print(f"round {i + 1}: without {without[-1] * 1e6:.1f} µs/batch, with {with_[-1] * 1e6:.1f} µs/batch "
              "(CPU)", flush=True)
    calls = calls_per_batch()
    med_without, med_with = statistics.median(without), statistics.median(with_)
    doc: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "command": "bench/metrics_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batches_per_round": args.batches,
        "rounds": args.rounds,
        "process_us_per_batch_without_metrics": [round(x * 1e6, 1) for x in without],
        "process_us_per_batch_with_metrics": [round(x * 1e6, 1) for x in with_],
        "median_without_us": round(med_without * 1e6, 1),
        "median_with_us": round(med_with * 1e6, 1),
        "overhead_percent": round(100 * (med_with - med_without) / med_without, 2),
        "overhead_percent_of_minimums": round(100 * (min(with_) - min(without)) / min(without), 2),
        "metric_calls_per_batch": calls,
        "scrape_ms": scrape_ms(),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    print(f"process: median {doc['median_without_us']} µs/batch without metrics, {doc['median_with_us']} with "
          f"({doc['overhead_percent']:+.2f}%; the fastest rounds: {doc['overhead_percent_of_minimums']:+.2f}%)")
    print(f"metric calls of one batch: WorkerMetrics {calls['worker_metrics_ns']} ns, "
          f"prometheus-client {calls['prometheus_client_ns']} ns; a scrape {doc['scrape_ms']} ms; "
          f"load average {doc['load_average']}")
    if args.live:
        broker = None
        bootstrap = args.bootstrap_servers
        if not bootstrap:
            from monitor.broker import LocalBroker

            broker = LocalBroker(heap="1g", jit=True).start(timeout=180)
            bootstrap = broker.bootstrap_servers
        try:
            doc["live"] = live_rounds(bootstrap, args.batches, args.rounds)
        finally:
            if broker is not None:
                broker.stop()
        w, wo = doc["live"]["with"], doc["live"]["without"]
        print(f"live: median {wo['median_batches_per_s']:,} batches/s without metrics, {w['median_batches_per_s']:,} "
              f"with; CPU a batch {wo['median_cpu_us_per_batch']} µs without, {w['median_cpu_us_per_batch']} with")
        doc["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
