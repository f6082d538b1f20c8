"""The monitor worker: the Kafka-free core (:mod:`monitor.core`) on the stream runtime
(:mod:`monitor.runtime`), partitioned by session.

For each record of ``<prefix>.events`` the core decides; this module publishes what it decided:
the verdict on ``<prefix>.verdicts``, one alert per violation on ``<prefix>.alerts``, a refused
record on ``<prefix>.deadletter``. Session state lives in the runtime's changelog table
(``<prefix>.monitor-state-changelog``) and is removed when a session ends (an ``end_session``
batch) or has been idle for ``session_ttl_s``.

Run it with ``agent-monitor run --policy FILE|DIR`` or::

    from monitor.config import WorkerSettings
    from monitor.worker import run_worker
    run_worker(WorkerSettings(policy_path="examples/policies"))   # blocks until SIGTERM
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json

from monitor import __version__, sandbox, signing
from monitor.changelog import ChangelogTable, Send
from monitor.config import WorkerSettings
from monitor.core import BatchEvaluator, Outcome, Rejected, dead_letter_for, failure_kind, short_validation
from monitor.limits import alert_records, fit_dead_letter, fit_shadow
from monitor.metrics import FILE_POLICY_VERSION, WorkerMetrics
from monitor.models import SourceRef
from monitor.policy import PolicySet, load_policy_set
from monitor.registry import RegistryFollower
from monitor.runtime import Runtime, RuntimeConfig, Sink, print_ready
from monitor.state import HEAD_PREFIX, SessionStore, StateTooLarge

log = logging.getLogger("agent_monitor.worker")

READY_LINE = "agent-monitor worker ready"


class SessionClock:
    """When each session of each partition was last written, oldest first: expiry pops from the
    front, so finding the idle sessions costs nothing while none are."""

    def __init__(self) -> None:
        self.parts: dict[int, dict[str, float]] = {}

    def load(self, partition: int, table: ChangelogTable) -> None:
        """Rebuild a restored partition's clock from its session heads."""
        heads = [(from_json(rec).get("updated_at", 0.0), key[len(HEAD_PREFIX):])
                 for key, rec in table.parts[partition].items() if key.startswith(HEAD_PREFIX)]
        self.parts[partition] = {sid: t for t, sid in sorted(heads)}

    def touch(self, partition: int, session_id: str, now: float) -> None:
        clock = self.parts.setdefault(partition, {})
        clock.pop(session_id, None)  # re-inserted last: dicts keep insertion order
        clock[session_id] = now

    def forget(self, partition: int, session_id: str | None = None) -> None:
        if session_id is None:
            self.parts.pop(partition, None)
        else:
            self.parts.get(partition, {}).pop(session_id, None)

    def idle(self, partition: int, before: float) -> list[str]:
        """Sessions of ``partition`` last written before ``before`` (oldest first)."""
        out = []
        for sid, t in self.parts.get(partition, {}).items():
            if t >= before:
                break
            out.append(sid)
        return out

    def count(self) -> int:
        return sum(len(c) for c in self.parts.values())


def state_record_guard(send: Send, limit: int) -> Send:
    """``send`` (a changelog table's) refusing a record over ``limit`` bytes before the broker
    would: :class:`StateTooLarge` then reaches the core, which denies the batch (the changelog
    refusing it would stop the worker, and the record would stop it again after a restart).

    >>> sent = []
    >>> send = state_record_guard(lambda k, p, v: sent.append(k), 10)
    >>> send("a", 0, b"12345"); send("b", 0, None)
    >>> send("c", 0, b"x" * 11)
    Traceback (most recent call last):
    ...
    monitor.state.StateTooLarge: a state record of 11 bytes, over the limit of 10 (--max-state-record-bytes)
    >>> sent
    ['a', 'b']
    """

    def guarded(key: str, partition: int, value: bytes | None) -> None:
        if value is not None and len(value) > limit:
            raise StateTooLarge(f"a state record of {len(value)} bytes, over the limit of {limit} "
                                "(--max-state-record-bytes)")
        send(key, partition, value)

    return guarded


