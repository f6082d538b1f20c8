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
    m.set_consumer_lag(3, 120, 4.5)
    m.set_consumer_lag(4, -5, -1.0)  # a stale end offset never shows negative lag
    m.set_state_keys({3: 40, 4: 2})

    assert m.value("agent_monitor_alerts_total", rule="x [risk=low]", severity="low") == 1
    assert m.value("agent_monitor_dead_letters_total", kind="not_json") == 2
    assert m.value("agent_monitor_dead_letters_total", kind="too_large") == 1
    assert m.value("agent_monitor_policy_failures_total", kind="error") == 1
    assert m.value("agent_monitor_policy_failures_total", kind="timeout") == 2
    assert m.value("agent_monitor_duplicate_batches_total") == 1
    assert m.value("agent_monitor_sessions") == 7
    assert m.value("agent_monitor_consumer_lag_records", partition="3") == 120
    assert m.value("agent_monitor_consumer_lag_seconds", partition="3") == 4.5
    assert m.value("agent_monitor_consumer_lag_records", partition="4") == 0
    assert m.value("agent_monitor_consumer_lag_seconds", partition="4") == 0
    assert m.value("agent_monitor_state_keys", partition="3") == 40
    m.forget_partitions([3, 99])
    for name in ("agent_monitor_consumer_lag_records", "agent_monitor_consumer_lag_seconds",
                 "agent_monitor_state_keys"):
        assert m.registry.get_sample_value(name, {"partition": "3"}) is None, name
        assert m.registry.get_sample_value(name, {"partition": "4"}) is not None, name
    m.forget_partitions()
    assert m.registry.get_sample_value("agent_monitor_consumer_lag_records", {"partition": "4"}) is None
    assert m.registry.get_sample_value("agent_monitor_state_keys", {"partition": "4"}) is None
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


def test_verdict_latency_is_a_histogram_with_inclusive_upper_bounds():
    m = WorkerMetrics()
    for seconds in (0.001, 0.0011, 0.3, 400.0, -2.0):  # a producer clock ahead of ours counts as 0
        m.observe_verdict_latency(seconds)
    bucket = "agent_monitor_verdict_latency_seconds_bucket"
    assert m.value(bucket, le="0.001") == 2  # le is "less or equal": 0.001 itself and the clamped -2
    assert m.value(bucket, le="0.0025") == 3
    assert m.value(bucket, le="0.25") == 3 and m.value(bucket, le="0.5") == 4
    assert m.value(bucket, le="300.0") == 4 and m.value(bucket, le="+Inf") == 5
    assert m.value("agent_monitor_verdict_latency_seconds_count") == 5
    assert m.value("agent_monitor_verdict_latency_seconds_sum") == pytest.approx(400.3021)


def test_one_active_version_per_policy():
    m = WorkerMetrics()
    m.set_policy("flow", "a" * 64)
    m.set_policy("secrets", "b" * 64)
    m.set_policy("flow", "c" * 64, version="7")  # a reload (or a registry's new version) replaces it
    series = {tuple(sorted(s.labels.items())) for f in m.registry.collect() if f.name == "agent_monitor_policy_info"
              for s in f.samples}
    assert series == {
        (("policy_id", "flow"), ("policy_sha256", "c" * 64), ("version", "7")),
        (("policy_id", "secrets"), ("policy_sha256", "b" * 64), ("version", "file")),
    }


def test_runtime_counters_are_read_when_scraped():
    from types import SimpleNamespace

    m = WorkerMetrics()
    assert m.value("agent_monitor_rebalances_total") == 0 and m.value("agent_monitor_assigned_partitions") == 0
    # the attributes monitor.runtime.Runtime keeps; the real one is scraped in tests/metrics/test_prometheus.py
    runtime = SimpleNamespace(rebalances=1, commits=10, aborts=0, assignment=[0, 2])
    m.attach_runtime(runtime)
    runtime.rebalances, runtime.aborts, runtime.assignment = 3, 1, [0, 2, 5]
    assert m.value("agent_monitor_rebalances_total") == 3
    assert m.value("agent_monitor_commits_total") == 10
    assert m.value("agent_monitor_transaction_aborts_total") == 1
    assert m.value("agent_monitor_assigned_partitions") == 3


def test_heartbeat_and_worker_info():
    m = WorkerMetrics(engine="incremental")
    # no heartbeat before the loop's first tick: an alert on its age must not see a zero
    assert m.registry.get_sample_value("agent_monitor_heartbeat_timestamp_seconds") is None
    m.beat(1_700_000_000.5)
    assert m.value("agent_monitor_heartbeat_timestamp_seconds") == 1_700_000_000.5
    m.set_worker("w-1", "exactly-once", "0.1.0")
    assert m.value("agent_monitor_worker_info", worker_id="w-1", engine="incremental", guarantee="exactly-once",
                   version="0.1.0") == 1


def _populated() -> WorkerMetrics:
    from types import SimpleNamespace

    m = WorkerMetrics(engine="incremental")
    m.batch_consumed(2)
    m.observe_verdict(Verdict(session_id="s", batch_id="b", decision="deny", violations=[_violation("r")]))
    m.alert_published(_violation("r"))
    m.observe_verdict_latency(0.01)
    m.set_consumer_lag(0, 3, 0.5)
    m.set_state_keys({0: 3})
    m.beat()
    m.set_policy("p", "a" * 64)
    m.set_worker("w", "at-least-once", "0.1.0")
    m.attach_runtime(SimpleNamespace(rebalances=1, commits=1, aborts=0, assignment=[0]))
    return m


def test_every_metric_is_listed_with_its_type_and_labels():
    from monitor.metrics import METRICS

    exported = {}
    for family in _populated().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        exported[name] = (family.type, labels)
    assert set(exported) == set(METRICS)
    for name, (kind, labels, doc) in METRICS.items():
        assert exported[name] == (kind, set(labels)), name
        assert doc and name.startswith("agent_monitor_")
        # Prometheus conventions: counters end in _total, a unit is the last word of a measurement
        assert (kind == "counter") == name.endswith("_total"), name
        assert not name.endswith(("_ms", "_milliseconds", "_count", "_sum", "_bucket")), name


def test_scrapes_while_the_loop_records_never_fail():
    import threading

    from prometheus_client import generate_latest

    m = WorkerMetrics(engine="incremental")
    stop = threading.Event()

    def loop() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            m.batch_consumed(1)
            m.set_consumer_lag(i % 64, i)  # new partitions appear while a scrape iterates them
            m.set_state_keys({p: i for p in range(i % 64)})
            m.observe_verdict(Verdict(session_id="s", batch_id="b", decision="deny",
                                      violations=[_violation(f"rule {i % 300}")]))
            if i % 50 == 0:
                m.forget_partitions(range(0, 64, 2))

    writer = threading.Thread(target=loop)
    writer.start()
    try:
        seen = []
        for _ in range(200):
            text = generate_latest(m.registry).decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            seen.append(families["agent_monitor_batches"].samples[0].value)
    finally:
        stop.set()
        writer.join()
    assert seen == sorted(seen) and seen[-1] > 0  # counters only grow


def test_doc_examples_run():
    import doctest

    import monitor.metrics

    failed, tried = doctest.testmod(monitor.metrics)
    assert failed == 0 and tried > 5
