"""Benchmark: the live path, one worker against a real broker, under both guarantees.

For each guarantee (at-least-once, then exactly-once), against one Kafka broker on loopback
started from Kafka's jars with the JVM's full JIT (2 cores shared by broker, worker and load):

1. **Offered loads** of 100, 500, 1,000 and 2,000 events/s (batches of 3 events, one agent
   turn, over 1,000 sessions), ``--seconds`` each (default 20) after a short warm-up: p50, p95
   and p99 of produce→verdict latency, the verdict seen by a read_committed reader.
2. **A backlog** of ``--backlog`` batches (default 100,000) produced before the worker starts:
   sustained batches/s and events/s from its ready line to the last verdict, and the worker's
   CPU over that time.
3. **The runtime's ceiling**: the same backlog through a bare forwarder on the same runtime
   (``monitor.runtime.Forwarder``: no policy, one output per record), so the gap between the
   runtime and the monitor shows.

Every verdict is accounted for by the reader (missing, duplicated, conflicting, and expected
denies not given). The figures go to ``bench/results/live.json``: the default guarantee's at the
top level, the other's under ``"exactly_once"``.

Run: ``make bench-live`` (about 8 minutes) or ``.venv/bin/python bench/live.py --seconds 5 --backlog 20000``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("LOCAL_POLICY", "1")

from traffic import (  # noqa: E402
    POLICY,
    Sessions,
    VerdictReader,
    account,
    paced,
    percentile,
    produce_all,
    producer,
)

READY = "ready"
RATES = (100, 500, 1000, 2000)
EVENTS_PER_BATCH = 3
PARTITIONS = 12


class Child:
    """A worker (or forwarder) process: waits for its ready line, reads its CPU time."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self._err = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._err, text=True, cwd=ROOT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.ready = threading.Event()
        self.assigned = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            if READY in line:
                self.assigned = int(line.split("partitions=")[1].split()[0])
                if self.assigned == PARTITIONS:
                    self.ready.set()

    def wait_ready(self, timeout: float = 120) -> float:
        if not self.ready.wait(timeout):
            raise RuntimeError(f"not ready after {timeout}s: {self.log.read_text()[-2000:]}")
        return time.time()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._err.close()


def worker_settings(bootstrap: str, prefix: str, policy: Path, guarantee: str, metrics: bool) -> Any:
    from monitor.broker import free_port
    from monitor.config import WorkerSettings

    return WorkerSettings(bootstrap_servers=bootstrap, topic_prefix=prefix, policy_path=str(policy),
                          guarantee=guarantee, partitions=PARTITIONS, worker_id="bench",
                          metrics_port=free_port() if metrics else None)


def start_worker(bootstrap: str, prefix: str, policy: Path, guarantee: str, log: Path, metrics: bool) -> Child:
    settings = worker_settings(bootstrap, prefix, policy, guarantee, metrics)
    return Child([sys.executable, "-m", "monitor.worker", settings.model_dump_json()], log)


