"""docker-compose.yml's API service and the image it runs (structure only: no Docker engine here)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_the_api_with_keys_on_loopback():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    api = compose["services"]["api"]
    assert api["command"][0] == "serve" and "--no-auth" not in api["command"]
    assert api["command"][api["command"].index("--policy") + 1] == "/policies"
    assert api["ports"] == ["127.0.0.1:8000:8000"]
    # keys are required (compose refuses to start without them) and only their hashes are given
    assert api["environment"]["AGENT_MONITOR_API_KEYS"].startswith("${AGENT_MONITOR_API_KEYS:?")
    assert api["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert api["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["image"] == compose["services"]["worker"]["image"]
    assert api["cap_drop"] == ["ALL"]


def test_image_has_the_http_and_detectors_extras():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'pip wheel --wheel-dir /wheels ".[http,detectors]"' in dockerfile
    assert '"agent-monitor[http,detectors]"' in dockerfile


def test_local_container_plan_runs_the_api_with_a_key_the_tests_know():
    import sys

    sys.path.insert(0, str(ROOT))
    from deploy.local.stack import environment_for_tests, local_plan
    from monitor.api.security import ApiKeys

    token = "f" * 64
    api = local_plan(environment_for_tests(token)).services["api"]
    assert api.command[:1] == ["serve"]
    # the container tests' API key is their metrics token; compose holds only its hash
    keys = ApiKeys.parse(api.environment["AGENT_MONITOR_API_KEYS"], "compose", separators=",")
    assert keys.verify(token) == "tests" and token not in api.environment["AGENT_MONITOR_API_KEYS"]
