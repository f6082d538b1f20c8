"""docker-compose.yml against what ``make test-containers`` runs and ``make images`` builds (no Docker).

The container tests run :func:`deploy.local.stack.local_plan`, read from the compose file and the
local override. Here that plan is checked, key by key, against an independent reading of the
compose file: every image, environment variable, port, secret and volume of every service must be
in it, so the users' file and the tested stack cannot drift apart.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from test_deploy import interpolate

from deploy.local import images
from deploy.local.stack import (
    APPLIED,
    NOT_APPLIED,
    OVERRIDE_FILE,
    PlanError,
    duration_seconds,
    environment_for_tests,
    local_plan,
    merge,
    plan_stack,
)
from deploy.local.stack import interpolate as stack_interpolate

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "0123456789abcdef" * 4
ENV = environment_for_tests(TOKEN)
# the image each service runs in place of the compose file's (and the image itself where it is built here)
LOCAL_IMAGES = {"kafka": images.KAFKA_IMAGE, "topics-init": images.WORKER_IMAGE, "worker": images.WORKER_IMAGE,
                "api": images.WORKER_IMAGE, "prometheus": images.PROMETHEUS_IMAGE}


@pytest.fixture(scope="module")
def override() -> dict:
    return yaml.safe_load(OVERRIDE_FILE.read_text())


@pytest.fixture(scope="module")
def plan():
    return local_plan(ENV)


def test_every_service_is_run_or_says_why_not(plan, compose):
    assert set(plan.services) | set(plan.not_run) == set(compose["services"])
    assert not set(plan.services) & set(plan.not_run)
    # grafana only: no reachable registry ships it (deploy/README.md)
    assert set(plan.not_run) == {"grafana"} and "profile" in plan.not_run["grafana"]
    assert list(plan.services) == ["kafka", "topics-init", "worker", "api", "prometheus"]  # depends_on order


def test_every_image_is_the_compose_files_or_the_local_one_built_in_its_place(plan, compose):
    for name, service in plan.services.items():
        assert service.compose_image == compose["services"][name]["image"], name
        assert service.image == LOCAL_IMAGES[name], name
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{images.KAFKA_IMAGE.rsplit(':', 1)[1]}"
    # `make images` builds what the plan runs, plus the two bases
    built = [tag for tag, _ in images.STEPS]
    assert set(built) == {s.image for s in plan.services.values()} | {images.BASE_IMAGE, images.PYTHON_IMAGE}


def test_every_environment_variable_is_the_compose_files(plan, compose):
    for name, service in plan.services.items():
        raw = compose["services"][name].get("environment") or {}
        # test_deploy's own reading of compose's interpolation, not the plan's
        expected = {k: interpolate(str(v), ENV) for k, v in raw.items()}
        assert service.environment == expected, name
    assert plan.services["worker"].environment["AGENT_MONITOR_METRICS_TOKEN"] == TOKEN


def test_every_port_is_published_as_the_compose_file_says(plan, compose):
    for name, service in plan.services.items():
        raw = [str(p) for p in compose["services"][name].get("ports") or []]
        assert [f"{p.host_ip}:{p.host_port}:{p.container_port}" for p in service.ports] == raw, name
        assert all(p.host_ip == "127.0.0.1" for p in service.ports)


def test_every_volume_and_secret_is_mounted_as_the_compose_file_says(plan, compose):
    declared = set(compose["volumes"])
    for name, service in plan.services.items():
        raw = compose["services"][name]
        volumes = [m for m in service.mounts if m.kind != "secret"]
        assert len(volumes) == len(raw.get("volumes") or []), name
        for spec, mount in zip(raw.get("volumes") or [], volumes, strict=False):
            source, target, *mode = spec.split(":")
            assert mount.target == target and mount.read_only == (mode == ["ro"]), spec
            if source.startswith("./"):
                assert mount.kind == "bind" and Path(mount.source) == (ROOT / source).resolve(), spec
                assert Path(mount.source).exists(), spec
            else:
                assert mount.kind == "volume" and mount.source == source and source in declared, spec
        secrets = [m for m in service.mounts if m.kind == "secret"]
        assert [m.source for m in secrets] == list(raw.get("secrets") or []), name
        assert all(m.target == f"/run/secrets/{m.source}" and m.read_only for m in secrets)
    # the secret's content is what compose would take from the environment
    assert plan.secrets == {"metrics_token": TOKEN}
    assert compose["secrets"]["metrics_token"] == {"environment": "AGENT_MONITOR_METRICS_TOKEN"}
    assert sorted(plan.volumes) == sorted(v for v in declared if v != "grafana-data")
    # the policies reach the workers read-only
    (policies,) = [m for m in plan.services["worker"].mounts if m.target == "/policies"]
    assert policies.read_only and policies.kind == "bind"


def test_commands_healthchecks_replicas_and_hardening_are_the_compose_files(plan, compose):
    for name, service in plan.services.items():
        raw = compose["services"][name]
        assert service.command == raw.get("command"), name
        assert service.hostname == raw.get("hostname"), name
        assert service.replicas == (raw.get("deploy") or {}).get("replicas", 1), name
        assert service.security_opt == raw.get("security_opt", []), name
        assert service.cap_drop == raw.get("cap_drop", []), name
        assert service.stop_grace_period == duration_seconds(raw.get("stop_grace_period", "10s")), name
        deps = raw.get("depends_on") or {}
        deps = {d: "service_started" for d in deps} if isinstance(deps, list) else {
            d: v["condition"] for d, v in deps.items()}
        assert service.depends_on == deps, name
        if "healthcheck" in raw:
            hc = raw["healthcheck"]
            assert service.healthcheck["test"] == hc["test"]
            assert service.healthcheck["retries"] == hc["retries"]
            assert service.healthcheck["interval"] == duration_seconds(hc["interval"]) * 1e9
        else:
            assert service.healthcheck is None
    assert plan.services["worker"].replicas == 2 and plan.services["worker"].stop_grace_period == 30


def test_every_key_of_every_service_has_a_decision(compose):
    for name, service in compose["services"].items():
        assert set(service) <= APPLIED | set(NOT_APPLIED), name


def test_a_new_compose_key_fails_the_plan_until_it_has_a_decision(compose, override):
    changed = copy.deepcopy(compose)
    changed["services"]["worker"]["read_only"] = True
    with pytest.raises(PlanError, match=r"worker: compose keys \['read_only'\]"):
        plan_stack(changed, override, ENV)
    changed = copy.deepcopy(compose)
    changed["services"]["worker"]["deploy"]["resources"] = {"limits": {"cpus": "1"}}
    with pytest.raises(PlanError, match="deploy keys"):
        plan_stack(changed, override, ENV)


def test_the_plan_refuses_what_compose_would_refuse(compose, override):
    with pytest.raises(PlanError, match="AGENT_MONITOR_METRICS_TOKEN is required"):
        plan_stack(compose, override, {})
    changed = copy.deepcopy(compose)
    changed["services"]["worker"]["volumes"].append("undeclared:/x")
    with pytest.raises(PlanError, match="not declared"):
        plan_stack(changed, override, ENV)


def test_the_override_only_swaps_images_and_the_workers_base(override, compose):
    services = override["services"]
    assert set(services) <= set(compose["services"])
    for name, service in services.items():
        assert set(service) <= {"image", "build", "profiles"}, name
        if "image" in service:
            assert service["image"] == LOCAL_IMAGES[name], name
        if "build" in service:
            assert service["build"] == {"args": {"PYTHON_IMAGE": images.PYTHON_IMAGE}}, name
            assert compose["services"][name]["build"]["dockerfile"] == "deploy/Dockerfile"
    # the worker image is built from the users' Dockerfile, whose default base stays the official image
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11" in dockerfile
    assert [ln for ln in dockerfile.splitlines() if ln.startswith("FROM ")] == [
        "FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]
    assert not dockerfile.startswith("# syntax=")  # BuildKit would pull that frontend from Docker Hub
    assert services["grafana"] == {"profiles": ["grafana"]}


def test_merge_and_interpolation_follow_compose():
    assert merge({"a": {"b": 1, "c": [1]}}, {"a": {"b": 2}}) == {"a": {"b": 2, "c": [1]}}
    assert merge({"a": {}}, {"a": {"p": ["x"]}}) == {"a": {"p": ["x"]}}
    with pytest.raises(PlanError, match="list over the base"):
        merge({"a": {"ports": ["1:1"]}}, {"a": {"ports": ["2:2"]}})
    assert stack_interpolate("${A:-x}/${B-y}/${C}/$$D/$E", {"B": "", "E": "e"}) == "x///$D/e"
    with pytest.raises(PlanError, match="A is required: set it"):
        stack_interpolate("${A:?set it}", {"A": ""})
    assert stack_interpolate("${A?set it}", {"A": ""}) == ""
    assert duration_seconds("1m30s") == 90 and duration_seconds("500ms") == 0.5
    with pytest.raises(PlanError):
        duration_seconds("30 seconds")


def test_the_kafka_image_reads_the_compose_environment_as_apache_kafka_does(plan):
    """deploy/local/kafka/bin/kafka-env-properties, the image's own script, run here with bash."""
    script = ROOT / "deploy" / "local" / "kafka" / "bin" / "kafka-env-properties"
    env = dict(plan.services["kafka"].environment, KAFKA_FOO__BAR___BAZ="3", PATH=os.environ["PATH"])
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True).stdout
    props = dict(line.split("=", 1) for line in out.splitlines())
    assert props["node.id"] == "1" and props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@kafka:9093"
    assert props["listener.security.protocol.map"] == "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,HOST:PLAINTEXT"
    assert props["auto.create.topics.enable"] == "false" and props["log.dirs"] == "/var/lib/kafka/data"
    assert props["foo_bar-baz"] == "3"
    assert "heap.opts" not in props and "cluster.id" not in props  # the JVM's, and the format's
    kafka_vars = [k for k in env if k.startswith("KAFKA_") and k != "KAFKA_HEAP_OPTS"]
    assert len(props) == len(kafka_vars)


def test_the_test_fixture_and_the_container_tests_use_this_plan():
    from broker_choice import LOCAL_KAFKA_IMAGE, kafka_container_env

    assert LOCAL_KAFKA_IMAGE == images.KAFKA_IMAGE
    env = kafka_container_env(40000)
    kafka = local_plan(ENV).services["kafka"].environment
    assert {k for k in env if env[k] != kafka[k]} == {"KAFKA_ADVERTISED_LISTENERS"}
    source = (ROOT / "tests" / "containers" / "test_stack.py").read_text()
    assert re.search(r"\blocal_plan\(environment_for_tests\(TOKEN\)\)", source)
    assert "Stack(plan" in source
