"""WorkerMetrics counters and the /metrics endpoint with its bearer token."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.metrics import MAX_RULES, OTHER_RULE, WorkerMetrics, serve_metrics
from monitor.models import Alert, Match, Verdict, Violation


def _violation(message: str, key: str = "(0, (1,))") -> Violation:
    return Violation.from_match(Match(rule_index=0, message=message, key=key), "s1", "a" * 64)


def _get(url: str, token: str | None = None, accept: str | None = None) -> tuple[int, dict, bytes]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if accept:
        headers["Accept"] = accept
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_verdicts_violations_and_latency_are_counted():
    m = WorkerMetrics(engine="incremental")
    m.batch_consumed(events=2)
    m.batch_consumed(events=3)
    deny = Verdict(session_id="s1", batch_id="b1", decision="deny", engine="incremental", eval_ms=12.0,
                   violations=[_violation("secret in code [risk=medium]"), _violation("exfiltration")])
    m.observe_verdict(deny, eval_seconds=0.012)
    m.observe_verdict(Verdict(session_id="s1", batch_id="b2", decision="allow", eval_ms=3.0))

    assert m.value("agent_monitor_batches_total") == 2
    assert m.value("agent_monitor_events_total") == 5
    assert m.value("agent_monitor_verdicts_total", decision="deny") == 1
    assert m.value("agent_monitor_verdicts_total", decision="allow") == 1
    assert m.value("agent_monitor_violations_total", rule="secret in code [risk=medium]", severity="medium") == 1
    assert m.value("agent_monitor_violations_total", rule="exfiltration", severity="high") == 1
    # the allow verdict has no engine: the worker's engine labels it; eval_ms is the default latency
    assert m.value("agent_monitor_check_seconds_count", engine="incremental") == 2
    assert m.value("agent_monitor_check_seconds_sum", engine="incremental") == pytest.approx(0.015)
    assert m.value("agent_monitor_check_seconds_bucket", engine="incremental", le="0.005") == 1
    assert m.value("agent_monitor_check_seconds_bucket", engine="incremental", le="0.025") == 2


def test_alerts_dead_letters_policy_failures_and_state():
    m = WorkerMetrics()
    verdict = Verdict(session_id="s1", batch_id="b1", decision="deny", violations=[_violation("x [risk=low]")])
    m.alert_published(Alert.from_violation(verdict.violations[0], verdict))
    m.dead_letter("not_json")
    m.dead_letter("not_json")
    m.dead_letter("too_large")
    m.policy_failure("error")
    m.policy_failure("timeout")
    m.policy_failure("timeout")
    m.duplicate_batch()
    m.set_sessions(7)
    m.set_consumer_lag(3, 120)
    m.set_consumer_lag(4, -5)  # a stale end offset never shows negative lag

    assert m.value("agent_monitor_alerts_total", rule="x [risk=low]", severity="low") == 1
    assert m.value("agent_monitor_dead_letters_total", kind="not_json") == 2
    assert m.value("agent_monitor_dead_letters_total", kind="too_large") == 1
    assert m.value("agent_monitor_policy_failures_total", kind="error") == 1
    assert m.value("agent_monitor_policy_failures_total", kind="timeout") == 2
    assert m.value("agent_monitor_duplicate_batches_total") == 1
    assert m.value("agent_monitor_sessions") == 7
    assert m.value("agent_monitor_consumer_lag", partition="3") == 120
    assert m.value("agent_monitor_consumer_lag", partition="4") == 0
    m.forget_partitions([3, 99])
    assert m.registry.get_sample_value("agent_monitor_consumer_lag", {"partition": "3"}) is None
    assert m.value("agent_monitor_consumer_lag", partition="4") == 0
    m.forget_partitions()
    assert m.registry.get_sample_value("agent_monitor_consumer_lag", {"partition": "4"}) is None
    with pytest.raises(ValueError):
        m.policy_failure("crash")


def test_zero_series_exist_before_the_first_event():
    # alert rules use increase()/rate(): a series born at its first increment hides that increment
    m = WorkerMetrics(engine="reference")
    for kind in ("not_json", "invalid", "too_large", "out_of_order", "internal"):
        assert m.registry.get_sample_value("agent_monitor_dead_letters_total", {"kind": kind}) == 0
    for decision in ("allow", "deny"):
        assert m.registry.get_sample_value("agent_monitor_verdicts_total", {"decision": decision}) == 0
    for kind in ("error", "timeout"):
        assert m.registry.get_sample_value("agent_monitor_policy_failures_total", {"kind": kind}) == 0
    assert m.registry.get_sample_value("agent_monitor_check_seconds_count", {"engine": "reference"}) == 0


def test_rule_labels_are_bounded():
    m = WorkerMetrics()
    long = "leak " + "x" * 500 + "\n  more"
    m.observe_verdict(Verdict(session_id="s", batch_id="b", decision="deny", violations=[_violation(long)]))
    labels = [s.labels["rule"] for f in m.registry.collect() if f.name == "agent_monitor_violations"
              for s in f.samples if s.name.endswith("_total")]
    assert len(labels) == 1 and len(labels[0]) == 120 and "\n" not in labels[0]
    for i in range(MAX_RULES + 10):
        m.alert_published(_violation(f"rule {i}"))
    rules = {s.labels["rule"] for f in m.registry.collect() if f.name == "agent_monitor_alerts" for s in f.samples}
    # the cap is per worker: the long rule took one slot, 199 alert rules the rest, 11 fell into "(other)"
    assert len(rules - {OTHER_RULE}) == MAX_RULES - 1
    assert m.value("agent_monitor_alerts_total", rule=OTHER_RULE, severity="high") == 11
    assert m.value("agent_monitor_alerts_total", rule="rule 0", severity="high") == 1


def test_workers_in_one_process_do_not_collide():
    a, b = WorkerMetrics(), WorkerMetrics()
    a.dead_letter("invalid")
    assert a.value("agent_monitor_dead_letters_total", kind="invalid") == 1
    assert b.value("agent_monitor_dead_letters_total", kind="invalid") == 0
    assert a.registry is not b.registry


def test_serve_metrics_without_token(monkeypatch):
    monkeypatch.delenv("AGENT_MONITOR_METRICS_TOKEN", raising=False)
    monkeypatch.delenv("AGENT_MONITOR_METRICS_HOST", raising=False)
    m = WorkerMetrics(engine="reference")
    m.observe_verdict(Verdict(session_id="s", batch_id="b", decision="deny"), eval_seconds=0.2)
    with serve_metrics(m.registry, port=0) as srv:
        assert srv.host == "127.0.0.1"  # loopback unless told otherwise
        status, headers, body = _get(srv.url)
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        deny = [s for s in families["agent_monitor_verdicts"].samples
                if s.name == "agent_monitor_verdicts_total" and s.labels == {"decision": "deny"}]
        assert deny[0].value == 1
        assert "agent_monitor_check_seconds" in families
        assert _get(srv.url.replace("/metrics", "/other"))[0] == 404
        assert _get(srv.url.replace("/metrics", "/healthz"))[:3:2] == (200, b"ok\n")
        # OpenMetrics when Prometheus asks for it
        status, headers, body = _get(srv.url, accept="application/openmetrics-text; version=1.0.0")
        assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    # closed means closed: the port no longer answers
    with pytest.raises(OSError):
        socket.create_connection((srv.host, srv.port), timeout=1).close()


def test_serve_metrics_requires_the_bearer_token():
    m = WorkerMetrics()
    with serve_metrics(m.registry, port=0, token="s3cret-token") as srv:
        status, headers, body = _get(srv.url)
        assert status == 401 and b"agent_monitor" not in body
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert _get(srv.url, token="wrong")[0] == 401
        assert _get(srv.url, token="s3cret-token-and-more")[0] == 401
        status, _, body = _get(srv.url, token="s3cret-token")
        assert status == 200 and b"agent_monitor_dead_letters_total" in body
        # a basic-auth header with the right secret is still not a bearer token
        req = urllib.request.Request(srv.url, headers={"Authorization": "Basic s3cret-token"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 401
        # health checks need no token and reveal nothing
        assert _get(srv.url.replace("/metrics", "/healthz"))[0] == 200


def test_serve_metrics_reads_token_and_host_from_environment(monkeypatch):
    monkeypatch.setenv("AGENT_MONITOR_METRICS_TOKEN", "from-env")
    monkeypatch.setenv("AGENT_MONITOR_METRICS_HOST", "127.0.0.1")
    m = WorkerMetrics()
    with serve_metrics(m.registry, port=0) as srv:
        assert _get(srv.url)[0] == 401
        assert _get(srv.url, token="from-env")[0] == 200
    # an explicit token wins over the environment
    with serve_metrics(m.registry, port=0, token="explicit") as srv:
        assert _get(srv.url, token="from-env")[0] == 401
        assert _get(srv.url, token="explicit")[0] == 200
