"""Deciding each replayed batch with the live worker's own code: :class:`ReplayEvaluator`, the
Kafka-free core (:class:`monitor.core.BatchEvaluator`) on an in-memory session store.

Example::

    >>> import asyncio
    >>> from monitor.models import EventBatch
    >>> from monitor.policy import PolicySet, load_policy_text
    >>> from monitor.report import ReplayOptions
    >>> policy = load_policy_text('raise "no" if:\\n    (m: Message)\\n    "no" in m.content\\n', "p")
    >>> ev = ReplayEvaluator(PolicySet.single(policy), ReplayOptions(engine="reference"))
    >>> batch = EventBatch(session_id="s", batch_id="b1", events=[{"role": "user", "content": "no"}])
    >>> out = asyncio.run(ev.evaluate(batch, "t.json#0"))
    >>> out.result.decision, out.joined, [v.message for v in out.result.violations]
    ('deny', False, ['no'])
    >>> ev.close()
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from monitor.config import WorkerSettings
from monitor.core import BatchEvaluator, Outcome, Rejected
from monitor.models import EventBatch, SourceRef, Verdict, Violation
from monitor.policy import PolicySet
from monitor.replay.sources import Item
from monitor.replay.spool import VerdictSpill
from monitor.report import BatchResult, ReplayOptions
from monitor.state import SessionStore


@dataclass(slots=True)
class ReplayedBatch:
    """One batch as replay decided it: its row of the report and what the worker would publish."""

    result: BatchResult
    joined: bool  # the batch joined its session's past
    verdict: Verdict  # as the worker would publish it (a repeat: the stored verdict)
    omitted: tuple[Violation, ...] = ()  # violations past the verdict's cap: alerts only
    alerted: list[Violation] | None = None  # every violation, whole: one alert each


class ReplayEvaluator:
    """The live worker's own evaluator (:class:`monitor.core.BatchEvaluator`) on an in-memory table.

    Everything that decides a verdict - policy selection, repeated batch ids, seq order, the time
    budget, fail-closed, whether a denied batch joins the past - is the worker's code, not a copy.
    """

    def __init__(self, policies: PolicySet, options: ReplayOptions, policy_path: str = "<replay>",
                 spill: str | None = None) -> None:
        self.policies = policies
        self.options = options
        self.settings = WorkerSettings(
            policy_path=policy_path, engine=options.engine, keep_denied=options.keep_denied,
            verdict_memory=options.verdict_memory, max_record_bytes=max(1024, options.max_record_bytes),
            # no budget unless asked: a verdict must not depend on how busy the machine was
            budget_ms=options.budget_ms,
            # invariant-ai on threads: with no budget nothing is to be stopped, and replay runs
            # its shards in processes already
            engine_processes=0,
        )
        self.worker = BatchEvaluator(policies, self.settings)
        self.table: dict[str, Any] = {}
        self.verdicts = VerdictSpill(spill)
        self.store = SessionStore(self.table, verdict_memory=options.verdict_memory, verdicts=self.verdicts)
        self.lengths: dict[tuple[str, str | None], int] = {}

    def engine_names(self) -> str:
        return self.worker.engine_names()

    def decide(self, item: Item) -> Coroutine[Any, Any, ReplayedBatch] | None:
        """What the worker answers to an item (await it): a batch's verdict, or the deny of a
        refused record whose ids it can read; None for bad input it cannot answer."""
        if item.batch is not None:
            return self.evaluate(item.batch, item.where, item.ref)
        if item.rejected is not None and item.rejected.addressable:
            return self.reject(item.rejected, item.where, item.ref, item.remember)
        return None

    async def evaluate(self, batch: EventBatch, source: str, ref: SourceRef | None = None) -> ReplayedBatch:
        return self._replayed(await self.worker.evaluate(self.store, batch, ref), source, batch.seq,
                              len(batch.events))

    async def reject(self, rejected: Rejected, source: str, ref: SourceRef | None = None,
                     remember: bool = True) -> ReplayedBatch:
        """The worker's answer to a record it rejects but can address (session and batch ids
        readable): a deny it remembers, or the verdict that batch id already has; with
        ``remember=False`` (a record not keyed by its session id) a deny it only sends."""
        out = await self.worker.reject(self.store, rejected, ref, remember=remember)
        return self._replayed(out, source, out.verdict.seq if remember and out.verdict else None, 0)

    def _replayed(self, out: Outcome, source: str, seq: int | None, events: int) -> ReplayedBatch:
        verdict, omitted = out.verdict, out.omitted
        assert verdict is not None  # noqa: S101 - the core decides every batch it is given
        alerted = out.alerted() if omitted or out.cut else verdict.violations
        # the trace index of the batch's first event: what this policy's past of the session holds
        # (counted here rather than re-reading the session head: same number, less work)
        key = (verdict.session_id, verdict.policy_id)
        start = self.lengths.get(key, 0)
        if out.joined:
            self.lengths[key] = start + events
        # validating is cheaper than model_construct here (pydantic-core vs a Python loop)
        res = BatchResult(
            batch_id=verdict.batch_id, seq=seq, source=source, events=events, start=start,
            decision=verdict.decision, reason=verdict.reason, duplicate=not out.new, policy_id=verdict.policy_id,
            policy_sha256=verdict.policy_sha256,
            # an audit lists every violation, whole: the verdict's, and those past its cap (or
            # cut to fit its topic) that the worker sends as alerts only
            violations=alerted, evidence=[])
        return ReplayedBatch(res, joined=out.joined, verdict=verdict, omitted=omitted, alerted=alerted)

    def close(self) -> None:
        self.worker.close()
        self.verdicts.close()
