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
from collections import OrderedDict, deque
from typing import Any

from monitor.client import (
    BrokerUnreachable,
    MonitorClient,
    MonitorError,
    PublishError,
    TopicMissing,
    VerdictListener,
    VerdictTimeout,
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


class VerdictFeed(VerdictListener):
    """A thread consuming ``<prefix>.verdicts`` (every partition, no group): the SDK's listener,
    started ``backfill`` records before each partition's end, that fills :class:`RecentVerdicts`
    and resolves asyncio waiters."""

    group_prefix = "agent-monitor-api"
    thread_name = "agent-monitor-api-verdicts"

    def __init__(self, bootstrap: str, topics: TopicNames, recent: RecentVerdicts,
                 backfill: int = 1000, connect_timeout: float = 10.0) -> None:
        super().__init__(bootstrap, topics, {}, connect_timeout)
        self.recent = recent
        self.backfill = backfill
        self._loop_waiters: dict[tuple[str, str], list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self.started_at: float | None = None
        self.caught_up = threading.Event()

    def start(self) -> None:
        """Assign every partition at ``end - backfill`` (blocking; run it on a thread)."""
        wait_for_broker(self.bootstrap, self.connect_timeout)
        super().start()
        self.started_at = time.time()

    def _start_offsets(self, consumer: Any, topic: str, ends: dict[int, int]) -> dict[int, int]:
        from confluent_kafka import TopicPartition

        starts = {}
        for p, end in ends.items():
            low, _high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=self.connect_timeout)
            starts[p] = max(low, end - self.backfill)
        return starts

    def expect(self, session_id: str, batch_id: str) -> asyncio.Future:  # type: ignore[override]
        """A future for the verdict of ``(session_id, batch_id)``; call before publishing."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._loop_waiters.setdefault((session_id, batch_id), []).append((loop, fut))
        return fut

    def forget(self, session_id: str, batch_id: str, fut: asyncio.Future) -> None:  # type: ignore[override]
        with self._lock:
            waiting = [w for w in self._loop_waiters.get((session_id, batch_id), []) if w[1] is not fut]
            if waiting:
                self._loop_waiters[(session_id, batch_id)] = waiting
            else:
                self._loop_waiters.pop((session_id, batch_id), None)

    @staticmethod
    def _set(fut: asyncio.Future, verdict: Verdict) -> None:
        if not fut.done():
            fut.set_result(verdict)

    def _idle(self) -> None:
        if not self.caught_up.is_set() and all(
                self.positions.get(p, -1) + 1 >= end for p, end in self._ends.items()):
            self.caught_up.set()

    def _on_verdict(self, verdict: Verdict) -> None:
        self.recent.add(verdict)
        with self._lock:
            waiting = self._loop_waiters.pop((verdict.session_id, verdict.batch_id), [])
        for loop, fut in waiting:
            try:
                loop.call_soon_threadsafe(self._set, fut, verdict)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass


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