def offered(bootstrap: str, prefix: str, policy: Path, guarantee: str, seconds: float,
            workdir: Path, metrics: bool = False) -> tuple[list[dict[str, Any]], dict[str, int]]:
    from monitor.config import TopicNames

    topics = TopicNames.for_prefix(prefix)
    worker = start_worker(bootstrap, prefix, policy, guarantee, workdir / f"worker-{prefix}.log", metrics)
    sessions = Sessions(1000)
    sent_at: dict[tuple[str, str], float] = {}
    sent = []
    out = []
    try:
        worker.wait_ready()
        reader = VerdictReader(bootstrap, topics.verdicts)
        try:
            # warm-up (not counted): the producer's connection, the broker's JIT, first sessions
            gen = producer(bootstrap)
            warm = paced(gen, topics.events, sessions, 100, 5.0, {})
            reader.wait_for({(b.session_id, b.batch_id) for b in warm}, 60)
            sent.extend(warm)
            for rate in RATES:
                batches_per_s = rate / EVENTS_PER_BATCH
                phase = paced(gen, topics.events, sessions, batches_per_s, seconds, sent_at)
                keys = {(b.session_id, b.batch_id) for b in phase}
                done = reader.wait_for(keys, 60)
                sent.extend(phase)
                lat = [(reader.received[k][0][0] - sent_at[k]) * 1000.0 for k in keys if k in reader.received]
                row = {"events_per_s": rate, "batches_per_s": round(batches_per_s, 1), "batches": len(keys),
                       "p50_ms": round(percentile(lat, 50), 1), "p95_ms": round(percentile(lat, 95), 1),
                       "p99_ms": round(percentile(lat, 99), 1), "max_ms": round(max(lat), 1) if lat else None,
                       "answered": len(lat), "complete": done}
                print(f"  {guarantee:13} {rate:5} events/s: p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f}"
                      f"  p99 {row['p99_ms']:7.1f}  max {row['max_ms']}  ({len(lat)}/{len(keys)} answered)",
                      flush=True)
                out.append(row)
            time.sleep(2)  # late duplicates would show now
            counts = account(sent, reader)
        finally:
            reader.close()
    finally:
        worker.stop()
    return out, counts


def backlog(bootstrap: str, prefix: str, n: int, child_argv: list[str], log: Path, output_topic: str,
            input_topic: str) -> dict[str, Any]:
    """Produce ``n`` batches, then start the child and time it until the last output is read."""
    sessions = Sessions(2000)
    sent = produce_all(bootstrap, input_topic, sessions.batches(n))
    reader = VerdictReader(bootstrap, output_topic)
    child = Child(child_argv, log)
    try:
        t0 = child.wait_ready(180)
        c0 = child.cpu_seconds()
        keys = {(b.session_id, b.batch_id) for b in sent}
        if not reader.wait_for(keys, 900):
            raise RuntimeError(f"only {len(reader.received)} of {n} outputs after 900 s")
        c1 = child.cpu_seconds()
        t1 = max(t for k in keys for t, _ in reader.received[k][:1])
        time.sleep(2)
        counts = account(sent, reader)
    finally:
        reader.close()
        child.stop()
    seconds = t1 - t0
    return {"batches": n, "seconds": round(seconds, 2), "batches_per_s": round(n / seconds),
            "events_per_s": round(n * EVENTS_PER_BATCH / seconds), "cpu_percent": round(100 * (c1 - c0) / seconds),
            **counts}


def run_guarantee(bootstrap: str, guarantee: str, args: argparse.Namespace, workdir: Path,
                  policy: Path) -> dict[str, Any]:
    from monitor.config import TopicNames
    from monitor.topics import create_topics

    tag = uuid.uuid4().hex[:6]
    print(f"{guarantee}: offered loads, {args.seconds:g} s each", flush=True)
    prefix = f"live-{tag}-o"
    create_topics(bootstrap, prefix, partitions_override=PARTITIONS)
    rows, counts = offered(bootstrap, prefix, policy, guarantee, args.seconds, workdir, args.metrics)

    print(f"{guarantee}: a backlog of {args.backlog:,} batches through the worker", flush=True)
    prefix = f"live-{tag}-b"
    create_topics(bootstrap, prefix, partitions_override=PARTITIONS)
    topics = TopicNames.for_prefix(prefix)
    settings = worker_settings(bootstrap, prefix, policy, guarantee, args.metrics)
    mon = backlog(bootstrap, prefix, args.backlog, [sys.executable, "-m", "monitor.worker", settings.model_dump_json()],
                  workdir / f"worker-{prefix}.log", topics.verdicts, topics.events)
    print(f"  monitor:   {mon['batches_per_s']:,} batches/s = {mon['events_per_s']:,} events/s, "
          f"worker CPU {mon['cpu_percent']}%, missing {mon['missing']}, duplicates {mon['duplicates']}", flush=True)

    print(f"{guarantee}: the same backlog through a bare forwarder on the runtime", flush=True)
    prefix = f"live-{tag}-f"
    create_topics(bootstrap, prefix, partitions_override=PARTITIONS)
    topics = TopicNames.for_prefix(prefix)
    fwd = backlog(bootstrap, prefix, args.backlog,
                  [sys.executable, str(Path(__file__).resolve()), "forwarder", bootstrap, topics.events,
                   topics.verdicts, guarantee], workdir / f"forwarder-{prefix}.log", topics.verdicts, topics.events)
    print(f"  forwarder: {fwd['batches_per_s']:,} records/s, CPU {fwd['cpu_percent']}%, "
          f"missing {fwd['missing']}, duplicates {fwd['duplicates']}", flush=True)
    return {
        "offered": rows,
        "sustained_events_per_s": mon["events_per_s"],
        "sustained_batches_per_s": mon["batches_per_s"],
        "runtime_ceiling_records_per_s": fwd["batches_per_s"],
        "worker_cpu_percent": mon["cpu_percent"],
        "forwarder_cpu_percent": fwd["cpu_percent"],
        "missing": counts["missing"] + mon["missing"],
        "duplicates": counts["duplicates"] + mon["duplicates"],
        "conflicting": counts["conflicting"] + mon["conflicting"],
        "wrong_decisions": counts["wrong"] + mon["wrong"],
        "commit_interval_ms": 50 if guarantee == "exactly-once" else 200,
        "backlog": mon,
        # (the forwarder copies the input records: there is no decision to be wrong about)
        "forwarder": {k: v for k, v in fwd.items() if k != "wrong"},
    }