class MonitorProcessor:
    """Publishes the core's outcomes; expires idle sessions; with a policy registry, swaps in the
    versions its follower hands over at batch boundaries."""

    def __init__(self, policies: PolicySet, settings: WorkerSettings,
                 metrics: WorkerMetrics | None = None, follower: RegistryFollower | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.core = BatchEvaluator(policies, settings)
        self.metrics = metrics
        self.follower = follower
        self.clock = SessionClock()
        self.table: ChangelogTable | None = None
        self.store: SessionStore | None = None
        self.runtime: Runtime | None = None

    def attach(self, table: ChangelogTable | None, runtime: Runtime) -> None:
        assert table is not None, "the monitor keeps session state: the runtime needs a changelog"  # noqa: S101 - the message says why
        self.table = table
        self.runtime = runtime
        self.store = SessionStore(table, verdict_memory=self.settings.verdict_memory)
        if self.metrics:
            self.metrics.attach_runtime(runtime)
        table.send = state_record_guard(table.send, self.settings.max_state_record_bytes)

    async def process(self, records: list[Any], sink: Sink) -> None:
        if self.follower is not None:
            self.apply_updates()  # a batch boundary: every record below is checked by one version
        table, store, core, clock, metrics = self.table, self.store, self.core, self.clock, self.metrics
        assert table is not None and store is not None  # noqa: S101 - attach() ran first
        topic = self.topics.events
        now = time.time()
        for m in records:
            p = m.partition()
            table.use(p)
            source = SourceRef(topic=topic, partition=p, offset=m.offset())
            try:
                outcome = await core.process_record(store, m.key(), m.value(), source)
            except Exception as exc:  # noqa: BLE001 - the core answers every record; if it ever
                # fails, the record still costs only itself: a dead letter, and the partition goes on
                log.exception("the core failed on %s", source)
                outcome = Outcome(None, dead_letter=dead_letter_for(
                    Rejected("internal", f"the worker failed on this record: {type(exc).__name__}: {exc}"),
                    m.key(), m.value(), source, self.settings.max_id_bytes))
            self.publish(outcome, m.key(), sink)
            if outcome.verdict is not None and outcome.new:
                if metrics:
                    kind, ms = m.timestamp()
                    if kind:  # 0: the record carries no timestamp
                        # what the agent waits: from its record's timestamp to the verdict produced
                        # (under exactly-once, readers see it when the transaction commits)
                        metrics.observe_verdict_latency(time.time() - ms / 1000.0)
                if outcome.ended:
                    clock.forget(p, outcome.verdict.session_id)
                elif m.key() and m.key().decode("utf-8", "replace") == outcome.verdict.session_id:
                    clock.touch(p, outcome.verdict.session_id, now)

    def publish(self, outcome: Outcome, key: bytes | None, sink: Sink) -> None:
        """The verdict, its alerts and the dead letter of one record, as the core decided them."""
        metrics, settings = self.metrics, self.settings
        if outcome.dead_letter is not None:
            dead = outcome.dead_letter
            # (its key: at most --max-id-bytes; a longer one was refused and is not echoed)
            sink.produce(self.topics.deadletter, key if key is None or len(key) <= settings.max_id_bytes else None,
                         fit_dead_letter(dead, dead.model_dump_json().encode(), settings.max_state_record_bytes))
            if metrics:
                metrics.dead_letter(dead.kind)
        verdict = outcome.verdict
        if verdict is None:
            return
        vkey = verdict.session_id.encode()
        # (the core fitted the verdict to --max-output-bytes; alerts are fitted here)
        sink.produce(self.topics.verdicts, vkey, outcome.verdict_json or verdict.model_dump_json().encode())
        if outcome.shadow is not None:  # a candidate's verdict: to the shadow topic only
            shadow = fit_shadow(outcome.shadow, settings.max_output_bytes)
            if shadow is not None:
                sink.produce(self.topics.shadow, vkey, shadow)
        for alert, raw in alert_records(verdict, outcome.alerted(), settings.max_batch_alerts,
                                        settings.max_output_bytes):
            sink.produce(self.topics.alerts, vkey, raw)
            if metrics:
                metrics.alert_published(alert)
        if metrics:
            if outcome.dead_letter is None:
                metrics.batch_consumed(outcome.events)
            if not outcome.new:
                metrics.duplicate_batch()
            else:
                metrics.observe_verdict(verdict, verdict.eval_ms / 1000.0, engine=verdict.engine)
                kind = failure_kind(verdict)
                if kind:
                    metrics.policy_failure(kind)

    def assigned(self, partitions: list[int]) -> None:
        assert self.table is not None  # noqa: S101 - attach() ran first
        for p in partitions:
            self.clock.load(p, self.table)

    def revoked(self, partitions: list[int]) -> None:
        for p in partitions:
            self.clock.forget(p)
        if self.metrics:
            self.metrics.forget_partitions(partitions)

    def apply_updates(self) -> int:
        """Serve the registry versions the follower handed over since the last call (at a batch
        boundary: between micro-batches, or at a tick); returns how many."""
        assert self.follower is not None  # noqa: S101 - called only with a follower
        updates = self.follower.updates()
        if not updates:
            return 0
        # only the last of several versions of one policy (as at start) is built and served;
        # active versions first: one may end a candidate that the same read replaced
        latest = {(u.policy.policy_id, u.stage): u for u in updates}
        for update in sorted(latest.values(), key=lambda u: u.stage != "active"):
            policy, record = update.policy, update.record
            if update.withdrawn:
                self.core.withdraw_shadow(policy.policy_id)
                log.warning("policy %s: shadow candidate v%d withdrawn", policy.policy_id, record.version)
            elif update.stage == "shadow":
                self.core.install_shadow(policy)
                log.warning("policy %s: shadow candidate v%d (sha256 %s) checked beside the active version",
                            policy.policy_id, record.version, record.sha256[:12])
            else:
                self.core.install(policy)
                if self.metrics:
                    self.metrics.set_policy(policy.policy_id, policy.sha256, str(record.version))
                log.warning("policy %s: version %d (sha256 %s) active, %.0f ms after it was read",
                            policy.policy_id, record.version, record.sha256[:12],
                            (time.monotonic() - update.received) * 1000.0)
        return len(updates)

    def tick(self, sink: Sink, now: float) -> None:
        if self.follower is not None:
            self.apply_updates()
        wall = time.time()
        self.expire(wall)
        metrics = self.metrics
        if metrics and self.runtime is not None:
            # every tick (about 1 s): a dozen cached watermarks and dict sizes, microseconds
            for p, (records, seconds) in self.runtime.lag().items():
                metrics.set_consumer_lag(p, records, seconds)
            metrics.set_sessions(self.clock.count())
            if self.table is not None:
                metrics.set_state_keys(self.table.sizes())
            metrics.beat(wall)

    def expire(self, now: float) -> int:
        """Remove the state of sessions idle for ``session_ttl_s``; returns how many."""
        ttl = self.settings.session_ttl_s
        table, store = self.table, self.store
        if ttl is None or table is None or store is None:
            return 0
        n = 0
        for p in list(self.clock.parts):
            idle = self.clock.idle(p, now - ttl)
            if not idle:
                continue
            table.use(p)
            for sid in idle:
                head = store.head(sid)
                # the clock may be older than the head (a restore, another writer): ask the head
                if head.updated_at and head.updated_at >= now - ttl:
                    self.clock.touch(p, sid, head.updated_at)
                    continue
                store.delete_session(sid)
                self.clock.forget(p, sid)
                n += 1
        if n:
            log.info("expired %d idle session(s)", n)
        return n

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
        self.core.close()


def runtime_config(settings: WorkerSettings) -> RuntimeConfig:
    topics = settings.topics
    return RuntimeConfig(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.group,
        input_topic=topics.events,
        changelog_topic=topics.state,
        guarantee=settings.guarantee,
        commit_interval_ms=settings.commit_interval_ms,
        worker_id=settings.worker_id or f"{os.uname().nodename}-{os.getpid()}",
        max_record_bytes=settings.max_record_bytes,
    )


def run_worker(settings: WorkerSettings) -> None:
    """Load the policy (refusing a bad one), then consume, check and publish until SIGTERM/SIGINT.

    With ``policy_registry`` the policies come from ``<prefix>.policies``: read to its end before
    the first batch, then followed (a new version serves from the next batch boundary)."""
    sandbox.set_allowed_imports(settings.allow_imports)
    sandbox.install_guard()
    trusted = [signing.load_public_key(path) for path in settings.policy_public_keys]
    policies = load_policy_set(settings.policy_path) if settings.policy_path else None
    level = settings.log_level.upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.create_topics:
        from monitor.topics import create_topics

        # idempotent: a worker started before `topics create` still gets its topics
        create_topics(settings.bootstrap_servers, settings.topic_prefix,
                      partitions_override=settings.partitions)
    metrics = server = None
    if settings.metrics_port is not None:
        metrics = WorkerMetrics(engine=settings.engine)
    follower = None
    if policies is None:
        follower = RegistryFollower(settings.bootstrap_servers, settings.topic_prefix, trusted,
                                    on_refused=(lambda reason, _why: metrics.policy_record_refused(reason))
                                    if metrics else None)
        policies = PolicySet.empty(settings.default_policy)
        follower.start()  # (the versions it read are served from the first batch: apply_updates)
    if metrics is not None and settings.metrics_port is not None:  # (both or neither)
        from monitor.metrics import serve_metrics

        for p in policies.all():
            metrics.set_policy(p.policy_id, p.sha256, FILE_POLICY_VERSION)
        server = serve_metrics(metrics.registry, settings.metrics_port)
    processor = MonitorProcessor(policies, settings, metrics, follower)
    if follower is not None:
        n = processor.apply_updates()
        log.warning("policy registry %s: %d version(s) read; serving %s", follower.topic, n,
                    ", ".join(sorted(p.policy_id for p in policies.all())) or "nothing yet")
    # the imports, the parsed policies and the engines live as long as the process: keep the
    # cyclic collector from walking them again and again (pauses show as verdict latency)
    gc.collect()
    gc.freeze()
    config = runtime_config(settings)
    if metrics is not None:
        metrics.set_worker(config.worker_id, config.guarantee, __version__)
    runtime = Runtime(config, processor, on_ready=print_ready(config.worker_id, READY_LINE))

    def stop(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
        runtime.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        runtime.run()
    finally:
        processor.close()
        if server is not None:
            server.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m monitor.worker SETTINGS_JSON``: run a worker from serialised settings."""
    from monitor.metrics import MetricsExposed
    from monitor.policy import PolicyLoadError
    from monitor.signing import KeyFileError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m monitor.worker '<WorkerSettings as JSON>' "
              "(people use: agent-monitor run --policy FILE|DIR)", file=sys.stderr)
        return 2
    try:
        settings = WorkerSettings.model_validate_json(args[0])
    except ValidationError as exc:
        print(f"invalid worker settings: {short_validation(exc)}", file=sys.stderr)
        return 2
    try:
        run_worker(settings)
    except (PolicyLoadError, KeyFileError, MetricsExposed) as exc:
        print(f"agent-monitor: refusing to start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
