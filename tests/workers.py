"""Test helpers: worker subprocesses and plain Kafka producing/consuming for assertions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from monitor.config import TopicNames, WorkerSettings
from monitor.models import EventBatch

ROOT = Path(__file__).resolve().parent.parent
READY = "agent-monitor worker ready"


class WorkerProcess:
    """A monitor worker in its own process, as it runs in production."""

    def __init__(self, bootstrap: str, prefix: str, policy: str | Path, **settings: Any) -> None:
        self.settings = WorkerSettings(bootstrap_servers=bootstrap, topic_prefix=prefix,
                                       policy_path=str(policy), **settings)
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.stderr_path = Path(tempfile.mkstemp(prefix="worker-", suffix=".log")[1])

    def start(self, wait: bool = True, timeout: float = 90.0) -> "WorkerProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor.worker", self.settings.model_dump_json()],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, cwd=ROOT, env=env,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            try:
                self.wait_ready(timeout=timeout)
            except BaseException:
                self.stop()  # a worker that never got ready must not outlive its test
                raise
        return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def ready_lines(self) -> list[str]:
        with self._cond:
            return [ln for ln in self.lines if READY in ln]

    def assigned(self) -> list[int]:
        lines = self.ready_lines()
        if not lines:
            return []
        part = lines[-1].rsplit("assigned=", 1)[-1]
        return [int(p) for p in part.split(",") if p]

    def wait_ready(self, count: int = 1, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len([ln for ln in self.lines if READY in ln]) < count:
                if self.proc and self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"worker not ready after {timeout}s (log {self.stderr_path}):\n"
                                       f"{self.log_tail()}")
                self._cond.wait(min(left, 0.5))

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_stderr", None):
            self._stderr.close()

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
