"""The worker's evaluation logic without Kafka: a real engine over a dict-backed state store."""

from __future__ import annotations

import asyncio

import pytest
from traces import BENIGN, FLOW, SEND_EMAIL, USER_SEND

from monitor.config import WorkerSettings
from monitor.core import BatchEvaluator, Rejected, decode_batch
from monitor.models import EventBatch
from monitor.policy import PolicySet, load_policy_text
from monitor.state import HEAD_PREFIX, SessionStore, entry_key

CRASH = '''
raise "long message" if:
    (m: Message)
    len(m.content) > 3
'''


def evaluator(text: str = FLOW, **settings) -> BatchEvaluator:
    policy = load_policy_text(text, policy_id="p")
    return BatchEvaluator(PolicySet.single(policy), WorkerSettings(policy_path="unused", **settings))


def run(ev: BatchEvaluator, store: SessionStore, bid: str, events: list[dict], **kw):
    b = EventBatch(session_id="s", batch_id=bid, events=events, **kw)
    out = asyncio.run(ev.evaluate(store, b, None))
    return out.verdict, out.new


@pytest.mark.parametrize("engine", ["incremental", "reference"])
def test_keep_denied_puts_a_denied_batch_in_the_past(engine):
    for keep, expected_index in ((False, 1), (True, 2)):
        ev, store = evaluator(engine=engine, keep_denied=keep), SessionStore({})
        run(ev, store, "b1", [USER_SEND])
        assert run(ev, store, "b2", [SEND_EMAIL])[0].decision == "deny"
        v, _ = run(ev, store, "b3", [SEND_EMAIL])
        assert v.violations[0].addresses[-1] == f"messages.{expected_index}"


def test_redelivery_repeats_and_forgets_beyond_memory():
    ev, store = evaluator(verdict_memory=2), SessionStore({}, verdict_memory=2)
    first, new = run(ev, store, "b1", [USER_SEND])
    assert new and first.decision == "allow"
    again, new = run(ev, store, "b1", [SEND_EMAIL])
    assert not new and again == first
    run(ev, store, "b2", [BENIGN])
    run(ev, store, "b3", [BENIGN])
    assert store.known_verdict(store.head("s"), "s", "b1") is None  # evicted: only 2 remembered
    assert store.head("s").recent == ["b2", "b3"]


def test_a_stale_seq_is_denied_and_changes_no_state():
    ev, store = evaluator(), SessionStore({})
    run(ev, store, "b1", [USER_SEND], seq=5)
    v, _ = run(ev, store, "b0", [SEND_EMAIL], seq=3)
    assert v.decision == "deny" and "out of order" in v.reason and not v.violations
    assert store.head("s").policies["p"].length == 1


def test_an_unknown_policy_id_is_denied_with_the_known_ids():
    ev, store = evaluator(), SessionStore({})
    v, _ = run(ev, store, "b1", [BENIGN], policy="nope")
    assert v.decision == "deny" and "'nope'" in v.reason and "p" in v.reason


@pytest.mark.parametrize("fail_closed, kinds, decision", [
    (True, ["timeout", "error"], "deny"),
    # --fail-open alone covers timeouts: an error on accepted input is the agent's to choose
    (False, ["timeout"], "deny"),
    (False, ["timeout", "error"], "allow"),
])
def test_a_policy_that_raises_fails_closed_unless_told(fail_closed, kinds, decision):
    ev, store = evaluator(CRASH, fail_closed=fail_closed, fail_open_kinds=kinds), SessionStore({})
    # an assistant message with only tool calls has content None: len(None) raises inside the rule
    v, _ = run(ev, store, "b1", [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}]}])
    assert v.decision == decision
    assert v.reason and ("raised an error" in v.reason or "check failed" in v.reason)
    assert not v.violations


