"""The client SDK for agents and gateways: publish event batches, wait for verdicts, read topics.

An agent publishes each pending batch of a session with :meth:`MonitorClient.submit` (fire and
forget) or :meth:`MonitorClient.check` (publish, then wait for that batch's verdict). Records are
keyed by ``session_id`` and partitioned with Java-compatible murmur2, so confluent-kafka, aiokafka
and Java producers all put one session on the same partition.

Example (needs a broker and a worker: ``agent-monitor broker start``,
``agent-monitor run --policy examples/policies``)::

    from monitor.client import MonitorClient

    with MonitorClient("127.0.0.1:9092", prefix="agent") as client:
        verdict = client.check("session-1", [
            {"role": "user", "content": "Can you send this email to Peter?"},
            {"id": "1", "type": "function",
             "function": {"name": "send_email", "arguments": {"contents": "Hi Peter"}}},
        ], policy="send_after_keyword", timeout=30)
        if verdict.decision == "deny":
            print([v.message for v in verdict.violations])

From asyncio (nothing blocks the loop)::

    verdict = await client.acheck("session-1", events, timeout=30)

Reading the output topics as typed records::

    from monitor.client import AlertConsumer
    with AlertConsumer("127.0.0.1:9092", prefix="agent", from_beginning=True, idle_timeout=5) as alerts:
        for alert in alerts:
            print(alert.severity, alert.message, alert.addresses)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ValidationError

from monitor.config import DEFAULT_PREFIX, TopicNames, env_bootstrap
from monitor.errors import EXIT_UNREACHABLE, MonitorError
from monitor.models import (
    Alert,
    BatchMetadata,
    DeadLetter,
    EventBatch,
    SourceRef,
    Verdict,
)

log = logging.getLogger(__name__)

# librdkafka reports every refused connection; route it through logging (silent unless the
# application configures a handler for "monitor.client.kafka") instead of raw stderr.
_KAFKA_LOG = logging.getLogger("monitor.client.kafka")
_KAFKA_LOG.addHandler(logging.NullHandler())

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CHECK_TIMEOUT = 30.0


class BrokerUnreachable(MonitorError):
    """No Kafka broker answered at ``address`` within the bounded wait."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, address: str, waited: float, detail: str = "") -> None:
        self.address = address
        self.waited = waited
        super().__init__(
            f"no Kafka broker answered at {address} within {waited:g}s"
            + (f" ({detail})" if detail else "")
            + ": start one with `agent-monitor broker start` or set KAFKA_BOOTSTRAP_SERVERS"
        )


class TopicMissing(MonitorError):
    """A topic the client needs does not exist on the cluster."""

    def __init__(self, topic: str, prefix: str) -> None:
        self.topic = topic
        super().__init__(f"topic {topic} does not exist: create the topics with "
                         f"`agent-monitor topics create --prefix {prefix}` (or start a worker)")


class PublishError(MonitorError):
    """Kafka did not acknowledge a record.

    ``batch`` is the batch that was being published: retry with ``check_batch(err.batch)`` (same
    ``batch_id``), never by calling ``check`` again, which would make a new batch whose events
    join the session's past a second time if the first one did arrive.
    """

    def __init__(self, message: str, batch: EventBatch | None = None) -> None:
        super().__init__(message)
        self.batch = batch


class VerdictTimeout(MonitorError, TimeoutError):
    """No verdict for the batch arrived in time (is a worker running for this prefix?).

    ``batch`` is the batch that is waiting: retrying with ``check_batch(err.batch)`` keeps its
    ``batch_id``, so the worker answers it once.
    """

    def __init__(self, session_id: str, batch_id: str, timeout: float, topic: str,
                 batch: EventBatch | None = None) -> None:
        self.session_id = session_id
        self.batch_id = batch_id
        self.timeout = timeout
        self.batch = batch
        super().__init__(
            f"no verdict for session {session_id!r} batch {batch_id!r} on {topic} within {timeout:g}s: "
            "is a monitor worker running for this prefix (agent-monitor run --policy ...)?"
        )


def _first_address(bootstrap: str) -> str:
    return bootstrap.split(",")[0].strip()


