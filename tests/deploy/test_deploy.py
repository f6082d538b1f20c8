"""Structure of docker-compose.yml and deploy/, with no Docker: the files are checked against each
other, against topics/topics.toml and against the metrics the worker really exports. The stack
itself runs in `make test-containers` (tests/containers), from the local images of `make images`."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from monitor.broker import KAFKA_VERSION
from monitor.config import WorkerSettings
from monitor.metrics import METRICS
from monitor.topics import load_spec, topic_specs

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` with an empty environment."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("-"):
            return arg
        if op and op.endswith("?"):
            raise KeyError(f"{name} is required: {arg}")
        return ""

    return _VAR.sub(sub, value)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(cmd: list[str], name: str) -> str | None:
    for i, arg in enumerate(cmd):
        if arg == name and i + 1 < len(cmd):
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _workers(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if _command(s)[:1] == ["run"]}


def _topic_init(compose: dict) -> tuple[str, dict]:
    found = [(n, s) for n, s in compose["services"].items() if _command(s)[:2] == ["topics", "create"]]
    assert len(found) == 1, "exactly one one-shot `agent-monitor topics create` service"
    return found[0]


def _kafka_listener(compose: dict) -> tuple[str, str]:
    """(host, port) of the kafka service's PLAINTEXT listener as advertised to containers."""
    env = _env(compose["services"]["kafka"])
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    host, port = advertised["PLAINTEXT"].rsplit(":", 1)
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    assert listeners["PLAINTEXT"].rsplit(":", 1)[1] == port, "advertised port is not the one listened on"
    return host, port


def test_services_present(compose):
    services = compose["services"]
    assert {"kafka", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    _topic_init(compose)
    workers = _workers(compose)
    replicas = sum(int((s.get("deploy") or {}).get("replicas", 1)) for s in workers.values())
    assert replicas >= 2, "two worker replicas share the partitions"


def test_kafka_is_kraft_from_the_official_image(compose):
    kafka = compose["services"]["kafka"]
    # the same broker version as the tests' broker and the local launcher
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}" == "apache/kafka:4.1.1"
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@kafka:")
    assert len(env["CLUSTER_ID"]) == 22  # base64 of a UUID, as kafka-storage random-uuid prints
    # single node: internal topics must not ask for three replicas
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", key
    # topics come from the spec only
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "healthcheck" in kafka


def test_every_image_is_pinned(compose):
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image, f"{name} has no image name (a build needs a tag too)"
        ref = interpolate(image)
        repo, sep, tag = ref.rpartition("/")[2].partition(":")
        assert sep and tag, f"{name}: image {ref} has no tag"
        assert tag != "latest" and "latest" not in ref, f"{name}: image {ref} is not pinned"
    # FROM lines name their base through build ARGs (`make images` passes a local one): their defaults
    args = dict(line.split(None, 1)[1].split("=", 1) for line in (DEPLOY / "Dockerfile").read_text().splitlines()
                if line.upper().startswith("ARG ") and "=" in line)
    froms = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.upper().startswith("FROM ")]
    assert len(froms) == 2
    for line in froms:
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line.split()[1])
        assert ":" in ref and not ref.endswith(":latest"), line
        assert ref.startswith("python:3.11"), line  # users get the official image by default


def test_worker_image_tag_is_the_package_version(compose):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in {**_workers(compose), _topic_init(compose)[0]: _topic_init(compose)[1]}.items():
        assert service["image"] == f"agent-monitor:{version}", name
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_bootstrap_servers_point_at_the_kafka_listener(compose):
    host, port = _kafka_listener(compose)
    assert host == "kafka" and "kafka" in compose["services"]
    expected = f"{host}:{port}"
    name, init = _topic_init(compose)
    assert _flag(_command(init), "--bootstrap-servers") == expected
    for service_name, service in {**_workers(compose), name: init}.items():
        assert interpolate(_env(service)["KAFKA_BOOTSTRAP_SERVERS"]) == expected, service_name
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy", service_name
    for worker in _workers(compose).values():
        assert worker["depends_on"][_topic_init(compose)[0]]["condition"] == "service_completed_successfully"


def test_workers_share_one_group_and_the_provisioned_topics(compose):
    spec = load_spec()
    name, init = _topic_init(compose)
    init_prefix = interpolate(_env(init).get("AGENT_MONITOR_PREFIX", spec.prefix))
    assert init_prefix == spec.prefix == "agent"
    assert _flag(_command(init), "--prefix") in (None, init_prefix)
    events = {s.key: s.partitions for s in topic_specs(init_prefix)}["events"]
    groups = set()
    for wname, worker in _workers(compose).items():
        env = _env(worker)
        cmd = _command(worker)
        prefix = interpolate(env.get("AGENT_MONITOR_PREFIX", spec.prefix))
        assert prefix == init_prefix, f"{wname} reads other topics than the provisioned ones"
        settings = WorkerSettings(policy_path="/policies", topic_prefix=prefix,
                                  group_id=env.get("AGENT_MONITOR_GROUP_ID") or _flag(cmd, "--group-id"))
        groups.add(settings.group)
        # the worker checks the events topic's partitions at start: they must agree with the spec
        partitions = int(_flag(cmd, "--partitions") or env.get("AGENT_MONITOR_PARTITIONS") or settings.partitions)
        assert partitions == events
        assert _flag(cmd, "--policy") == "/policies"
        assert "./examples/policies:/policies:ro" in worker["volumes"]
        assert "container_name" not in worker, "replicas cannot share a container name"
    assert len(groups) == 1, f"workers must share one consumer group, got {groups}"
    assert any((ROOT / "examples" / "policies").glob("*.gr")), "no policies to mount"


