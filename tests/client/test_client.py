"""The client SDK against a real Kafka broker: partitioning, check/verdict round trips, timeouts,
typed consumers, and clear errors. A tiny fake responder stands in for the worker: this tests the
client, not the monitor."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Producer

from monitor.client import (
    AlertConsumer,
    BrokerUnreachable,
    DeadLetterConsumer,
    MonitorClient,
    TopicMissing,
    VerdictConsumer,
    VerdictTimeout,
)
from monitor.config import TopicNames
from monitor.models import Alert, DeadLetter, EventBatch, SourceRef, Verdict, Violation
from monitor.topics import create_topics

EVENTS_PARTITIONS = 6
USER = {"role": "user", "content": "hello"}
from workers import FakeResponder, read_messages


def java_murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` (the Java client's default partitioner), transcribed."""
    length = len(data)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(length // 4):
        k = int.from_bytes(data[4 * i:4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length & ~3
    extra = length % 4
    if extra == 3:
        h ^= data[rest + 2] << 16
    if extra >= 2:
        h ^= data[rest + 1] << 8
    if extra >= 1:
        h ^= data[rest]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def java_partition(key: bytes, partitions: int) -> int:
    return (java_murmur2(key) & 0x7FFFFFFF) % partitions


def test_java_murmur2_transcription_matches_kafka_test_vectors() -> None:
    # values from Kafka's UtilsTest.testMurmur2 (signed ints there)
    vectors = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
               b"a-little-bit-longer-string": -1486304829,
               b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, b"abc": 479470107}
    for data, signed in vectors.items():
        assert java_murmur2(data) == signed & 0xFFFFFFFF, data


@pytest.fixture
def topics(kafka_bootstrap: str, topic_prefix: str) -> TopicNames:
    create_topics(kafka_bootstrap, topic_prefix, partitions_override=EVENTS_PARTITIONS)
    return TopicNames.for_prefix(topic_prefix)


@pytest.fixture
def client(kafka_bootstrap: str, topics: TopicNames) -> Iterator[MonitorClient]:
    with MonitorClient(kafka_bootstrap, prefix=topics.prefix, connect_timeout=20) as c:
        yield c


def test_submit_lands_on_the_murmur2_partition(kafka_bootstrap: str, topics: TopicNames,
                                               client: MonitorClient) -> None:
    sessions = [f"session-{i}-{uuid.uuid4().hex[:6]}" for i in range(24)]
    sent: list[EventBatch] = []
    for s in sessions:
        for seq in range(2):
            sent.append(client.submit(s, [USER], seq=seq, policy="p", metadata={"agent": "test"}))
    # fire and forget, then flush: lands the same way
    extra = [client.submit(f"nowait-{i}", [USER], policy="p", metadata={"agent": "test"}, wait=False)
             for i in range(6)]
    assert client.flush(30) == 0 and client.delivery_errors == []
    sent += extra
    records = read_messages(kafka_bootstrap, topics.events, len(sent))
    assert len(records) == len(sent)
    aiokafka_partitioner = DefaultPartitioner()
    all_parts = list(range(EVENTS_PARTITIONS))
    by_batch = {b.batch_id: b for b in sent}
    used = set()
    for m in records:
        key = m.key()
        expected = java_partition(key, EVENTS_PARTITIONS)
        assert m.partition() == expected, f"{key!r}: partition {m.partition()}, Java murmur2 says {expected}"
        assert m.partition() == aiokafka_partitioner(key, all_parts, all_parts)
        used.add(m.partition())
        batch = EventBatch.model_validate_json(m.value())
        assert key == batch.session_id.encode()
        assert batch.model_dump() == by_batch[batch.batch_id].model_dump()
        assert batch.policy == "p" and batch.metadata.agent == "test"
        uuid.UUID(hex=batch.batch_id)  # default batch ids are uuid4s
    assert len(used) > 1, "24 sessions should spread over several partitions"
    # a session's batches are in order on one partition
    for s in sessions:
        seqs = [EventBatch.model_validate_json(m.value()).seq for m in records if m.key() == s.encode()]
        assert seqs == [0, 1]


def test_check_returns_the_batchs_verdict(kafka_bootstrap: str, topics: TopicNames,
                                          client: MonitorClient) -> None:
    with FakeResponder(kafka_bootstrap, topics):
        allow = client.check("s-allow", [USER], timeout=30, batch_id="b1")
        deny = client.check("s-deny", [{"role": "user", "content": "please deny"}], timeout=30)
    assert isinstance(allow, Verdict) and allow.decision == "allow" and allow.batch_id == "b1"
    assert deny.decision == "deny" and [v.message for v in deny.violations] == ["said deny"]
    assert deny.session_id == "s-deny"


def test_concurrent_checks_each_get_their_own_verdict(kafka_bootstrap: str, topics: TopicNames,
                                                      client: MonitorClient) -> None:
    results: dict[str, Verdict] = {}

    def one(i: int) -> None:
        text = "deny" if i % 3 == 0 else "fine"
        results[f"s{i}"] = client.check(f"s{i}", [{"role": "user", "content": text}], batch_id=f"b{i}",
                                        timeout=30)

    with FakeResponder(kafka_bootstrap, topics, delay=0.01):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(results) == sorted(f"s{i}" for i in range(12))
    for i in range(12):
        v = results[f"s{i}"]
        assert (v.session_id, v.batch_id) == (f"s{i}", f"b{i}")
        assert v.decision == ("deny" if i % 3 == 0 else "allow")


def test_async_check_and_submit(kafka_bootstrap: str, topics: TopicNames, client: MonitorClient) -> None:
    async def main() -> list[Verdict]:
        ticks = 0

        async def ticker() -> None:  # proves the loop is not blocked while checks wait
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        t = asyncio.create_task(ticker())
        batch = await client.asubmit("a-submit", [USER])
        assert batch.session_id == "a-submit"
        verdicts = await asyncio.gather(*(client.acheck(f"a{i}", [USER], timeout=30) for i in range(5)))
        t.cancel()
        assert ticks >= 2
        return verdicts

    with FakeResponder(kafka_bootstrap, topics, delay=0.05):
        verdicts = asyncio.run(main())
    assert [v.session_id for v in verdicts] == [f"a{i}" for i in range(5)]
    assert all(v.decision == "allow" for v in verdicts)


def test_check_times_out_without_a_worker(topics: TopicNames, client: MonitorClient) -> None:
    start = time.monotonic()
    with pytest.raises(VerdictTimeout) as info:
        client.check("lonely", [USER], batch_id="b-lonely", timeout=1.5)
    elapsed = time.monotonic() - start
    assert 1.4 <= elapsed < 15
    assert info.value.session_id == "lonely" and info.value.batch_id == "b-lonely"
    assert "b-lonely" in str(info.value) and topics.verdicts in str(info.value)
    assert isinstance(info.value, TimeoutError)
    # what a retry needs: the very batch, so the worker answers its batch_id once
    assert info.value.batch is not None and info.value.batch.batch_id == "b-lonely"
    assert info.value.batch.trace() == [USER]

    async def acheck() -> None:
        await client.acheck("lonely", [USER], timeout=1.0)

    with pytest.raises(VerdictTimeout):
        asyncio.run(acheck())


def test_typed_consumers(kafka_bootstrap: str, topics: TopicNames) -> None:
    p = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    v = Verdict(session_id="s1", batch_id="b1", decision="deny",
                violations=[Violation(alert_id="x" * 32, rule_index=0, message="m [risk=low]", severity="low",
                                      key="(0, (0,))", addresses=["messages.0"])])
    alert = Alert.from_violation(v.violations[0], v)
    dead = DeadLetter(kind="not_json", reason="not JSON", source=SourceRef(topic=topics.events, partition=0,
                                                                          offset=7),
                      value_b64=DeadLetter.encode(b"{oops"), size=5)
    p.produce(topics.verdicts, key=b"s1", value=v.model_dump_json().encode())
    p.produce(topics.verdicts, key=b"s1", value=b"not a verdict")
    p.produce(topics.verdicts, key=b"s2", value=v.model_copy(update={"session_id": "s2"}).model_dump_json().encode())
    p.produce(topics.alerts, key=b"s1", value=alert.model_dump_json().encode())
    p.produce(topics.deadletter, key=None, value=dead.model_dump_json().encode())
    assert p.flush(10) == 0

    with VerdictConsumer(kafka_bootstrap, topics.prefix, from_beginning=True, idle_timeout=3) as verdicts:
        got = list(verdicts)
    assert sorted(x.session_id for x in got) == ["s1", "s2"]
    assert all(isinstance(x, Verdict) for x in got) and verdicts.skipped == 1
    assert got[0].violations[0].severity == "low"

    with VerdictConsumer(kafka_bootstrap, topics.prefix, from_beginning=True, idle_timeout=2,
                         session_id="s2") as only_s2:
        assert [x.session_id for x in only_s2] == ["s2"]

    with AlertConsumer(kafka_bootstrap, topics.prefix, from_beginning=True, max_records=1, timeout=20) as alerts:
        got_alerts = list(alerts)
    assert got_alerts == [alert] and alerts.last_source is not None

    with DeadLetterConsumer(kafka_bootstrap, topics.prefix, from_beginning=True, max_records=1,
                            timeout=20) as dl:
        (d,) = list(dl)
    assert isinstance(d, DeadLetter) and d.original() == b"{oops" and d.source.offset == 7

    # "latest": positioned at the end when opened, sees only what comes after
    with VerdictConsumer(kafka_bootstrap, topics.prefix, max_records=1, timeout=20) as latest:
        p.produce(topics.verdicts, key=b"s3", value=v.model_copy(update={"session_id": "s3"}).model_dump_json().encode())
        p.flush(10)
        assert [x.session_id for x in latest] == ["s3"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def test_unreachable_broker_is_a_clear_error() -> None:
    address = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with MonitorClient(address, prefix="nowhere", connect_timeout=1.5) as c, \
            pytest.raises(BrokerUnreachable) as info:
        c.submit("s", [USER])
    assert time.monotonic() - start < 10
    assert address in str(info.value) and "agent-monitor broker start" in str(info.value)
    with pytest.raises(BrokerUnreachable, match=address):
        list(VerdictConsumer(address, "nowhere", connect_timeout=1, timeout=1))


def test_missing_topics_are_named(kafka_bootstrap: str, topic_prefix: str) -> None:
    with MonitorClient(kafka_bootstrap, prefix=topic_prefix, connect_timeout=2) as c, \
            pytest.raises(TopicMissing, match=rf"{topic_prefix}\.verdicts.*topics create"):
        c.check("s", [USER], timeout=2)