def _kafka_error_text(exc: BaseException) -> str:
    err = exc.args[0] if exc.args else exc
    return err.str() if hasattr(err, "str") else str(err)


def producer_config(bootstrap: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The producer settings every agent-side producer should use.

    >>> cfg = producer_config("127.0.0.1:9092")
    >>> cfg["partitioner"], cfg["acks"], cfg["enable.idempotence"]
    ('murmur2_random', 'all', True)
    """
    return {
        "bootstrap.servers": bootstrap,
        # Java and aiokafka hash keys with murmur2; librdkafka's default (crc32) would split a
        # session across partitions when producers of several kinds share the topic
        "partitioner": "murmur2_random",
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 2,
        "message.timeout.ms": 30000,
        "logger": _KAFKA_LOG,
        **dict(extra or {}),
    }


def wait_for_broker(bootstrap: str, timeout: float = DEFAULT_CONNECT_TIMEOUT,
                    config: Mapping[str, Any] | None = None) -> None:
    """Return once a broker at ``bootstrap`` answers a metadata request; raise
    :class:`BrokerUnreachable` (with the address) after ``timeout`` seconds otherwise.

    >>> wait_for_broker("127.0.0.1:1", timeout=1)
    Traceback (most recent call last):
    ...
    monitor.client.BrokerUnreachable: no Kafka broker answered at 127.0.0.1:1 within 1s ...
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _KAFKA_LOG, **dict(config or {})}
    admin = AdminClient(conf)
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnreachable(bootstrap, timeout, _kafka_error_text(exc)) from None
    if not md.brokers:
        raise BrokerUnreachable(bootstrap, timeout, "the cluster lists no brokers")


