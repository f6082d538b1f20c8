"""Running a replay: shards (processes evaluating disjoint sessions of one input), their progress,
and the report they add up to (:func:`run_replay`).

Each shard reads the whole input and keeps its own sessions (:func:`~monitor.replay.sources.shard_of`),
evaluates them with the worker's own code, and spools every batch's result to SQLite; the report
is then put together from the spools (:mod:`monitor.replay.assemble`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import pickle
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from monitor import sandbox
from monitor.policy import PolicySet, load_policy_set
from monitor.replay.assemble import assemble, check_writable
from monitor.replay.evaluate import ReplayedBatch, ReplayEvaluator
from monitor.replay.publish import Publisher
from monitor.replay.request import ReplayError, ReplayRequest
from monitor.replay.sources import (
    JSONL_SUFFIXES,
    TRACE_SUFFIXES,
    FileSource,
    Item,
    Source,
    discover_files,
    kafka_source,
    open_source,
)
from monitor.replay.spool import ResultStore
from monitor.replay.tally import SessionTally, ShardSummary
from monitor.report import BatchChange, Report, SessionChange, violation_line

# ``report(done, events[, total])``: progress of a shard, in bytes or records read
ProgressReport = Callable[..., None]


@dataclass
class ReplayResult:
    report: Report  # without sessions (they are in the file)
    out: str
    html: str | None
    seconds: float
    changed_sessions: list[SessionChange] = field(default_factory=list)
    shards: int = 1
    peak_rss_mib: float = 0.0  # this process plus every shard process (an upper bound: pages are shared)

    @property
    def events_per_s(self) -> float:
        return self.report.totals.events / self.seconds if self.seconds > 0 else 0.0


def run_replay(req: ReplayRequest) -> ReplayResult:
    """Replay ``req`` and write its JSON (and HTML) report; see :mod:`monitor.replay`."""
    os.environ.setdefault("LOCAL_POLICY", "1")
    with tempfile.TemporaryDirectory(prefix="agent-monitor-replay-", dir=req.workdir) as workdir:
        return _replay(req, workdir)


def _replay(req: ReplayRequest, workdir: str) -> ReplayResult:
    t0 = time.monotonic()
    if not req.topic and not req.inputs:
        raise ReplayError("nothing to replay: give trace files or folders, or --topic/--prefix")
    if not req.topic and not discover_files(req.inputs):
        raise ReplayError(f"no trace files ({', '.join(TRACE_SUFFIXES + JSONL_SUFFIXES)}) in "
                          + ", ".join(req.inputs))
    sandbox.set_allowed_imports(req.allow_imports)
    policies = load_policy_set(req.policy)  # refuse a bad policy before any work starts
    other = load_policy_set(req.compare) if req.compare else None
    for target in (req.out, req.html):  # and an unwritable report path before the work, not after
        if target:
            check_writable(target)
    summaries = _run_shards(req, _auto_shards(req), workdir, policies, other)
    head, changes = assemble(req, summaries, policies, other)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return ReplayResult(report=head, out=req.out, html=req.html or None, seconds=time.monotonic() - t0,
                        changed_sessions=changes, shards=len(summaries),
                        peak_rss_mib=own + sum(s.peak_rss_mib for s in summaries))


# ---------------------------------------------------------------------------- one shard


async def evaluate_shard(req: ReplayRequest, shard: int, shards: int, db_dir: str,
                         report: ProgressReport | None = None, policies: PolicySet | None = None,
                         other: PolicySet | None = None) -> ShardSummary:
    """Read the input, evaluate the sessions of this shard, spool per-batch results to SQLite.

    ``report(done, events[, total])`` is called now and then with progress (bytes or records read).
    """
    options = req.options()
    sandbox.set_allowed_imports(req.allow_imports)  # (a shard may be a process of its own)
    policies = policies or load_policy_set(req.policy)
    if req.compare and other is None:
        other = load_policy_set(req.compare)
    source = open_source(req, (shard, shards))
    if report is not None:
        report(0, 0, source.total)  # a topic's records to read are known once its range is planned
    main = ReplayEvaluator(policies, options, req.policy, os.path.join(db_dir, f"verdicts-{shard}.sqlite"))
    alt = ReplayEvaluator(other, options, req.compare or "", os.path.join(db_dir, f"verdicts-{shard}-b.sqlite")) \
        if other else None
    publisher = None
    if req.publish_prefix:
        bootstrap = req.publish_bootstrap or req.bootstrap_servers
        if not bootstrap:
            raise ReplayError("--publish needs --bootstrap-servers")
        publisher = Publisher(bootstrap, req.publish_prefix)
    store = ResultStore(db_dir, f"shard-{shard}")
    summary = ShardSummary(db=store.path)
    try:
        await _evaluate_items(source, main, alt, publisher, store, summary, report)
    finally:
        main.close()
        if alt:
            alt.close()
    if publisher is not None:
        publisher.close()
    store.finish()
    store.close()
    summary.inputs = source.describe()
    summary.engine = main.engine_names()
    return summary


async def _evaluate_items(source: Source, main: ReplayEvaluator, alt: ReplayEvaluator | None,
                          publisher: Publisher | None, store: ResultStore, summary: ShardSummary,
                          report: ProgressReport | None) -> None:
    """Every item of ``source``: decided, tallied, spooled (and compared and published)."""
    sessions, bad, decisions = summary.sessions, summary.bad, summary.decisions
    last = 0.0
    # plain ints in the loop: a pydantic model's attribute write costs a Python call per batch
    records = batches = events = duplicates = 0
    try:
        for item in source:
            records += 1
            if item.bad is not None:
                bad.append(item.bad)
            decision = main.decide(item)
            if decision is None:  # bad input the worker could not even deny
                continue
            out = await decision
            res = out.result
            sid = out.verdict.session_id
            agg = sessions.get(sid)
            if agg is None:
                agg = sessions[sid] = SessionTally()
            raw = b"" if item.batch is None else (
                item.raw if item.raw is not None else json.dumps(item.batch.trace()).encode())
            store.add(sid, agg.ord, out.joined, res, raw)
            batches += 1
            events += res.events
            agg.events += res.events
            decisions[res.decision] += 1
            if res.duplicate:
                duplicates += 1
            if res.decision == "deny":
                agg.denied += 1
            if not res.duplicate and res.violations:
                agg.violations += len(res.violations)
                summary.count_rules(sid, res)
            if alt is not None:
                await _compare(alt, item, out, agg, store, summary)
            if publisher is not None:
                publisher.send(out.verdict, out.alerted)
            agg.ord += 1
            if report is not None and batches % 256 == 0:
                now = time.monotonic()
                if now - last > 0.1:
                    last = now
                    report(source.done, events)
        if report is not None:
            report(source.done, events)
    finally:
        counts = summary.counts
        counts.records, counts.batches, counts.events, counts.duplicates = records, batches, events, duplicates


async def _compare(alt: ReplayEvaluator, item: Item, out: ReplayedBatch, agg: SessionTally, store: ResultStore,
                   summary: ShardSummary) -> None:
    """The compared policy's decision on the same item; one that differs is spooled as a change."""
    decision = alt.decide(item)
    assert decision is not None  # noqa: S101 - the main policy decided it: so does this one
    o, res = (await decision).result, out.result
    summary.other_decisions[o.decision] += 1
    if o.decision == "deny":
        agg.other_denied += 1
    if o.decision != res.decision:
        summary.batches_changed += 1
        store.add_change(out.verdict.session_id, agg.ord, BatchChange(
            batch_id=res.batch_id, source=item.where, decision=res.decision,
            other_decision=o.decision, violations=[violation_line(v) for v in res.violations],
            other_violations=[violation_line(v) for v in o.violations],
            reason=res.reason, other_reason=o.reason))


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Less cyclic garbage collection while a shard evaluates.

    Evaluation allocates many short-lived objects (pydantic models, dicts), so the collector runs
    often, and every full pass walks the policy, the imports and all open sessions. Freezing what
    exists (nothing of it is garbage) and collecting the young generation less often keeps the
    same memory bound: cycles are still collected, just in bigger steps.
    """
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


# ---------------------------------------------------------------------------- shards


def _auto_shards(req: ReplayRequest) -> int:
    if req.shards:
        return max(1, req.shards)
    if req.topic:
        return 1
    # below ~16 MiB the start of a second process costs more than it saves
    size = sum(f.stat().st_size for f in discover_files(req.inputs) if f.is_file())
    return 1 if size < 16 * 2**20 else max(1, min(4, os.cpu_count() or 1))


def _shard_child(req: ReplayRequest, shard: int, shards: int, db_dir: str, progress: Any,
                 policies: PolicySet, other: PolicySet | None) -> None:
    """Entry of a shard process (forked): the summary (or the error) goes to a pickle file."""
    path = os.path.join(db_dir, f"shard-{shard}.pickle")

    def report(done: int, events: int, total: int | None = None) -> None:
        progress[2 * shard], progress[2 * shard + 1] = done, events

    try:
        with fewer_collections():
            summary: Any = asyncio.run(evaluate_shard(req, shard, shards, db_dir, report, policies, other))
        summary.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except BaseException as exc:  # noqa: BLE001 - the parent re-raises it with its message
        summary = ReplayError(f"shard {shard}: {type(exc).__name__}: {exc}")
    with open(path, "wb") as fh:
        pickle.dump(summary, fh)


def _run_shards(req: ReplayRequest, shards: int, workdir: str, policies: PolicySet,
                other: PolicySet | None) -> list[ShardSummary]:
    unit = "records" if req.topic else "bytes"
    if shards == 1:
        progress = Progress(req.progress, 0 if req.topic else FileSource(req.inputs).total, unit)
        try:
            with fewer_collections():
                return [asyncio.run(evaluate_shard(req, 0, 1, workdir,
                                                   lambda d, e, t=None: progress.update(d, e, True, t),
                                                   policies, other))]
        finally:
            progress.close()
    sub, total = _shard_request(req)
    ctx = mp.get_context("fork")  # the parsed policy and imports are shared, nothing is re-imported
    shared = ctx.Array("q", 2 * shards, lock=False)
    procs = []
    for k in range(shards):
        p = ctx.Process(target=_shard_child, args=(sub, k, shards, workdir, shared, policies, other), daemon=True)
        p.start()
        procs.append(p)
    progress = Progress(req.progress, total * shards, unit)
    try:
        while any(p.is_alive() for p in procs):
            progress.update(sum(shared[0::2]), sum(shared[1::2]), force=True)
            time.sleep(0.2)
        progress.update(sum(shared[0::2]), sum(shared[1::2]), force=True)
    finally:
        progress.close()
        for p in procs:
            p.join()
    return [_shard_result(workdir, k, p.exitcode) for k, p in enumerate(procs)]


def _shard_request(req: ReplayRequest) -> tuple[ReplayRequest, int]:
    """The request every shard runs, and what each one reads (bytes or records).

    A topic is planned once here: every shard reads the same ranges whole and keeps its sessions
    (by partition would split a session whose records came under other keys).
    """
    if not req.topic:
        return req, FileSource(req.inputs).total
    plan = kafka_source(req)
    plan.consumer.close()
    ranges = list(plan.ranges)
    sub = replace(req, partitions=[r.partition for r in ranges], from_offsets={r.partition: r.start for r in ranges},
                  to_offsets={r.partition: r.end for r in ranges}, from_time=None, to_time=None)
    return sub, sum(r.end - r.start for r in ranges)


def _shard_result(workdir: str, shard: int, exitcode: int | None) -> ShardSummary:
    path = os.path.join(workdir, f"shard-{shard}.pickle")
    if not os.path.exists(path):
        raise ReplayError(f"shard {shard} died (exit code {exitcode}) without a result")
    with open(path, "rb") as fh:
        summary = pickle.load(fh)  # noqa: S301 - written by our own child process just now
    if isinstance(summary, BaseException):
        raise summary
    return summary


# ---------------------------------------------------------------------------- progress


class Progress:
    """A rich progress bar with events/s; silent when disabled."""

    def __init__(self, enabled: bool, total: int, unit: str) -> None:
        self.enabled = enabled
        self.last = 0.0
        self.t0 = time.monotonic()
        if enabled:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("[bold]replay"), BarColumn(), TextColumn("{task.percentage:>3.0f}% of " + unit),
                TextColumn("{task.fields[events]:,} events · {task.fields[rate]:,.0f} events/s"),
                TimeElapsedColumn(), transient=False,
            )
            self.task = self.bar.add_task("replay", total=total or None, events=0, rate=0.0)
            self.bar.start()

    def update(self, done: int, events: int, force: bool = False, total: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if force or now - self.last > 0.2:
            self.last = now
            rate = events / (now - self.t0) if now > self.t0 else 0.0
            # a total of 0 (not known yet) leaves the bar's total as it is
            self.bar.update(self.task, total=total or None, completed=done, events=events, rate=rate)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
