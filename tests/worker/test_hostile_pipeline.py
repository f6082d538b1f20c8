"""Hostile records against a real worker on a real broker (issue 11).

- A poison corpus (every reproduction of the issue and more) produced among normal sessions:
  every normal batch gets its normal verdict, the worker never exits, every poison record is
  answered (a deny, or a dead letter naming its offset), and ``tail`` shows agents' ids escaped.
- An attacker and a victim session on one partition: the attacker's overrunning checks are
  killed at their budget and stop using CPU; the victim's batches are answered as if alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from workers import batch, topics, worker

from monitor.models import EventBatch

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "examples" / "policies"

USER_SEND = {"role": "user", "content": "send it"}
BENIGN = {"role": "user", "content": "what is the weather?"}


def call(i: int, name: str = "send_email") -> dict:
    return {"type": "function", "id": str(i), "function": {"name": name, "arguments": {}}}


def raw(session: str, batch_id: str, events: list[dict] | str, **fields) -> bytes:
    ev = events if isinstance(events, str) else json.dumps(events)
    extra = "".join(f', "{k}": {v if isinstance(v, str) and v[:1] in "0123456789-{[" else json.dumps(v)}'
                    for k, v in fields.items())
    return f'{{"session_id": {json.dumps(session)}, "batch_id": {json.dumps(batch_id)}, "events": {ev}{extra}}}'.encode()


def produce_all(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> list[tuple[int, int]]:
    """Produce in order; returns each record's (partition, offset)."""
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 5,
                  "enable.idempotence": True, "message.max.bytes": 2_000_000})
    where: list[tuple[int, int] | None] = [None] * len(records)

    def delivered(i: int):
        def cb(err, msg):
            assert err is None, err
            where[i] = (msg.partition(), msg.offset())
        return cb

    for i, (key, value) in enumerate(records):
        p.produce(topic, key=key, value=value, on_delivery=delivered(i))
        p.poll(0)
    assert p.flush(60) == 0
    return [w for w in where if w is not None]


