"""Issue 11's reproductions, each a test: hostile input cannot stop, starve or flood the monitor.

These run the worker's core (decoding, engines, the outputs it would produce) without a broker;
tests/worker/test_hostile_pipeline.py sends the same records through a real worker on a real broker.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from monitor.changelog import ChangelogTable
from monitor.cli import LIMIT_FLAGS, build_parser
from monitor.config import WorkerSettings
from monitor.console import printable_json, render_record
from monitor.core import STATE_REASON, BatchEvaluator, Rejected, decode_batch
from monitor.engine import BudgetExceeded
from monitor.limits import alert_records, fit_dead_letter
from monitor.metrics import MetricsExposed, WorkerMetrics, serve_metrics
from monitor.models import Alert, DeadLetter, SourceRef, Verdict, Violation
from monitor.policy import PolicySet, load_policy_set, load_policy_text
from monitor.state import SessionStore
from monitor.worker import state_record_guard

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "examples" / "policies"
TOPIC_LIMIT = 1_048_588  # max.message.bytes of the verdicts and alerts topics (topics/topics.toml)
STATE_TOPIC_LIMIT = 2_097_152  # of the changelog and dead-letter topics

USER_SEND = {"role": "user", "content": "send"}
SEND_EMAIL = {"type": "function", "id": "1", "function": {"name": "send_email", "arguments": {}}}


def call(i: int, name: str = "send_email") -> dict:
    return {"type": "function", "id": str(i), "function": {"name": name, "arguments": {}}}


def record(session: str, batch: str, events: list[dict], **fields) -> bytes:
    return json.dumps({"session_id": session, "batch_id": batch, "events": events, **fields}).encode()


def evaluator(policy: str | Path = POLICIES / "send_after_keyword.gr", **settings) -> BatchEvaluator:
    return BatchEvaluator(load_policy_set(policy), WorkerSettings(policy_path=str(policy), **settings))


def inline(text: str, **settings) -> BatchEvaluator:
    return BatchEvaluator(PolicySet.single(load_policy_text(text, "p")), WorkerSettings(policy_path="-", **settings))


def process(core: BatchEvaluator, store: SessionStore, key: bytes | None, value: bytes | None, offset: int = 0):
    return asyncio.run(core.process_record(store, key, value, SourceRef(topic="t", partition=0, offset=offset)))


def guarded_store(limit: int = 2_000_000) -> tuple[SessionStore, list[int]]:
    """A store on a changelog table guarded as the worker guards it; the sizes it sent."""
    sizes: list[int] = []
    table = ChangelogTable("t.changelog", state_record_guard(lambda k, p, v: sizes.append(len(v or b"")), limit))
    table.add_partition(0)
    table.use(0)
    return SessionStore(table), sizes


# -- 1. the poison pill: a verdict the broker refuses ------------------------------------------

@pytest.mark.parametrize("policy", ["\\" * 499_000, "a" * 600_000])
def test_a_huge_policy_id_gets_a_small_deny_and_its_dead_letter(policy):
    value = record("s", "b", [USER_SEND], policy=policy)
    assert len(value) < 1_000_000  # under --max-record-bytes: it used to be checked
    core = evaluator()
    out = process(core, SessionStore({}), b"s", value)
    assert out.verdict.decision == "deny"
    assert len(out.verdict_json) < 4096, "the verdict echoes the policy id"
    assert "policy is over the limit of 512 bytes" in out.verdict.reason
    dead = fit_dead_letter(out.dead_letter, out.dead_letter.model_dump_json().encode(), 2_000_000)
    assert out.dead_letter.kind == "invalid" and len(dead) < STATE_TOPIC_LIMIT
    assert DeadLetter.model_validate_json(dead).original() == value  # nothing lost


def test_ids_and_keys_past_the_limit_are_never_echoed():
    core = evaluator()
    long_key = b"k" * 600_000
    out = process(core, SessionStore({}), long_key, record("k" * 600_000, "b", [USER_SEND]))
    assert out.verdict is None and out.dead_letter.kind == "invalid"
    assert "the record key is 600000 bytes, over the limit of 512" in out.dead_letter.reason
    assert len(out.dead_letter.key) < 600 and len(out.dead_letter.model_dump_json()) < 900_000
    # a session id past the limit: the deny goes to the key (within it), never echoing the id
    out = process(core, SessionStore({}), b"s", record("s" * 513, "b", [USER_SEND]))
    assert out.verdict.session_id == "s" and "session_id is over the limit" in out.verdict.reason
    with pytest.raises(Rejected, match="batch_id is over the limit of 16"):
        decode_batch(b"s", record("s", "é" * 9, [USER_SEND]), 10_000, max_id_bytes=16)


def test_a_batch_past_the_events_limit_is_refused_before_validation():
    out = process(evaluator(), SessionStore({}), b"s", record("s", "b", [USER_SEND] * 2001))
    assert out.verdict.decision == "deny" and "2001 events, over the limit of 2000" in out.verdict.reason
    assert out.dead_letter.kind == "invalid"


def test_an_oversized_verdict_is_cut_down_and_still_denies():
    # a policy that echoes a whole event into its violations, twice: 2 x 2 x 400 KB
    core = inline('from invariant import PolicyViolation\n'
                  'raise PolicyViolation("leak", text=m.content, again=m.content) if:\n'
                  '    (m: Message)\n    "x" in m.content\n')
    events = [{"role": "user", "content": "x" * 400_000 + str(i)} for i in range(2)]
    out = process(core, SessionStore({}), b"s", record("s", "b", events))
    assert out.verdict.decision == "deny" and len(out.verdict_json) <= 1_000_000
    assert "--max-output-bytes" in out.verdict.reason and len(out.verdict.violations) == 2
    alerts = alert_records(out.verdict, out.alerted(), 1000, 1_000_000)
    assert len(alerts) == 2 and all(len(raw) <= 1_000_000 for _, raw in alerts)
    assert {a.alert_id for a, _ in alerts} == {v.alert_id for v in out.verdict.violations}
    assert all(len(a.kwargs["text"]) == 400_001 for a, _ in alerts)  # whole, as the policy raised them
    alerts = alert_records(out.verdict, out.alerted(), 1000, 500_000)  # each was 800 KB: cut to fit
    assert len(alerts) == 2 and all(len(raw) <= 500_000 for _, raw in alerts)
    assert "alert cut from" in alerts[0][0].message
    # too many violations to list even shortened: the verdict lists none, their alerts still go out
    core = inline('raise "has a" if:\n    (m: Message)\n    "a" in m.content\n', max_output_bytes=4096)
    out = process(core, SessionStore({}), b"s", record("s", "b", [{"role": "user", "content": "a"}] * 50))
    assert out.verdict.decision == "deny" and len(out.verdict_json) <= 4096
    assert out.verdict.violations == [] and out.verdict.violations_omitted == 50 and len(out.alerted()) == 50
    assert "its violations are left out (each still has its alert)" in out.verdict.reason
    assert len(alert_records(out.verdict, out.alerted(), 1000, 4096)) == 50


def test_a_dead_letter_too_large_to_copy_names_where_the_record_stays():
    core = evaluator(max_record_bytes=1_500_000)
    value = record("s", "b", [{"role": "user", "content": "x" * 1_600_000}])
    out = process(core, SessionStore({}), b"s", value, offset=42)
    assert out.verdict.decision == "deny" and out.dead_letter.kind == "too_large"
    dead = DeadLetter.model_validate_json(fit_dead_letter(out.dead_letter, out.dead_letter.model_dump_json().encode(),
                                                          2_000_000))
    assert dead.value_b64 == "" and dead.size == len(value) and "it stays at t[0]@42" in dead.reason


def test_a_state_record_the_changelog_would_refuse_denies_the_batch_only():
    # the reference engine keeps raw events; 1E9 is written back as 1000000000.0, 3.7 times longer
    core = evaluator(engine="reference", engine_processes=0)
    store, sizes = guarded_store()
    grows = ('{"session_id": "s", "batch_id": "b1", "events": [{"role": "user", "content": "hi", "v": ['
             + ",".join(["1E9"] * 180_000) + "]}]}").encode()
    assert len(grows) < 1_000_000
    out = process(core, store, b"s", grows)
    assert out.verdict.decision == "deny" and out.verdict.reason.startswith(STATE_REASON)
    assert "--max-state-record-bytes" in out.verdict.reason and max(sizes) <= 2_000_000
    assert store.head("s").policies == {}  # the batch did not join the past
    out = process(core, store, b"s", record("s", "b2", [USER_SEND]))
    assert out.verdict.decision == "allow" and store.head("s").policies["send_after_keyword"].length == 1


def test_candidates_marking_a_megabyte_keep_at_most_a_hundred_addresses():
    store, sizes = guarded_store()
    core = evaluator()
    out = process(core, store, b"s", record("s", "b1", [{"role": "user", "content": "send " * 190_000}]))
    assert out.verdict.decision == "allow" and max(sizes) < 20_000  # was one state record of 8 MB
    out = process(core, store, b"s", record("s", "b2", [SEND_EMAIL]))
    (v,) = out.verdict.violations
    assert len(v.addresses) == 100 and v.addresses[0] == "messages.0"


# -- 2. fan-out -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [400, 1000])
def test_a_fan_out_stops_at_the_rule_cap_with_one_summary(n):
    core = evaluator()
    value = record("s", "b", [USER_SEND] * n + [call(i) for i in range(n)])
    started = time.process_time()
    out = process(core, SessionStore({}), b"s", value)
    took = time.process_time() - started
    assert took < 2.0, f"{n} x {n} took {took:.1f} s of CPU"  # was 8.4 s for 400, out of memory at 1 MB
    v = out.verdict
    assert v.decision == "deny" and len(v.violations) == 101 and v.violations_omitted == 0
    assert "matching stopped after 100, --max-rule-matches" in v.violations[-1].message
    alerts = alert_records(v, out.alerted(), 1000, 1_000_000)
    assert len(alerts) == 101


def test_a_fan_out_across_batches_is_bounded_too():
    core, store = evaluator(), SessionStore({})
    for i in range(400):
        process(core, store, b"s", record("s", f"m{i}", [USER_SEND]))
    out = process(core, store, b"s", record("s", "call", [SEND_EMAIL]))
    assert out.verdict.decision == "deny" and len(out.verdict.violations) == 101
    # the kept candidates are the first ones: the listed violations are those invariant lists first
    assert [v.key for v in out.verdict.violations[:3]] == ["(0, (0, 400))", "(0, (1, 400))", "(0, (2, 400))"]


def test_the_batch_cap_stops_every_rule_and_alerts_are_capped():
    text = "".join(f'raise "r{i}" if:\n    (m: Message)\n    "a" in m.content\n\n' for i in range(3))
    core = inline(text, max_rule_matches=50, max_batch_matches=120, max_batch_alerts=100)
    out = process(core, SessionStore({}), b"s", record("s", "b", [{"role": "user", "content": "a"}] * 60))
    msgs = [v.message for v in out.alerted()]
    assert len(msgs) == 50 + 1 + 50 + 1 + 18 + 1  # (a summary counts towards the batch's cap)
    assert msgs[50].endswith("matching stopped after 50, --max-rule-matches)")
    assert msgs[-1].endswith("matching stopped after 18, --max-batch-matches)")
    alerts = alert_records(out.verdict, out.alerted(), 100, 1_000_000)
    assert len(alerts) == 100 and alerts[-1][0].message.startswith("22 more violations (rule 2: 19, rule 1: 3)")


def test_the_reference_engine_reports_a_fan_out_as_the_incremental_one():
    core = evaluator(engine="reference", engine_processes=0)
    out = process(core, SessionStore({}), b"s", record("s", "b", [USER_SEND] * 150 + [call(i) for i in range(2)]))
    assert len(out.verdict.violations) == 101 and "matching stopped after 100" in out.verdict.violations[-1].message


# -- 3. a budget with teeth -----------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_an_overrunning_reference_check_is_killed_and_the_next_session_is_unaffected():
    core = evaluator(POLICIES / "multi_turn_flow.gr", engine="reference", budget_ms=1000)
    store = SessionStore({})
    try:
        first = [{"role": "user", "content": "send it"}] * 200 + [call(i) for i in range(200)]
        assert process(core, store, b"A", record("A", "a0", first)).verdict.decision == "allow"
        for k in range(2):
            pids = {s.process.pid for s in core.pool.slots}
            started = time.monotonic()
            out = process(core, store, b"A", record("A", f"a{k + 1}", [
                {"role": "tool", "tool_call_id": "199", "content": "Peter"}]))
            took = time.monotonic() - started
            assert out.verdict.decision == "deny" and "time budget of 1000 ms" in out.verdict.reason
            assert took < 2.0, f"the check stopped after {took:.2f} s, past twice its budget"
            killed = pids - {s.process.pid for s in core.pool.slots}
            assert len(killed) == 1 and not any(_alive(p) for p in killed), "the overrunning process still runs"
            started = time.monotonic()
            out = process(core, store, b"B", record("B", f"b{k}", [{"role": "user", "content": "hi"}]))
            assert out.verdict.decision == "allow" and out.verdict.reason is None
            assert time.monotonic() - started < 0.5  # a ready process took it at once
        assert core.pool.kills == 2
    finally:
        core.close()


def test_the_incremental_engine_stops_its_enumeration_at_the_deadline():
    # a join condition that never holds: one million pairs to try
    core = inline('raise "x" if:\n    (m: Message) -> (t: ToolCall)\n    m.content == t.function.name\n',
                  budget_ms=300)
    value = record("s", "b", [{"role": "user", "content": "a"}] * 1000 + [call(i, "b") for i in range(1000)])
    started = time.monotonic()
    out = process(core, SessionStore({}), b"s", value)
    took = time.monotonic() - started
    assert out.verdict.decision == "deny" and "time budget of 300 ms" in out.verdict.reason
    assert took < 0.6 + 0.3, f"{took:.2f} s"  # twice the budget, plus decoding 2,000 events


def test_a_pool_that_cannot_start_fails_closed_without_a_restart_storm():
    from monitor.engine.isolation import IsolatedPool

    pool = IsolatedPool(1)
    broken = load_policy_text('raise "x" if:\n    (m: Message)\n    "a" in m.content\n', "broken")
    broken.text = "raise this does not parse"  # what a child is told to load
    pool.register(broken)
    try:
        with pytest.raises(Exception, match="engine processes cannot start"):
            asyncio.run(pool.analyze(broken, None, [], [USER_SEND], time.perf_counter() + 60))
    finally:
        pool.close()


def test_a_pool_check_past_its_deadline_raises_budget_exceeded():
    from monitor.engine.isolation import IsolatedPool

    policy = load_policy_text((POLICIES / "multi_turn_flow.gr").read_text(), "m")
    pool = IsolatedPool(1)
    pool.register(policy)
    pool.start()
    past = [{"role": "user", "content": "send it"}] * 200 + [call(i) for i in range(200)]
    try:
        started = time.perf_counter()
        with pytest.raises(BudgetExceeded):
            asyncio.run(pool.analyze(policy, None, past, [{"role": "tool", "tool_call_id": "1", "content": "Peter"}],
                                     time.perf_counter() + 0.5))
        assert time.perf_counter() - started < 1.0
    finally:
        pool.close()



def test_a_policy_registered_after_the_pool_started_is_loaded_before_its_first_check():
    """A new policy version (hot reload) is parsed by the idle children between batches, so its
    first check does not spend its budget loading it; the children keep the sandbox's allowances."""
    from monitor import sandbox
    from monitor.engine.isolation import IsolatedPool

    sandbox.set_allowed_imports(["math"])  # the worker's --allow-import math
    first = load_policy_text('raise "a" if:\n    (m: Message)\n    "a" in m.content\n', "p")
    pool = IsolatedPool(1, allowed_imports=sandbox.allowed_imports())
    pool.register(first)
    pool.start()
    try:
        assert asyncio.run(pool.analyze(first, None, [], [USER_SEND], time.perf_counter() + 30)) == []
        second = load_policy_text('from math import floor\nraise "s" if:\n    (m: Message)\n'
                                  '    floor(len(m.content)) == 4\n', "p")
        pool.register(second)
        [slot] = pool.slots
        assert not slot.ready  # loading it now, between batches
        deadline = time.perf_counter() + 30
        while not slot.conn.poll(0.05):
            assert time.perf_counter() < deadline
        errors = asyncio.run(pool.analyze(second, None, [], [USER_SEND], time.perf_counter() + 30))
        assert [e.args for e in errors] == [["s"]]
        assert pool.kills == 0
    finally:
        pool.close()
        sandbox.set_allowed_imports([])