def forwarder_main(bootstrap: str, input_topic: str, output_topic: str, guarantee: str) -> None:
    import signal

    from monitor.runtime import Forwarder, Runtime, RuntimeConfig, print_ready

    cfg = RuntimeConfig(bootstrap_servers=bootstrap, group_id=f"{input_topic}-fwd", input_topic=input_topic,
                        guarantee=guarantee, worker_id="fwd")  # type: ignore[arg-type]
    rt = Runtime(cfg, Forwarder(output_topic), on_ready=print_ready("fwd", "forwarder ready"))
    signal.signal(signal.SIGTERM, lambda *_: rt.stop())
    rt.run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "forwarder":
        forwarder_main(*argv[1:5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per offered load (default 20)")
    ap.add_argument("--backlog", type=int, default=100_000, help="batches in the backlog (default 100,000)")
    ap.add_argument("--guarantee", choices=["both", "at-least-once", "exactly-once"], default="both")
    ap.add_argument("--bootstrap-servers", help="use this broker instead of starting one (full JIT)")
    ap.add_argument("--metrics", action="store_true",
                    help="workers serve /metrics (--metrics-port) as in production; compare with a run without")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "live.json"))
    args = ap.parse_args(argv)

    import tempfile

    from monitor.broker import LocalBroker

    workdir = Path(tempfile.mkdtemp(prefix="bench-live-"))
    policy = workdir / "flow.gr"
    policy.write_text(POLICY)
    broker = None
    bootstrap = args.bootstrap_servers
    if not bootstrap:
        broker = LocalBroker(heap="1g", jit=True).start(timeout=180)
        bootstrap = broker.bootstrap_servers
    started = time.time()
    try:
        guarantees = ["at-least-once", "exactly-once"] if args.guarantee == "both" else [args.guarantee]
        results = {g: run_guarantee(bootstrap, g, args, workdir, policy) for g in guarantees}
    finally:
        if broker:
            broker.stop()
    doc: dict[str, Any] = results.get("at-least-once", {})
    if "exactly-once" in results:
        doc["exactly_once"] = results["exactly-once"]
    doc["date"] = datetime.date.today().isoformat()
    doc["command"] = "make bench-live" if not argv else "bench/live.py " + " ".join(argv)
    doc["seconds"] = round(time.time() - started)
    doc["setup"] = (f"one worker, {PARTITIONS} partitions, batches of {EVENTS_PER_BATCH} events, Kafka on "
                    f"loopback with full JIT, {os.cpu_count()} cores shared by broker, worker and load"
                    + (", the worker serving /metrics" if args.metrics else ""))
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out} ({doc['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