def test_dockerfile_runs_the_cli_as_a_non_root_user():
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    stages = [i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")]
    final = lines[stages[-1]:]
    users = [ln.split(None, 1)[1] for ln in final if ln.upper().startswith("USER ")]
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    assert json.loads(next(ln for ln in final if ln.startswith("ENTRYPOINT")).split(None, 1)[1]) == ["agent-monitor"]
    assert json.loads(next(ln for ln in final if ln.startswith("CMD")).split(None, 1)[1]) == [
        "run", "--policy", "/policies"]
    text = "\n".join(final)
    assert "AGENT_MONITOR_TOPICS_SPEC=/opt/agent-monitor/topics/topics.toml" in text
    assert "COPY topics/topics.toml /opt/agent-monitor/topics/topics.toml" in text
    assert "LOCAL_POLICY=1" in text  # policies never reach the network
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore and "topics" not in ignore


def test_mounted_files_exist_and_ports_stay_on_loopback(compose):
    for name, service in compose["services"].items():
        for vol in service.get("volumes") or []:
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
        for port in service.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_prometheus_scrapes_the_workers_with_the_token(compose):
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    job = jobs["agent-monitor"]
    workers = _workers(compose)
    ports = {_flag(_command(w), "--metrics-port") for w in workers.values()}
    assert len(ports) == 1 and None not in ports
    (port,) = ports
    sd = job["dns_sd_configs"][0]
    assert set(sd["names"]) == set(workers) and str(sd["port"]) == port
    # token: workers read it from the environment, Prometheus from the secret file
    assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_token"
    assert "metrics_token" in compose["services"]["prometheus"]["secrets"]
    assert compose["secrets"]["metrics_token"]["environment"] == "AGENT_MONITOR_METRICS_TOKEN"
    for w in workers.values():
        token = _env(w)["AGENT_MONITOR_METRICS_TOKEN"]
        with pytest.raises(KeyError):
            interpolate(token)  # compose refuses to start without a token
        assert interpolate(token, {"AGENT_MONITOR_METRICS_TOKEN": "t"}) == "t"
        assert _env(w)["AGENT_MONITOR_METRICS_HOST"] == "0.0.0.0"
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./deploy/alert-rules.yml"] in prom["rule_files"]


def _exported_names() -> set[str]:
    """Sample names of every metric the worker exports (tests/metrics/test_metrics.py checks METRICS against
    a populated registry; tests/metrics/test_prometheus.py against a running worker's /metrics)."""
    suffixes = {"counter": [""], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {name + s for name, (kind, _labels, _doc) in METRICS.items() for s in suffixes[kind]}


def _exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "alert-rules.yml").read_text())
    out = [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    out += [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    return out


def test_alert_rules_and_dashboard_query_metrics_the_worker_exports():
    exported = _exported_names()
    used = set()
    for where, expr in _exprs():
        for name in re.findall(r"\bagent_monitor_\w+", expr):
            assert name in exported, f"{where} queries {name}, which monitor.metrics does not export"
            used.add(name)
    # the alerts issue 14 asks for (each is unit-tested in deploy/alert-rules.test.yml)
    alerts = {name: expr for name, expr in _exprs() if name.startswith("AgentMonitor")}
    assert 'up{job="agent-monitor"}' in alerts["AgentMonitorWorkerDown"]
    assert "agent_monitor_verdicts_total" in alerts["AgentMonitorNoVerdicts"]
    assert "agent_monitor_consumer_lag_records" in alerts["AgentMonitorNoVerdicts"]
    assert "deriv(" in alerts["AgentMonitorConsumerLagGrowing"]
    assert 'decision="deny"' in alerts["AgentMonitorDenyRateSpike"] and "offset" in alerts["AgentMonitorDenyRateSpike"]
    assert "agent_monitor_dead_letters_total" in alerts["AgentMonitorDeadLetters"]
    assert "agent_monitor_policy_failures_total" in alerts["AgentMonitorPolicyFailures"]
    assert "histogram_quantile(0.99" in alerts["AgentMonitorCheckLatencyP99High"]
    for group in yaml.safe_load((DEPLOY / "alert-rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]
    # the dashboard shows verdicts, alerts and latency
    assert {"agent_monitor_verdicts_total", "agent_monitor_alerts_total",
            "agent_monitor_check_seconds_bucket"} <= used


def test_grafana_provisioning_matches_the_dashboard(compose):
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    dash = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    assert dash["uid"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/agent-monitor.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert Path(mounts["./deploy/grafana/dashboard.json"]).parent == Path(path)
    with pytest.raises(KeyError):
        interpolate(_env(compose["services"]["grafana"])["GF_SECURITY_ADMIN_PASSWORD"])  # no default password


def test_the_readme_lists_every_metric_and_every_alert():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Metrics, alerts and dashboards"):readme.index("### Alert rules")]
    listed = set(re.findall(r"^\| `(agent_monitor_\w+)` \|", section, re.M))
    assert listed == set(METRICS)
    for name, (kind, labels, _doc) in METRICS.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        assert kind in row and all(f"`{label}`" in row for label in labels), row
    rules = yaml.safe_load((DEPLOY / "alert-rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    table = readme[readme.index("### Alert rules"):readme.index("### The dashboard")]
    assert set(re.findall(r"^\| `(AgentMonitor\w+)` \|", table, re.M)) == alerts
    for line in table.splitlines():
        for name in alerts:
            if line.startswith(f"| `{name}` |"):
                severity = next(r["labels"]["severity"] for g in rules["groups"] for r in g["rules"]
                                if r["alert"] == name)
                assert line.rstrip().endswith(f"| {severity} |"), line
