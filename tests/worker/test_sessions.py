"""Session lifecycle on a real broker: an idle TTL and an explicit end remove a session's state
(tombstones on the changelog), and a session that comes back starts afresh."""

from __future__ import annotations

import asyncio
import time
import uuid

from confluent_kafka import Consumer, TopicPartition
from traces import BENIGN, FLOW, SEND_EMAIL, USER_SEND
from workers import batch, consume_covering, produce_batches, topics, worker

from monitor.config import WorkerSettings
from monitor.core import BatchEvaluator
from monitor.models import EventBatch
from monitor.policy import PolicySet, load_policy_text
from monitor.state import HEAD_PREFIX, SessionStore


def live_state(bootstrap: str, topic: str) -> dict[str, bytes]:
    """The changelog as compaction would leave it: the last value of every key still set."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "enable.partition.eof": True,
                  "isolation.level": "read_committed"})
    parts = list(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    state: dict[str, bytes | None] = {}
    done: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        while len(done) < len(parts) and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                continue
            if m.error():
                done.add(m.partition())
                continue
            state[m.key().decode()] = m.value()
    finally:
        c.close()
    return {k: v for k, v in state.items() if v is not None}


def sessions_in(state: dict[str, bytes]) -> set[str]:
    return {k[len(HEAD_PREFIX):] for k in state if k.startswith(HEAD_PREFIX)}


def state_when(bootstrap: str, topic: str, sessions: set[str], timeout: float = 20.0) -> dict[str, bytes]:
    """The live state once it holds exactly ``sessions`` (state writes trail the verdicts a little)."""
    deadline = time.monotonic() + timeout
    while True:
        state = live_state(bootstrap, topic)
        if sessions_in(state) == sessions or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def test_idle_sessions_expire_and_an_ended_session_starts_afresh(kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    policy = tmp_path / "flow.gr"
    policy.write_text(FLOW)
    with worker(kafka_bootstrap, topic_prefix, policy, session_ttl_s=10.0):
        first = [batch("idle", [USER_SEND], "i1"), batch("ended", [USER_SEND], "e1"),
                 batch("ended", [BENIGN], "e2", end_session=True), batch("keep", [BENIGN], "k0")]
        produce_batches(kafka_bootstrap, t.events, first)
        got = consume_covering(kafka_bootstrap, t.verdicts, {(b.session_id, b.batch_id) for b in first})
        assert {v["batch_id"]: v["decision"] for v in got} == {"i1": "allow", "e1": "allow", "e2": "allow",
                                                               "k0": "allow"}
        # the ended session's state went at once; the others are there
        state = state_when(kafka_bootstrap, t.state, {"idle", "keep"})
        assert sessions_in(state) == {"idle", "keep"}
        idle_keys = [k for k in state if "\x1fidle" in k]
        assert len(idle_keys) >= 3  # its head, its log entry, its verdict
        # "keep" stays busy (a batch every 2 s) while "idle" idles past its 10 s TTL
        deadline = time.monotonic() + 40
        n = 0
        while True:
            n += 1
            produce_batches(kafka_bootstrap, t.events, [batch("keep", [BENIGN], f"k{n}")])
            after_state = live_state(kafka_bootstrap, t.state)
            if "idle" not in sessions_in(after_state) or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        assert sessions_in(after_state) == {"keep"}
        assert not [k for k in after_state if "\x1fidle" in k], "an expired session left records"
        # both come back: their past is gone, so the flow rule has nothing to match
        again = [batch("idle", [SEND_EMAIL], "i2"), batch("ended", [SEND_EMAIL], "e3")]
        produce_batches(kafka_bootstrap, t.events, again)
        got = consume_covering(kafka_bootstrap, t.verdicts, {(b.session_id, b.batch_id) for b in again})
    decisions = {v["batch_id"]: v["decision"] for v in got}
    assert decisions["i2"] == "allow" and decisions["e3"] == "allow"


def test_end_session_batch_is_checked_then_forgotten():
    policy = load_policy_text(FLOW, policy_id="flow")
    core = BatchEvaluator(PolicySet.single(policy), WorkerSettings(policy_path="-"))
    table: dict = {}
    store = SessionStore(table)

    def run(events, bid, **kw):
        return asyncio.run(core.evaluate(store, EventBatch(session_id="s", batch_id=bid, events=events, **kw), None))

    run([USER_SEND], "b1")
    # the end batch is checked against the past like any other: here it is denied
    out = run([SEND_EMAIL], "b2", end_session=True)
    assert out.verdict.decision == "deny" and out.ended
    assert table == {}, "an ended session keeps nothing"
    # an empty end batch is valid and allowed
    out = run([], "b3", end_session=True)
    assert out.verdict.decision == "allow" and out.ended and table == {}
