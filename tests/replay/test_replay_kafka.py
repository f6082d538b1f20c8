"""Replay from a real broker's events topic: ranges, committed records only, bad records, verify,
publishing under another prefix, and the proof that replay gives exactly the worker's verdicts."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import Producer
from workers import batch, consume, produce_batches, topics, worker

from monitor.models import EventBatch
from monitor.replay import ReplayError, ReplayRequest, run_replay, verify_report
from monitor.report import Report
from monitor.topics import create_topics

FLOW = '''raise "Must not call tool after user uses keyword" if:
    (msg: Message) -> (tool: ToolCall)
    msg.role == "user"
    "send" in msg.content
    tool is tool:send_email
'''

USER_SEND = {"role": "user", "content": "Can you send this email to Peter?"}
USER_HI = {"role": "user", "content": "What is the weather?"}
SEND_EMAIL = {"id": "1", "type": "function", "function": {"name": "send_email", "arguments": {"to": "p"}}}
READ = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "2", "type": "function", "function": {"name": "read_file", "arguments": {"path": "/x"}}}]}
BENIGN = {"role": "assistant", "content": "Sure."}


def _policy(tmp_path):
    p = tmp_path / "flow.gr"
    p.write_text(FLOW)
    return p


def _replay(tmp_path, bootstrap: str, topic: str, name: str = "report.json", **kw) -> Report:
    out = tmp_path / name
    run_replay(ReplayRequest(policy=str(_policy(tmp_path)), bootstrap_servers=bootstrap, topic=topic,
                             out=str(out), progress=False, **kw))
    return Report.load(out)


def _transactional(bootstrap: str) -> Producer:
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"t-{uuid.uuid4().hex}",
                  "partitioner": "murmur2_random"})
    p.init_transactions(30)
    return p


def test_topic_replay_reads_committed_records_in_range_and_lists_bad_ones(kafka_bootstrap, topic_prefix,
                                                                          tmp_path):
    t = topics(topic_prefix)
    create_topics(kafka_bootstrap, topic_prefix, partitions_override=3)
    t0 = int(time.time() * 1000) - 60_000
    early = [batch("s1", [USER_SEND], "b1", seq=0), batch("s2", [USER_HI], "c1", seq=0)]
    p = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    for i, b in enumerate(early):  # an hour-old slice the time range must leave out
        p.produce(t.events, key=b.session_id.encode(), value=b.model_dump_json().encode(), timestamp=t0 + i)
    p.flush(30)
    cut = int(time.time() * 1000)
    produce_batches(kafka_bootstrap, t.events, [
        batch("s1", [SEND_EMAIL], "b2", seq=1),
        ("s2", b"{not json"),
        ("s3", json.dumps({"session_id": "s3", "batch_id": "x1", "events": []}).encode()),
        batch("s2", [SEND_EMAIL], "c2", seq=1),
    ])
    tx = _transactional(kafka_bootstrap)
    tx.begin_transaction()
    tx.produce(t.events, key=b"s1", value=batch("s1", [USER_SEND], "aborted").model_dump_json().encode())
    tx.abort_transaction(30)
    tx.begin_transaction()  # committed last: each partition's end is a transaction marker
    tx.produce(t.events, key=b"s2", value=batch("s2", [READ], "c3", seq=2).model_dump_json().encode())
    tx.commit_transaction(30)

    full = _replay(tmp_path, kafka_bootstrap, t.events)
    by = {s.session_id: s for s in full.sessions}
    assert [b.batch_id for b in by["s1"].batches] == ["b1", "b2"]  # the aborted record is never read
    assert [b.decision for b in by["s1"].batches] == ["allow", "deny"]
    assert [b.decision for b in by["s2"].batches] == ["allow", "allow", "allow"]
    assert by["s3"].batches[0].reason.startswith("rejected record (invalid)")
    reasons = sorted(b.reason for b in full.bad_input)
    assert len(reasons) == 2 and reasons[0].startswith("not a valid EventBatch: events")
    assert reasons[1].startswith("the record value is not JSON")
    assert all(b.partition is not None and b.offset is not None and b.where == f"{t.events}/{b.partition}@{b.offset}"
               for b in full.bad_input)
    k = full.manifest.inputs.kafka
    assert k.topic == t.events and [r.partition for r in k.partitions] == [0, 1, 2]
    assert sum(r.records for r in k.partitions) == full.manifest.counts.records == 7
    src = by["s1"].batches[1].source
    assert src.startswith(f"{t.events}/") and "@" in src

    v = verify_report(tmp_path / "report.json")
    assert v.ok, v.problems
    # two processes, partitions dealt out between them: the same report
    sharded = _replay(tmp_path, kafka_bootstrap, t.events, name="sharded.json", shards=2)
    assert sharded.model_dump(exclude={"manifest"}) == full.model_dump(exclude={"manifest"})
    assert sharded.manifest.inputs == full.manifest.inputs

    recent = _replay(tmp_path, kafka_bootstrap, t.events, name="recent.json", from_time=str(cut))
    rs = {s.session_id: [b.batch_id for b in s.batches] for s in recent.sessions}
    assert rs == {"s1": ["b2"], "s2": ["c2", "c3"], "s3": ["x1"]}
    # without b1 in its past, s1's send_email is allowed: a range is a range
    assert recent.totals.decisions == {"allow": 3, "deny": 1}

    p0 = {r.partition: r for r in k.partitions}
    part = by["s1"].batches[0].source.split("/")[-1].split("@")[0]
    first = _replay(tmp_path, kafka_bootstrap, t.events, name="offsets.json", partitions=[int(part)],
                    to_offsets={int(part): p0[int(part)].start + 1})
    assert [(s.session_id, [b.batch_id for b in s.batches]) for s in first.sessions] == [("s1", ["b1"])]


def test_an_open_transaction_ends_the_range_and_a_missing_partition_is_named(kafka_bootstrap, topic_prefix,
                                                                             tmp_path):
    t = topics(topic_prefix)
    create_topics(kafka_bootstrap, topic_prefix, partitions_override=1)
    produce_batches(kafka_bootstrap, t.events, [batch("s1", [USER_SEND], "b1", seq=0)])
    tx = _transactional(kafka_bootstrap)
    tx.begin_transaction()
    tx.produce(t.events, key=b"s1", value=batch("s1", [SEND_EMAIL], "b2", seq=1).model_dump_json().encode())
    tx.flush(30)
    produce_batches(kafka_bootstrap, t.events, [batch("s1", [USER_HI], "b3", seq=2)])  # behind the open one
    # read_committed delivers nothing past the open transaction: the range ends before it, rather
    # than waiting for records that cannot come yet
    first = _replay(tmp_path, kafka_bootstrap, t.events)
    assert [b.batch_id for s in first.sessions for b in s.batches] == ["b1"]
    assert [(r.start, r.end, r.records) for r in first.manifest.inputs.kafka.partitions] == [(0, 1, 1)]
    tx.commit_transaction(30)
    again = _replay(tmp_path, kafka_bootstrap, t.events, name="again.json")
    assert [(b.batch_id, b.decision) for s in again.sessions for b in s.batches] == [
        ("b1", "allow"), ("b2", "deny"), ("b3", "allow")]
    assert verify_report(tmp_path / "report.json").ok  # its range is still its range
    with pytest.raises(ReplayError, match="has no partition 5"):
        _replay(tmp_path, kafka_bootstrap, t.events, name="none.json", partitions=[0, 5])


def test_live_worker_verdicts_equal_a_replay_of_the_events_topic(kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    rng = random.Random(7)
    records: list = []
    for s in range(24):
        sid = f"sess-{s:02d}"
        seq = 0
        for n in range(rng.randint(2, 6)):
            events = [rng.choice([USER_SEND, USER_HI, BENIGN, SEND_EMAIL, READ])
                      for _ in range(rng.randint(1, 3))]
            b = EventBatch(session_id=sid, batch_id=f"{sid}-{n}", seq=seq, events=events)
            records.append(b)
            seq += 1
            if rng.random() < 0.15:  # a redelivery: the worker repeats the verdict
                records.append(b)
    records += [
        batch("sess-00", [USER_HI], "late", seq=0),  # out of order
        ("sess-01", json.dumps({"session_id": "sess-01", "batch_id": "broken", "events": [{"role": "x"}]}).encode()),
        ("sess-02", b"garbage"),
        batch("sess-03", [USER_HI], "unknown-policy", policy="nope"),
    ]
    expected = len(records) - 1  # garbage has no ids: dead letter only, no verdict
    with worker(kafka_bootstrap, topic_prefix, _policy(tmp_path)):
        produce_batches(kafka_bootstrap, t.events, records)
        live = consume(kafka_bootstrap, t.verdicts, until=expected, timeout=120)
        alerts = consume(kafka_bootstrap, t.alerts, timeout=30, idle=3)
    assert len(live) == expected
    assert Counter(v["decision"] for v in live)["deny"] >= 5

    def key(session_id, batch_id, decision, violations):
        return (session_id, batch_id, decision,
                tuple(sorted((v["alert_id"], v["message"], tuple(v["addresses"])) for v in violations)))

    publish = f"{topic_prefix}-replay"
    report = _replay(tmp_path, kafka_bootstrap, t.events, publish_prefix=publish)
    replayed = [key(s.session_id, b.batch_id, b.decision, [v.model_dump() for v in b.violations])
                for s in report.sessions for b in s.batches]
    assert Counter(replayed) == Counter(key(v["session_id"], v["batch_id"], v["decision"], v["violations"])
                                        for v in live)
    replay_alerts = Counter((s.session_id, b.batch_id, v.alert_id, tuple(v.addresses))
                            for s in report.sessions for b in s.batches for v in b.violations)
    assert replay_alerts == Counter((a["session_id"], a["batch_id"], a["alert_id"], tuple(a["addresses"]))
                                    for a in alerts)
    assert report.manifest.counts.bad_input == 2
    # two processes, the topic's partitions dealt out between them: every record still read once
    sharded = _replay(tmp_path, kafka_bootstrap, t.events, name="sharded.json", shards=2)
    assert sharded.manifest.counts == report.manifest.counts
    assert sharded.model_dump(exclude={"manifest"}) == report.model_dump(exclude={"manifest"})

    # --publish wrote the same verdicts under its own prefix, nothing to the production topics
    published = consume(kafka_bootstrap, f"{publish}.verdicts", until=expected, timeout=60)
    assert Counter(key(v["session_id"], v["batch_id"], v["decision"], v["violations"]) for v in published) \
        == Counter(replayed)
    assert len(consume(kafka_bootstrap, t.verdicts, timeout=10, idle=3)) == expected


def test_rejected_records_and_capped_verdicts_replay_and_publish_as_the_worker_gave_them(
        kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    policy = tmp_path / "a.gr"
    # three rules of 70 matches each: under --max-rule-matches (100), over the verdict's cap (200)
    policy.write_text("".join(f'raise "has {c}" if:\n    (m: Message)\n    "{c}" in m.content\n\n' for c in "abc"))
    many = batch("s", [{"role": "user", "content": f"abc{i}"} for i in range(70)], "many", seq=2)
    records = [
        # keyed by another id: the worker sends a deny but cannot remember it (other partition's state)
        ("k", json.dumps({"session_id": "s", "batch_id": "b1", "events": "not a list"}).encode()),
        batch("s", [{"role": "user", "content": "hi"}], "b1", seq=1),  # evaluated, not taken for a redelivery
        many, many,  # 210 violations: the verdict lists 200, then its redelivery repeats it
    ]
    with worker(kafka_bootstrap, topic_prefix, policy, partitions=1):
        produce_batches(kafka_bootstrap, t.events, records)
        live = consume(kafka_bootstrap, t.verdicts, until=4, timeout=120)
    assert [(v["batch_id"], v["decision"], len(v["violations"]), v["violations_omitted"]) for v in live] == [
        ("b1", "deny", 0, 0), ("b1", "allow", 0, 0), ("many", "deny", 200, 10), ("many", "deny", 200, 10)]

    publish = f"{topic_prefix}-replay"
    out = tmp_path / "r.json"
    run_replay(ReplayRequest(policy=str(policy), bootstrap_servers=kafka_bootstrap, topic=t.events, out=str(out),
                             progress=False, publish_prefix=publish))
    report = Report.load(out)
    [s] = report.sessions
    assert [(b.batch_id, b.decision, b.duplicate, len(b.violations)) for b in s.batches] == [
        ("b1", "deny", False, 0), ("b1", "allow", False, 0), ("many", "deny", False, 210), ("many", "deny", True, 200)]
    published = consume(kafka_bootstrap, f"{publish}.verdicts", until=4, timeout=60)

    def seen(v: dict) -> tuple:  # a repeat is the stored verdict: its source is the first record's
        return v["batch_id"], v["decision"], len(v["violations"]), v["violations_omitted"], v["source"]["offset"]
    assert [seen(v) for v in published] == [seen(v) for v in live]
    assert published[3]["source"]["offset"] == 2  # the redelivery at offset 3 repeats offset 2's verdict
    # 210 for the batch, then the 200 its stored verdict lists again for the redelivery
    alerts = consume(kafka_bootstrap, f"{publish}.alerts", until=410, timeout=60, idle=3)
    assert len(alerts) == 410 and len({a["alert_id"] for a in alerts}) == 210


def test_a_sharded_topic_replay_keeps_a_session_whose_records_came_under_other_keys(kafka_bootstrap, topic_prefix,
                                                                                   tmp_path):
    t = topics(topic_prefix)
    create_topics(kafka_bootstrap, topic_prefix, partitions_override=4)
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for b in [batch("s", [USER_SEND], "b0", seq=0), batch("s", [SEND_EMAIL], "b1", seq=1),
              batch("t", [USER_HI], "c0", seq=0)]:
        p.produce(t.events, key=b.session_id.encode(), value=b.model_dump_json().encode(), partition=0)
    # session s's record keyed by another id, on another partition: rejected, and denied in s
    p.produce(t.events, key=b"other", partition=3,
              value=json.dumps({"session_id": "s", "batch_id": "b2", "events": "none"}).encode())
    p.flush(30)
    reports = {n: _replay(tmp_path, kafka_bootstrap, t.events, name=f"r{n}.json", shards=n) for n in (1, 2, 3)}
    for n, r in reports.items():
        got = {s.session_id: sorted((b.batch_id, b.decision) for b in s.batches) for s in r.sessions}
        assert got == {"s": [("b0", "allow"), ("b1", "deny"), ("b2", "deny")], "t": [("c0", "allow")]}, n
        assert r.manifest.counts.records == 4 and r.manifest.counts.bad_input == 1, n
        assert r.manifest.inputs == reports[1].manifest.inputs, n