def _partitions(client: Any, topic: str, prefix: str, timeout: float, address: str) -> list[int]:
    """The partitions of ``topic``, waiting up to ``timeout`` for it to appear (a worker or
    ``topics create`` may be creating it right now)."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            md = client.list_topics(topic, timeout=max(0.5, deadline - time.monotonic()))
        except KafkaException as exc:
            raise BrokerUnreachable(address, timeout, _kafka_error_text(exc)) from None
        t = md.topics.get(topic)
        if t is not None and t.error is None and t.partitions:
            return sorted(t.partitions)
        if time.monotonic() >= deadline:
            raise TopicMissing(topic, prefix)
        time.sleep(0.25)


def _end_offsets(consumer: Any, topic: str, parts: list[int], timeout: float) -> dict[int, int]:
    """The current end offset of each partition. A topic created a moment ago may not have
    partition leaders yet ("not leader for partition"): retry those until ``timeout``."""
    from confluent_kafka import KafkaException, TopicPartition

    deadline = time.monotonic() + timeout
    ends: dict[int, int] = {}
    for p in parts:
        while True:
            try:
                _low, ends[p] = consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=max(0.5, deadline - time.monotonic()))
                break
            except KafkaException as exc:
                if time.monotonic() >= deadline:
                    raise MonitorError(f"cannot read the end offset of {topic}[{p}]: "
                                       f"{_kafka_error_text(exc)}") from None
                time.sleep(0.2)
    return ends


def _resolve(fut: Future[Verdict], outcome: Verdict | BaseException) -> None:
    # an asyncio waiter that timed out cancels its future concurrently: never let that race
    # raise InvalidStateError in the listener thread
    try:
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
    except InvalidStateError:
        pass


class VerdictListener:
    """A background consumer of the verdicts topic that resolves futures keyed by
    ``(session_id, batch_id)``. It is positioned at the end of every partition before it returns
    from :meth:`start`, so a verdict published after that is never missed.

    Subclasses may start earlier (:meth:`_start_offsets`), watch idle polls (:meth:`_idle`) and
    handle each verdict their own way (:meth:`_on_verdict`); the HTTP API's
    :class:`monitor.api.sessions.VerdictFeed` does."""

    group_prefix = "agent-monitor-client"
    thread_name = "agent-monitor-verdicts"

    def __init__(self, bootstrap: str, topics: TopicNames, config: Mapping[str, Any],
                 connect_timeout: float) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.config = dict(config)
        self.connect_timeout = connect_timeout
        self._waiters: dict[tuple[str, str], list[Future[Verdict]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        self._ends: dict[int, int] = {}  # each partition's end when the listener started
        self.positions: dict[int, int] = {}  # the offset last read, per partition
        self.received = 0
        self.invalid = 0

    def start(self) -> None:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            # manual assignment, never committed: the group id only satisfies librdkafka
            "group.id": f"{self.group_prefix}-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "latest",
            # a worker under exactly-once publishes in transactions: only committed verdicts count
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 50,
            "logger": _KAFKA_LOG,
            **self.config,
        })
        try:
            topic = self.topics.verdicts
            parts = _partitions(consumer, topic, self.topics.prefix, self.connect_timeout, self.bootstrap)
            # explicit offsets (the current ends), not OFFSET_END: OFFSET_END is resolved lazily at
            # the first fetch, after which a verdict produced in between would be skipped
            self._ends = _end_offsets(consumer, topic, parts, self.connect_timeout)
            starts = self._start_offsets(consumer, topic, self._ends)
            consumer.assign([TopicPartition(topic, p, starts[p]) for p in parts])
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def _start_offsets(self, consumer: Any, topic: str, ends: dict[int, int]) -> dict[int, int]:
        """Where each partition is read from: its end as of :meth:`start`."""
        return ends

    def expect(self, session_id: str, batch_id: str) -> Future[Verdict]:
        fut: Future[Verdict] = Future()
        with self._lock:
            self._waiters.setdefault((session_id, batch_id), []).append(fut)
        return fut

    def forget(self, session_id: str, batch_id: str, fut: Future[Verdict]) -> None:
        with self._lock:
            waiting = self._waiters.get((session_id, batch_id), [])
            if fut in waiting:
                waiting.remove(fut)
            if not waiting:
                self._waiters.pop((session_id, batch_id), None)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._consumer.poll(0.2)
            except Exception:  # noqa: BLE001 - keep listening; librdkafka reconnects by itself
                log.exception("verdict consumer poll failed")
                time.sleep(0.5)
                continue
            if msg is None:
                self._idle()
                continue
            if msg.error():
                log.debug("verdict consumer: %s", msg.error())
                continue
            self.positions[msg.partition()] = msg.offset()
            try:
                verdict = Verdict.model_validate_json(msg.value())
            except (ValidationError, ValueError, TypeError):
                self.invalid += 1
                log.warning("skipping a record on %s that is not a Verdict (partition %s offset %s)",
                            msg.topic(), msg.partition(), msg.offset())
                continue
            self.received += 1
            self._on_verdict(verdict)

    def _idle(self) -> None:
        """A poll found nothing new."""

    def _on_verdict(self, verdict: Verdict) -> None:
        with self._lock:
            waiting = self._waiters.pop((verdict.session_id, verdict.batch_id), [])
        for fut in waiting:
            _resolve(fut, verdict)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        with self._lock:
            waiting = [f for fs in self._waiters.values() for f in fs]
            self._waiters.clear()
        for fut in waiting:
            _resolve(fut, MonitorError("the client was closed while waiting for a verdict"))


class MonitorClient:
    """Publishes event batches to ``<prefix>.events`` and waits for verdicts on ``<prefix>.verdicts``.

    Thread-safe; one client per process is enough. ``bootstrap_servers`` defaults to
    ``KAFKA_BOOTSTRAP_SERVERS``, ``prefix`` to ``AGENT_MONITOR_PREFIX`` (else ``agent``).
    ``producer_config``/``consumer_config`` add librdkafka settings (``security.protocol``,
    ``sasl.*``...). The broker is contacted on first use; if none answers within
    ``connect_timeout`` seconds, :class:`BrokerUnreachable` names the address.

    >>> client = MonitorClient("127.0.0.1:9092", prefix="demo")
    >>> client.topics.events, client.topics.verdicts
    ('demo.events', 'demo.verdicts')
    >>> client.close()
    """

    def __init__(self, bootstrap_servers: str | None = None, prefix: str | None = None, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 producer_config: Mapping[str, Any] | None = None,
                 consumer_config: Mapping[str, Any] | None = None) -> None:
        import os

        self.bootstrap_servers = bootstrap_servers or env_bootstrap()
        self.prefix = prefix or os.environ.get("AGENT_MONITOR_PREFIX") or DEFAULT_PREFIX
        self.topics = TopicNames.for_prefix(self.prefix)
        self.connect_timeout = connect_timeout
        self._producer_extra = dict(producer_config or {})
        self._consumer_extra = dict(consumer_config or {})
        self._producer: Any = None
        self._listener: VerdictListener | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.last_partition: int | None = None
        self.last_offset: int | None = None
        self.delivery_errors: list[str] = []

    # -- connections (lazy) ------------------------------------------------------------------

    def _get_producer(self) -> Any:
        with self._lock:
            if self._closed:
                raise MonitorError("the client is closed")
            if self._producer is None:
                from confluent_kafka import Producer

                wait_for_broker(self.bootstrap_servers, self.connect_timeout, self._security())
                self._producer = Producer(producer_config(self.bootstrap_servers, self._producer_extra))
            return self._producer

    def _security(self) -> dict[str, Any]:
        # settings needed to even talk to the cluster (TLS/SASL) apply to the probe too
        return {k: v for k, v in self._producer_extra.items()
                if k.startswith(("security.", "sasl.", "ssl."))}

    def _get_listener(self) -> VerdictListener:
        with self._lock:
            if self._closed:
                raise MonitorError("the client is closed")
            if self._listener is None:
                wait_for_broker(self.bootstrap_servers, self.connect_timeout, self._security())
                listener = VerdictListener(self.bootstrap_servers, self.topics, self._consumer_extra,
                                            self.connect_timeout)
                listener.start()
                self._listener = listener
            return self._listener

    # -- publishing --------------------------------------------------------------------------

    @staticmethod
    def make_batch(session_id: str, events: Sequence[Mapping[str, Any] | BaseModel],
                   batch_id: str | None = None, seq: int | None = None, policy: str | None = None,
                   metadata: Mapping[str, Any] | BatchMetadata | None = None) -> EventBatch:
        """Build (and validate) the record without publishing it.

        >>> b = MonitorClient.make_batch("s1", [{"role": "user", "content": "hi"}], batch_id="b1")
        >>> b.session_id, b.batch_id, b.trace()
        ('s1', 'b1', [{'role': 'user', 'content': 'hi'}])
        """
        evs: list[Any] = [e.model_dump(mode="json", exclude_unset=True) if isinstance(e, BaseModel)
                          else dict(e) for e in events]  # (EventBatch validates them)
        meta = metadata if isinstance(metadata, BatchMetadata) else BatchMetadata(**dict(metadata or {}))
        return EventBatch(session_id=session_id, batch_id=batch_id or uuid.uuid4().hex, seq=seq,
                          events=evs, policy=policy, metadata=meta)

    def publish(self, batch: EventBatch, timeout: float | None = None, wait: bool = True) -> EventBatch:
        """Publish a prepared batch and wait until Kafka acknowledges it (acks=all).

        ``wait=False`` returns at once (for throughput); a later delivery failure is logged and
        appended to ``delivery_errors``, and :meth:`flush` waits for the outstanding records.
        """
        producer = self._get_producer()
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def delivered(err: Any, msg: Any) -> None:
            outcome["err"], outcome["msg"] = err, msg
            done.set()
            if err is not None and not wait:
                self.delivery_errors.append(f"batch {batch.batch_id!r}: {err.str()}")
                log.error("%s: batch %r of session %r not delivered: %s", self.topics.events,
                          batch.batch_id, batch.session_id, err.str())

        from confluent_kafka import KafkaException

        value = batch.model_dump_json().encode()
        while True:
            try:
                producer.produce(self.topics.events, key=batch.session_id.encode(), value=value,
                                 on_delivery=delivered)
                break
            except BufferError:  # local queue full: serve callbacks, then retry
                producer.poll(0.1)
            except KafkaException as exc:
                raise PublishError(f"cannot publish to {self.topics.events}: {_kafka_error_text(exc)}",
                                   batch) from None
        if not wait:
            producer.poll(0)
            return batch
        deadline = time.monotonic() + (timeout if timeout is not None else 35.0)
        # whichever thread polls serves the callbacks, so concurrent publishers all make progress
        while not done.is_set():
            if time.monotonic() > deadline:
                raise PublishError(f"{self.topics.events}: no acknowledgement for batch "
                                   f"{batch.batch_id!r} within {timeout}s", batch)
            producer.poll(0.05)
        err = outcome["err"]
        if err is not None:
            if err.code() in _UNREACHABLE_CODES():
                raise BrokerUnreachable(self.bootstrap_servers, timeout or 30.0, err.str())
            raise PublishError(f"{self.topics.events}: batch {batch.batch_id!r} not delivered: {err.str()}",
                               batch)
        self.last_partition = outcome["msg"].partition()
        self.last_offset = outcome["msg"].offset()
        return batch

    def submit(self, session_id: str, events: Sequence[Mapping[str, Any] | BaseModel],
               batch_id: str | None = None, seq: int | None = None, policy: str | None = None,
               metadata: Mapping[str, Any] | BatchMetadata | None = None, *, wait: bool = True) -> EventBatch:
        """Publish one batch of a session's events (keyed by ``session_id``); returns the record.

        ``batch_id`` is the idempotency key (default: a fresh uuid4): publishing the same batch id
        again yields the same verdict, never a second one. ``seq`` lets the worker check order;
        ``policy`` picks a policy id the worker serves; ``metadata`` carries agent/tenant/user.
        Returns once Kafka acknowledged the record, or at once with ``wait=False`` (then call
        :meth:`flush` before exiting).

        Example (needs a broker)::

            batch = client.submit("s1", [{"role": "user", "content": "hello"}])
            print(batch.batch_id)
        """
        batch = self.make_batch(session_id, events, batch_id, seq, policy, metadata)
        return self.publish(batch, wait=wait)

    def expect(self, session_id: str, batch_id: str) -> Future[Verdict]:
        """A future resolved by the verdict of ``(session_id, batch_id)``; call it *before*
        publishing the batch (as :meth:`check` does) so the verdict cannot be missed."""
        return self._get_listener().expect(session_id, batch_id)

    def check_batch(self, batch: EventBatch, timeout: float = DEFAULT_CHECK_TIMEOUT) -> Verdict:
        """Publish ``batch`` and block until its verdict arrives; raises :class:`VerdictTimeout`."""
        listener = self._get_listener()
        fut = listener.expect(batch.session_id, batch.batch_id)
        start = time.monotonic()
        try:
            self.publish(batch, timeout=timeout)
            left = max(0.0, timeout - (time.monotonic() - start))
            try:
                return fut.result(left)
            except FutureTimeout:
                raise VerdictTimeout(batch.session_id, batch.batch_id, timeout, self.topics.verdicts,
                                 batch) from None
        finally:
            listener.forget(batch.session_id, batch.batch_id, fut)

    def check(self, session_id: str, events: Sequence[Mapping[str, Any] | BaseModel],
              timeout: float = DEFAULT_CHECK_TIMEOUT, batch_id: str | None = None,
              seq: int | None = None, policy: str | None = None,
              metadata: Mapping[str, Any] | BatchMetadata | None = None) -> Verdict:
        """Publish one batch and wait up to ``timeout`` seconds for its verdict.

        Example (needs a broker and a worker)::

            verdict = client.check("s1", [{"role": "user", "content": "hello"}], timeout=10)
            assert verdict.decision in ("allow", "deny")
        """
        batch = self.make_batch(session_id, events, batch_id, seq, policy, metadata)
        return self.check_batch(batch, timeout)

    # -- asyncio -----------------------------------------------------------------------------

    async def asubmit(self, session_id: str, events: Sequence[Mapping[str, Any] | BaseModel],
                      batch_id: str | None = None, seq: int | None = None, policy: str | None = None,
                      metadata: Mapping[str, Any] | BatchMetadata | None = None) -> EventBatch:
        """:meth:`submit` for asyncio: the blocking wait for the acknowledgement runs on a thread."""
        batch = self.make_batch(session_id, events, batch_id, seq, policy, metadata)
        return await asyncio.to_thread(self.publish, batch)

    async def acheck_batch(self, batch: EventBatch, timeout: float = DEFAULT_CHECK_TIMEOUT) -> Verdict:
        """:meth:`check_batch` for asyncio; many can be awaited concurrently."""
        listener = self._listener
        if listener is None:
            listener = await asyncio.to_thread(self._get_listener)
        fut = listener.expect(batch.session_id, batch.batch_id)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.to_thread(self.publish, batch, timeout)
                return await asyncio.wrap_future(fut)
        except TimeoutError:
            raise VerdictTimeout(batch.session_id, batch.batch_id, timeout, self.topics.verdicts,
                                 batch) from None
        finally:
            listener.forget(batch.session_id, batch.batch_id, fut)

    async def acheck(self, session_id: str, events: Sequence[Mapping[str, Any] | BaseModel],
                     timeout: float = DEFAULT_CHECK_TIMEOUT, batch_id: str | None = None,
                     seq: int | None = None, policy: str | None = None,
                     metadata: Mapping[str, Any] | BatchMetadata | None = None) -> Verdict:
        """:meth:`check` for asyncio.

        Example (needs a broker and a worker)::

            verdicts = await asyncio.gather(*(client.acheck(f"s{i}", events) for i in range(10)))
        """
        batch = self.make_batch(session_id, events, batch_id, seq, policy, metadata)
        return await self.acheck_batch(batch, timeout)

    # -- lifecycle ---------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding records; returns how many are still unsent."""
        return self._producer.flush(timeout) if self._producer is not None else 0

    def close(self) -> None:
        """Flush, stop the verdict listener and release the connections (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            producer, listener = self._producer, self._listener
            self._producer = self._listener = None
        if producer is not None:
            producer.flush(10)
        if listener is not None:
            listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)


def _UNREACHABLE_CODES() -> tuple[int, ...]:
    from confluent_kafka import KafkaError

    # (librdkafka's local error codes: underscored in confluent-kafka, yet its public API)
    return (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._MSG_TIMED_OUT)  # noqa: SLF001


# -- typed consumers of the output topics ---------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


class RecordConsumer(Generic[M]):
    """Iterates typed records of one monitor topic, in order per partition.

    All partitions are assigned manually (no consumer group, nothing committed): ``from_beginning``
    starts at the earliest offsets, otherwise at the current end. Iteration stops after
    ``max_records`` records, after ``idle_timeout`` seconds without a record, or ``timeout``
    seconds in total (each optional; with none it runs until :meth:`stop` or Ctrl-C). Records that
    are not valid are skipped and counted in ``skipped`` (``strict=True`` raises instead).
    ``session_id`` keeps only one session's records.
    """

    model: ClassVar[type[BaseModel]]
    topic_key: ClassVar[str]

    def __init__(self, bootstrap_servers: str | None = None, prefix: str | None = None, *,
                 from_beginning: bool = False, timeout: float | None = None,
                 idle_timeout: float | None = None, max_records: int | None = None,
                 session_id: str | None = None, strict: bool = False,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 config: Mapping[str, Any] | None = None) -> None:
        import os

        self.bootstrap_servers = bootstrap_servers or env_bootstrap()
        self.prefix = prefix or os.environ.get("AGENT_MONITOR_PREFIX") or DEFAULT_PREFIX
        self.topic: str = getattr(TopicNames.for_prefix(self.prefix), self.topic_key)
        self.from_beginning = from_beginning
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.max_records = max_records
        self.session_id = session_id
        self.strict = strict
        self.connect_timeout = connect_timeout
        self.config = dict(config or {})
        self.skipped = 0
        self.count = 0
        self.last_source: SourceRef | None = None
        self._consumer: Any = None
        self._stop = threading.Event()

    def open(self) -> Self:
        """Connect and assign the partitions (done by iteration or ``with`` if not called)."""
        if self._consumer is not None:
            return self
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        wait_for_broker(self.bootstrap_servers, self.connect_timeout,
                        {k: v for k, v in self.config.items() if k.startswith(("security.", "sasl.", "ssl."))})
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": f"agent-monitor-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest" if self.from_beginning else "latest",
            "isolation.level": "read_committed",
            "logger": _KAFKA_LOG,
            **self.config,
        })
        try:
            parts = _partitions(consumer, self.topic, self.prefix, self.connect_timeout,
                                self.bootstrap_servers)
            if self.from_beginning:
                consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
            else:  # the end as of now, resolved before returning (see VerdictListener)
                ends = _end_offsets(consumer, self.topic, parts, self.connect_timeout)
                consumer.assign([TopicPartition(self.topic, p, ends[p]) for p in parts])
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        return self

    def parse(self, raw: bytes) -> M:
        return self.model.model_validate_json(raw)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[M]:
        self.open()
        start = last = time.monotonic()
        while self._consumer is not None and not self._stop.is_set():
            if self.max_records is not None and self.count >= self.max_records:
                return
            now = time.monotonic()
            if self.timeout is not None and now - start >= self.timeout:
                return
            if self.idle_timeout is not None and now - last >= self.idle_timeout:
                return
            msg = self._consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                log.debug("%s: %s", self.topic, msg.error())
                continue
            last = time.monotonic()
            try:
                record = self.parse(msg.value())
            except (ValidationError, ValueError) as exc:
                if self.strict:
                    raise MonitorError(f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: not a "
                                       f"{self.model.__name__}: {exc}") from None
                self.skipped += 1
                continue
            if self.session_id is not None and getattr(record, "session_id", None) != self.session_id:
                continue
            self.last_source = SourceRef(topic=msg.topic(), partition=msg.partition(), offset=msg.offset())
            self.count += 1
            yield record

    def stop(self) -> None:
        """Make a running iteration return at its next poll (safe from another thread)."""
        self._stop.set()

    def close(self) -> None:
        """Release the connection; call from the iterating thread (use :meth:`stop` from others)."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class VerdictConsumer(RecordConsumer[Verdict]):
    """Verdicts from ``<prefix>.verdicts``.

    Example (needs a broker)::

        with VerdictConsumer(prefix="agent", from_beginning=True, idle_timeout=5) as verdicts:
            for v in verdicts:
                print(v.session_id, v.batch_id, v.decision)
    """

    model = Verdict
    topic_key = "verdicts"


