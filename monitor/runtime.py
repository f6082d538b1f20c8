"""The stream runtime: a consume-process-produce loop on confluent-kafka that only moves records.

One thread, one consumer in a consumer group (cooperative-sticky assignment), one producer.
Records are taken in micro-batches (up to ``max_batch`` per poll, strict order within a
partition) and handed to a :class:`Processor`, which produces its outputs through the runtime and
keeps its state in a :class:`~monitor.changelog.ChangelogTable` restored from the changelog when a
partition is assigned. Two guarantees:

- ``at-least-once`` (default): outputs go out as soon as they are produced; every
  ``commit_interval_ms`` the producer is flushed (every output and state write acknowledged)
  and only then are the consumed offsets committed. A crash redelivers the records after the
  last commit; the processor answers them again (the monitor repeats a known verdict).
- ``exactly-once``: outputs, state writes and consumer offsets commit in one Kafka transaction
  every ``commit_interval_ms``; an aborted transaction rolls the in-memory state back and
  rewinds the partitions, and a new owner waits for a dead owner's open transaction to end
  before it restores (read_committed, stable offsets).

Example (needs a broker; the bare forwarder of ``make bench-live``)::

    from monitor.runtime import Forwarder, Runtime, RuntimeConfig
    cfg = RuntimeConfig(bootstrap_servers="127.0.0.1:9092", group_id="fwd", input_topic="in")
    Runtime(cfg, Forwarder("out")).run()          # blocks until stop() or SIGTERM
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from monitor.changelog import ChangelogTable, restore, take
from monitor.errors import MonitorError

log = logging.getLogger("agent_monitor.runtime")

Guarantee = Literal["at-least-once", "exactly-once"]
GUARANTEES: tuple[str, ...] = ("at-least-once", "exactly-once")


class RuntimeFailure(MonitorError):
    """The runtime cannot go on safely (a record could not be delivered, the producer was fenced);
    the process should exit and be restarted: it resumes from the last commit."""


class TransactionStuck(MonitorError):
    """A transactional call of librdkafka's did not return within its bound (see
    :meth:`Runtime._bounded`)."""


# what a transactional call may take beyond the timeout it is given before it counts as stuck
STUCK_GRACE_S = 5.0


@dataclass
class RuntimeConfig:
    """How the runtime talks to Kafka."""

    bootstrap_servers: str
    group_id: str
    input_topic: str
    changelog_topic: str | None = None
    guarantee: Guarantee = "at-least-once"
    # at-least-once: how often outputs are flushed and offsets committed (what a crash redoes);
    # exactly-once: how long a transaction stays open (what a reader waits for)
    commit_interval_ms: float | None = None
    worker_id: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    max_batch: int = 500
    max_record_bytes: int = 1_000_000
    transaction_timeout_ms: int = 15_000
    restore_timeout_s: float = 180.0
    tick_interval_s: float = 1.0
    session_timeout_ms: int = 10_000
    consumer_config: dict[str, Any] = field(default_factory=dict)
    producer_config: dict[str, Any] = field(default_factory=dict)

    @property
    def exactly_once(self) -> bool:
        return self.guarantee == "exactly-once"

    @property
    def commit_interval(self) -> float:
        """Seconds between commits: 50 ms under exactly-once (a reader's wait), 200 ms else."""
        ms = self.commit_interval_ms
        if ms is None:
            ms = 50.0 if self.exactly_once else 200.0
        return ms / 1000.0


class Sink(Protocol):
    """Where a processor sends its outputs."""

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                partition: int | None = None) -> None: ...


