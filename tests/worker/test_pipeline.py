"""The monitor pipeline on a real Kafka broker: worker processes, verdicts, alerts, dead letters."""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections import defaultdict

import pytest
from traces import BENIGN, FLOW, SEND_EMAIL, USER_SEND
from workers import (
    Tail,
    batch,
    consume,
    consume_covering,
    produce_batches,
    raw_values,
    topics,
    worker,
)

from monitor.broker import free_port
from monitor.models import DeadLetter

SECRETS = '''
from invariant.detectors import secrets

raise "Secret in tool arguments [risk=critical]" if:
    (call: ToolCall)
    len(secrets(call.function.arguments.body)) > 0
'''

def policy_file(tmp_path, text: str, name: str = "policy.gr"):
    path = tmp_path / name
    path.write_text(text)
    return path


def by_batch(verdicts: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for v in verdicts:
        out[(v["session_id"], v["batch_id"])].append(v)
    return out


def essence(v: dict) -> tuple:
    """What must be identical when a verdict is repeated."""
    return (v["decision"], v["reason"],
            tuple((x["alert_id"], x["message"], tuple(x["addresses"])) for x in v["violations"]))


def test_past_counts_and_alerts(kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    port = free_port()
    with worker(kafka_bootstrap, topic_prefix, policy_file(tmp_path, FLOW), metrics_port=port):
        produce_batches(kafka_bootstrap, t.events, [
            batch("s1", [USER_SEND], "b1", seq=0),
            batch("s1", [BENIGN], "b2", seq=1),
            batch("s1", [SEND_EMAIL], "b3", seq=2),
            batch("s2", [BENIGN, SEND_EMAIL], "c1"),
        ])
        verdicts = consume(kafka_bootstrap, t.verdicts, until=4, timeout=60)
        alerts = consume(kafka_bootstrap, t.alerts, timeout=20, idle=3)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'agent_monitor_verdicts_total{decision="deny"} 1.0' in scraped
    assert 'agent_monitor_verdicts_total{decision="allow"} 3.0' in scraped
    assert "agent_monitor_batches_total 4.0" in scraped
    got = {v["batch_id"]: v for v in verdicts}
    assert {k: v["decision"] for k, v in got.items()} == {"b1": "allow", "b2": "allow", "b3": "deny",
                                                         "c1": "allow"}
    (viol,) = got["b3"]["violations"]
    # the rule's first event arrived two batches earlier; addresses count over the whole trace
    assert viol["message"] == "Must not call tool after user uses keyword"
    assert viol["addresses"] == ["messages.0", "messages.0.content:8-12", "messages.2"]
    assert viol["key"] == "(0, (0, 2))"
    assert got["b3"]["source"]["topic"] == t.events and got["b3"]["policy_sha256"]
    assert len(alerts) == 1 and alerts[0]["alert_id"] == viol["alert_id"]
    assert alerts[0]["session_id"] == "s1" and alerts[0]["batch_id"] == "b3"


def test_redelivered_batch_repeats_its_verdict(kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    with worker(kafka_bootstrap, topic_prefix, policy_file(tmp_path, FLOW)):
        produce_batches(kafka_bootstrap, t.events, [
            batch("s", [USER_SEND], "b1"),
            batch("s", [SEND_EMAIL], "b2"),
            # the same batch id again, even with other content: the first verdict is repeated
            batch("s", [BENIGN], "b2"),
            batch("s", [BENIGN], "b1"),
            batch("s", [BENIGN], "b3"),
        ])
        verdicts = consume(kafka_bootstrap, t.verdicts, until=5, timeout=60)
    assert [v["batch_id"] for v in verdicts] == ["b1", "b2", "b2", "b1", "b3"]
    assert essence(verdicts[1]) == essence(verdicts[2]) and verdicts[1]["decision"] == "deny"
    assert essence(verdicts[0]) == essence(verdicts[3]) and verdicts[0]["decision"] == "allow"
    assert verdicts[4]["decision"] == "allow"


def test_denied_batch_does_not_join_the_past(kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    with worker(kafka_bootstrap, topic_prefix, policy_file(tmp_path, FLOW)):
        produce_batches(kafka_bootstrap, t.events, [
            batch("s", [USER_SEND], "b1"),
            batch("s", [SEND_EMAIL], "b2"),   # denied: never reaches the agent's trace
            batch("s", [BENIGN], "b3"),
            batch("s", [SEND_EMAIL], "b4"),   # trace is [user, benign, send]: index 2
        ])
        verdicts = consume(kafka_bootstrap, t.verdicts, until=4, timeout=60)
    d = {v["batch_id"]: v for v in verdicts}
    assert [d[b]["decision"] for b in ("b1", "b2", "b3", "b4")] == ["allow", "deny", "allow", "deny"]
    assert d["b4"]["violations"][0]["addresses"][-1] == "messages.2"


def test_malformed_records_go_to_the_dead_letter_topic(kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    big = batch("s", [{"role": "user", "content": "x" * 60_000}], "huge").model_dump_json().encode()
    records = [
        ("s", b"this is not json {"),
        ("s", json.dumps({"session_id": "s", "batch_id": "typed", "events": "not a list"}).encode()),
        ("s", json.dumps({"batch_id": "nosession", "events": [BENIGN]}).encode()),
        ("s", json.dumps({"session_id": "s", "batch_id": "badrole",
                          "events": [{"role": "robot", "content": "x"}]}).encode()),
        ("s", big),
        batch("s", [USER_SEND], "ok1"),
        batch("s", [SEND_EMAIL], "ok2"),
    ]
    with worker(kafka_bootstrap, topic_prefix, policy_file(tmp_path, FLOW), max_record_bytes=50_000):
        produce_batches(kafka_bootstrap, t.events, records)
        dead = consume(kafka_bootstrap, t.deadletter, until=5, timeout=60)
        verdicts = consume(kafka_bootstrap, t.verdicts, until=6, timeout=60, idle=5)
    dls = [DeadLetter.model_validate({k: v for k, v in d.items() if not k.startswith("_")}) for d in dead]
    assert [d.kind for d in dls] == ["not_json", "invalid", "invalid", "invalid", "too_large"]
    assert dls[0].original() == b"this is not json {"
    assert "events" in dls[1].reason and "list" in dls[1].reason
    assert "session_id" in dls[2].reason
    assert "role" in dls[3].reason
    assert "60" in dls[4].reason and "50000" in dls[4].reason
    assert [d.source.offset for d in dls] == [0, 1, 2, 3, 4]
    assert all(d.source.topic == t.events for d in dls)
    by_id = {v["batch_id"]: v for v in verdicts}
    # readable ids still get a deny that says why; the partition keeps flowing after bad records
    assert by_id["typed"]["decision"] == "deny" and "rejected record" in by_id["typed"]["reason"]
    assert by_id["nosession"]["decision"] == "deny" and by_id["nosession"]["session_id"] == "s"
    assert by_id["badrole"]["decision"] == "deny"
    assert by_id["ok1"]["decision"] == "allow"
    assert by_id["ok2"]["decision"] == "deny"
    assert "huge" in by_id and by_id["huge"]["decision"] == "deny"


def test_two_workers_share_the_partitions(kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    policy = policy_file(tmp_path, FLOW)
    rng = random.Random(7)
    sessions = [f"sess-{i:03d}" for i in range(200)]
    per_session = 4
    plan = []
    for s in sessions:
        evs = [[BENIGN], [USER_SEND] if rng.random() < 0.5 else [BENIGN], [BENIGN], [SEND_EMAIL]]
        plan.append([batch(s, evs[k], f"{s}-b{k}", seq=k) for k in range(per_session)])
    # interleave sessions while keeping each session's own order
    stream = []
    cursors = [0] * len(plan)
    while len(stream) < len(sessions) * per_session:
        i = rng.randrange(len(plan))
        if cursors[i] < per_session:
            stream.append(plan[i][cursors[i]])
            cursors[i] += 1
    with worker(kafka_bootstrap, topic_prefix, policy, worker_id="a") as a, \
            worker(kafka_bootstrap, topic_prefix, policy, worker_id="b") as b:
        deadline = time.monotonic() + 90
        while sorted(a.assigned() + b.assigned()) != list(range(12)) or not a.assigned() or not b.assigned():
            assert time.monotonic() < deadline, f"no stable split: {a.assigned()} / {b.assigned()}"
            time.sleep(0.5)
        produce_batches(kafka_bootstrap, t.events, stream)
        extra = consume_covering(kafka_bootstrap, t.verdicts,
                                 {(b.session_id, b.batch_id) for b in stream}, timeout=180)
    groups = by_batch(extra)
    assert len(extra) == len(stream), f"{len(extra)} verdicts for {len(stream)} batches"
    assert all(len(v) == 1 for v in groups.values()), "a batch got more than one verdict"
    assert set(groups) == {(b.session_id, b.batch_id) for b in stream}
    order: dict[str, list[int]] = defaultdict(list)
    for v in sorted(extra, key=lambda v: (v["_partition"], v["_offset"])):
        order[v["session_id"]].append(v["seq"])
    assert all(seqs == list(range(per_session)) for seqs in order.values())
    for s, p in zip(sessions, plan, strict=False):
        trig = p[1].events[0]["role"] == "user"
        last = groups[(s, f"{s}-b3")][0]
        assert last["decision"] == ("deny" if trig else "allow"), s
    workers = {v["source"]["partition"] for v in extra}
    assert len(workers) == 12


def test_state_survives_a_killed_worker(kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    policy = policy_file(tmp_path, FLOW)
    first = [batch(f"k{i}", [USER_SEND if i % 2 == 0 else BENIGN], f"k{i}-0") for i in range(40)]
    filler = [batch(f"k{i % 40}", [BENIGN], f"k{i % 40}-f{i}") for i in range(3000)]
    last = [batch(f"k{i}", [SEND_EMAIL], f"k{i}-last") for i in range(40)]
    w = worker(kafka_bootstrap, topic_prefix, policy).start()
    try:
        w.wait_ready()
        produce_batches(kafka_bootstrap, t.events, first)
        assert len(consume(kafka_bootstrap, t.verdicts, until=40, timeout=60)) == 40
        with Tail(kafka_bootstrap, t.verdicts) as tail:
            produce_batches(kafka_bootstrap, t.events, filler)
            # kill it mid-stream, with verdicts flowing and state writes in flight
            seen = tail.wait_for(40 + 300, timeout=60)
            w.kill()
        assert 340 <= seen < 40 + len(filler), f"the kill came too late to be mid-stream ({seen})"
    finally:
        w.stop()
    expected = {(b.session_id, b.batch_id) for b in first + filler + last}
    with worker(kafka_bootstrap, topic_prefix, policy):
        produce_batches(kafka_bootstrap, t.events, last)
        verdicts = consume_covering(kafka_bootstrap, t.verdicts, expected, timeout=180)
    groups = by_batch(verdicts)
    assert expected <= set(groups), f"{len(expected - set(groups))} batches without a verdict"
    for key, vs in groups.items():
        assert len({essence(v) for v in vs}) == 1, f"{key} got different verdicts: {vs}"
    for i in range(40):
        v = groups[(f"k{i}", f"k{i}-last")][0]
        # the rule needs the user message from before the crash
        assert v["decision"] == ("deny" if i % 2 == 0 else "allow"), (i, v)
        if i % 2 == 0:
            assert v["violations"][0]["addresses"][0] == "messages.0"


def test_secrets_detector_over_a_stream(kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    rng = random.Random(11)
    token = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    batches, expected = [], set()
    n = 0
    for s in range(10):
        sid = f"sec{s}"
        count = 0
        trace_len = 0  # denied batches never join the trace, so they shift no later index
        while count < 30:
            size = min(rng.randint(1, 5), 30 - count)
            evs = []
            for _ in range(size):
                leak = rng.random() < 0.2
                body = f"deploy with {token} now" if leak else f"plain text {n}"
                evs.append({"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"c{n}", "type": "function",
                     "function": {"name": "post", "arguments": {"body": body}}}]})
                n += 1
                count += 1
            bid = f"{sid}-{count}"
            batches.append(batch(sid, evs, bid))
            leaks = [j for j, e in enumerate(evs)
                     if "ghp_" in e["tool_calls"][0]["function"]["arguments"]["body"]]
            expected.update((sid, bid, trace_len + j) for j in leaks)
            if not leaks:
                trace_len += size
    assert n == 300 and expected
    with worker(kafka_bootstrap, topic_prefix, policy_file(tmp_path, SECRETS)):
        produce_batches(kafka_bootstrap, t.events, batches)
        verdicts = consume(kafka_bootstrap, t.verdicts, until=len(batches), timeout=120)
        alerts = consume(kafka_bootstrap, t.alerts, timeout=60, idle=5)  # drained: extras would show
    assert len(verdicts) == len(batches)
    got = set()
    for a in alerts:
        # messages.<i>.tool_calls.0... : the trace index of the leaking call
        idx = int(a["addresses"][0].split(".")[1])
        got.add((a["session_id"], a["batch_id"], idx))
        assert a["severity"] == "critical"
    assert got == expected
    assert len(alerts) == len(expected)


@pytest.mark.parametrize("engine, events", [("reference", 300), ("incremental", 1000)])
def test_overrun_of_the_time_budget_fails_closed(kafka_bootstrap, topic_prefix, tmp_path, engine, events):
    t = topics(topic_prefix)
    # the join condition makes every ordered pair a candidate: seconds of work on either engine
    slow = '''
raise "pairs" if:
    (a: Message) -> (b: Message)
    a.content == "never" and b.content == "never"
'''
    many = [{"role": "user", "content": f"m{i}"} for i in range(events)]
    with worker(kafka_bootstrap, topic_prefix, policy_file(tmp_path, slow), engine=engine,
                       budget_ms=1000):
        produce_batches(kafka_bootstrap, t.events, [batch("slow", many, "big"),
                                                    batch("fast", [BENIGN], "small")])
        verdicts = consume(kafka_bootstrap, t.verdicts, until=2, timeout=60)
    d = {v["batch_id"]: v for v in verdicts}
    assert d["big"]["decision"] == "deny" and "time budget" in d["big"]["reason"]
    # the overrun did not hold the worker: the next batch is answered, and on time
    assert d["small"]["decision"] == "allow"
    assert d["big"]["eval_ms"] < 5000


def test_a_policy_with_a_syntax_error_is_refused(kafka_bootstrap, topic_prefix, tmp_path):
    bad = policy_file(tmp_path, 'raise "x" if:\n    (msg: Message)\n    msg.content == == "x"\n\n'
                             'raise "y" if:\n    (m: Message)\n    "y" in m.content\n', "bad.gr")
    w = worker(kafka_bootstrap, topic_prefix, bad)
    w.start()
    assert w.proc.wait(60) == 2
    err = w.log_tail()
    assert "bad.gr:3:" in err and "msg.content == ==" in err
    assert "does not parse" in err


def test_a_session_of_10000_events_and_10_mb(kafka_bootstrap, topic_prefix, tmp_path):
    """State is one record per entry plus a small head: no record nears Kafka's 1 MB default."""
    t = topics(topic_prefix)
    filler = "lorem ipsum dolor sit amet " * 37  # ~1 KB per event
    batches = [batch("long", [USER_SEND], "b0")]
    n = 1
    while n < 9_999:
        size = min(100, 9_999 - n)
        batches.append(batch("long", [{"role": "assistant", "content": f"{i} {filler}"}
                                      for i in range(n, n + size)], f"b{len(batches)}"))
        n += size
    batches.append(batch("long", [SEND_EMAIL], "last"))
    total_bytes = sum(len(b.model_dump_json()) for b in batches)
    assert n + 1 == 10_000 and total_bytes > 10_000_000
    with worker(kafka_bootstrap, topic_prefix, policy_file(tmp_path, FLOW)):
        produce_batches(kafka_bootstrap, t.events, batches)
        verdicts = consume(kafka_bootstrap, t.verdicts, until=len(batches), timeout=240)
    assert len(verdicts) == len(batches)
    assert all(v["decision"] == "allow" for v in verdicts[:-1])
    last = verdicts[-1]
    assert last["batch_id"] == "last" and last["decision"] == "deny"
    assert last["violations"][0]["addresses"] == ["messages.0", "messages.0.content:8-12",
                                                  "messages.9999"]
    state = raw_values(kafka_bootstrap, t.state)
    assert state, "the worker wrote no state"
    assert max(len(v) for v in state) < 100_000, "a state record grew with the session"


def test_exactly_once_verdicts_are_transactional_and_the_sdk_reads_them(kafka_bootstrap, topic_prefix, tmp_path):
    from confluent_kafka import Consumer, TopicPartition

    from monitor.client import MonitorClient

    t = topics(topic_prefix)
    with worker(kafka_bootstrap, topic_prefix, policy_file(tmp_path, FLOW), guarantee="exactly-once"):
        with MonitorClient(kafka_bootstrap, topic_prefix) as client:
            assert client.check("s", [USER_SEND], timeout=60).decision == "allow"
            denied = client.check("s", [SEND_EMAIL], timeout=60)
        assert denied.decision == "deny" and denied.violations[0].addresses[-1] == "messages.1"
        more = [batch(f"m{i % 7}", [USER_SEND if i % 3 else SEND_EMAIL], f"b{i}") for i in range(60)]
        produce_batches(kafka_bootstrap, t.events, more)
        verdicts = consume_covering(kafka_bootstrap, t.verdicts, {(b.session_id, b.batch_id) for b in more})
    assert len(verdicts) == 62, "exactly one verdict per batch"
    # transaction markers take offsets: a partition's end is past its last committed record
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "x", "isolation.level": "read_committed"})
    try:
        parts = {v["_partition"] for v in verdicts}
        for p in parts:
            high = c.get_watermark_offsets(TopicPartition(t.verdicts, p), timeout=10)[1]
            last = max(v["_offset"] for v in verdicts if v["_partition"] == p)
            assert high > last + 1, "verdicts were not written in transactions"
    finally:
        c.close()
