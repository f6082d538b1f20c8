"""Per-rule actions in the core: ``block`` denies, ``log`` lets the batch through (listed in the
verdict as logged, alerted) and the batch joins the past; a record's action overrides the tag."""

from __future__ import annotations

import asyncio
import json

import pytest

from monitor.config import WorkerSettings
from monitor.core import BatchEvaluator
from monitor.models import parse_action
from monitor.policy import PolicySet, load_policy_text
from monitor.state import SessionStore

POLICY = '''raise "keyword seen [risk=low] [action=log]" if:
    (m: Message)
    "send" in m.content

raise "email after the keyword" if:
    (m: Message) -> (t: ToolCall)
    "send" in m.content
    t is tool:send_email
'''


def run(core: BatchEvaluator, store: SessionStore, batch_id: str, events: list[dict]):
    record = json.dumps({"session_id": "s", "batch_id": batch_id, "events": events}).encode()
    return asyncio.run(core.process_record(store, b"s", record, None))


@pytest.mark.parametrize("engine", ["incremental", "reference"])
def test_a_logged_violation_allows_the_batch_alerts_and_joins_the_past(engine: str) -> None:
    policy = load_policy_text(POLICY, "flow")
    core = BatchEvaluator(PolicySet.single(policy), WorkerSettings(policy_path="-", engine=engine))
    store = SessionStore({})
    try:
        first = run(core, store, "b1", [{"role": "user", "content": "please send it"}])
        assert first.verdict.decision == "allow" and first.joined
        assert [(v.message, v.action, v.severity) for v in first.verdict.violations] == [
            ("keyword seen [risk=low] [action=log]", "log", "low")]
        assert [(a.action, a.decision) for a in first.alerts()] == [("log", "allow")]
        # the logged batch is in the past: the flow rule (block) fires on the tool call
        second = run(core, store, "b2", [{"type": "function", "id": "1",
                                          "function": {"name": "send_email", "arguments": {}}}])
        assert second.verdict.decision == "deny"
        assert [(v.message, v.action) for v in second.verdict.violations] == [("email after the keyword", "block")]
    finally:
        core.close()


def test_a_batch_with_a_blocking_and_a_logged_violation_is_denied() -> None:
    core = BatchEvaluator(PolicySet.single(load_policy_text(POLICY, "flow")), WorkerSettings(policy_path="-"))
    try:
        out = run(core, SessionStore({}), "b", [
            {"role": "user", "content": "send"},
            {"type": "function", "id": "1", "function": {"name": "send_email", "arguments": {}}}])
    finally:
        core.close()
    assert out.verdict.decision == "deny" and not out.joined
    assert sorted(v.action for v in out.verdict.violations) == ["block", "log"]


def test_a_record_action_overrides_the_tag() -> None:
    policy = load_policy_text(POLICY, "flow")
    policy.actions = {0: "block", 1: "log"}
    assert policy.rule_actions() == {0: "block", 1: "log"}
    core = BatchEvaluator(PolicySet.single(policy), WorkerSettings(policy_path="-"))
    try:
        out = run(core, SessionStore({}), "b", [{"role": "user", "content": "send"}])
    finally:
        core.close()
    assert out.verdict.decision == "deny" and out.verdict.violations[0].action == "block"


@pytest.mark.parametrize(("message", "action"), [
    ("x [action=log]", "log"), ("x [Action = BLOCK]", "block"), ("x [risk=high]", None), ("x [action=warn]", None)])
def test_the_action_tag(message: str, action: str | None) -> None:
    assert parse_action(message) == action