def test_reference_history_window_drops_old_entries():
    ev, store = evaluator(engine="reference", reference_max_history=3), SessionStore({})
    for i in range(6):
        run(ev, store, f"b{i}", [BENIGN])
    cur = store.head("s").policies["p"]
    assert (cur.length, cur.log_start, cur.log_end) == (6, 3, 6)
    assert entry_key("p", "s", 0) not in store.table and entry_key("p", "s", 5) in store.table


@pytest.mark.parametrize("value, kind", [
    (b"\xff\xfe", "not_json"),
    (b"[1, 2]", "invalid"),
    (b'{"session_id": "s", "batch_id": "b", "events": []}', "invalid"),
    (b'{"session_id": "other", "batch_id": "b", "events": [{"role": "user", "content": "x"}]}', "invalid"),
    (b'{"session_id": "s", "batch_id": "b", "events": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}',
     "too_large"),
])
def test_decode_batch_rejects_with_a_reason(value, kind):
    with pytest.raises(Rejected) as exc:
        decode_batch(b"s", value, max_bytes=1024)
    assert exc.value.kind == kind and exc.value.reason
    assert exc.value.session_id in ("s", "other")


def test_a_rejected_batch_id_keeps_its_deny():
    ev, store = evaluator(), SessionStore({})
    with pytest.raises(Rejected) as exc:
        decode_batch(b"s", b'{"session_id": "s", "batch_id": "b1", "events": 5}', 10_000)
    out = asyncio.run(ev.reject(store, exc.value, None))
    deny, new = out.verdict, out.new
    assert new and deny.decision == "deny" and "rejected record" in deny.reason
    # the agent resends a fixed record under the same batch id: it keeps its one verdict
    again, new = run(ev, store, "b1", [BENIGN])
    assert not new and again == deny


def test_missing_state_records_fail_closed():
    ev, store = evaluator(engine="reference"), SessionStore({})
    run(ev, store, "b1", [USER_SEND])
    del store.table[entry_key("p", "s", 0)]
    v, _ = run(ev, store, "b2", [SEND_EMAIL])
    assert v.decision == "deny" and "damaged" in v.reason


class CrashAtHead(dict):
    """A table whose process dies when armed and the head is about to be written."""

    armed = False

    def __setitem__(self, key, value):
        if self.armed and key.startswith(HEAD_PREFIX):
            raise SystemExit("crash")
        super().__setitem__(key, value)


def test_a_crash_before_the_head_leaves_a_readable_state():
    table = CrashAtHead()
    ev, store = evaluator(engine="reference", reference_max_history=2), SessionStore(table)
    for i in range(2):
        run(ev, store, f"b{i}", [BENIGN])
    table.armed = True
    with pytest.raises(SystemExit):
        run(ev, store, "b2", [USER_SEND])  # would move the window: entry 0 is due for deletion
    survivor = SessionStore(dict(table))  # what the changelog holds after the crash
    again, _ = run(ev, survivor, "b2", [USER_SEND])  # the redelivery
    assert again.decision == "allow"
    v, _ = run(ev, survivor, "b3", [SEND_EMAIL])
    assert v.decision == "deny" and v.violations[0].key == "(0, (2, 3))"


def test_a_verdict_lists_a_bounded_number_of_violations():
    many = '''
raise "word" if:
    (m: Message)
    "w" in m.content
'''
    ev, store = evaluator(many, max_verdict_violations=3), SessionStore({})
    b = EventBatch(session_id="s", batch_id="b1", events=[{"role": "user", "content": f"w{i}"} for i in range(10)])
    out = asyncio.run(ev.evaluate(store, b, None))
    v, omitted = out.verdict, out.omitted
    assert len(v.violations) == 3 and v.violations_omitted == 7 and len(omitted) == 7
    assert {x.key for x in v.violations} | {x.key for x in omitted} == {
        f"(0, ({i},))" for i in range(10)}


def test_a_record_without_a_key_is_rejected():
    with pytest.raises(Rejected, match="no key"):
        decode_batch(None, b'{"session_id": "s", "batch_id": "b", "events": []}', 10_000)
