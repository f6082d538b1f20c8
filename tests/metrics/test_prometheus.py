"""A real Prometheus (Debian's package) scrapes a real worker with the bearer token, as
deploy/prometheus.yml says, during a small load on a real broker: every metric is there, the counts
are the load's, every alert rule evaluates (the dead-letter alert fires, no other), and the PromQL of
every dashboard panel returns data with the labels its legend names."""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from traces import BENIGN, FLOW, SEND_EMAIL, USER_SEND
from workers import batch, consume, produce_batches, topics, worker

from deploy.local.prometheus_server import PrometheusMissing, PrometheusServer, local_config
from monitor.broker import free_port
from monitor.cli import main
from monitor.metrics import METRICS
from monitor.policy import load_policy_set
from monitor.top import buckets, quantile, scrape
from monitor.worker_process import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
RULE_MESSAGE = "Must not call tool after user uses keyword"
SESSIONS = 40


def _sample_names() -> set[str]:
    suffixes = {"counter": [""], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {n + s for n, (kind, _, _) in METRICS.items() for s in suffixes[kind]}


def _panel_queries() -> list[tuple[str, str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in dash["panels"] for t in p["targets"]]


def _scrape(url: str, token: str) -> dict[str, list]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


@pytest.fixture
def token(monkeypatch) -> str:
    value = secrets.token_hex(16)
    monkeypatch.setenv("AGENT_MONITOR_METRICS_TOKEN", value)  # the worker process inherits it
    return value


def test_prometheus_scrapes_a_worker_under_load_and_every_panel_has_data(kafka_bootstrap, topic_prefix,
                                                                          tmp_path, token, capsys):
    t = topics(topic_prefix)
    policy = tmp_path / "flow.gr"
    policy.write_text(FLOW)
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(token)
    prom_port = free_port()
    config = local_config([f"127.0.0.1:{port}"], token_file, interval="1s", self_target=f"127.0.0.1:{prom_port}")
    # the same worker scraped without the token: Prometheus must be refused
    config["scrape_configs"].append({"job_name": "no-token", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]})
    server = PrometheusServer(config, tmp_path / "prometheus", port=prom_port)
    with worker(kafka_bootstrap, topic_prefix, policy, metrics_port=port, partitions=4) as running:
        try:
            server.start()
        except PrometheusMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            _run(server, running, kafka_bootstrap, t, port, token, policy, capsys)
        finally:
            server.stop()


def _run(prom: PrometheusServer, running: WorkerProcess, bootstrap: str, t, port: int, token: str,
         policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # -- a small load over a few seconds: each session asks for "send", then half of them send
    batches = []
    for i in range(SESSIONS):
        sid = f"s{i}"
        batches.append(batch(sid, [USER_SEND], f"{sid}-1", seq=1))
        batches.append(batch(sid, [SEND_EMAIL] if i % 2 == 0 else [BENIGN], f"{sid}-2", seq=2))
    for start in range(0, len(batches), 10):
        produce_batches(bootstrap, t.events, batches[start:start + 10])
        time.sleep(0.4)
    produce_batches(bootstrap, t.events, [("s-bad", b"{not json")])
    verdicts = consume(bootstrap, t.verdicts, until=len(batches), timeout=90)
    assert len(verdicts) == len(batches)
    denies = sum(v["decision"] == "deny" for v in verdicts)
    assert denies == SESSIONS // 2

    # -- Prometheus has scraped every verdict, with the token
    def scraped_all() -> bool:
        got = prom.query("sum(agent_monitor_verdicts_total)")
        return bool(got) and float(got[0]["value"][1]) == len(batches)

    prom.wait_for(scraped_all, 60, "Prometheus to scrape every verdict")
    (target,) = prom.targets()
    assert target["health"] == "up" and target["scrapeUrl"] == f"http://127.0.0.1:{port}/metrics"
    (refused,) = prom.targets("no-token")
    assert refused["health"] == "down" and "401" in refused["lastError"]

    # -- every metric the worker exports, as Prometheus stores it and as /metrics serves it
    stored = {r["metric"]["__name__"] for r in prom.query('count by (__name__) ({__name__=~"agent_monitor_.*"})')}
    served = set(_scrape(f"http://127.0.0.1:{port}/metrics", token))
    assert stored == served == _sample_names()

    # -- the counts are the load's
    def value(expr: str) -> float:
        result = prom.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    assert value('sum(agent_monitor_verdicts_total{decision="deny"})') == denies
    assert value("sum(agent_monitor_batches_total)") == len(batches)
    assert value(f'sum(agent_monitor_violations_total{{rule="{RULE_MESSAGE}", severity="high"}})') == denies
    assert value('sum(agent_monitor_dead_letters_total{kind="not_json"})') == 1
    assert value("sum(agent_monitor_verdict_latency_seconds_count)") == len(batches)
    assert value("sum(agent_monitor_check_seconds_count)") == len(batches)
    # produced a moment before its verdict: well under the broker's 10 s, never negative
    assert 0 < value("sum(agent_monitor_verdict_latency_seconds_sum)") / len(batches) < 10
    assert value("sum(agent_monitor_assigned_partitions)") == 4
    assert value("sum(agent_monitor_rebalances_total)") >= 1
    assert value("sum(agent_monitor_commits_total)") >= 1
    def settles_at(expr: str, expected: float) -> None:
        """A gauge the worker's loop sets on its tick (every second): its last scrape may be a tick old."""
        def probe() -> bool:
            got = prom.query(expr)
            return bool(got) and float(got[0]["value"][1]) == expected

        prom.wait_for(probe, 20, f"{expr} == {expected}")

    settles_at("sum(agent_monitor_consumer_lag_records)", 0)  # caught up
    settles_at("sum(agent_monitor_sessions)", SESSIONS)
    assert value("sum(agent_monitor_state_keys)") > SESSIONS
    assert value("time() - max(agent_monitor_heartbeat_timestamp_seconds)") < 10
    (loaded,) = load_policy_set(policy).all()
    assert value(f'agent_monitor_policy_info{{policy_id="{loaded.policy_id}", version="file", '
                 f'policy_sha256="{loaded.sha256}"}}') == 1
    assert value('agent_monitor_worker_info{engine="incremental", guarantee="at-least-once"}') == 1

    # -- every dashboard panel's query parses and returns data, with the labels its legend shows
    empty, bad_labels = [], []
    for title, expr, legend in _panel_queries():
        result = prom.query(expr.replace("$__rate_interval", "1m"))  # a parse error raises bad_data
        values = [float(r["value"][1]) for r in result]
        if not result or not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {expr} -> {result}")
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if any(label not in r["metric"] for r in result):
                bad_labels.append(f"{title}: legend {{{{{label}}}}} but {expr} -> {[r['metric'] for r in result]}")
    assert not empty and not bad_labels, "\n".join(["panels without data:", *empty, "legends:", *bad_labels])

    # -- every alert rule evaluates without error; the dead letter fires, nothing else does
    def evaluated() -> dict | None:
        rules = prom.rules()
        return rules if all(r["health"] == "ok" and r.get("lastEvaluation", "").startswith("2")
                            for r in rules.values()) and rules["AgentMonitorDeadLetters"]["state"] == "firing" \
            else None

    rules = prom.wait_for(evaluated, 30, "every rule to evaluate, and AgentMonitorDeadLetters to fire")
    firing = {name for name, r in rules.items() if r["state"] == "firing"}
    assert firing == {"AgentMonitorDeadLetters"}
    # a healthy worker is neither down, stalled nor silent, and its policy never failed (the latency
    # and deny-share rules may be pending on a busy machine or at a 25% deny share: their 10 minutes
    # never pass here)
    for name in ("AgentMonitorWorkerDown", "AgentMonitorNoWorkerUp", "AgentMonitorWorkerStalled",
                 "AgentMonitorNoVerdicts", "AgentMonitorPolicyFailures"):
        assert rules[name]["state"] == "inactive", (name, rules[name])
    (alert,) = rules["AgentMonitorDeadLetters"]["alerts"]
    assert alert["labels"]["kind"] == "not_json"
    assert running.proc is not None and running.proc.poll() is None

    # -- agent-monitor top reads the same worker (its token from the environment), and its
    # percentiles are Prometheus' histogram_quantile over the same buckets
    assert main(["top", "--once", "--url", f"127.0.0.1:{port}", "--interval", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "1/1 workers up" in out and RULE_MESSAGE in out and "Lag per partition" in out
    assert "not_json 1" in out
    got = scrape(f"http://127.0.0.1:{port}/metrics", token)
    for q in (0.5, 0.9, 0.99):
        ours = quantile(q, buckets(got, "agent_monitor_verdict_latency_seconds_bucket"))
        theirs = value(f"histogram_quantile({q}, sum by (le) (agent_monitor_verdict_latency_seconds_bucket))")
        assert ours == pytest.approx(theirs, rel=1e-9), q
