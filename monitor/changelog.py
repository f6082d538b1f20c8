"""Partitioned key-value state held in memory and mirrored to a compacted changelog topic.

Partition ``p`` of the state is written to partition ``p`` of the changelog, the partition of the
input records that changed it, so state moves with its input partition: a worker that is assigned
``p`` restores it by reading the changelog partition ``p`` to its end (committed records only).
Each write is one changelog record (key = the state key, value = JSON, a deletion a tombstone).

Under exactly-once the writes ride in the runtime's transaction. The table keeps an undo log while
a transaction is open, so an aborted transaction leaves memory as the changelog has it.

Example::

    >>> sent = []
    >>> t = ChangelogTable("s.changelog", lambda key, p, value: sent.append((key, p, value)))
    >>> t.add_partition(3)
    >>> t.use(3)
    >>> t["a"] = {"n": 1}
    >>> del t["a"]
    >>> sent
    [('a', 3, b'{"n":1}'), ('a', 3, None)]
    >>> t.begin()
    >>> t["b"] = 2
    >>> t.rollback()
    >>> "b" in t, len(t)
    (False, 0)
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

from pydantic_core import from_json, to_json

from monitor.errors import MonitorError

log = logging.getLogger("agent_monitor.changelog")

_MISSING: Any = object()

Send = Callable[[str, int, "bytes | None"], None]


def encode(value: Any) -> bytes:
    """A value as its changelog record: bytes are taken as JSON already (a verdict the worker
    serialised once for its topic), anything else is serialised (pydantic-core: 3-5x json's speed).

    >>> encode({"a": [1, "é"]}), encode(b'{"x":1}')
    (b'{"a":[1,"\xc3\xa9"]}', b'{"x":1}')
    """
    if type(value) is bytes:
        return value
    return to_json(value)


class RestoreTimeout(MonitorError):
    """A changelog partition could not be read to its end in time (an open transaction of a dead
    worker holds it until the broker times that transaction out)."""


class ChangelogTable(MutableMapping[str, Any]):
    """The state of the partitions a worker owns; reads and writes go to the *current* partition
    (:meth:`use`), which the runtime sets to the partition of the record being processed.

    Values are held as the JSON records the changelog carries and decoded when read: a million
    sessions' state is then a few flat dicts of bytes that the cyclic garbage collector never
    walks (as dicts and lists it would, in pauses that show as verdict latency), a restore
    stores what it reads as it is, and memory is a fraction of the objects'.
    """

    def __init__(self, topic: str, send: Send) -> None:
        self.topic = topic
        self.send = send
        self.parts: dict[int, dict[str, bytes]] = {}
        self.partition = -1
        self._data: dict[str, bytes] = {}
        self._undo: list[tuple[int, str, Any]] | None = None

    # -- partitions ------------------------------------------------------------------------------

    def add_partition(self, partition: int, data: dict[str, bytes] | None = None) -> None:
        self.parts[partition] = data if data is not None else {}

    def drop_partition(self, partition: int) -> None:
        self.parts.pop(partition, None)
        if partition == self.partition:
            self.partition, self._data = -1, {}

    def use(self, partition: int) -> None:
        if partition != self.partition:
            self.partition = partition
            self._data = self.parts[partition]

    # -- transactions ----------------------------------------------------------------------------

    def begin(self) -> None:
        """Start recording undo entries (exactly-once: a transaction opened)."""
        self._undo = []

    def commit(self) -> None:
        self._undo = [] if self._undo is not None else None

    def rollback(self) -> None:
        """Put back every value changed since :meth:`begin` (the transaction was aborted)."""
        undo, self._undo = self._undo or [], []
        for partition, key, old in reversed(undo):
            data = self.parts.get(partition)
            if data is None:
                continue  # the partition left meanwhile: its state goes with it
            if old is _MISSING:
                data.pop(key, None)
            else:
                data[key] = old

    # -- the mapping -----------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return from_json(self._data[key])

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._data.get(key)
        return default if raw is None else from_json(raw)

    def get_json(self, key: str) -> bytes | None:
        """A value as its JSON record, undecoded (a reader that validates JSON straight into a
        model skips building the dicts)."""
        return self._data.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __setitem__(self, key: str, value: Any) -> None:
        raw = encode(value)
        if self._undo is not None:
            self._undo.append((self.partition, key, self._data.get(key, _MISSING)))
        self._data[key] = raw
        self.send(key, self.partition, raw)

    def __delitem__(self, key: str) -> None:
        if key not in self._data:
            raise KeyError(key)
        self.pop(key)

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        old = self._data.pop(key, _MISSING)
        if old is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        if self._undo is not None:
            self._undo.append((self.partition, key, old))
        self.send(key, self.partition, None)
        return from_json(old)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def sizes(self) -> dict[int, int]:
        """Keys held per partition."""
        return {p: len(d) for p, d in self.parts.items()}


def restore(bootstrap: str, topic: str, partitions: list[int], timeout: float = 120.0,
            config: dict[str, Any] | None = None) -> dict[int, dict[str, bytes]]:
    """Read changelog ``partitions`` from their start to their end, committed records only, into
    one dict per partition of the records as read (a tombstone removes its key).

    The end is the partition's high watermark when the read starts: a read_committed reader
    stops short of it while a transaction on it is open, so this waits until that transaction is
    committed or aborted (a dead worker's, at the broker's transaction timeout), up to
    ``timeout`` seconds, then raises :class:`RestoreTimeout`.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    out: dict[int, dict[str, bytes]] = {p: {} for p in partitions}
    if not partitions:
        return out
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"agent-monitor-restore-{uuid.uuid4().hex}",  # never joined nor committed
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        **(config or {}),
    })
    deadline = time.monotonic() + timeout
    try:
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = _watermarks(consumer, TopicPartition(topic, p), deadline)
            if high > low:
                ends[p] = high
        if not ends:
            return out
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        while ends:
            if time.monotonic() > deadline:
                raise RestoreTimeout(
                    f"changelog {topic} partitions {sorted(ends)} not read to their end within "
                    f"{timeout:g}s (an open transaction of a stopped worker?)")
            for m in take(consumer, 10_000, 0.5):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 - confluent-kafka's public name
                        p = m.partition()
                        if p in ends and m.offset() >= ends[p]:
                            del ends[p]
                        continue
                    raise RuntimeError(f"reading changelog {topic}: {err.str()}")
                data = out[m.partition()]
                key = m.key().decode()
                value = m.value()
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
    finally:
        consumer.close()
    return out


def take(consumer: Any, n: int, timeout: float) -> list[Any]:
    """Up to ``n`` records: waits up to ``timeout`` for the first, then takes what is already
    fetched. (``consume(n, timeout)`` alone waits until ``n`` records or the whole timeout.)"""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(n - 1, 0)] if n > 1 else [first]


def _watermarks(consumer: Any, tp: Any, deadline: float) -> tuple[int, int]:
    """A partition's offsets; a topic created a moment ago may have no leader yet: retry."""
    from confluent_kafka import KafkaException

    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=max(1.0, deadline - time.monotonic()))
            return int(low), int(high)
        except KafkaException as exc:
            if time.monotonic() >= deadline:
                raise RestoreTimeout(f"cannot read the offsets of {tp.topic}[{tp.partition}]: "
                                     f"{exc.args[0].str()}") from None
            time.sleep(0.2)
