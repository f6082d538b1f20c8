"""docker-compose.yml's stack in real containers (``make test-containers``; not part of ``make test``:
tests/deploy/conftest.py collects this folder only when it is named, as ``pytest tests/containers``).

The plan comes from the compose file itself with the local override (deploy/local/stack.py): the
Kafka image built here, ``agent-monitor topics create`` from the worker image, two worker replicas
as compose runs them (environment, token, user 10001, read-only policies, hardening), Prometheus
with the token as a secret file. From the host, the SDK plays every sample session and each verdict
must meet the sample's expectation; the workers' /metrics must refuse a request without the token.
Nothing here skips: no daemon or no image fails with what to do.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.local import images
from deploy.local.stack import RUN_LABEL, Stack, StackPlan, environment_for_tests, leftovers, local_plan
from monitor.client import MonitorClient
from monitor.models import Verdict
from monitor.samples import SampleSession, load_samples
from monitor.topics import topic_specs
from monitor.worker import READY_LINE

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[2]
TOKEN = secrets.token_hex(32)
HOST_BOOTSTRAP = "127.0.0.1:29092"  # the HOST listener docker-compose.yml publishes (checked below)


def _docker():
    import docker

    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - reported as the reason
        pytest.fail(f"no Docker daemon answers ({exc}): `make test-containers` starts one; as root run "
                    "`dockerd &` or `make test-containers`", pytrace=False)
    return client


@pytest.fixture(scope="module")
def plan() -> StackPlan:
    return local_plan(environment_for_tests(TOKEN))


@pytest.fixture(scope="module")
def docker_client(plan: StackPlan):
    client = _docker()
    missing = sorted({s.image for s in plan.services.values()} - {
        tag for img in client.images.list() for tag in img.tags})
    if missing:
        pytest.fail(f"images missing from the Docker daemon: {missing}: run `make images`", pytrace=False)
    return client


@pytest.fixture(scope="module")
def stack(plan: StackPlan, docker_client) -> Iterator[Stack]:
    old = leftovers()
    if old:
        print(f"note: containers of an earlier, killed run are still there: {old}")
    s = Stack(plan, log=lambda line: print(f"[stack] {line}", flush=True))
    try:
        s.up()
        _wait_for_workers(s)
        yield s
    finally:
        s.down()


def _wait_for_workers(stack: Stack, timeout: float = 180.0) -> None:
    """Every replica printed the ready line (it has its partitions)."""
    deadline = time.monotonic() + timeout
    while True:
        states = stack.wrapped("worker")
        exited = [w.name for w in states if w.status == "exited"]
        if exited:
            pytest.fail(f"worker(s) {exited} exited:\n{stack.logs('worker')}", pytrace=False)
        if all(READY_LINE in w.logs(stderr=False).decode(errors="replace") for w in states):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the workers printed no {READY_LINE!r} within {timeout:.0f}s:\n{stack.logs('worker')}",
                        pytrace=False)
        time.sleep(1)


# -- first, while the stack is not up: a stack that fails half-way ----------------------------------

def test_a_stack_that_fails_half_way_leaves_nothing_behind(plan: StackPlan, docker_client):
    broken = copy.deepcopy(plan)
    # the second replica cannot publish the host port the first holds: it is created, then fails to start
    broken.services["kafka"].replicas = 2
    s = Stack(broken, log=lambda _line: None)
    try:
        with pytest.raises(Exception, match="port is already allocated|address already in use"):
            s.up()
        assert len(s.containers["kafka"]) == 2
    finally:
        s.down()
    label = f"{RUN_LABEL}={s.project}"
    assert not docker_client.containers.list(all=True, filters={"label": label})
    assert not docker_client.networks.list(filters={"label": label})
    assert not docker_client.volumes.list(filters={"label": label})


# -- the worker image --------------------------------------------------------------------------------

_HASHES = """
import hashlib, json, pathlib, monitor
root = pathlib.Path(monitor.__file__).parent
print(json.dumps({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(root.rglob("*.py"))}))
"""


def test_the_worker_image_runs_this_repositorys_code(docker_client):
    """The image is rebuilt from the working tree (`make images`): its package is monitor/ as it is now."""
    out = docker_client.containers.run(images.WORKER_IMAGE, entrypoint=["python", "-c", _HASHES], remove=True)
    in_image = json.loads(out)
    here = {str(p.relative_to(ROOT / "monitor")): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((ROOT / "monitor").rglob("*.py"))}
    stale = sorted(k for k in here.keys() | in_image.keys() if here.get(k) != in_image.get(k))
    assert not stale, f"the worker image holds other code than monitor/ ({stale[:10]}): run `make images`"
    spec = docker_client.containers.run(images.WORKER_IMAGE, entrypoint=["cat", "/opt/agent-monitor/topics/topics.toml"],
                                        remove=True)
    assert spec.decode() == (ROOT / "topics" / "topics.toml").read_text()


# -- Kafka --------------------------------------------------------------------------------------------

def test_kafka_runs_with_the_compose_files_settings(stack: Stack, plan: StackPlan):
    from confluent_kafka.admin import AdminClient, ConfigResource

    kafka = plan.services["kafka"]
    host = [p for p in kafka.ports if p.container_port == 29092]
    assert host and f"{host[0].host_ip}:{host[0].host_port}" == HOST_BOOTSTRAP
    # the image's own reading of the environment (the apache/kafka convention), run on the host
    script = ROOT / "deploy" / "local" / "kafka" / "bin" / "kafka-env-properties"
    props = subprocess.run(["bash", str(script)], env={"PATH": os.environ["PATH"], **kafka.environment},
                           capture_output=True, text=True, check=True).stdout
    expected = dict(line.split("=", 1) for line in props.splitlines())
    assert len(expected) == sum(k.startswith("KAFKA_") for k in kafka.environment) - 1  # all but the heap
    admin = AdminClient({"bootstrap.servers": HOST_BOOTSTRAP})
    resource = ConfigResource(ConfigResource.Type.BROKER, kafka.environment["KAFKA_NODE_ID"])
    live = admin.describe_configs([resource])[resource].result(30)
    differ = {k: (v, live[k].value if k in live else None) for k, v in expected.items()
              if k not in live or live[k].value != v}
    assert not differ, f"broker settings that are not the compose file's (expected, live): {differ}"
    # KAFKA_HEAP_OPTS reaches the JVM, which is PID 1 (it gets docker's SIGTERM)
    (container,) = stack.wrapped("kafka")
    cmdline = container.exec_run(["cat", "/proc/1/cmdline"]).output.decode().split("\0")
    assert cmdline[0].endswith("java") and "kafka.Kafka" in cmdline
    assert set(kafka.environment["KAFKA_HEAP_OPTS"].split()) <= set(cmdline)
    assert container.attrs["State"]["Health"]["Status"] == "healthy"  # the compose file's healthcheck
    # the distribution's tools find their classes on the image's jars
    for tool in ("kafka-topics", "kafka-consumer-groups", "kafka-console-consumer", "kafka-console-producer",
                 "kafka-configs"):
        result = container.exec_run([f"/opt/kafka/bin/{tool}.sh", "--version"])
        assert result.exit_code == 0 and kafka.image.rsplit(":", 1)[1] in result.output.decode(), tool


def test_the_worker_images_topics_create_provisioned_the_spec(stack: Stack, plan: StackPlan):
    from confluent_kafka.admin import AdminClient

    (init,) = stack.wrapped("topics-init")
    assert init.status == "exited" and init.attrs["State"]["ExitCode"] == 0
    prefix = plan.services["topics-init"].environment["AGENT_MONITOR_PREFIX"]
    topics = AdminClient({"bootstrap.servers": HOST_BOOTSTRAP}).list_topics(timeout=30).topics
    for spec in topic_specs(prefix):
        assert spec.name in topics, f"{spec.name} was not created:\n{stack.logs('topics-init')}"
        assert len(topics[spec.name].partitions) == spec.partitions, spec.name
    assert f"{prefix}.events" in init.logs().decode()  # it printed its table


# -- the workers as compose runs them -----------------------------------------------------------------

def test_the_workers_run_as_the_compose_file_says(stack: Stack, plan: StackPlan):
    worker = plan.services["worker"]
    replicas = stack.wrapped("worker")
    assert len(replicas) == worker.replicas == 2
    for w in replicas:
        assert w.status == "running", stack.logs("worker")
        config, host = w.attrs["Config"], w.attrs["HostConfig"]
        assert config["User"] == "10001:10001"
        assert w.exec_run(["id", "-u"]).output.decode().strip() == "10001"
        env = dict(item.split("=", 1) for item in config["Env"])
        assert {k: env.get(k) for k in worker.environment} == worker.environment
        assert env["AGENT_MONITOR_METRICS_TOKEN"] == TOKEN and env["AGENT_MONITOR_METRICS_HOST"] == "0.0.0.0"
        assert config["Cmd"] == worker.command
        assert host["SecurityOpt"] == ["no-new-privileges:true"] and host["CapDrop"] == ["ALL"]
        (policies,) = [m for m in w.attrs["Mounts"] if m["Destination"] == "/policies"]
        assert policies["RW"] is False and Path(policies["Source"]) == ROOT / "examples" / "policies"
        touched = w.exec_run(["touch", "/policies/x"])
        assert touched.exit_code != 0 and b"Read-only file system" in touched.output


# -- the sample sessions, from the host -----------------------------------------------------------------

@dataclass
class Played:
    batches: int
    denies: int
    problems: list[str]
    verdicts: list[Verdict]


@pytest.fixture(scope="module")
def played(stack: Stack, plan: StackPlan) -> Played:
    prefix = plan.services["worker"].environment["AGENT_MONITOR_PREFIX"]
    samples: list[SampleSession] = load_samples(ROOT / "examples" / "sessions")
    run = stack.project.rsplit("-", 1)[1]
    problems, verdicts, denies = [], [], 0
    with MonitorClient(HOST_BOOTSTRAP, prefix=prefix, connect_timeout=30) as client:
        for sample in samples:
            for batch, want in zip(sample.event_batches(f"{sample.session_id}-{run}"), sample.expect, strict=True):
                verdict = client.check_batch(batch, timeout=60)
                verdicts.append(verdict)
                denies += verdict.decision == "deny"
                problem = want.matches_verdict(verdict)
                if problem:
                    problems.append(f"{sample.name} batch {batch.seq}: {problem}")
    return Played(len(verdicts), denies, problems, verdicts)


def test_every_sample_session_gets_its_expected_verdicts(played: Played):
    assert played.batches > 10 and played.denies > 0
    assert not played.problems, "\n".join(played.problems)
    assert all(v.policy_sha256 for v in played.verdicts)


# -- metrics --------------------------------------------------------------------------------------------

_SCRAPE = """
import json, os, sys, urllib.error, urllib.request
out = {}
for host in sys.argv[1:]:
    got = {}
    for case, token in (("token", os.environ["TOKEN"]), ("none", None), ("wrong", "0" * 64)):
        req = urllib.request.Request(f"http://{host}:9464/metrics")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                got[case] = [r.status, r.read().decode()]
        except urllib.error.HTTPError as e:
            got[case] = [e.code, ""]
    out[host] = got
