"""The session-aware HTTP path: batches go to ``<prefix>.events`` and verdicts come back from
``<prefix>.verdicts``, so an agent behind plain HTTP gets the full stateful monitor (the worker
keeps the session's past; this server keeps nothing but recent verdicts).

One background consumer (:class:`VerdictFeed`) reads every partition of the verdicts topic, with
no consumer group: it resolves waiting requests by ``(session_id, batch_id)`` and keeps the last
verdicts of recently seen sessions. At start it reads back the last ``backfill`` records of each
partition, so a restarted server can list verdicts from before it started.

Example (needs a broker and a worker)::

    gateway = SessionGateway("127.0.0.1:9092", "agent")
    await gateway.start()
    verdict = await gateway.submit(EventBatch(session_id="s", batch_id="b1", events=[...]),
                                   wait=True, timeout=30)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

from pydantic import ValidationError

from monitor.client import (
    BrokerUnreachable,
    MonitorClient,
    MonitorError,
    PublishError,
    TopicMissing,
    VerdictTimeout,
    _end_offsets,
    _partitions,
    wait_for_broker,
)
from monitor.config import TopicNames
from monitor.models import EventBatch, Verdict

log = logging.getLogger("agent_monitor.api.sessions")


class RecentVerdicts:
    """The last ``per_session`` verdicts of the last ``max_sessions`` sessions seen (one per batch
    id: a repeated verdict replaces its earlier copy).

    >>> r = RecentVerdicts(per_session=2, max_sessions=1)
    >>> for b in ("b1", "b2", "b3"):
    ...     r.add(Verdict(session_id="s", batch_id=b, decision="allow"))
    >>> [v.batch_id for v in r.get("s")]
    ['b2', 'b3']
    >>> r.add(Verdict(session_id="t", batch_id="x", decision="deny")); r.get("s")
    []
    """

    def __init__(self, per_session: int = 64, max_sessions: int = 10_000) -> None:
        self.per_session = per_session
        self.max_sessions = max_sessions
        self._by_session: OrderedDict[str, deque[Verdict]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, verdict: Verdict) -> None:
        with self._lock:
            recent = self._by_session.get(verdict.session_id)
            if recent is None:
                recent = self._by_session[verdict.session_id] = deque(maxlen=self.per_session)
            else:
                for old in list(recent):
                    if old.batch_id == verdict.batch_id:
                        recent.remove(old)
            recent.append(verdict)
            self._by_session.move_to_end(verdict.session_id)
            while len(self._by_session) > self.max_sessions:
                self._by_session.popitem(last=False)

    def get(self, session_id: str, limit: int | None = None) -> list[Verdict]:
        with self._lock:
            found = list(self._by_session.get(session_id, ()))
        return found[-limit:] if limit else found


class VerdictFeed:
    """A thread consuming ``<prefix>.verdicts`` (every partition, no group): resolves waiters and
    fills :class:`RecentVerdicts`."""

    def __init__(self, bootstrap: str, topics: TopicNames, recent: RecentVerdicts,
                 backfill: int = 1000, connect_timeout: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.recent = recent
        self.backfill = backfill
        self.connect_timeout = connect_timeout
        self._waiters: dict[tuple[str, str], list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        self.started_at: float | None = None
        self.caught_up = threading.Event()

    def start(self) -> None:
        """Assign every partition at ``end - backfill`` (blocking; run it on a thread)."""
        from confluent_kafka import Consumer, TopicPartition

        wait_for_broker(self.bootstrap, self.connect_timeout)
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"agent-monitor-api-{uuid.uuid4().hex}",  # never joins: manual assignment
            "enable.auto.commit": False,
            "auto.offset.reset": "latest",
            "fetch.wait.max.ms": 50,
            "isolation.level": "read_committed",
        })
        try:
            topic = self.topics.verdicts
            parts = _partitions(consumer, topic, self.topics.prefix, self.connect_timeout, self.bootstrap)
            ends = _end_offsets(consumer, topic, parts, self.connect_timeout)
            starts = {}
            for p in parts:
                low, _high = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                            timeout=self.connect_timeout)
                starts[p] = max(low, ends[p] - self.backfill)
            self._ends = ends
            # explicit offsets: a verdict produced after this returns is never missed
            consumer.assign([TopicPartition(topic, p, starts[p]) for p in parts])
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._run, name="agent-monitor-api-verdicts", daemon=True)
        self._thread.start()

    def expect(self, session_id: str, batch_id: str) -> asyncio.Future:
        """A future for the verdict of ``(session_id, batch_id)``; call before publishing."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._waiters.setdefault((session_id, batch_id), []).append((loop, fut))
        return fut

    def forget(self, session_id: str, batch_id: str, fut: asyncio.Future) -> None:
        with self._lock:
            waiting = [w for w in self._waiters.get((session_id, batch_id), []) if w[1] is not fut]
            if waiting:
                self._waiters[(session_id, batch_id)] = waiting
            else:
                self._waiters.pop((session_id, batch_id), None)

    @staticmethod
    def _resolve(fut: asyncio.Future, verdict: Verdict) -> None:
        if not fut.done():
            fut.set_result(verdict)

    def _run(self) -> None:
        seen: dict[int, int] = {}
        while not self._stop.is_set():
            try:
                msg = self._consumer.poll(0.2)
            except Exception:  # noqa: BLE001 - keep serving; librdkafka reconnects by itself
                log.exception("verdict consumer poll failed")
                time.sleep(0.5)
                continue
            if msg is None:
                if not self.caught_up.is_set() and all(
                        seen.get(p, -1) + 1 >= end for p, end in self._ends.items()):
                    self.caught_up.set()
                continue
            if msg.error():
                continue
            seen[msg.partition()] = msg.offset()
            try:
                verdict = Verdict.model_validate_json(msg.value())
            except (ValidationError, ValueError, TypeError):
                log.warning("skipping a record on %s that is not a Verdict (partition %s offset %s)",
                            msg.topic(), msg.partition(), msg.offset())
                continue
            self.recent.add(verdict)
            with self._lock:
                waiting = self._waiters.pop((verdict.session_id, verdict.batch_id), [])
            for loop, fut in waiting:
                try:
                    loop.call_soon_threadsafe(self._resolve, fut, verdict)
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


