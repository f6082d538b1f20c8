"""Test helpers: worker subprocesses, a fake responder in a worker's place, and plain Kafka producing/consuming
for assertions."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from monitor.config import TopicNames, WorkerSettings
from monitor.models import EventBatch, SourceRef, Verdict, Violation
from monitor.worker_process import WorkerProcess


def worker(bootstrap: str, prefix: str, policy: str | Path, **settings: Any) -> WorkerProcess:
    """A monitor worker in its own process, as it runs in production (``with`` starts it and waits
    until it is ready)."""
    return WorkerProcess(WorkerSettings(bootstrap_servers=bootstrap, topic_prefix=prefix,
                                        policy_path=str(policy), **settings))


def producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                     "linger.ms": 5, "enable.idempotence": True})


def produce_batches(bootstrap: str, topic: str, batches: Iterable[EventBatch | tuple[str, bytes]]) -> int:
    """Publish batches (or raw ``(key, value)`` records) in order; returns the count."""
    p = producer(bootstrap)
    n = 0
    for b in batches:
        if isinstance(b, EventBatch):
            p.produce(topic, key=b.session_id.encode(), value=b.model_dump_json().encode())
        else:
            key, value = b
            p.produce(topic, key=key.encode() if isinstance(key, str) else key, value=value)
        n += 1
        if n % 500 == 0:
            p.poll(0)
    assert p.flush(30) == 0, "records left unsent after 30 s"
    return n


def batch(session_id: str, events: list[dict], batch_id: str | None = None, **kw: Any) -> EventBatch:
    return EventBatch(session_id=session_id, batch_id=batch_id or uuid.uuid4().hex, events=events, **kw)


def consume(bootstrap: str, topic: str, *, until: int | None = None, timeout: float = 60.0,
            idle: float | None = None, to_end: bool = False) -> list[dict]:
    """Read a topic from the beginning as JSON dicts; stop at ``until`` records, after ``idle``
    seconds without a record, once every partition's end (as it was at the start) is read
    (``to_end``), or at ``timeout``."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=10)
    parts = md.topics[topic].partitions if topic in md.topics else {}
    c.assign([TopicPartition(topic, p, 0) for p in parts] or [TopicPartition(topic, 0, 0)])
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    position = {p: 0 for p in parts}
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if until is not None and len(out) >= until:
                break
            if to_end and all(position[p] >= ends[p] for p in parts):
                break
            # the idle clock starts at the first record: a cold worker may take a while to answer
            if idle is not None and out and time.monotonic() - last > idle:
                break
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            last = time.monotonic()
            position[m.partition()] = m.offset() + 1
            rec = json.loads(m.value())
            rec["_partition"], rec["_offset"] = m.partition(), m.offset()
            out.append(rec)
    finally:
        c.close()
    return out


def topics(prefix: str) -> TopicNames:
    return TopicNames.for_prefix(prefix)


def raw_values(bootstrap: str, topic: str, timeout: float = 30.0, idle: float = 3.0) -> list[bytes]:
    """Every value of a topic, undecoded (tombstones skipped)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=10)
    c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
    out: list[bytes] = []
    deadline, last = time.monotonic() + timeout, time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last < idle:
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            last = time.monotonic()
            if m.value() is not None:
                out.append(m.value())
    finally:
        c.close()
    return out


class Tail:
    """A consumer that keeps its position: counts a topic's records as they arrive."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"tail-{uuid.uuid4().hex}",
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
        md = self.consumer.list_topics(topic, timeout=10)
        self.consumer.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
        self.count = 0

    def wait_for(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.count < n:
            assert time.monotonic() < deadline, f"only {self.count} of {n} records after {timeout}s"
            m = self.consumer.poll(0.1)
            if m is not None and not m.error():
                self.count += 1
        return self.count

    def __enter__(self) -> "Tail":
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.close()


def consume_covering(bootstrap: str, topic: str, keys: set[tuple[str, str]], timeout: float = 120.0
                     ) -> list[dict]:
    """Read verdict-like records (committed ones) from the beginning until every
    ``(session_id, batch_id)`` in ``keys`` was seen (duplicates can arrive first, so a count is not
    enough), then to the end of every partition."""
    from confluent_kafka import KafkaError

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "isolation.level": "read_committed", "enable.partition.eof": True})
    parts = list(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out: list[dict] = []
    missing = set(keys)
    at_end: set[int] = set()  # partitions whose last event was their end
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not missing and len(at_end) == len(parts):
                break
            m = c.poll(0.2)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(m.partition())
                continue
            at_end.discard(m.partition())
            rec = json.loads(m.value())
            rec["_partition"], rec["_offset"] = m.partition(), m.offset()
            out.append(rec)
            missing.discard((rec["session_id"], rec["batch_id"]))
    finally:
        c.close()
    return out


def read_messages(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list:
    """The first ``expected`` records of ``topic`` from the beginning, as raw confluent-kafka messages."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is not None and not m.error():
                out.append(m)
    finally:
        c.close()
    return out


class FakeResponder:
    """Answers every batch on the events topic with a verdict: deny when an event says "deny"."""

    def __init__(self, bootstrap: str, topics: TopicNames, delay: float = 0.0) -> None:
        self.topics = topics
        self.delay = delay
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"fake-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False})
        parts = self.consumer.list_topics(topics.events, timeout=10).topics[topics.events].partitions
        self.consumer.assign([TopicPartition(topics.events, p, OFFSET_BEGINNING) for p in parts])
        self.producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
        self.stop = threading.Event()
        self.answered = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            m = self.consumer.poll(0.1)
            if m is None or m.error():
                continue
            batch = EventBatch.model_validate_json(m.value())
            deny = any("deny" in json.dumps(e) for e in batch.trace())
            violations = [Violation(alert_id="a" * 32, rule_index=0, message="said deny", key="(0, (0,))")] \
                if deny else []
            verdict = Verdict(session_id=batch.session_id, batch_id=batch.batch_id, seq=batch.seq,
                              decision="deny" if deny else "allow", violations=violations, engine="fake",
                              source=SourceRef(topic=m.topic(), partition=m.partition(), offset=m.offset()))
            time.sleep(self.delay)
            self.producer.produce(self.topics.verdicts, key=m.key(), value=verdict.model_dump_json().encode())
            self.producer.flush(10)
            self.answered += 1

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.consumer.close()
