"""Chaos proof: workers killed, the broker restarted, workers added and removed, while agents talk.

One run, for one guarantee:

1. a single-node Kafka broker of its own (so it can be restarted), topics with 12 partitions;
2. two workers in one consumer group (stable worker ids, as a supervisor would restart them);
3. ``batches`` batches over ``sessions`` sessions produced at a steady rate, and meanwhile, at
   random points: ``kills`` SIGKILLs of a random worker (restarted a moment later with the same
   id), ``broker_restarts`` broker restarts, one worker added and one removed (rebalances);
4. then, with a read_committed reader: every batch has a verdict, no batch has two different
   ones, every expected deny is there, the live verdicts equal ``agent-monitor replay`` of the
   events topic (decision, alert ids and addresses), and under exactly-once no batch has two.

``make chaos`` runs it with 100,000 batches over 2,000 sessions under both guarantees and writes
``bench/results/chaos.json`` (the exactly-once figures at the top level, at-least-once under
``"at_least_once"``); ``tests/worker/test_chaos.py`` runs a short version in ``make test``.
A worker that exits by itself (not killed) is restarted too, and counted in ``worker_exits``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("LOCAL_POLICY", "1")

from traffic import POLICY, Sessions, VerdictReader, account, producer  # noqa: E402

PARTITIONS = 12


class Worker:
    """One worker process with a stable id; restartable."""

    def __init__(self, worker_id: str, settings_json: str, logdir: Path) -> None:
        self.worker_id = worker_id
        self.settings_json = settings_json
        self.log = logdir / f"{worker_id}.log"
        self.proc: subprocess.Popen | None = None
        self.wanted = False  # a supervisor restarts it when it exits while wanted

    def start(self) -> None:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "monitor.worker", self.settings_json],
                                         stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.wanted = True

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.wanted = False
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None


@dataclass
class ChaosResult:
    guarantee: str
    batches: int
    sessions: int
    kills: int = 0
    broker_restarts: int = 0
    rebalances: int = 0
    worker_exits: int = 0
    missing: int = 0
    duplicates: int = 0
    conflicting: int = 0
    wrong_decisions: int = 0
    expected_denies: int = 0
    live_vs_replay_diffs: int = 0
    seconds: float = 0.0
    events: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_chaos(guarantee: str, batches: int, sessions: int, kills: int, broker_restarts: int = 1,
              rate: float = 1000.0, seed: int = 1, workdir: Path | None = None,
              verbose: bool = True) -> ChaosResult:
    """One chaos run (see the module docstring); returns its counts."""
    from monitor.broker import LocalBroker
    from monitor.config import TopicNames, WorkerSettings
    from monitor.topics import create_topics

    rng = random.Random(seed)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    policy = workdir / "flow.gr"
    policy.write_text(POLICY)
    say = (lambda msg: print(f"  [{guarantee}] {msg}", flush=True)) if verbose else (lambda msg: None)
    res = ChaosResult(guarantee=guarantee, batches=batches, sessions=sessions)
    started = time.monotonic()
    broker = LocalBroker(heap="1g").start(timeout=180)
    workers: list[Worker] = []
    reader = None
    try:
        bootstrap = broker.bootstrap_servers
        prefix = f"chaos-{guarantee.split('-')[0]}"
        create_topics(bootstrap, prefix, partitions_override=PARTITIONS)
        topics = TopicNames.for_prefix(prefix)

        def settings(worker_id: str) -> str:
            return WorkerSettings(bootstrap_servers=bootstrap, topic_prefix=prefix, policy_path=str(policy),
                                  guarantee=guarantee, partitions=PARTITIONS, worker_id=worker_id,
                                  create_topics=False, log_level="info").model_dump_json()

        workers = [Worker(f"w{i}", settings(f"w{i}"), workdir) for i in (1, 2, 3)]
        for w in workers[:2]:
            w.start()
        reader = VerdictReader(bootstrap, topics.verdicts)
        traffic = Sessions(sessions, tag="c")
        sent = []
        duration = batches / rate
        # the schedule: kills, broker restarts, one worker added, one removed
        plan: list[tuple[float, str]] = [(rng.uniform(0.1, 0.85) * duration, "kill") for _ in range(kills)]
        plan += [(rng.uniform(0.3, 0.7) * duration, "broker") for _ in range(broker_restarts)]
        plan += [(0.2 * duration, "add"), (0.6 * duration, "remove")]
        plan.sort()
        stop = threading.Event()
        plan_done = threading.Event()

        def chaos() -> None:
            t0 = time.monotonic()
            for at, what in plan:
                while time.monotonic() - t0 < at:
                    if stop.wait(0.05):
                        return
                    supervise()
                if what == "kill":
                    live = [w for w in workers if w.wanted and not w.exited()]
                    w = rng.choice(live)
                    w.kill()
                    res.kills += 1
                    res.rebalances += 2  # the group drops the dead member, then takes it back
                    say(f"{time.monotonic() - t0:6.1f}s SIGKILL {w.worker_id}")
                    res.events.append(f"kill {w.worker_id}")
                    time.sleep(rng.uniform(0.5, 2.0))
                    w.start()
                elif what == "broker":
                    say(f"{time.monotonic() - t0:6.1f}s broker restart")
                    broker.restart(down_for=rng.uniform(1.0, 3.0))
                    res.broker_restarts += 1
                    res.events.append("broker restart")
                elif what == "add":
                    w = workers[2]
                    w.start()
                    res.rebalances += 1
                    say(f"{time.monotonic() - t0:6.1f}s add {w.worker_id}")
                    res.events.append(f"add {w.worker_id}")
                elif what == "remove":
                    w = workers[0]
                    w.stop()
                    res.rebalances += 1
                    say(f"{time.monotonic() - t0:6.1f}s remove {w.worker_id}")
                    res.events.append(f"remove {w.worker_id}")
            plan_done.set()
            while not stop.wait(0.2):
                supervise()

        def supervise() -> None:
            for w in workers:
                if w.wanted and w.exited() and w.proc is not None and w.proc.returncode != -signal.SIGKILL:
                    res.worker_exits += 1
                    say(f"{w.worker_id} exited with {w.proc.returncode}: restarted (see {w.log})")
                    w.start()

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        p = producer(bootstrap)
        chaos_thread.start()
        t0 = time.perf_counter()
        for i in range(batches):
            due = t0 + i / rate
            while time.perf_counter() < due:
                p.poll(min(0.002, max(0.0, due - time.perf_counter())))
            b = traffic.batch()
            while True:
                try:
                    p.produce(topics.events, b.value, b.session_id.encode())
                    break
                except BufferError:
                    p.poll(0.05)
            sent.append(b)
            p.poll(0)
        assert p.flush(300) == 0, "records left unsent"
        say(f"produced {batches} batches in {time.perf_counter() - t0:.1f}s")
        plan_done.wait()  # every planned event happened
        keys = {(b.session_id, b.batch_id) for b in sent}
        reader.wait_for(keys, 600)
        stop.set()
        chaos_thread.join()
        time.sleep(3)  # late duplicates would show now
        counts = account(sent, reader)
        res.missing, res.duplicates = counts["missing"], counts["duplicates"]
        res.conflicting, res.wrong_decisions = counts["conflicting"], counts["wrong"]
        res.expected_denies = sum(b.deny for b in sent)
        say(f"accounted: {counts}")
        for w in workers:
            w.stop()
        res.live_vs_replay_diffs = _compare_with_replay(bootstrap, topics, policy, workdir, say)
    finally:
        if reader is not None:
            reader.close()
        for w in workers:
            w.stop()
        broker.stop()
    res.seconds = round(time.monotonic() - started, 1)
    return res


def _compare_with_replay(bootstrap: str, topics: Any, policy: Path, workdir: Path, say: Any) -> int:
    """Batches whose live verdict (decision, alert ids, addresses) differs from a replay of the
    events topic, or that only one side has."""
    from confluent_kafka import Consumer, TopicPartition

    from monitor.replay import ReplayRequest, run_replay

    out = workdir / "replay.json"
    run_replay(ReplayRequest(policy=str(policy), out=str(out), bootstrap_servers=bootstrap, topic=topics.events,
                             from_offsets=0, progress=False, workdir=str(workdir)))
    doc = json.loads(out.read_text())
    replayed = {(s["session_id"], b["batch_id"]): _essence(b["decision"], b["violations"])
                for s in doc["sessions"] for b in s["batches"] if not b.get("duplicate")}
    live: dict[tuple[str, str], tuple] = {}
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"chaos-check-{os.getpid()}",
                  "enable.auto.commit": False, "isolation.level": "read_committed", "enable.partition.eof": True})
    parts = list(c.list_topics(topics.verdicts, timeout=30).topics[topics.verdicts].partitions)
    c.assign([TopicPartition(topics.verdicts, p, 0) for p in parts])
    done: set[int] = set()
    deadline = time.monotonic() + 120
    while len(done) < len(parts) and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            done.add(m.partition())
            continue
        v = json.loads(m.value())
        live.setdefault((v["session_id"], v["batch_id"]), _essence(v["decision"], v["violations"]))
    c.close()
    diffs = sum(1 for k in replayed.keys() | live.keys() if replayed.get(k) != live.get(k))
    say(f"live vs replay: {len(live)} live, {len(replayed)} replayed, {diffs} differ")
    return diffs


def _essence(decision: str, violations: list[dict[str, Any]]) -> tuple:
    return decision, tuple(sorted((v["alert_id"], tuple(v["addresses"])) for v in violations))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=100_000)
    ap.add_argument("--sessions", type=int, default=2_000)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--broker-restarts", type=int, default=1)
    ap.add_argument("--rate", type=float, default=1_200.0, help="batches/s offered (default 1,200)")
    ap.add_argument("--guarantee", choices=["both", "at-least-once", "exactly-once"], default="both")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    args = ap.parse_args(argv)
    order = ["exactly-once", "at-least-once"] if args.guarantee == "both" else [args.guarantee]
    results = {}
    for g in order:
        print(f"{g}: {args.batches:,} batches over {args.sessions:,} sessions, {args.kills} kills, "
              f"{args.broker_restarts} broker restart(s)", flush=True)
        results[g] = run_chaos(g, args.batches, args.sessions, args.kills, args.broker_restarts, args.rate,
                               args.seed).as_dict()
        print(json.dumps({k: v for k, v in results[g].items() if k != "events"}), flush=True)
    doc = dict(results.get("exactly-once") or {})
    if "at-least-once" in results:
        doc["at_least_once"] = results["at-least-once"]
    doc["date"] = datetime.date.today().isoformat()
    doc["command"] = "make chaos" if not argv else "bench/chaos.py " + " ".join(argv)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    bad = [g for g, r in results.items() if r["missing"] or r["conflicting"] or r["wrong_decisions"]
           or r["live_vs_replay_diffs"] or r["worker_exits"] or (g == "exactly-once" and r["duplicates"])]
    print(f"wrote {args.out}" + (f"; FAILED: {', '.join(bad)}" if bad else "; all zeros"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