# -- 4. huge integers -----------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["seq", "metadata", "event"])
def test_an_integer_of_over_4300_digits_is_denied_with_its_dead_letter(where):
    big = "9" * 5000
    value = {"seq": f'{{"session_id": "s", "batch_id": "b", "seq": {big}, "events": [{{"role": "user"}}]}}',
             "metadata": f'{{"session_id": "s", "batch_id": "b", "metadata": {{"n": {big}}}, "events": [{{"role": "user"}}]}}',
             "event": f'{{"session_id": "s", "batch_id": "b", "events": [{{"role": "user", "n": -{big}}}]}}'}[where]
    out = process(evaluator(), SessionStore({}), b"s", value.encode())
    assert out.verdict.decision == "deny" and out.verdict.batch_id == "b"
    assert "an integer of 5000 digits: at most 4300" in out.verdict.reason
    assert out.dead_letter.kind == "invalid"


def test_replay_of_files_with_huge_integers_writes_its_report(tmp_path):
    big = "9" * 5000
    (tmp_path / "a.jsonl").write_text(
        f'{{"session_id": "s", "batch_id": "b1", "seq": {big}, "events": [{{"role": "user", "content": "x"}}]}}\n'
        '{"session_id": "s", "batch_id": "b2", "events": [{"role": "user", "content": "x"}]}\n')
    (tmp_path / "b.json").write_text(f'[{{"role": "user", "content": "x", "n": {big}}}, {{"role": "user", "content": "y"}}]')
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    proc = subprocess.run([sys.executable, "-m", "monitor.cli", "replay", str(tmp_path / "a.jsonl"),
                           str(tmp_path / "b.json"), "--policy", str(POLICIES), "-o", str(out), "--html", str(page)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    decisions = {(s["session_id"], b["batch_id"]): b["decision"] for s in report["sessions"] for b in s["batches"]}
    assert decisions[("s", "b1")] == "deny" and decisions[("s", "b2")] == "allow"
    assert len(report["bad_input"]) == 2 and page.exists()


# -- 5. fail-open that stays honest ---------------------------------------------------------------

def test_an_engine_error_on_accepted_input_is_no_allow_under_fail_open():
    unparsable = {"role": "user", "content": [{"text": 5}]}  # the schema takes it, invariant does not
    for kinds, decision in ((["timeout"], "deny"), (["timeout", "error"], "allow")):
        core, store = evaluator(fail_closed=False, fail_open_kinds=kinds), SessionStore({})
        process(core, store, b"s", record("s", "b1", [USER_SEND]))
        out = process(core, store, b"s", record("s", "b2", [unparsable, SEND_EMAIL]))
        assert out.verdict.decision == decision, kinds
        assert out.verdict.reason.startswith("the policy raised an error")
    args = build_parser().parse_args(["run", "--policy", "p", "--fail-open"])
    assert args.fail_open == ["timeout"]
    assert build_parser().parse_args(["run", "--policy", "p", "--fail-open", "timeout,error"]).fail_open == [
        "timeout", "error"]
    assert build_parser().parse_args(["run", "--policy", "p"]).fail_open is None


# -- 6. state growth ------------------------------------------------------------------------------

def test_a_long_session_of_send_keeps_bounded_state_and_check_time():
    core, store = evaluator(), SessionStore({})
    times = []
    for i in range(3000):
        started = time.process_time()
        out = process(core, store, b"s", record("s", f"b{i}", [USER_SEND]))
        times.append(time.process_time() - started)
        assert out.verdict.decision == "allow"
    cur = store.head("s").policies["send_after_keyword"]
    assert cur.log_end - cur.log_start <= 101 + 1  # was 3,065 records
    first, last = sum(times[:300]), sum(times[-300:])
    assert last < 2.5 * first + 0.05, f"the check grew from {first / 300 * 1000:.2f} to {last / 300 * 1000:.2f} ms"
    out = process(core, store, b"s", record("s", "call", [SEND_EMAIL]))
    assert out.verdict.decision == "deny" and len(out.verdict.violations) == 101


def test_state_past_the_session_limit_denies_with_a_reason_and_misses_nothing():
    # a join condition reads every candidate: none may be dropped, so the limit applies
    core = inline('raise "x" if:\n    (m: Message) -> (t: ToolCall)\n    m.content == t.function.name\n',
                  max_session_entries=5)
    store = SessionStore({})
    for i in range(5):
        assert process(core, store, b"s", record("s", f"b{i}", [{"role": "user", "content": f"f{i}"}])).verdict.allowed
    out = process(core, store, b"s", record("s", "b5", [{"role": "user", "content": "f5"}]))
    assert out.verdict.decision == "deny" and out.verdict.reason.startswith(STATE_REASON)
    assert "over the limit of 5 (--max-session-entries)" in out.verdict.reason and "end_session" in out.verdict.reason
    # the past is as it was: a call matching a kept message is still caught, one adding nothing passes
    out = process(core, store, b"s", record("s", "b6", [call(1, "f3")]))
    assert out.verdict.decision == "deny" and out.verdict.violations[0].key == "(0, (3, 5))"
    assert process(core, store, b"s", record("s", "b7", [call(2, "zz")])).verdict.allowed


# -- 7. terminal and display ----------------------------------------------------------------------

NASTY = "s\x1b[2J\x1b]0;owned\x07\u202egnp.exe\u2066\x9b31m"


def test_console_output_escapes_control_and_bidi_characters():
    from rich.console import Console

    violation = Violation(alert_id="a", rule_index=0, message=f"leak {NASTY}", key="k",
                          addresses=[f"messages.0.content.{NASTY}"])
    verdict = Verdict(session_id=NASTY, batch_id=NASTY, decision="deny", violations=[violation])
    records = [verdict, Alert.from_violation(violation, verdict),
               Verdict(session_id=NASTY, batch_id="b", decision="deny", reason=f"because {NASTY}"),
               DeadLetter(kind="invalid", reason=NASTY, source=SourceRef(topic=NASTY, partition=0, offset=1),
                          value_b64="", size=0, session_id=NASTY, batch_id=NASTY)]
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=400)
    for r in records:
        console.print(render_record(r))
    shown = buf.getvalue()
    for raw in ("\x1b[2J", "\x1b]0;", "\x07", "\u202e", "\u2066", "\x9b"):
        assert raw not in shown, repr(raw)
    assert "\\x1b[2J" in shown and "\\u202e" in shown
    line = printable_json(verdict.model_dump_json())
    assert "\u202e" not in line and "\x9b" not in line and json.loads(line) == json.loads(verdict.model_dump_json())


def test_the_html_report_shows_bidi_characters_escaped(tmp_path):
    from monitor.replay import ReplayRequest, run_replay

    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"session_id": NASTY, "events": [
        {"role": "user", "content": "send \u202etxt.exe\u2069 now\nline two"}, SEND_EMAIL]}))
    run_replay(ReplayRequest(inputs=[str(trace)], policy=str(POLICIES / "send_after_keyword.gr"),
                             out=str(tmp_path / "r.json"), html=str(tmp_path / "r.html"), progress=False))
    page = (tmp_path / "r.html").read_text()
    for raw in ("\x1b", "\u202e", "\u2066", "\u2069", "\x9b", "\x07"):
        assert raw not in page, repr(raw)
    assert "\\u202etxt.exe\\u2069" in page and "now\nline two" in page


