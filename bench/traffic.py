"""Agent traffic for the live benchmarks and the chaos run: sessions, a paced producer, a verdict reader.

Speaks only the wire contract: EventBatch JSON keyed by session id, produced with a murmur2
partitioner as the SDK does; verdicts read with read_committed. Each batch is one agent turn of
3 events (a user message, an assistant tool call, its tool output). One session in ``risky_every``
asks to "send" something at turn 3 and calls ``send_email`` at turn 5: the flow rule below denies
that batch, so every run knows which verdicts must be denies.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from monitor.changelog import take

POLICY = '''raise "Must not call tool after user uses keyword" if:
    (msg: Message) -> (tool: ToolCall)
    msg.role == "user"
    "send" in msg.content
    tool is tool:send_email
'''

RISKY_TURN, SEND_TURN = 3, 5


def turn_events(session: int, turn: int, risky: bool) -> list[dict[str, Any]]:
    """The 3 events of one turn of a session."""
    text = (f"Could you send the notes of ticket {turn} to the team?" if risky and turn == RISKY_TURN
            else f"Please look at ticket {turn} of project {session} and summarise it.")
    tool = "send_email" if risky and turn == SEND_TURN else ("search", "read_file")[turn % 2]
    call_id = f"c{turn}"
    return [
        {"role": "user", "content": text},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": tool, "arguments": {"query": f"ticket {turn}", "n": turn}}}]},
        {"role": "tool", "tool_call_id": call_id, "content": f"{tool} result for ticket {turn}: ok"},
    ]


@dataclass(frozen=True)
class Batch:
    session_id: str
    batch_id: str
    value: bytes
    deny: bool  # the flow rule must deny it


class Sessions:
    """Round-robin turns over ``count`` sessions; session ids carry ``tag`` so runs never mix."""

    def __init__(self, count: int, tag: str | None = None, risky_every: int = 50) -> None:
        self.count = count
        self.tag = tag or uuid.uuid4().hex[:8]
        self.risky_every = risky_every
        self.turns = [0] * count
        self.next = 0

    def batch(self) -> Batch:
        s = self.next
        self.next = (s + 1) % self.count
        turn = self.turns[s]
        self.turns[s] = turn + 1
        risky = s % self.risky_every == 0
        sid = f"{self.tag}-s{s:05d}"
        bid = f"t{turn}"
        rec = {"session_id": sid, "batch_id": bid, "seq": turn, "events": turn_events(s, turn, risky),
               "metadata": {"agent": "bench"}}
        return Batch(sid, bid, json.dumps(rec, separators=(",", ":")).encode(),
                     deny=risky and turn == SEND_TURN)

    def batches(self, n: int) -> Iterator[Batch]:
        for _ in range(n):
            yield self.batch()


def producer(bootstrap: str) -> Any:
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "acks": "all",
                     "enable.idempotence": True, "linger.ms": 0,
                     "queue.buffering.max.messages": 2_000_000})


def produce_all(bootstrap: str, topic: str, batches: Iterator[Batch]) -> list[Batch]:
    """Publish as fast as Kafka takes them; returns what was sent."""
    p = producer(bootstrap)
    sent = []
    for b in batches:
        while True:
            try:
                p.produce(topic, b.value, b.session_id.encode())
                break
            except BufferError:
                p.poll(0.05)
        sent.append(b)
        if len(sent) % 1000 == 0:
            p.poll(0)
    assert p.flush(120) == 0, "records left unsent after 120 s"
    return sent


def paced(p: Any, topic: str, sessions: Sessions, per_second: float, seconds: float,
          sent_at: dict[tuple[str, str], float]) -> list[Batch]:
    """Publish ``per_second`` batches for ``seconds`` on a fixed schedule (open loop: a slow
    consumer does not slow the offered load); ``sent_at`` gets each batch's send time.

    ``p`` is a producer made by :func:`producer` and used before: a new one spends its first half
    second connecting and getting its idempotent producer id, which would count as latency."""
    sent = []
    start = time.perf_counter()
    n = int(per_second * seconds)
    for i in range(n):
        due = start + i / per_second
        while True:
            left = due - time.perf_counter()
            if left <= 0:
                break
            p.poll(min(left, 0.002))
        b = sessions.batch()
        sent_at[(b.session_id, b.batch_id)] = time.time()
        p.produce(topic, b.value, b.session_id.encode())
        p.poll(0)
        sent.append(b)
    assert p.flush(60) == 0, "records left unsent after 60 s"
    return sent


@dataclass
class VerdictReader:
    """A read_committed reader of a verdicts topic from its current end: per (session, batch), the
    receive time and essence (decision, reason, alert ids and addresses) of every copy."""

    bootstrap: str
    topic: str
    received: dict[tuple[str, str], list[tuple[float, str]]] = field(default_factory=dict)
    count: int = 0

    def __post_init__(self) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "isolation.level": "read_committed",
                                  "fetch.wait.max.ms": 10, "auto.offset.reset": "earliest"})
        md = self.consumer.list_topics(self.topic, timeout=30)
        parts = sorted(md.topics[self.topic].partitions)
        ends = {p: _end(self.consumer, TopicPartition(self.topic, p)) for p in parts}
        self.consumer.assign([TopicPartition(self.topic, p, ends[p]) for p in parts])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for m in take(self.consumer, 1000, 0.05):
                if m.error():
                    continue
                now = time.time()
                v = json.loads(m.value())
                with self._lock:
                    essence = (v.get("decision", ""), v.get("reason"),
                               tuple(sorted((x["alert_id"], tuple(x["addresses"])) for x in v.get("violations", ()))))
                    self.received.setdefault((v["session_id"], v["batch_id"]), []).append((now, essence))
                    self.count += 1

    def wait_for(self, keys: set[tuple[str, str]], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if keys.issubset(self.received.keys()):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.consumer.close()


def _end(consumer: Any, tp: Any, timeout: float = 60.0) -> int:
    """A partition's end offset; a topic created a moment ago may have no leader yet: retry."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=10)[1]
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def account(sent: list[Batch], reader: VerdictReader) -> dict[str, int]:
    """Missing, duplicated and conflicting verdicts, and expected denies not given."""
    missing = duplicates = conflicting = wrong = 0
    for b in sent:
        got = reader.received.get((b.session_id, b.batch_id), [])
        if not got:
            missing += 1
            continue
        duplicates += len(got) - 1
        conflicting += len({essence for _, essence in got}) > 1  # a repeat must be the same verdict
        wrong += ("deny" if b.deny else "allow") not in {essence[0] for _, essence in got}
    return {"missing": missing, "duplicates": duplicates, "conflicting": conflicting, "wrong": wrong}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))]