def read_until(bootstrap: str, names: list[str], done, timeout: float) -> dict[str, list[dict]]:
    """Read ``names`` from the beginning until ``done(records_by_topic)`` or ``timeout``."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    assign = []
    for name in names:
        for p in c.list_topics(name, timeout=10).topics[name].partitions:
            assign.append(TopicPartition(name, p, 0))
    c.assign(assign)
    got: dict[str, list[dict]] = {n: [] for n in names}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not done(got):
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            got[m.topic()].append(json.loads(m.value()))
    finally:
        c.close()
    return got


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and every live descendant, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo.extend(c for c, (ppid, _) in stats.items() if ppid == p)
    return total


NASTY_ID = "s-\x1b[2J\x1b]0;owned\x07\u202egnp.exe"

FALLBACK = '''from invariant import count

raise "send, send_email, then Peter" if:
    (m: Message) -> (t: ToolCall)
    t -> (o: ToolOutput)
    "send" in m.content
    t is tool:send_email
    "Peter" in o.content
    count(min=1):
        (x: ToolOutput)
'''

ECHO = '''from invariant import PolicyViolation

raise PolicyViolation("leak", text=m.content, again=m.content) if:
    (m: Message)
    "LEAK" in m.content
'''


def poison_corpus() -> list[tuple[str, bytes | None, bytes | None, str | None]]:
    """(name, key, value, what it must get: "deny" with a reason fragment, or None: a dead letter)."""
    big = "9" * 5000
    out: list[tuple[str, bytes | None, bytes | None, str | None]] = [
        # 1. the poison pill: a policy id echoed into a 3 MB verdict, or a 1.2 MB one
        ("backslashes", b"p1", raw("p1", "b", [BENIGN], policy="\\" * 499_000), "policy is over the limit"),
        ("long policy", b"p2", raw("p2", "b", [BENIGN], policy="a" * 600_000), "policy is over the limit"),
        # 2. fan-out
        ("fan-out 400", b"p3", raw("p3", "b", [USER_SEND] * 400 + [call(i) for i in range(400)],
                                    policy="send_after_keyword"), "matching stopped after 100"),
        ("fan-out 1000", b"p4", raw("p4", "b", [USER_SEND] * 1000 + [call(i) for i in range(1000)],
                                     policy="send_after_keyword"), "matching stopped after 100"),
        # invariant-ai itself on a fan-out (a rule with a quantifier): killed at the budget
        ("fan-out on invariant-ai", b"p5", raw("p5", "b", [USER_SEND] * 300 + [call(i) for i in range(300)] + [
            {"role": "tool", "tool_call_id": "299", "content": "Peter"}], policy="fallback"), "exceeded its time budget"),
        # 4. huge integers
        ("huge seq", b"p6", raw("p6", "b", [BENIGN], seq=big), "integer of 5000 digits"),
        ("huge metadata", b"p7", raw("p7", "b", [BENIGN], metadata=f'{{"n": -{big}}}'), "integer of 5000 digits"),
        # 5. an event the schema takes and the policy cannot evaluate: fail closed
        ("text 5", b"p8", raw("p8", "b", [USER_SEND, {"role": "user", "content": [{"text": 5}]}, call(1)],
                              policy="send_after_keyword"), "the policy raised an error"),
        # a megabyte of "send": 190,000 marks, at most 100 kept
        ("marks", b"p9", raw("p9", "b", [{"role": "user", "content": "send " * 190_000}],
                             policy="send_after_keyword"), ""),
        # numbers that grow when written back into the state of a rule evaluated by invariant-ai
        ("floats", b"p10", raw("p10", "b", '[{"role": "user", "content": "x", "v": ['
                                + ",".join(["1E9"] * 230_000) + "]}]", policy="fallback"),
         "--max-state-record-bytes"),
        # a verdict past its topic's limit: cut down, still a deny
        ("echo", b"p11", raw("p11", "b", [{"role": "user", "content": "LEAK" + "x" * 400_000 + str(i)}
                                           for i in range(2)], policy="echo"), "--max-output-bytes"),
        ("events", b"p12", raw("p12", "b", [BENIGN] * 2100), "over the limit of 2000"),
        ("surrogate", b"p13", raw("p13", "b", '[{"role": "user", "content": "\\ud800"}]'), "lone UTF-16 surrogate"),
        ("too large", b"p14", raw("p14", "b", [{"role": "user", "content": "x" * 1_000_400}]), "over the limit of 1000000"),
        ("long session id", b"p15", raw("s" * 600, "b", [BENIGN]), "session_id is over the limit"),
        ("out of order", b"p16", raw("p16", "b2", [BENIGN], seq="1"), "out of order"),
        # answered with a dead letter only: no session or batch to answer
        ("long key", b"k" * 10_000, raw("k", "b", [BENIGN]), None),
        ("not json", b"p17", b"{not json", None),
        ("tombstone", b"p18", None, None),
        ("deep", b"p19", b"[" * 100_000 + b"]" * 100_000, None),
        ("garbage", b"p20", bytes(range(256)), None),
        ("no key", None, raw("p21", "b", [BENIGN]), None),
        # ids a terminal would obey: a normal verdict, shown escaped
        ("escapes", NASTY_ID.encode(), raw(NASTY_ID, "b\u2066\x9b", [BENIGN]), ""),
    ]
    # (p16's first batch, so that its seq 1 comes after seq 5)
    out.insert(0, ("in order", b"p16", raw("p16", "b1", [BENIGN], seq="5"), ""))
    return out


def test_a_poison_corpus_among_normal_sessions(kafka_bootstrap, topic_prefix, tmp_path):
    t = topics(topic_prefix)
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "fallback.gr").write_text(FALLBACK)
    (policies / "echo.gr").write_text(ECHO)
    poison = poison_corpus()
    normal: list[tuple[EventBatch, str]] = []  # (batch, its decision)
    for i in range(12):
        sid, risky = f"normal-{i}", i % 2 == 0
        plan = [([USER_SEND if risky else BENIGN], "allow"), ([call(1, "search")], "allow"),
                ([{"role": "tool", "tool_call_id": "1", "content": "sunny"}], "allow"),
                ([call(2)], "deny" if risky else "allow")]
        normal += [(batch(sid, events, f"{sid}-{k}", policy="send_after_keyword"), want)
                   for k, (events, want) in enumerate(plan)]
    records: list[tuple[bytes | None, bytes | None]] = []
    kinds: list[str] = []
    for k in range(max(len(normal), len(poison))):  # interleaved
        if k < len(normal):
            b = normal[k][0]
            records.append((b.session_id.encode(), b.model_dump_json().encode()))
            kinds.append("normal")
        if k < len(poison):
            records.append(poison[k][1:3])
            kinds.append(poison[k][0])
    with worker(kafka_bootstrap, topic_prefix, policies, partitions=3, budget_ms=2000) as w:
        where = produce_all(kafka_bootstrap, t.events, records)
        assert len(where) == len(records)

        def answered(got):
            seen = {(r["source"]["partition"], r["source"]["offset"])
                    for name in (t.verdicts, t.deadletter) for r in got[name] if r.get("source")}
            return all(x in seen for x in where)

        got = read_until(kafka_bootstrap, [t.verdicts, t.deadletter], answered, timeout=300)
        assert answered(got), "records without an answer: " + ", ".join(
            kinds[i] for i, x in enumerate(where)
            if x not in {(r["source"]["partition"], r["source"]["offset"]) for n in got.values() for r in n})
        time.sleep(1)
        assert w.proc.poll() is None, f"the worker exited: {w.log_tail()}"
        log = w.log_tail(200_000)
        shown = subprocess.run(
            [sys.executable, "-m", "monitor.cli", "tail", "verdicts", "--from-beginning", "--idle", "5",
             "--timeout", "60", "--prefix", topic_prefix, "--bootstrap-servers", kafka_bootstrap],
            cwd=ROOT, capture_output=True, timeout=120)
    assert "Traceback" not in log, log[-3000:]
    verdicts = {(v["session_id"], v["batch_id"]): v for v in got[t.verdicts]}
    dead = {(d["source"]["partition"], d["source"]["offset"]): d for d in got[t.deadletter]}
    # every normal batch gets its normal verdict
    for b, want in normal:
        v = verdicts[(b.session_id, b.batch_id)]
        assert v["decision"] == want and v["reason"] is None, (b.batch_id, v["reason"])
    # every poison record is answered as it must be
    offsets = dict(zip([i for i, k in enumerate(kinds) if k != "normal"], [where[i] for i, k in enumerate(kinds)
                                                                             if k != "normal"], strict=True))
    for (name, key, value, want), i in zip(poison, offsets, strict=False):
        if want is None:
            assert where[i] in dead, name
            continue
        fields = json.loads(value, parse_int=str)  # (some hold integers Python will not read)
        sid = fields["session_id"] if name != "long session id" else key.decode()
        bid = fields["batch_id"]
        v = verdicts[(sid, bid)]
        if want == "":
            assert v["reason"] is None or want in v["reason"], (name, v["reason"])
        else:
            assert v["decision"] == "deny" and want in (v["reason"] or "") + " ".join(
                x["message"] for x in v["violations"]), (name, v["reason"])
    assert verdicts[(NASTY_ID, "b\u2066\x9b")]["decision"] == "allow"
    assert verdicts[("p9", "b")]["decision"] == "allow"
    assert len(verdicts[("p4", "b")]["violations"]) == 101
    # tail shows agents' ids escaped: nothing a terminal would obey
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout.decode()
    assert "\x1b" not in out and "\u202e" not in out and "\u2066" not in out and "\x9b" not in out
    assert "s-\\x1b[2J\\x1b]0;owned\\x07\\u202egnp.exe" in out


def test_an_attacker_session_does_not_starve_a_victim(kafka_bootstrap, topic_prefix):
    """Issue 11's third reproduction: multi_turn_flow, --budget-ms 1000, session A's five
    checks of ~32 s each on invariant-ai; session B's one-message batches in between."""
    t = topics(topic_prefix)
    budget = 1000
    with worker(kafka_bootstrap, topic_prefix, POLICIES / "multi_turn_flow.gr", engine="reference",
                budget_ms=budget, partitions=1) as w:
        first = batch("A", [{"role": "user", "content": "send it"}] * 200 + [call(i) for i in range(200)], "a0")
        produce_all(kafka_bootstrap, t.events, [(b"A", first.model_dump_json().encode())])
        got = read_until(kafka_bootstrap, [t.verdicts], lambda g: len(g[t.verdicts]) >= 1, timeout=120)
        assert got[t.verdicts][0]["decision"] == "allow"
        records = []
        for k in range(5):
            records.append((b"A", batch("A", [{"role": "tool", "tool_call_id": "199", "content": "Peter"}],
                                        f"a{k + 1}").model_dump_json().encode()))
            records.append((b"B", batch("B", [BENIGN], f"b{k}").model_dump_json().encode()))
        produced = time.time()
        produce_all(kafka_bootstrap, t.events, records)
        got = read_until(kafka_bootstrap, [t.verdicts], lambda g: len(g[t.verdicts]) >= 11, timeout=180)
        answered = time.time()
        cpu_before = tree_cpu_seconds(w.proc.pid)
        time.sleep(3)
        cpu_idle = tree_cpu_seconds(w.proc.pid) - cpu_before
        assert w.proc.poll() is None
    by = {v["batch_id"]: v for v in got[t.verdicts]}
    for k in range(5):
        a, b = by[f"a{k + 1}"], by[f"b{k}"]
        # the attacker: denied at its budget, stopped within twice of it
        assert a["decision"] == "deny" and f"time budget of {budget} ms" in a["reason"]
        assert a["eval_ms"] < 2 * budget, a["eval_ms"]
        # the victim: answered as if alone (it was denied for the budget, or allowed under
        # --fail-open, while the abandoned checks ran on)
        assert b["decision"] == "allow" and b["reason"] is None
        assert b["eval_ms"] < 300, b["eval_ms"]
    # five overruns cost five budgets, not five times 32 s: all answered within about that
    assert answered - produced < 5 * 2 * budget / 1000 + 15
    # and nothing runs on once they are answered
    assert cpu_idle < 0.6, f"the worker's processes used {cpu_idle:.2f} s of CPU in 3 s after the last verdict"