class SessionGateway:
    """Publishes batches and waits for their verdicts; starts lazily and retries a failed start
    on the next request, so the stateless endpoints work while Kafka is away."""

    def __init__(self, bootstrap: str, prefix: str, *, verdict_memory: int = 64,
                 max_sessions: int = 10_000, backfill: int = 1000, connect_timeout: float = 10.0) -> None:
        self.topics = TopicNames.for_prefix(prefix)
        self.bootstrap = bootstrap
        self.recent = RecentVerdicts(verdict_memory, max_sessions)
        self.feed = VerdictFeed(bootstrap, self.topics, self.recent, backfill, connect_timeout)
        self.client = MonitorClient(bootstrap, prefix, connect_timeout=connect_timeout)
        self.connect_timeout = connect_timeout
        self._start_lock = asyncio.Lock()
        self.state = "starting"
        self.last_error: str | None = None

    async def start(self) -> None:
        """Start the verdict feed (idempotent); raises :class:`BrokerUnreachable` or
        :class:`TopicMissing` when Kafka or the topics are not there."""
        if self.state == "ready":
            return
        async with self._start_lock:
            if self.state == "ready":
                return
            try:
                await asyncio.to_thread(self.feed.start)
            except (BrokerUnreachable, TopicMissing, MonitorError) as exc:
                self.state, self.last_error = "unavailable", str(exc)
                raise
            self.state, self.last_error = "ready", None

    async def submit(self, batch: EventBatch, wait: bool, timeout: float) -> Verdict | None:
        """Publish ``batch``; with ``wait`` also its verdict. Raises :class:`VerdictTimeout`,
        :class:`PublishError` or :class:`BrokerUnreachable`."""
        await self.start()
        fut = self.feed.expect(batch.session_id, batch.batch_id) if wait else None
        try:
            async with asyncio.timeout(timeout):
                await asyncio.to_thread(self.client.publish, batch, timeout)
                return None if fut is None else await fut
        except TimeoutError:
            raise VerdictTimeout(batch.session_id, batch.batch_id, timeout, self.topics.verdicts,
                                 batch) from None
        finally:
            if fut is not None:
                self.feed.forget(batch.session_id, batch.batch_id, fut)

    def close(self) -> None:
        self.feed.close()
        self.client.close()


__all__ = ["PublishError", "RecentVerdicts", "SessionGateway", "VerdictFeed"]
