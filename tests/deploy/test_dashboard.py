"""deploy/grafana/dashboard.json as Grafana 12.0 (docker-compose.yml's) reads it, without a Grafana
server (none can be installed here): tests/deploy/grafana_dashboard.py holds the schema and the rules.
Every panel's PromQL runs against a real Prometheus scraping a real worker in
tests/metrics/test_prometheus.py."""

from __future__ import annotations

import copy
import doctest
import json
import re
from pathlib import Path

import grafana_dashboard
import pytest
from grafana_dashboard import problems

from monitor.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboard.json"


@pytest.fixture
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_is_valid_for_its_grafana(dashboard):
    assert problems(dashboard) == []


def test_the_dashboard_shows_what_the_issue_asks_for(dashboard):
    used = {name for p in dashboard["panels"] for t in p["targets"]
            for name in re.findall(r"\bagent_monitor_\w+", t["expr"])}
    # lag in records and seconds, produce->verdict latency, violations per rule, dead letters by kind,
    # the active policy version, state per partition, rebalances, budget overruns (policy_failures)
    assert {"agent_monitor_consumer_lag_records", "agent_monitor_consumer_lag_seconds",
            "agent_monitor_verdict_latency_seconds_bucket", "agent_monitor_violations_total",
            "agent_monitor_dead_letters_total", "agent_monitor_policy_info", "agent_monitor_state_keys",
            "agent_monitor_rebalances_total", "agent_monitor_policy_failures_total"} <= used
    # every metric the worker exports is on the dashboard somewhere
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert set(METRICS) - bases == {"agent_monitor_commits_total", "agent_monitor_worker_info"}


@pytest.mark.parametrize("mistake, change, expected", [
    ("an Angular panel Grafana 12 no longer has", lambda d: d["panels"][4].update(type="graph"),
     "panel type 'graph'"),
    ("a panel wider than the grid", lambda d: d["panels"][6]["gridPos"].update(x=20), "reaches column 32"),
    ("panels on top of each other", lambda d: d["panels"][5]["gridPos"].update(x=0, y=4), "overlaps"),
    ("an id used twice", lambda d: d["panels"][3].update(id=1), "id used twice"),
    ("a misspelt key", lambda d: d["panels"][0]["targets"][0].update(legendFromat="x"),
     "'legendFromat' was unexpected"),
    ("a missing required key", lambda d: d["panels"][0]["fieldConfig"].pop("overrides"),
     "'overrides' is a required property"),
    ("a variable the dashboard does not define",
     lambda d: d["panels"][0]["targets"][0].update(expr='sum(agent_monitor_sessions{instance="$instance"})'),
     "uses $instance"),
    ("a unit Grafana does not know", lambda d: d["panels"][0]["fieldConfig"]["defaults"].update(unit="seconds"),
     "unit 'seconds'"),
    ("thresholds out of order",
     lambda d: d["panels"][1]["fieldConfig"]["defaults"]["thresholds"]["steps"].reverse(), "threshold"),
    ("a stat option Grafana does not have", lambda d: d["panels"][0]["options"].update(colourMode="value"),
     "'colourMode' was unexpected"),
    ("a schema version from before datasource references", lambda d: d.update(schemaVersion=27),
     "schemaVersion 27"),
])
def test_each_kind_of_mistake_is_reported(dashboard, mistake, change, expected):
    broken = copy.deepcopy(dashboard)
    change(broken)
    found = problems(broken)
    assert any(expected in p for p in found), f"{mistake}: {found}"


def test_doc_examples_run():
    failed, tried = doctest.testmod(grafana_dashboard)
    assert failed == 0 and tried > 0