# -- 8. the metrics server ------------------------------------------------------------------------

def test_metrics_beyond_loopback_need_a_token(monkeypatch):
    monkeypatch.delenv("AGENT_MONITOR_METRICS_TOKEN", raising=False)
    registry = WorkerMetrics().registry
    with pytest.raises(MetricsExposed, match="refusing to serve /metrics on 0.0.0.0 without a token"):
        serve_metrics(registry, port=0, host="0.0.0.0")
    with serve_metrics(registry, port=0, host="0.0.0.0", token="t") as srv:
        req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/metrics", headers={"Authorization": "Bearer t"})
        assert b"agent_monitor" in urllib.request.urlopen(req, timeout=10).read()
    with serve_metrics(registry, port=0, host="127.0.0.1") as srv:  # loopback: no token needed
        assert urllib.request.urlopen(srv.url, timeout=10).status == 200


def test_half_open_connections_hold_no_more_than_the_cap_and_time_out():
    registry = WorkerMetrics().registry
    before = threading.active_count()
    with serve_metrics(registry, port=0, token="t", max_connections=8, timeout=0.5) as srv:
        silent = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(300)]
        time.sleep(0.3)
        assert threading.active_count() <= before + 1 + 8 + 1  # the server's thread, the cap, slack
        # the first ones were served until their timeout, then dropped by the server
        time.sleep(1.0)
        silent[0].settimeout(2)
        assert silent[0].recv(1) == b""
        for s in silent:
            s.close()
        req = urllib.request.Request(srv.url, headers={"Authorization": "Bearer t"})
        assert urllib.request.urlopen(req, timeout=10).status == 200
        assert threading.active_count() <= before + 1 + 8 + 1


def test_the_worker_refuses_to_start_with_exposed_metrics(tmp_path):
    settings = WorkerSettings(policy_path=str(POLICIES), metrics_port=9, bootstrap_servers="127.0.0.1:1",
                              create_topics=False)
    env = {k: v for k, v in os.environ.items() if k != "AGENT_MONITOR_METRICS_TOKEN"}
    env["AGENT_MONITOR_METRICS_HOST"] = "0.0.0.0"
    proc = subprocess.run([sys.executable, "-m", "monitor.worker", settings.model_dump_json()], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "without a token" in proc.stderr


# -- the limits are documented --------------------------------------------------------------------

def test_every_limit_has_a_flag_a_setting_and_a_readme_line():
    readme = (ROOT / "README.md").read_text()
    limits = readme.split("## Limits", 1)[1].split("\n## ", 1)[0]
    run_help = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for name in LIMIT_FLAGS:
        flag = "--" + name.replace("_", "-")
        assert flag in run_help and name in WorkerSettings.model_fields
        default = WorkerSettings.model_fields[name].default
        assert f"`{flag}`" in limits and f"{default:,}" in limits, flag
