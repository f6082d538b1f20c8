"""The session-aware HTTP path against a real broker and a real worker process: batches posted over
HTTP get the stateful monitor's verdicts (the past counts across requests), and the server lists
them."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from http_server import LiveServer
from workers import worker

from monitor.api.app import ServeSettings
from monitor.api.security import ApiKeys, new_key
from monitor.samples import load_sample
from monitor.topics import create_topics

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "examples" / "policies"
SESSIONS = ROOT / "examples" / "sessions"
KEY, KEY_LINE = new_key("sessions")


@pytest.fixture(scope="module")
def stack(kafka_bootstrap):
    prefix = f"t-http-{uuid.uuid4().hex[:8]}"
    with worker(kafka_bootstrap, prefix, POLICIES, partitions=3):
        settings = ServeSettings(sessions=True, bootstrap_servers=kafka_bootstrap, topic_prefix=prefix,
                                 rate_limit=1000, rate_burst=1000, max_record_bytes=20_000,
                                 max_body_bytes=100_000)
        with LiveServer(settings, ApiKeys.parse(KEY_LINE, "tests")) as live, live.client(KEY) as client:
            yield live, client, prefix


@pytest.mark.parametrize("name", ["flow_send_email_split", "semgrep_monitor_check", "secrets_monitor_check"])
def test_sample_sessions_through_http(stack, name):
    """Each batch of a sample session, posted with wait=true, gets the verdict the sample promises:
    the worker keeps the session's past between requests."""
    _live, client, prefix = stack
    sample = load_sample(SESSIONS / f"{name}.json")
    session = f"{sample.session_id}-{uuid.uuid4().hex[:6]}"
    for i, (events, expect) in enumerate(zip(sample.batches, sample.expect, strict=True)):
        r = client.post(f"/api/v1/sessions/{session}/batches", params={"wait": "true", "timeout": 60},
                        json={"batch_id": f"b{i}", "events": events, "policy": sample.policy})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["topic"] == f"{prefix}.events" and body["batch_id"] == f"b{i}"
        verdict = body["verdict"]
        problem = expect.mismatch(verdict["decision"], [v["message"] for v in verdict["violations"]])
        assert problem is None, f"{name} batch {i}: {problem}"
        assert verdict["policy_id"] == sample.policy and verdict["session_id"] == session
    listed = client.get(f"/api/v1/sessions/{session}/verdicts").json()
    assert [v["batch_id"] for v in listed["verdicts"]] == [f"b{i}" for i in range(len(sample.batches))]
    assert listed["verdicts"][-1]["decision"] == sample.expect[-1].decision


def test_the_past_counts_and_a_repeat_repeats(stack):
    _live, client, _prefix = stack
    session = f"s-{uuid.uuid4().hex[:8]}"
    url = f"/api/v1/sessions/{session}/batches"
    first = client.post(url, params={"wait": "true"}, json={
        "batch_id": "one", "events": [{"role": "user", "content": "please send it"}],
        "policy": "send_after_keyword"})
    assert first.json()["verdict"]["decision"] == "allow"
    call = {"id": "1", "type": "function", "function": {"name": "send_email", "arguments": {}}}
    second = client.post(url, params={"wait": "true"}, json={"batch_id": "two", "events": [call],
                                                             "policy": "send_after_keyword"})
    v2 = second.json()["verdict"]
    assert v2["decision"] == "deny"
    assert v2["violations"][0]["addresses"] == ["messages.0", "messages.0.content:7-11", "messages.1"]
    again = client.post(url, params={"wait": "true"}, json={"batch_id": "two", "events": [call],
                                                            "policy": "send_after_keyword"})
    assert again.json()["verdict"]["violations"][0]["alert_id"] == v2["violations"][0]["alert_id"]
    listed = client.get(f"/api/v1/sessions/{session}/verdicts").json()["verdicts"]
    assert [v["batch_id"] for v in listed] == ["one", "two"]  # one entry per batch id
    assert [v["batch_id"] for v in client.get(f"/api/v1/sessions/{session}/verdicts",
                                              params={"limit": 1}).json()["verdicts"]] == ["two"]


def test_fire_and_forget_then_list(stack):
    _live, client, _prefix = stack
    session = f"s-{uuid.uuid4().hex[:8]}"
    r = client.post(f"/api/v1/sessions/{session}/batches", json={"events": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 202 and r.json()["verdict"] is None
    batch_id = r.json()["batch_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = client.get(f"/api/v1/sessions/{session}/verdicts").json()["verdicts"]
        if listed:
            break
        time.sleep(0.2)
    assert [v["batch_id"] for v in listed] == [batch_id] and listed[0]["decision"] == "allow"


def test_bad_batches_are_refused_before_kafka(stack):
    _live, client, _prefix = stack
    url = f"/api/v1/sessions/s-{uuid.uuid4().hex[:8]}/batches"
    r = client.post(url, json={"events": []})
    assert r.status_code == 400 and r.json()["where"] == "body.events"
    r = client.post(url, json={"events": [{"role": "user", "content": "x" * 30_000}]})
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    r = client.post(url, params={"wait": "true", "timeout": 3600}, json={"events": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["where"] == "query.timeout"
    r = client.post(url, json={"events": [{"role": "user", "content": "x"}], "policy": "p", "bogus": 1})
    assert r.status_code == 400 and r.json()["where"] == "body.bogus"


def test_no_worker_is_a_504_naming_the_batch(kafka_bootstrap):
    prefix = f"t-http-idle-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix, 1)
    settings = ServeSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, no_auth=True)
    with LiveServer(settings) as live, live.client() as client:
        r = client.post("/api/v1/sessions/s/batches", params={"wait": "true", "timeout": 2},
                        json={"batch_id": "late", "events": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 504, r.text
        assert r.json()["error"] == "verdict_timeout" and "'late'" in r.json()["detail"]
        assert r.headers["X-Batch-Id"] == "late"


def test_kafka_away_is_a_503_and_stateless_checks_still_work():
    settings = ServeSettings(bootstrap_servers="127.0.0.1:1", no_auth=True, connect_timeout=1,
                             allow_policy_text=True)
    with LiveServer(settings) as live, live.client() as client:
        r = client.post("/api/v1/sessions/s/batches", json={"events": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"] == "unavailable"
        assert "127.0.0.1:1" in r.json()["detail"] and r.headers["Retry-After"] == "5"
        assert client.get("/healthz").json()["sessions"] == "unavailable"
        r = client.post("/api/monitor/check", json={
            "policy": 'raise "hi" if:\n    (m: Message)\n    "hi" in m.content\n',
            "pending_events": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and len(r.json()) == 1