class Processor(Protocol):
    """What the runtime drives. Every method runs on the runtime's thread."""

    def attach(self, table: ChangelogTable | None, runtime: "Runtime") -> None:
        """Called once before the loop starts: the state table (None without a changelog)."""

    async def process(self, records: list[Any], sink: Sink) -> None:
        """Handle consumed records (confluent-kafka messages) in order. Must not raise for one bad
        record: an exception here stops the worker."""

    def assigned(self, partitions: list[int]) -> None:
        """Partitions were assigned and their state restored."""

    def revoked(self, partitions: list[int]) -> None:
        """Partitions left this worker (their state is dropped after this returns)."""

    def tick(self, sink: Sink, now: float) -> None:
        """Called about every ``tick_interval_s`` (inside a transaction under exactly-once)."""


class Forwarder:
    """The bare runtime job of ``make bench-live``: one output per record, no policy, no state."""

    def __init__(self, output_topic: str) -> None:
        self.output_topic = output_topic

    def attach(self, table: ChangelogTable | None, runtime: "Runtime") -> None:
        pass

    async def process(self, records: list[Any], sink: Sink) -> None:
        produce = sink.produce
        out = self.output_topic
        for m in records:
            produce(out, m.key(), m.value())

    def assigned(self, partitions: list[int]) -> None:
        pass

    def revoked(self, partitions: list[int]) -> None:
        pass

    def tick(self, sink: Sink, now: float) -> None:
        pass