print(json.dumps(out))
"""


def _verdict_counts(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "agent_monitor_verdicts_total":
                counts[sample.labels["decision"]] = counts.get(sample.labels["decision"], 0) + sample.value
    return counts


def test_metrics_answer_only_with_the_token(stack: Stack, played: Played, docker_client):
    """Scraped over the compose network from another container, as Prometheus does: so /metrics
    listens beyond loopback (0.0.0.0), and refuses a request without the token or with another."""
    names = [w.name for w in stack.wrapped("worker")]
    out = docker_client.containers.run(
        images.WORKER_IMAGE, entrypoint=["python", "-c", _SCRAPE], command=names, environment={"TOKEN": TOKEN},
        network=stack.network_name, remove=True, security_opt=["no-new-privileges:true"], cap_drop=["ALL"])
    results = json.loads(out)
    total: dict[str, float] = {}
    for name in names:
        assert results[name]["none"][0] == 401, name
        assert results[name]["wrong"][0] == 401, name
        status, body = results[name]["token"]
        assert status == 200 and "agent_monitor_verdicts_total" in body, name
        for decision, n in _verdict_counts(body).items():
            total[decision] = total.get(decision, 0) + n
    # the two replicas answered every batch once between them
    assert total.get("deny", 0) == played.denies
    assert sum(total.values()) == played.batches


def _prometheus(path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:9090{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_prometheus_scrapes_both_workers_with_the_secret_token(stack: Stack, played: Played, plan: StackPlan):
    """Prometheus (deploy/prometheus.yml: DNS discovery of `worker`, the token from the secret file)."""
    assert [m.target for m in plan.services["prometheus"].mounts if m.kind == "secret"] == [
        "/run/secrets/metrics_token"]
    deadline = time.monotonic() + 120
    while True:
        try:
            targets = [t for t in _prometheus("/api/v1/targets")["data"]["activeTargets"]
                       if t["labels"]["job"] == "agent-monitor"]
            total = _prometheus("/api/v1/query", query="sum(agent_monitor_verdicts_total)")["data"]["result"]
        except OSError:
            targets, total = [], []
        if (len(targets) == 2 and all(t["health"] == "up" for t in targets)
                and total and float(total[0]["value"][1]) == played.batches):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus did not scrape both workers (targets {targets}, verdicts {total}):\n"
                        f"{stack.logs('prometheus')}", pytrace=False)
        time.sleep(2)


def test_prometheus_evaluates_every_alert_rule_without_error(stack: Stack):
    """deploy/alert-rules.yml loaded by a real Prometheus, each rule evaluated against the workers' metrics."""
    import yaml

    rules_file = yaml.safe_load((ROOT / "deploy" / "alert-rules.yml").read_text())
    wanted = {r["alert"] for g in rules_file["groups"] for r in g["rules"]}
    deadline = time.monotonic() + 60  # evaluation_interval is 15 s
    while True:
        rules = {r["name"]: r for g in _prometheus("/api/v1/rules")["data"]["groups"] for r in g["rules"]}
        assert set(rules) == wanted
        if all(r["health"] == "ok" for r in rules.values()):
            return
        bad = {n: (r["health"], r.get("lastError")) for n, r in rules.items() if r["health"] == "err"}
        assert not bad, f"alert rules that Prometheus cannot evaluate: {bad}"
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus evaluated not every rule within 60 s: "
                        f"{ {n: r['health'] for n, r in rules.items()} }", pytrace=False)
        time.sleep(2)


# -- last: stopping ------------------------------------------------------------------------------------

def test_workers_stop_cleanly_within_their_grace_period(stack: Stack, plan: StackPlan):
    started = time.monotonic()
    codes = stack.stop_service("worker")
    took = time.monotonic() - started
    assert codes and all(code == 0 for code in codes.values()), f"{codes}:\n{stack.logs('worker')}"
    assert took < plan.services["worker"].stop_grace_period * len(codes)
