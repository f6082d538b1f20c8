"""Unit tests of the incremental engine: compilation, state, fallback, failure, caching."""

from __future__ import annotations

import asyncio
import doctest
import json
import os
from pathlib import Path

import pytest

os.environ["INVARIANT_MAX_ITERATIONS"] = str(10**12)

from engine_diff import differences  # noqa: E402

import monitor.engine.compiler  # noqa: E402
import monitor.engine.conditions  # noqa: E402
import monitor.engine.incremental  # noqa: E402
from monitor.engine import make_engine  # noqa: E402
from monitor.engine.base import EngineError, SessionState  # noqa: E402
from monitor.engine.incremental import IncrementalEngine  # noqa: E402
from monitor.policy import load_policy_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEND = '''raise "send" if:
    (msg: Message) -> (tool: ToolCall)
    msg.role == "user"
    "send" in msg.content
    tool is tool:send_email
'''
DIRECT = '''raise "direct" if:
    (call: ToolCall) ~> (output: ToolOutput)
    call is tool:send_email
    "Peter" in output.content
'''
ONE = '''raise "one" if:
    (m: Message)
    "bad" in m.content
'''
QUANT = '''from invariant import count

raise "two calls" if:
    (m: Message)
    m.role == "user"
    count(min=2):
        (t: ToolCall)
        t is tool:send_email
'''


def run(engine, state, batch):
    return asyncio.run(engine.check(state, batch))


def feed(engine, events, batch=1):
    state, out = engine.initial_state(), []
    for k in range(0, len(events), batch):
        result = run(engine, state, events[k:k + batch])
        out.append(result)
        state = result.advance(state)
    return state, out


def user(text):
    return {"role": "user", "content": text}