class Runtime:
    """Runs a :class:`Processor` over the input topic until :meth:`stop` (or SIGTERM)."""

    def __init__(self, config: RuntimeConfig, processor: Processor,
                 on_ready: Callable[[list[int]], None] | None = None) -> None:
        self.config = config
        self.processor = processor
        self.on_ready = on_ready
        self._stop = threading.Event()
        self.positions: dict[int, int] = {}  # next offset to process, per input partition
        self.committed: dict[int, int] = {}  # what the last commit stored
        self.last_timestamp: dict[int, float] = {}  # of the last processed record (seconds)
        self.assignment: list[int] = []
        self.rebalances = 0
        self.commits = 0
        self.aborts = 0
        self._txn_open = False
        self._txn_start: dict[int, int] = {}  # per partition: position when the transaction began
        self._delivery_errors: list[str] = []
        self._dirty = False
        self._failed = False
        self._replaced: list[float] = []  # when the transactional producer was replaced
        self._txn_calls: concurrent.futures.ThreadPoolExecutor | None = None
        # why the open transaction can take no more records (it is aborted and its records
        # processed again); None while it can
        self._doomed: str | None = None
        self._last_commit = time.monotonic()
        self.consumer: Any = None
        self.producer: Any = None
        self.table: ChangelogTable | None = None

    # -- Kafka clients ------------------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        c = self.config
        fetch = max(c.max_record_bytes + 65_536, 4 * 1_048_576)
        return {
            "bootstrap.servers": c.bootstrap_servers,
            "group.id": c.group_id,
            "client.id": f"agent-monitor-{c.worker_id}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # events are not transactional, but this makes the group's offset fetch wait for a
            # previous owner's open transaction (stable offsets), as exactly-once needs
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": c.session_timeout_ms,
            "heartbeat.interval.ms": max(500, c.session_timeout_ms // 4),
            "max.poll.interval.ms": 300_000,
            "fetch.wait.max.ms": 100,
            "max.partition.fetch.bytes": fetch,
            "fetch.max.bytes": max(fetch, 52_428_800),
            "on_commit": self._on_commit,
            **c.consumer_config,
        }

    def _producer_config(self) -> dict[str, Any]:
        c = self.config
        conf: dict[str, Any] = {
            "bootstrap.servers": c.bootstrap_servers,
            "client.id": f"agent-monitor-{c.worker_id}",
            "acks": "all",
            "enable.idempotence": True,
            # Java's and the SDK's partitioner: a session's outputs share a partition
            "partitioner": "murmur2_random",
            # a verdict leaves at once; a transaction waits for its commit anyway
            "linger.ms": 5 if c.exactly_once else 1,
            "queue.buffering.max.messages": 1_000_000,
            # a dead letter carries its record base64-encoded (4/3) in an envelope
            "message.max.bytes": max(c.max_record_bytes * 3 // 2 + 65_536, 2 * 1_048_576),
            "delivery.report.only.error": True,
            "on_delivery": self._delivered,
            "retry.backoff.ms": 20,
        }
        if c.exactly_once:
            conf.update({
                "transactional.id": f"{c.group_id}-{c.worker_id}",
                "transaction.timeout.ms": c.transaction_timeout_ms,
                "message.timeout.ms": c.transaction_timeout_ms,
            })
        else:
            conf["message.timeout.ms"] = 300_000  # rides out a broker restart
        conf.update(c.producer_config)
        return conf

    def _on_commit(self, err: Any, partitions: list[Any]) -> None:
        # an asynchronous commit that failed is retried by the next one
        for tp in partitions:
            if err is not None or tp.error is not None:
                if self.committed.get(tp.partition) == tp.offset:
                    del self.committed[tp.partition]

    def _new_producer(self) -> Any:
        from confluent_kafka import Producer

        producer = Producer(self._producer_config())
        if self.config.exactly_once:
            # fences an earlier incarnation with the same transactional id and aborts what it
            # left open
            producer.init_transactions(60)
        return producer

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err.str()}")

    # -- the sink -------------------------------------------------------------------------------

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                partition: int | None = None) -> None:
        """Send one output record (inside the open transaction under exactly-once)."""
        from confluent_kafka import KafkaException

        self._dirty = True
        if self._doomed:
            return  # the transaction is aborted at the end of this micro-batch: nothing it held counts
        while True:
            try:
                if partition is None:
                    self.producer.produce(topic, value, key)
                else:
                    self.producer.produce(topic, value, key, partition)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self.producer.poll(0.05)
            except KafkaException as exc:
                if not self.config.exactly_once:
                    raise
                # the transaction went into an error state (a broker restart or a rebalance under
                # way, seen as "Erroneous state"): abort it and process its records again, rather
                # than fail the record (its verdict would be lost) or stop the worker
                self._doomed = exc.args[0].str()
                log.warning("the transaction can take no more records (%s): it will be aborted and "
                            "its records processed again", self._doomed)
                return

    def _send_changelog(self, key: str, partition: int, value: bytes | None) -> None:
        assert self.config.changelog_topic  # noqa: S101 - registered only with a changelog topic
        self.produce(self.config.changelog_topic, key.encode(), value, partition)

    # -- the loop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its micro-batch, commit and leave the group."""
        self._stop.set()

    def run(self) -> None:
        """Consume, process, produce and commit until :meth:`stop`."""
        from confluent_kafka import Consumer

        c = self.config
        self.producer = self._new_producer()
        if c.changelog_topic:
            self.table = ChangelogTable(c.changelog_topic, self._send_changelog)
        self.processor.attach(self.table, self)
        self.consumer = Consumer(self._consumer_config())
        self.consumer.subscribe([c.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        loop = asyncio.new_event_loop()
        interval = c.commit_interval
        next_commit = time.monotonic() + interval
        next_tick = time.monotonic() + c.tick_interval_s
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wait = max(0.0, min(next_tick - now, (next_commit - now) if self._dirty else 0.5))
                msgs = take(self.consumer, c.max_batch, wait)
                if msgs:
                    records = self._records(msgs)
                    if records:
                        self._begin()
                        loop.run_until_complete(self.processor.process(records, self))
                        self._advance(records)
                        if self._doomed:
                            self._abort()
                self.producer.poll(0)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + c.tick_interval_s
                    self._begin()
                    self.processor.tick(self, now)
                    if self._doomed:
                        self._abort()
                if self._dirty and now >= next_commit:
                    # put off while outputs are in flight: look again in a millisecond
                    next_commit = time.monotonic() + (interval if self._commit() else 0.001)
                elif not self._dirty:
                    next_commit = now + interval
                    self._last_commit = now  # nothing uncommitted as of now
            self._commit(sync=True)
        except BaseException:
            self._failed = True  # leaving the group must not commit what failed
            raise
        finally:
            try:
                self.consumer.close()  # leaves the group (its revoke callback commits first)
            finally:
                if not c.exactly_once:
                    self.producer.flush(30)
                if self._txn_calls is not None:
                    self._txn_calls.shutdown(wait=False)
                loop.close()

    def _records(self, msgs: list[Any]) -> list[Any]:
        from confluent_kafka import KafkaError

        out = []
        for m in msgs:
            err = m.error()
            if err is None:
                out.append(m)
            elif err.fatal():
                raise RuntimeFailure(f"consumer: {err.str()}")
            elif err.code() != KafkaError._PARTITION_EOF:  # noqa: SLF001 - confluent-kafka's public name
                log.warning("consumer: %s", err.str())
        return out

    def _advance(self, records: list[Any]) -> None:
        positions, start = self.positions, self._txn_start
        for m in records:
            p = m.partition()
            if p not in start:
                start[p] = positions.get(p, m.offset())
            positions[p] = m.offset() + 1
        last = records[-1]
        self.last_timestamp[last.partition()] = last.timestamp()[1] / 1000.0
        self._dirty = True

    # -- commits --------------------------------------------------------------------------------

    def _begin(self) -> None:
        if self.config.exactly_once and not self._txn_open:
            self.producer.begin_transaction()
            self._txn_open = True
            self._txn_start = {}
            if self.table is not None:
                self.table.begin()

    def _offsets(self) -> list[Any]:
        from confluent_kafka import TopicPartition

        topic = self.config.input_topic
        return [TopicPartition(topic, p, off) for p, off in self.positions.items()
                if self.committed.get(p) != off]

    def _commit(self, sync: bool = False) -> bool:
        """Commit what was processed; False when (at-least-once, not ``sync``) outputs are still
        in flight and the commit was put off rather than wait for them."""
        from confluent_kafka import KafkaException

        if self.config.exactly_once:
            self._commit_transaction()
            return True
        if not self._dirty and not sync:
            return True
        # every output and state write of the records processed so far is acknowledged before
        # their offsets are: a crash between the two redelivers, never loses. Waiting for the
        # acknowledgements would hold the records arriving meanwhile, so a commit waits for a
        # moment with nothing in flight (under steady load there is one every few ms), and only
        # blocks once it has been put off for a second.
        self.producer.poll(0)
        if not sync and len(self.producer) > 0 and time.monotonic() - self._last_commit < 1.0:
            return False
        while self.producer.flush(1.0) > 0:
            log.warning("waiting for Kafka to acknowledge %d record(s)", len(self.producer))
        if self._delivery_errors:
            raise RuntimeFailure("records could not be delivered: " + "; ".join(self._delivery_errors[:5]))
        offsets = self._offsets()
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=not sync)
            except KafkaException as exc:  # e.g. a rebalance under way: redelivery covers it
                log.warning("offset commit failed: %s", exc.args[0].str())
            else:
                for tp in offsets:
                    self.committed[tp.partition] = tp.offset
                self.commits += 1
        self._dirty = False
        self._last_commit = time.monotonic()
        return True

    def _commit_transaction(self) -> None:
        from confluent_kafka import KafkaException

        if not self._txn_open:
            self._dirty = False
            return
        if self._doomed:
            self._abort()
            return
        offsets = self._offsets()
        if offsets:
            try:
                # short: a group in the middle of a rebalance refuses it until this consumer
                # polls again, so waiting longer would only hold the rebalance up
                group = self.consumer.consumer_group_metadata()
                self._bounded("send_offsets_to_transaction",
                              lambda: self.producer.send_offsets_to_transaction(offsets, group, 5), 5)
            except TransactionStuck as exc:
                self._stuck(exc)
                return
            except KafkaException as exc:
                # nothing is committed yet: abort, rewind, and let the rebalance go on
                log.warning("offsets refused (%s): transaction aborted, partitions rewound",
                            exc.args[0].str())
                self._abort()
                return
        for attempt in range(1, 6):
            try:
                self._bounded("commit_transaction", lambda: self.producer.commit_transaction(30), 30)
                break
            except TransactionStuck as exc:
                self._stuck(exc)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if err.txn_requires_abort():
                    log.warning("transaction aborted, rewinding: %s", err.str())
                    self._abort()
                    return
                if err.fatal():
                    self._replace_producer(err.str())
                    self._abort(begun=False)
                    return
                if not err.retriable() or attempt == 5:
                    raise RuntimeFailure(f"transaction commit failed: {err.str()}") from None
                # a commit that timed out may still be completing: the same call finishes it
                log.warning("transaction commit failed, retrying: %s", err.str())
        for tp in offsets:
            self.committed[tp.partition] = tp.offset
        if self.table is not None:
            self.table.commit()
        self._txn_open = False
        self._txn_start = {}
        self._dirty = False
        self.commits += 1

    def _abort(self, begun: bool = True) -> None:
        """Abort the open transaction: memory goes back to what the changelog holds, and every
        partition back to where the transaction began. ``begun=False``: the producer is new and
        its predecessor's transaction ended with it; only memory and positions go back."""
        from confluent_kafka import KafkaException, TopicPartition

        # an abort that times out (the coordinator moving, a broker restarting) is retried until
        # it completes: no other transactional call may be made meanwhile
        deadline = time.monotonic() + self.config.transaction_timeout_ms / 1000.0 + 120
        while begun:
            try:
                self.producer.abort_transaction(10)
                break
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal():
                    # e.g. the coordinator moved on during a broker restart: a new producer with
                    # the same transactional id ends whatever the old one had open
                    self._replace_producer(err.str())
                    break
                if time.monotonic() > deadline:
                    raise RuntimeFailure(f"transaction abort failed: {err.str()}") from None
                log.warning("transaction abort not done yet, retrying: %s", err.str())
        if self.table is not None:
            self.table.rollback()
        self._doomed = None
        self.aborts += 1
        topic = self.config.input_topic
        for p, off in self._txn_start.items():
            if p in self.assignment and self.positions.get(p) != off:
                try:
                    self.consumer.seek(TopicPartition(topic, p, off))
                except KafkaException as exc:
                    raise RuntimeFailure(f"cannot rewind partition {p}: {exc.args[0].str()}") from None
            self.positions[p] = off
        self._txn_open = False
        self._txn_start = {}
        self._dirty = False

    def _bounded(self, what: str, call: Callable[[], Any], timeout_s: float) -> Any:
        """``call()`` (a transactional call given ``timeout_s``), raising :class:`TransactionStuck`
        if it has not returned ``STUCK_GRACE_S`` after that. librdkafka does not always keep its
        own timeout there: after a broker restart, send_offsets_to_transaction waited about five
        minutes for a group coordinator it had cached from before the restart (measured in the
        short chaos run, which took 387 s instead of 35), and every verdict of the worker waited
        with it. The call runs on a thread of its own so that a stuck one can be left behind."""
        if self._txn_calls is None:
            self._txn_calls = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="txn-call")
        future = self._txn_calls.submit(call)
        try:
            return future.result(timeout_s + STUCK_GRACE_S)
        except concurrent.futures.TimeoutError:
            self._txn_calls.shutdown(wait=False)  # its thread stays blocked in librdkafka
            self._txn_calls = None
            raise TransactionStuck(f"{what} did not return within {timeout_s + STUCK_GRACE_S:g} s") from None

    def _stuck(self, exc: TransactionStuck) -> None:
        """A transactional call is stuck: a new producer with the same transactional id fences the
        old one (the broker aborts its open transaction), and memory and positions go back to the
        last commit, as for an abort."""
        self._replace_producer(str(exc))
        self._abort(begun=False)

    def _replace_producer(self, why: str) -> None:
        now = time.monotonic()
        self._replaced = [t for t in self._replaced if now - t < 60.0] + [now]
        if len(self._replaced) > 3:  # a live twin with our transactional id keeps fencing us
            raise RuntimeFailure(f"the transactional producer failed again ({why}): stopping")
        log.warning("the transactional producer failed (%s): starting a new one", why)
        self.producer = self._new_producer()

    # -- rebalances -----------------------------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        c = self.config
        mine = sorted(tp.partition for tp in partitions if tp.topic == c.input_topic)
        if mine:
            # what is done so far is committed first: the wait below may outlast a transaction
            if not self._failed:
                self._commit(sync=True)
            started = time.monotonic()
            if c.exactly_once:
                # waits until an earlier owner's open transaction ends (committed or timed out):
                # its state writes are then either in the changelog or gone for good
                consumer.committed(partitions, timeout=c.transaction_timeout_ms / 1000.0 + 60)
            if c.changelog_topic and self.table is not None:
                data = restore(c.bootstrap_servers, c.changelog_topic, mine, timeout=c.restore_timeout_s)
                for p in mine:
                    self.table.add_partition(p, data[p])
                log.info("restored partitions %s (%d keys) in %.2fs", mine,
                         sum(len(d) for d in data.values()), time.monotonic() - started)
        self.assignment = sorted(set(self.assignment) | set(mine))
        self.rebalances += 1
        self.processor.assigned(mine)
        if self.on_ready:
            self.on_ready(self.assignment)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        mine = sorted(tp.partition for tp in partitions if tp.topic == self.config.input_topic)
        if not mine:
            return
        # what was processed is committed before another worker takes over
        if not self._failed:
            self._commit(sync=True)
        self._release(mine)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        mine = sorted(tp.partition for tp in partitions if tp.topic == self.config.input_topic)
        log.warning("partitions %s were lost (the group moved on without this worker)", mine)
        if self.config.exactly_once and self._txn_open and not self._failed:
            self._abort()  # its offsets would be refused: start over from the last commit
        self._release(mine)

    def _release(self, partitions: list[int]) -> None:
        self.processor.revoked(partitions)
        for p in partitions:
            self.positions.pop(p, None)
            self.committed.pop(p, None)
            self.last_timestamp.pop(p, None)
            if self.table is not None:
                self.table.drop_partition(p)
        self.assignment = [p for p in self.assignment if p not in partitions]
        self.rebalances += 1
        if self.on_ready:
            self.on_ready(self.assignment)

    # -- what metrics read ----------------------------------------------------------------------

    def lag(self) -> dict[int, tuple[int, float]]:
        """Per assigned partition: records not yet processed, and the age in seconds of the last
        processed record while any are (0 when caught up). From cached watermarks: no request."""
        from confluent_kafka import KafkaException, TopicPartition

        out: dict[int, tuple[int, float]] = {}
        now = time.time()
        for p in self.assignment:
            try:
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.config.input_topic, p), cached=True)
            except KafkaException:
                continue
            pos = self.positions.get(p)
            if high < 0 or pos is None:
                continue
            behind = max(0, high - pos)
            ts = self.last_timestamp.get(p)
            out[p] = (behind, max(0.0, now - ts) if behind and ts else 0.0)
        return out


def print_ready(worker_id: str, line: str) -> Callable[[list[int]], None]:
    """An ``on_ready`` that announces the assignment on stdout (what tests and the demo wait for)."""

    def ready(assignment: list[int]) -> None:
        sys.stdout.write(f"{line} worker={worker_id} partitions={len(assignment)} "
                         f"assigned={','.join(map(str, assignment))}\n")
        sys.stdout.flush()

    return ready
