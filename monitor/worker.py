"""The monitor worker: a faust-streaming app, partitioned by session.

It consumes ``<prefix>.events``; for each record it

1. rejects what is not a valid :class:`~monitor.models.EventBatch` to ``<prefix>.deadletter`` with a
   reason (and, when its session and batch ids can be read, still gives the agent a ``deny``);
2. repeats the earlier verdict of a redelivered ``batch_id``;
3. runs the session's policy on (past, pending) within a time budget, failing closed;
4. publishes exactly one :class:`~monitor.models.Verdict` and one :class:`~monitor.models.Alert` per
   violation, and commits the session state (an allowed batch joins the past).

One agent with concurrency 1 keeps per-session order (faust #606: higher concurrency can commit
past a record still in flight). Offsets are committed only after the producer flushed the
verdicts and state writes (faust flushes before it commits), so a crash redelivers, never loses.

Run it with ``agent-monitor run --policy FILE|DIR`` or::

    from monitor.config import WorkerSettings
    from monitor.worker import run_worker
    run_worker(WorkerSettings(policy_path="examples/policies"))   # blocks until SIGTERM
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any, NamedTuple

from pydantic import ValidationError
from pydantic_core import from_json

from monitor.config import WorkerSettings
from monitor.engine import Engine, EngineError, make_engine
from monitor.engine.reference import LoopPool
from monitor.models import (
    Alert,
    DeadLetter,
    EventBatch,
    SourceRef,
    Verdict,
    Violation,
)
from monitor.policy import LoadedPolicy, PolicySet, load_policy_set
from monitor.state import HEAD_PREFIX, SessionHead, SessionStore, StateCorrupted

log = logging.getLogger("agent_monitor.worker")

READY_LINE = "agent-monitor worker ready"
BUDGET_REASON = "the policy check exceeded its time budget"
FAILURE_PREFIXES = (BUDGET_REASON, "the policy raised an error", "the policy check failed")


class Rejected(Exception):
    """A record that is not a valid EventBatch; carries what the dead letter needs."""

    def __init__(self, kind: str, reason: str, session_id: str | None = None,
                 batch_id: str | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.session_id = session_id
        self.batch_id = batch_id


def _short_validation(exc: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


TOO_DEEP = "it is nested too deeply"
LONE_SURROGATE = ("the record holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair): "
                  "not Unicode text, so no verdict or report could quote it")


def is_unicode(value: Any) -> bool:
    r"""False when a JSON value holds a lone surrogate (``json.loads`` lets ``"\ud83d"`` through).

    >>> is_unicode({"a": ["\U0001f600"]}), is_unicode(json.loads(r'{"a": "\ud83d"}'))
    (True, False)
    """
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_batch(key: bytes | None, value: bytes | None, max_bytes: int, *,
                 keyed: bool = True) -> EventBatch:
    """Parse a record into an EventBatch or raise :class:`Rejected` with a reason a person can act on.

    ``keyed=False`` is for records that never had a Kafka key (lines of a replayed file): no key
    is then required, and the session id is the record's own.
    """
    key_text = key.decode("utf-8", "replace") if key else None
    if keyed and not key_text:
        raise Rejected("invalid", "the record has no key: the key must be the session_id, so that a "
                       "session stays on one partition")
    if value is None:
        raise Rejected("invalid", "the record has no value (a tombstone?)", key_text)
    unicode_ok = True
    try:
        # pydantic-core's parser: over twice as fast as json's on agent records, and equal on
        # every text it accepts (numbers included)
        data = from_json(value, cache_strings=False)
    except ValueError:
        try:  # json decides the rest (it also takes a BOM and UTF-16) and words the error
            data = json.loads(value)
            unicode_ok = is_unicode(data)  # it also takes lone surrogates, which no JSON out can carry
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            data = exc
        except RecursionError:
            data = ValueError(TOO_DEEP)
    sid = data.get("session_id") if isinstance(data, dict) else None
    bid = data.get("batch_id") if isinstance(data, dict) else None
    # (ids from_json read are Unicode already: only json's may hold a lone surrogate)
    sid = sid if isinstance(sid, str) and sid and (unicode_ok or is_unicode(sid)) else key_text
    bid = bid if isinstance(bid, str) and bid and (unicode_ok or is_unicode(bid)) else None
    if len(value) > max_bytes:
        # still read its ids (Kafka bounded its size) so the waiting agent gets a deny
        raise Rejected("too_large", f"the record is {len(value)} bytes, over the limit of {max_bytes}",
                       sid, bid)
    if isinstance(data, Exception):
        raise Rejected("not_json", f"the record value is not JSON: {data}", key_text)
    if not isinstance(data, dict):
        raise Rejected("invalid", f"an EventBatch is a JSON object, not {type(data).__name__}", sid, bid)
    if not unicode_ok:
        raise Rejected("invalid", LONE_SURROGATE, sid, bid)
    try:
        batch = EventBatch.model_validate(data)
    except ValidationError as exc:
        raise Rejected("invalid", f"not a valid EventBatch: {_short_validation(exc)}", sid, bid) from None
    if keyed and key_text != batch.session_id:
        raise Rejected("invalid", f"the record key {key_text!r} is not its session_id "
                       f"{batch.session_id!r}: a session must stay on one partition", sid, bid)
    return batch


_SAME: Any = object()


def _remember(store: SessionStore, head: SessionHead, verdict: Verdict, seq: int | None = _SAME,
              **state: Any) -> Verdict:
    """Commit ``verdict`` (and, in ``state``, the session state it brings) for its batch."""
    store.commit(verdict.session_id, head, verdict.batch_id, verdict.model_dump(mode="json"),
                 seq=verdict.seq if seq is _SAME else seq, **state)
    return verdict


class Evaluated(NamedTuple):
    """What :meth:`Evaluator.evaluate` decided for one batch."""

    verdict: Verdict
    new: bool  # False: a repeat of a batch id that has its verdict already
    # violations past the verdict's cap (``max_verdict_violations``): not on the wire, but each
    # still gets its alert
    omitted: tuple[Violation, ...] = ()


class Evaluator:
    """The engine side of the worker, free of Kafka: also what tests and replay can drive."""

    def __init__(self, policies: PolicySet, settings: WorkerSettings) -> None:
        self.policies = policies
        self.settings = settings
        # the reference engine's window, and the incremental engine's for rules it cannot compile
        self.engines: dict[str, Engine] = {
            p.policy_id: make_engine(p, settings.engine, max_history=settings.reference_max_history)
            for p in policies.all()
        }
        # a budget is only kept if the check runs off this loop: the incremental engine's work is
        # plain Python that never yields (the reference engine has threads of its own)
        self._threads = (LoopPool("policy-check") if settings.budget_ms is not None
                         and settings.engine != "reference" else None)

    async def reject(self, store: SessionStore, rejected: "Rejected",
                     source: SourceRef | None) -> Evaluated:
        """A deny for a record that is not a valid batch, remembered like any verdict so that a
        redelivery repeats it (and a batch id that already has a verdict keeps it)."""
        sid, bid = rejected.session_id, rejected.batch_id
        assert sid and bid
        head = store.head(sid)
        known = store.known_verdict(head, sid, bid)
        if known is not None:
            return Evaluated(Verdict.model_validate(known), False)
        verdict = Verdict(session_id=sid, batch_id=bid, decision="deny", source=source,
                          reason=f"rejected record ({rejected.kind}): {rejected.reason}")
        return Evaluated(_remember(store, head, verdict, seq=None), True)

    async def evaluate(self, store: SessionStore, batch: EventBatch,
                       source: SourceRef | None) -> Evaluated:
        """The verdict for a batch, and whether it was new (False: a repeat of a known batch)."""
        head = store.head(batch.session_id)
        known = store.known_verdict(head, batch.session_id, batch.batch_id)
        if known is not None:
            return Evaluated(Verdict.model_validate(known), False)
        started = time.perf_counter()
        verdict_fields: dict[str, Any] = {"session_id": batch.session_id, "batch_id": batch.batch_id,
                                          "seq": batch.seq, "source": source}
        try:
            policy: LoadedPolicy = self.policies.resolve(batch.policy)
        except KeyError as exc:
            verdict = Verdict(decision="deny", reason=str(exc.args[0]), policy_id=batch.policy,
                              **verdict_fields)
            return Evaluated(_remember(store, head, verdict), True)
        engine = self.engines[policy.policy_id]
        verdict_fields.update(policy_id=policy.policy_id, policy_sha256=policy.sha256, engine=engine.name)

        if batch.seq is not None and head.last_seq is not None and batch.seq <= head.last_seq:
            verdict = Verdict(decision="deny", reason=(
                f"out of order: seq {batch.seq} arrived after seq {head.last_seq} of this session"),
                **verdict_fields)
            # a stale seq does not move the session's last seq
            return Evaluated(_remember(store, head, verdict, seq=None), True)

        result = None
        reason = None
        try:
            state = store.engine_state(head, policy.policy_id, engine.name, batch.session_id)
            check = engine.check(state, batch.trace())
            budget = self.settings.budget_ms
            if budget is None:  # replay: no wait_for task per batch, and no thread hop
                result = await check
            else:
                result = await asyncio.wait_for(self._threads.run(check) if self._threads else check,
                                                budget / 1000.0)
        except StateCorrupted as exc:
            log.error("%s", exc)
            reason = f"the session's stored state is damaged: {exc}"
        except asyncio.TimeoutError:
            reason = f"{BUDGET_REASON} of {self.settings.budget_ms:g} ms"
        except EngineError as exc:
            reason = f"the policy raised an error: {exc}"
        except Exception as exc:  # noqa: BLE001 - any failure of a check fails closed
            log.exception("policy check failed")
            reason = f"the policy check failed: {type(exc).__name__}: {exc}"
        eval_ms = (time.perf_counter() - started) * 1000.0

        if result is None:
            decision = "deny" if self.settings.fail_closed else "allow"
            verdict = Verdict(decision=decision, reason=reason, eval_ms=eval_ms, **verdict_fields)
            return Evaluated(_remember(store, head, verdict), True)

        violations = [Violation.from_match(m, batch.session_id, policy.sha256) for m in result.matches]
        decision = "deny" if violations else "allow"
        cap = self.settings.max_verdict_violations
        verdict = Verdict(decision=decision, violations=violations[:cap], eval_ms=eval_ms,
                          violations_omitted=max(0, len(violations) - cap), **verdict_fields)
        joins = decision == "allow" or self.settings.keep_denied
        _remember(
            store, head, verdict,
            policy_id=policy.policy_id if joins else None,
            new_state=result.advance(state) if joins else None,
            appended=result.appended if joins else None,
        )
        return Evaluated(verdict, True, tuple(violations[cap:]))

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        if self._threads:
            self._threads.close()


def build_app(settings: WorkerSettings, policies: PolicySet):
    """The faust app, its agent and table. Returned so tests can inspect it."""
    import faust

    topics = settings.topics
    n = settings.partitions
    datadir = settings.data_dir or os.path.join(
        os.path.expanduser("~/.cache/agent-monitor/worker"),
        f"{settings.group}-{settings.worker_id or os.getpid()}")
    os.makedirs(datadir, exist_ok=True)
    app = faust.App(
        settings.group,
        broker=[f"kafka://{b.strip()}" for b in settings.bootstrap_servers.split(",")],
        store=settings.store,
        datadir=datadir,
        topic_partitions=n,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=100,
        broker_commit_interval=0.5,
        table_standby_replicas=0,
        web_enabled=False,
        producer_acks=-1,
        # a dead letter carries its record base64-encoded: 4/3 of the record plus the envelope
        producer_max_request_size=max(settings.max_record_bytes * 3 // 2 + 65536, 2 * 1_048_576),
        consumer_max_fetch_size=max(settings.max_record_bytes + 65536, 4 * 1024 * 1024),
        # a revoked partition's batch in flight finishes before the new owner starts on it
        stream_wait_empty=True,
        broker_session_timeout=15,
        broker_heartbeat_interval=3,
        broker_rebalance_timeout=30,
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    events = app.topic(topics.events, partitions=n, **raw)
    verdicts = app.topic(topics.verdicts, **raw)
    alerts = app.topic(topics.alerts, **raw)
    deadletter = app.topic(topics.deadletter, **raw)
    schema = faust.Schema(key_type=str, value_type=None, key_serializer="json", value_serializer="json")
    changelog = app.topic(topics.state, schema=schema, partitions=n, compacting=True, deleting=False,
                          internal=True, acks=False, maxsize=131_072, allow_empty=True)
    table = app.Table("sessions", default=None, partitions=n, changelog_topic=changelog, schema=schema)

    evaluator = Evaluator(policies, settings)
    store = SessionStore(table, verdict_memory=settings.verdict_memory)
    metrics = _metrics(settings)

    if metrics:
        metrics.attach_faust(app, topics.events)
        for p in policies.all():
            metrics.set_policy(p.policy_id, p.sha256)

    async def publish(verdict: Verdict, omitted: tuple[Violation, ...] = ()) -> None:
        key = verdict.session_id.encode()
        await verdicts.send(key=key, value=verdict.model_dump_json().encode())
        for v in [*verdict.violations, *omitted]:
            alert = Alert.from_violation(v, verdict)
            await alerts.send(key=key, value=alert.model_dump_json().encode())
            if metrics:
                metrics.alert_published(alert)

    async def dead_letter(msg, source: SourceRef, rej: Rejected) -> None:
        key_text = msg.key.decode("utf-8", "replace") if msg.key else None
        dl = DeadLetter(kind=rej.kind, reason=rej.reason, source=source, key=key_text,
                        value_b64=DeadLetter.encode(msg.value), size=len(msg.value or b""),
                        session_id=rej.session_id, batch_id=rej.batch_id)
        await deadletter.send(key=msg.key, value=dl.model_dump_json().encode())
        if metrics:
            metrics.dead_letter(rej.kind)
        if rej.session_id and rej.batch_id:
            if key_text == rej.session_id:  # its state lives on this partition: remember the deny
                verdict = (await evaluator.reject(store, rej, source)).verdict
            else:
                verdict = Verdict(session_id=rej.session_id, batch_id=rej.batch_id, decision="deny",
                                  reason=f"rejected record ({rej.kind}): {rej.reason}", source=source)
            await publish(verdict)

    gaps = GapGuard(settings.bootstrap_servers, topics.events, settings.group)

    @app.agent(events, concurrency=1)
    async def process(stream):
        async for event in stream.events():
            msg = event.message
            # faust can hand over a partition's records with a hole after a restart or rebalance
            # (its recovery clears queues while the fetcher runs on; faust #596/#606) and then
            # commits past it: read what the hole held and process it first, in order
            for missed in await gaps.missing(msg.partition, msg.offset):
                await guarded(missed)
            await guarded(msg)

    async def guarded(msg) -> None:
        source = SourceRef(topic=msg.topic, partition=msg.partition, offset=msg.offset)
        try:
            await handle(msg, source)
        except Exception as exc:  # noqa: BLE001 - an agent that raises would skip the record silently
            log.exception("processing %s failed", source)
            try:
                await dead_letter(msg, source, Rejected(
                    "internal", f"the worker failed on this record: {type(exc).__name__}: {exc}",
                    msg.key.decode("utf-8", "replace") if msg.key else None, _batch_id_of(msg.value)))
            except Exception:  # noqa: BLE001 - nothing more can be done for this record
                log.exception("could not dead-letter %s", source)

    async def handle(msg, source: SourceRef) -> None:
        try:
            batch = decode_batch(msg.key, msg.value, settings.max_record_bytes)
        except Rejected as rej:
            await dead_letter(msg, source, rej)
            return
        if metrics:
            metrics.batch_consumed(len(batch.events))
        verdict, new, omitted = await evaluator.evaluate(store, batch, source)
        await publish(verdict, omitted)
        if metrics:
            if not new:
                metrics.duplicate_batch()
            else:
                metrics.observe_verdict(verdict, verdict.eval_ms / 1000.0, engine=verdict.engine)
                if verdict.reason and verdict.reason.startswith(FAILURE_PREFIXES):
                    metrics.policy_failure("timeout" if "time budget" in verdict.reason else "error")

    if metrics:
        @app.timer(10.0)
        async def _count_sessions() -> None:
            metrics.set_sessions(sum(1 for k in list(table.keys()) if k.startswith(HEAD_PREFIX)))

    @app.on_partitions_revoked.connect
    async def _revoked(sender, revoked, **kwargs) -> None:  # noqa: ARG001 - faust signal signature
        gaps.forget(tp.partition for tp in revoked if tp.topic == topics.events)

    @app.on_rebalance_complete.connect
    async def _ready(sender, **kwargs) -> None:  # noqa: ARG001 - faust signal signature
        assigned = app.assignor.assigned_actives()
        mine = sorted(tp.partition for tp in assigned if tp.topic == topics.events)
        # recovery of table state finishes after the rebalance; announce once it is done
        asyncio.ensure_future(_announce(mine))

    async def _announce(mine: list[int]) -> None:
        try:
            await asyncio.wait_for(app.tables.recovery.completed.wait(), timeout=300)
        except asyncio.TimeoutError:
            log.error("table recovery did not complete within 300 s")
            return
        sys.__stdout__.write(f"{READY_LINE} worker={settings.worker_id or os.getpid()} partitions={len(mine)} "
              f"assigned={','.join(map(str, mine))}\n")
        sys.__stdout__.flush()

    app.monitor_evaluator = evaluator  # type: ignore[attr-defined]
    return app


class _Record:
    """A record read around faust, shaped like the faust messages the agent handles."""

    def __init__(self, m) -> None:
        self.topic, self.partition, self.offset = m.topic(), m.partition(), m.offset()
        self.key, self.value = m.key(), m.value()


class GapGuard:
    """Notices when faust skips offsets of an events partition and reads the skipped records.

    The expected next offset of a partition starts at the group's committed offset (what a new
    owner must resume from) and then follows the records processed. Offsets a transaction marker
    holds are simply not returned by the read, so they are no false alarm.
    """

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self.bootstrap, self.topic, self.group = bootstrap, topic, group
        self.next: dict[int, int] = {}

    def forget(self, partitions) -> None:
        for p in partitions:
            self.next.pop(p, None)

    async def missing(self, partition: int, offset: int) -> list[_Record]:
        expected = self.next.get(partition)
        if expected is None:
            expected = await asyncio.to_thread(self._committed, partition)
        self.next[partition] = max(offset + 1, self.next.get(partition, 0))
        if expected is None or offset <= expected:
            return []
        log.warning("events partition %d: offsets %d..%d were skipped by the consumer; reading them",
                    partition, expected, offset - 1)
        return await asyncio.to_thread(self._read, partition, expected, offset)

    def _consumer(self, group: str):
        from confluent_kafka import Consumer

        return Consumer({"bootstrap.servers": self.bootstrap, "group.id": group,
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "auto.offset.reset": "earliest"})

    def _committed(self, partition: int) -> int | None:
        from confluent_kafka import TopicPartition

        c = self._consumer(self.group)
        try:
            (tp,) = c.committed([TopicPartition(self.topic, partition)], timeout=10)
            return tp.offset if tp.offset >= 0 else None
        except Exception:  # noqa: BLE001 - without it the guard only follows what it sees
            log.warning("could not read the committed offset of partition %d", partition)
            return None
        finally:
            c.close()

    def _read(self, partition: int, start: int, end: int) -> list[_Record]:
        from confluent_kafka import TopicPartition

        c = self._consumer(f"{self.group}-gap-reader")
        out: list[_Record] = []
        try:
            c.assign([TopicPartition(self.topic, partition, start)])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                m = c.poll(0.5)
                if m is None:
                    continue
                if m.error():
                    continue
                if m.offset() >= end:
                    break
                out.append(_Record(m))
                if m.offset() == end - 1:
                    break
        finally:
            c.close()
        return out


def _batch_id_of(value: bytes | None) -> str | None:
    try:
        bid = json.loads(value or b"").get("batch_id")
    except (ValueError, AttributeError):
        return None
    return bid if isinstance(bid, str) and bid else None


def _metrics(settings: WorkerSettings):
    if settings.metrics_port is None:
        return None
    from monitor.metrics import WorkerMetrics, serve_metrics

    metrics = WorkerMetrics(engine=settings.engine)
    serve_metrics(metrics.registry, settings.metrics_port)
    return metrics


def run_worker(settings: WorkerSettings) -> None:
    """Load the policy (refusing a bad one), build the app and run it until SIGTERM/SIGINT."""
    import faust

    policies = load_policy_set(settings.policy_path)
    if settings.create_topics:
        from monitor.topics import create_topics

        # idempotent: a worker started before `topics create` still gets 12-partition topics
        create_topics(settings.bootstrap_servers, settings.topic_prefix,
                      partitions_override=settings.partitions)
    app = build_app(settings, policies)
    level = settings.log_level.upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = faust.Worker(app, loglevel=level, quiet=True, redirect_stdouts=False)
    worker.spinner = None  # its terminal escapes would garble the ready line on stdout
    try:
        worker.execute_from_commandline()
    finally:
        app.monitor_evaluator.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m monitor.worker SETTINGS_JSON``: run a worker from serialised settings."""
    from monitor.policy import PolicyLoadError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m monitor.worker '<WorkerSettings as JSON>' "
              "(people use: agent-monitor run --policy FILE|DIR)", file=sys.stderr)
        return 2
    try:
        settings = WorkerSettings.model_validate_json(args[0])
    except ValidationError as exc:
        print(f"invalid worker settings: {_short_validation(exc)}", file=sys.stderr)
        return 2
    try:
        run_worker(settings)
    except PolicyLoadError as exc:
        print(f"agent-monitor: refusing to start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