def call(name, cid="1", **args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def assistant_calls(*calls):
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


def test_doc_examples_run():
    for module in (monitor.engine.incremental, monitor.engine.compiler, monitor.engine.conditions):
        failed, _ = doctest.testmod(module)
        assert failed == 0, module.__name__


def test_make_engine_uses_the_incremental_engine_by_default():
    policy = load_policy_text(ONE)
    assert isinstance(make_engine(policy), IncrementalEngine)
    assert make_engine(policy, "reference").name == "reference"


def test_seed_flow_rules_compile_and_explain_says_how():
    files = ["send_after_keyword.gr", "multi_turn_flow.gr", "direct_succession.gr",
             "secrets_to_pr.gr", "secrets_in_code.gr", "copyright.gr"]
    text = "\n".join((ROOT / "examples" / "policies" / f).read_text() for f in files)
    infos = IncrementalEngine(load_policy_text(text), offload=False).explain()
    assert [i.engine for i in infos] == ["incremental"] * len(infos)
    assert "msg: all candidates; tool: none" in infos[0].reason
    assert "call: last 1 position(s); output: none" in infos[2].reason


def test_unsupported_rule_runs_on_the_reference_and_says_why():
    engine = IncrementalEngine(load_policy_text(SEND + "\n" + QUANT), offload=False)
    first, second = engine.explain()
    assert (first.engine, second.engine) == ("incremental", "reference")
    assert second.message == "two calls"
    assert "quantifier" in second.reason and "last 2000 events" in second.reason


@pytest.mark.parametrize("kind", ["incremental", "reference"])
def test_both_engines_name_a_rule_by_the_message_it_raises(kind):
    policy = load_policy_text('raise PolicyViolation("bad thing", x=1) if:\n    (m: Message)\n'
                              '    "bad" in m.content\n\n'
                              'raise "plain" if:\n    (m: Message)\n    "plain" in m.content\n')
    engine = make_engine(policy, kind, offload=False)
    assert [i.message for i in engine.explain()] == ["bad thing", "plain"]
    result = asyncio.run(engine.check(engine.initial_state(), [{"role": "user", "content": "bad"}]))
    assert [(m.message, m.kwargs) for m in result.matches] == [("bad thing", {"x": 1})]


def test_violation_has_the_references_key_and_addresses_for_a_nested_call():
    engine = IncrementalEngine(load_policy_text(SEND), offload=False)
    trace = [user("please send it"), {"role": "assistant", "content": "ok"},
             assistant_calls(call("search"), call("send_email", "2", to="bob"))]
    _, results = feed(engine, trace)
    (m,) = results[-1].matches
    assert m.key == "(0, (0, 2))"
    assert m.addresses == ["messages.0", "messages.0.content:7-11", "messages.2.tool_calls.1"]
    assert results[0].matches == [] and results[1].matches == []


def test_a_past_match_is_not_reported_again():
    engine = IncrementalEngine(load_policy_text(SEND), offload=False)
    _, results = feed(engine, [user("send"), call("send_email"), user("more"), call("search")])
    assert [len(r.matches) for r in results] == [0, 1, 0, 0]


def test_state_keeps_only_what_rules_still_need_and_is_json():
    engine = IncrementalEngine(load_policy_text(SEND + "\n" + DIRECT + "\n" + ONE), offload=False)
    events = []
    for k in range(200):
        events += [user("hello" if k != 3 else "send it"),
                   assistant_calls(call("send_email" if k % 2 else "search", f"c{k}")),
                   {"role": "tool", "tool_call_id": f"c{k}", "content": "sent to Peter"}]
    state, results = feed(engine, events, batch=3)
    # SEND keeps the one user message that said "send"; DIRECT and ONE keep nothing in the log
    live = [(e["t"], e["r"], e["i"]) for e in state.log if e.get("k") != "F"]
    assert live == [("c", 0, 9)]
    # besides, per failing condition the earliest event that failed it (for error semantics)
    assert [(e["r"], e["i"], e["st"]) for e in state.log if e.get("k") == "F"] == [(0, 0, 2), (0, 1, 1)]
    assert state.head["tail"] == {} or all(len(v) <= 1 for r in state.head["tail"].values()
                                          for v in r.values())
    assert len(state.model_dump_json()) < 1000
    restored = SessionState.model_validate_json(state.model_dump_json())
    again = run(engine, restored, [call("send_email", "x")])
    assert [m.key for m in again.matches] == ["(0, (9, 600))"]
    assert sum(len(r.matches) for r in results) > 0


def test_fallback_window_and_candidates_coexist_in_the_log():
    policy = load_policy_text(SEND + "\n" + QUANT)
    engine = IncrementalEngine(policy, max_history=8, offload=False)
    events = [user("send this")] + [{"role": "assistant", "content": f"step {k}"} for k in range(200)]
    state, _ = feed(engine, events, batch=2)
    kinds = [e["t"] for e in state.log if e.get("k") != "F"]
    assert kinds.count("c") == 1  # the "send" candidate survived every compaction
    assert 8 <= kinds.count("e") <= 8 + 65 + 2  # the raw window stays bounded
    final = run(engine, state, [user("hi"), call("send_email", "z"), call("send_email", "y")])
    assert sorted(m.key for m in final.matches if m.rule_index == 0) == ["(0, (0, 202))", "(0, (0, 203))"]
    # the quantifier rule ran on invariant-ai over the window; its key counts over the session
    assert [(m.rule_index, m.key) for m in final.matches if m.rule_index == 1] == [(1, "(1, (201,))")]


def test_fallback_rules_equal_the_reference_on_short_sessions():
    policy = load_policy_text(SEND + "\n" + QUANT)
    engine = IncrementalEngine(policy, offload=False)
    trace = [user("send"), call("send_email", "1"), user("hi"), call("send_email", "2")]
    for bounds in ([4], [1, 2, 3, 4], [2, 4]):
        assert differences(policy, engine, trace, bounds) == []


def test_an_own_condition_that_raises_fails_the_batch_closed_like_the_reference():
    policy = load_policy_text('raise "long" if:\n    (m: Message)\n    len(m.content) > 3\n')
    engine = IncrementalEngine(policy, offload=False)
    state, _ = feed(engine, [user("hello")])
    with pytest.raises(EngineError, match="TypeError"):
        run(engine, state, [assistant_calls(call("x"))])
    with pytest.raises(Exception):  # noqa: B017 - whatever invariant-ai raises there
        asyncio.run(policy.local.a_analyze_pending([user("hello")], [assistant_calls(call("x"))]))


def test_detectors_run_once_per_event(monkeypatch):
    from invariant.analyzer.runtime.utils import secrets as secrets_module

    calls = []
    original = secrets_module.SecretsAnalyzer.detect_all

    def counting(self, text, **kw):
        calls.append(text)
        return original(self, text, **kw)

    monkeypatch.setattr(secrets_module.SecretsAnalyzer, "detect_all", counting)
    policy = load_policy_text((ROOT / "examples" / "policies" / "secrets_to_pr.gr").read_text())
    engine = IncrementalEngine(policy, offload=False)
    events = [user("token ghp_1234567890123456789012345678901234567890")]
    events += [user(f"hello {k}") for k in range(20)] + [call("create_pr", f"p{k}") for k in range(20)]
    _, results = feed(engine, events)
    assert len(calls) == 21  # one per message, never again when the tool calls arrive
    assert sum(len(r.matches) for r in results) == 20


def test_join_conditions_see_kept_events():
    text = '''raise "echo" if:
    (m: Message) -> (o: ToolOutput)
    m.role == "user"
    m.content == o.content
'''
    policy = load_policy_text(text)
    engine = IncrementalEngine(policy, offload=False)
    trace = json.loads(json.dumps([user("same words"), {"role": "tool", "content": "other"},
                                   {"role": "tool", "content": "same words"}]))
    assert differences(policy, engine, trace, [1, 2, 3]) == []
    _, results = feed(engine, trace)
    assert [m.key for m in results[2].matches] == ["(0, (0, 2))"]


def test_a_state_of_another_policy_text_is_not_misread():
    first = IncrementalEngine(load_policy_text(SEND), offload=False)
    state, _ = feed(first, [user("send")])
    assert len(state.log) == 1
    other = IncrementalEngine(load_policy_text(ONE + "\n" + SEND), offload=False)
    result = run(other, state, [user("bad, send it")])
    assert [m.key for m in result.matches] == ["(0, (1,))"]
    after = result.advance(state)
    assert after.log_start == 1 and [e["r"] for e in after.log] == [1]


def test_pure_predicates_compile_and_trace_wide_ones_fall_back():
    text = '''invalid_role(m: Message) :=
    m.role == "assistant"

wide(m: Message) :=
    (c: ToolCall)
    c is tool:send_email

raise "pure" if:
    (msg: Message)
    invalid_role(msg)
    "X" in msg.content

raise "wide" if:
    (msg: Message)
    wide(msg)
'''
    policy = load_policy_text(text)
    engine = IncrementalEngine(policy, offload=False)
    assert [i.engine for i in engine.explain()] == ["incremental", "reference"]
    assert "declares a variable over the trace" in engine.explain()[1].reason
    trace = [user("X"), {"role": "assistant", "content": "an X"}, call("send_email")]
    assert differences(policy, engine, trace, [1, 2, 3]) == []
    _, results = feed(engine, trace)
    assert [m.key for m in results[1].matches] == ["(0, (1,))"]


def test_concurrent_sessions_on_one_loop_get_their_own_verdicts():
    text = (ROOT / "examples" / "policies" / "secrets_to_pr.gr").read_text() + '''
raise "words" if:
    (m: Message) -> (t: ToolCall)
    any([w in m.content for w in ["alpha", "beta"]])
    t is tool:create_pr
'''
    engine = IncrementalEngine(load_policy_text(text), offload=False)
    key = "ghp_1234567890123456789012345678901234567890"

    def session(k):
        words = ["alpha", "beta", "gamma"][k % 3]
        return [user(f"{words} {key if k % 2 else 'nothing'}"), call("create_pr", f"p{k}")]

    async def one(k):
        state = engine.initial_state()
        found = []
        for event in session(k):
            await asyncio.sleep(0)
            result = await engine.check(state, [event])
            found += sorted((m.rule_index, m.key, tuple(m.addresses)) for m in result.matches)
            state = result.advance(state)
        return found

    async def all_at_once():
        return await asyncio.gather(*(one(k) for k in range(24)))

    sequential = [asyncio.run(one(k)) for k in range(24)]
    assert asyncio.run(all_at_once()) == sequential
    assert sequential[1] == [(0, "(0, (0, 1))", ("messages.0", "messages.1")),
                             (1, "(1, (0, 1, -1))", ("messages.0", "messages.0.content:0-4",
                                                     "messages.1"))]
    assert sequential[2] == []


def test_tool_outputs_are_linked_to_past_calls_like_invariant_links_them():
    text = '''raise "inbox" if:
    (out: ToolOutput)
    out is tool:get_inbox
    "Peter" in out.content

raise "join" if:
    (out: ToolOutput) -> (msg: Message)
    out is tool:send_email
    "Peter" in tool_call(out).function.arguments.to and "again" in msg.content
'''
    policy = load_policy_text(text)
    engine = IncrementalEngine(policy, offload=False)
    assert [i.engine for i in engine.explain()] == ["incremental", "incremental"]
    trace = json.loads(json.dumps([
        user("hello"),
        assistant_calls(call("get_inbox", "1"), call("send_email", "2", to="xavier Peter")),
        {"role": "tool", "tool_call_id": "1", "content": "mail from Peter"},
        {"role": "tool", "tool_call_id": "2", "content": "sent"},
        call("send_email", "1", to="Peter"),  # a later call reusing id 1: later outputs name it
        {"role": "tool", "tool_call_id": "1", "content": "Peter"},
        {"role": "tool", "content": "Peter again"},  # no id: the latest call's
        user("again, Peter"),
    ]))
    for bounds in ([8], list(range(1, 9)), [2, 4, 8], [3, 5, 8]):
        assert differences(policy, engine, trace, bounds) == []
    _, results = feed(engine, trace)
    assert [m.key for m in results[2].matches] == ["(0, (2,))"]
    assert sorted(m.key for m in results[7].matches) == ["(1, (7, 3))", "(1, (7, 5))", "(1, (7, 6))"]