class AlertConsumer(RecordConsumer[Alert]):
    """Alerts (one per violation) from ``<prefix>.alerts``.

    Example (needs a broker)::

        with AlertConsumer(prefix="agent", max_records=10, timeout=30) as alerts:
            for a in alerts:
                print(a.alert_id, a.severity, a.message)
    """

    model = Alert
    topic_key = "alerts"


class DeadLetterConsumer(RecordConsumer[DeadLetter]):
    """Dead letters from ``<prefix>.deadletter``: ``original()`` gives the rejected bytes back.

    Example (needs a broker)::

        with DeadLetterConsumer(prefix="agent", from_beginning=True, idle_timeout=5) as dead:
            for d in dead:
                print(d.kind, d.reason, d.original()[:80])
    """

    model = DeadLetter
    topic_key = "deadletter"


CONSUMERS: dict[str, type[RecordConsumer[Any]]] = {
    "verdicts": VerdictConsumer,
    "alerts": AlertConsumer,
    "deadletter": DeadLetterConsumer,
}


def dumps_record(record: BaseModel) -> str:
    """One record as a JSON line (what ``agent-monitor tail --json`` prints)."""
    return json.dumps(record.model_dump(mode="json"), separators=(",", ":"))


__all__ = [
    "CONSUMERS",
    "AlertConsumer",
    "BrokerUnreachable",
    "DeadLetterConsumer",
    "MonitorClient",
    "MonitorError",
    "PublishError",
    "RecordConsumer",
    "TopicMissing",
    "VerdictConsumer",
    "VerdictListener",
    "VerdictTimeout",
    "producer_config",
    "wait_for_broker",
]
