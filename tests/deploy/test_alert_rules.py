"""deploy/prometheus.yml and deploy/alert-rules.yml through Prometheus' own promtool (Debian's
prometheus package, installed by `make prometheus`): the config and the rules load, and the rules'
unit tests (deploy/alert-rules.test.yml) pass, with a case where each alert fires and one where it
does not. A missing promtool fails these tests; they never skip."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from deploy.local.prometheus_server import (
    ALERT_RULES,
    ALERT_RULES_TESTS,
    PROMETHEUS_YML,
    PrometheusMissing,
    local_config,
    promtool,
)


def run_promtool(*args: str, cwd: Path | None = None):
    try:
        return promtool(*args, cwd=cwd)
    except PrometheusMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_checks_the_rules():
    out = run_promtool("check", "rules", str(ALERT_RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in out.stdout


def test_promtool_checks_the_shipped_config(tmp_path):
    # as shipped: its rule file and token are paths inside the container, so only the syntax
    out = run_promtool("check", "config", "--syntax-only", str(PROMETHEUS_YML))
    assert out.returncode == 0, out.stdout + out.stderr
    # and in full, with those two paths pointing at files here (the rules are loaded and checked too)
    token = tmp_path / "token"
    token.write_text("t")
    config = local_config(["127.0.0.1:9464"], token, interval="15s")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    out = run_promtool("check", "config", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in out.stdout


def test_promtool_unit_tests_of_every_alert_pass():
    out = run_promtool("test", "rules", str(ALERT_RULES_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not():
    tests = yaml.safe_load(ALERT_RULES_TESTS.read_text())
    assert [(ALERT_RULES_TESTS.parent / f).resolve() for f in tests["rule_files"]] == [ALERT_RULES.resolve()]
    fires: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            bucket = fires if case.get("exp_alerts") else quiet
            bucket[case["alertname"]] = bucket.get(case["alertname"], 0) + 1
            if case.get("exp_alerts"):
                # the alert's own severity is expected: a case cannot pass on another alert's labels
                rule = next(r for r in _alerts() if r["alert"] == case["alertname"])
                for alert in case["exp_alerts"]:
                    assert alert["exp_labels"]["severity"] == rule["labels"]["severity"]
    names = {r["alert"] for r in _alerts()}
    assert set(fires) == names, f"no case where these fire: {names - set(fires)}"
    assert set(quiet) == names, f"no case where these stay quiet: {names - set(quiet)}"


def _copy(tmp_path: Path, rules: str) -> Path:
    shutil.copy(ALERT_RULES_TESTS, tmp_path / ALERT_RULES_TESTS.name)
    (tmp_path / ALERT_RULES.name).write_text(rules)
    return tmp_path / ALERT_RULES_TESTS.name


@pytest.mark.parametrize("mistake, wrong, right", [
    # a metric name with a typo is still valid PromQL: `promtool check rules` passes it, the unit tests do not
    ("a typo in a metric name", "time() - agent_monitor_heartbeat_timestamp_second ",
     "time() - agent_monitor_heartbeat_timestamp_seconds "),
    # a label that changed (decision="denied")
    ("a changed label value", 'decision="denied"', 'decision="deny"'),
    ("a threshold off by a factor", "clamp_min(\n              5 *", "clamp_min(\n              2 *"),
])
def test_the_unit_tests_catch_a_broken_rule(tmp_path, mistake, wrong, right):
    text = ALERT_RULES.read_text()
    assert right in text, f"the rule this case breaks ({right!r}) is gone: update the case"
    broken = text.replace(right, wrong, 1)
    if mistake != "a threshold off by a factor":
        assert run_promtool("check", "rules", str(_copy(tmp_path, broken).parent / ALERT_RULES.name)).returncode == 0
    out = run_promtool("test", "rules", str(_copy(tmp_path, broken)))
    assert out.returncode != 0, f"{mistake} went unnoticed:\n{out.stdout}"
    assert re.search(r"FAILED", out.stdout + out.stderr)
