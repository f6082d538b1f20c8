"""The policy registry against a real broker and two real worker processes following it.

One deployment (two workers in one group, four partitions, records must be signed) serves every
test; each test uses policy ids and sessions of its own. Covered: publish then hot reload on both
workers within 2 s with no verdict lost and each verdict's version the one active when its batch
was checked; rollback; a refused signature (logged, counted in the metric, the active version
kept); a flow that spans an update; log vs block; a shadow candidate and its report; publish
refusing an unsafe policy before anything reaches the topic."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from workers import batch, consume_covering, producer

from monitor import signing
from monitor.broker import free_port
from monitor.cli import main
from monitor.client import MonitorClient
from monitor.config import TopicNames, WorkerSettings
from monitor.models import PolicyRecord
from monitor.registry import Registry, prepare_record
from monitor.topics import create_topics
from monitor.worker_process import WorkerProcess

PARTITIONS = 4
ALPHA = 'raise "alpha is not allowed" if:\n    (m: Message)\n    "alpha" in m.content\n'
BETA = 'raise "beta is not allowed" if:\n    (m: Message)\n    "beta" in m.content\n'
FLOW = ('raise "{message}" if:\n    (m: Message) -> (t: ToolCall)\n    "send" in m.content\n'
        '    t is tool:send_email\n')
SEND_EMAIL = {"type": "function", "id": "1", "function": {"name": "send_email", "arguments": {"to": "x"}}}


@dataclass
class Deployment:
    bootstrap: str
    prefix: str
    registry: Registry
    workers: list[WorkerProcess]
    metrics_port: int
    public_key: Path
    folder: Path

    @property
    def topics(self) -> TopicNames:
        return TopicNames.for_prefix(self.prefix)

    def publish(self, policy_id: str, text: str, stage: str = "active", actions: list[tuple[str, str]] = (),
                registry: Registry | None = None) -> PolicyRecord:
        path = self.folder / f"{policy_id}-{uuid.uuid4().hex[:6]}.gr"
        path.write_text(text)
        return (registry or self.registry).publish(prepare_record(path, policy_id, actions, author="test"), stage)

    def wait_active(self, policy_id: str, version: int, what: str = "active", timeout: float = 30.0) -> None:
        """Until both workers logged that they serve ``version`` (or check it as a candidate)."""
        line = (f"policy {policy_id}: version {version} " if what == "active"
                else f"policy {policy_id}: shadow candidate v{version} ")
        deadline = time.monotonic() + timeout
        while not all(line in w.log_path.read_text(errors="replace") for w in self.workers):
            assert time.monotonic() < deadline, f"not every worker logged {line!r}:\n" + "\n".join(
                w.log_tail(1500) for w in self.workers)
            time.sleep(0.1)


@pytest.fixture(scope="module")
def deployment(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory):
    prefix = f"t-registry-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix, partitions_override=PARTITIONS)
    folder = tmp_path_factory.mktemp("registry")
    private, public, _ = signing.write_keypair(folder / "ops")
    port = free_port()
    workers = []
    for n in range(2):
        settings = WorkerSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, policy_registry=True,
                                  policy_public_keys=[str(public)], worker_id=f"registry-{n}",
                                  partitions=PARTITIONS, metrics_port=port if n == 0 else None)
        workers.append(WorkerProcess(settings, log_path=folder / f"worker-{n}.log").start())
    try:
        deadline = time.monotonic() + 180
        # both ready, and the partitions shared between them
        while not (all(w.assigned() for w in workers)
                   and sorted(p for w in workers for p in w.assigned()) == list(range(PARTITIONS))):
            for w in workers:
                assert w.proc is not None and w.proc.poll() is None, w.log_tail()
            assert time.monotonic() < deadline, "\n".join(w.log_tail() for w in workers)
            time.sleep(0.2)
        registry = Registry(kafka_bootstrap, prefix, signing_key=signing.load_private_key(private))
        yield Deployment(kafka_bootstrap, prefix, registry, workers, port, public, folder)
    finally:
        for w in workers:
            w.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:  # noqa: S310 - loopback
        return r.read().decode()


def seconds(t: str | datetime) -> float:
    return (datetime.fromisoformat(t) if isinstance(t, str) else t).timestamp()


def test_publish_then_hot_reload_on_two_workers_within_2s_with_no_verdict_lost(deployment: Deployment) -> None:
    dep = deployment
    v1 = dep.publish("hot", ALPHA)
    dep.wait_active("hot", v1.version)
    sessions = [f"hot-{n}" for n in range(48)]  # spread over every partition
    sent: list[tuple[str, str, str]] = []  # (session, batch id, word)
    stop = threading.Event()

    def produce() -> None:
        out = producer(dep.bootstrap)
        n = 0
        while not stop.is_set():
            word = ("alpha", "beta", "gamma")[n % 3]
            b = batch(sessions[n % len(sessions)], [{"role": "user", "content": f"{word} {n}"}], policy="hot")
            out.produce(dep.topics.events, key=b.session_id.encode(), value=b.model_dump_json().encode())
            out.poll(0)
            sent.append((b.session_id, b.batch_id, word))
            n += 1
            time.sleep(0.01)
        assert out.flush(30) == 0

    feeder = threading.Thread(target=produce)
    feeder.start()
    try:
        time.sleep(3.0)
        v2 = dep.publish("hot", BETA)
        published = seconds(v2.created_at)  # set before the record was written: a conservative start
        time.sleep(5.0)
    finally:
        stop.set()
        feeder.join()
    keys = {(s, b) for s, b, _ in sent}
    records = consume_covering(dep.bootstrap, dep.topics.verdicts, keys, timeout=120)
    by_key: dict[tuple[str, str], dict] = {}
    for r in records:
        if r["session_id"].startswith("hot-"):
            # at-least-once: a repeat is the same verdict
            assert by_key.setdefault((r["session_id"], r["batch_id"]), r)["policy_version"] == r["policy_version"]
    assert set(by_key) == keys, f"{len(keys - set(by_key))} batch(es) without a verdict"
    word = {(s, b): w for s, b, w in sent}
    sha = {v1.version: v1.sha256, v2.version: v2.sha256}
    denied_word = {v1.version: "alpha", v2.version: "beta"}
    for key, v in by_key.items():
        # each verdict was decided by the version it names, which existed when its batch was checked
        assert v["policy_version"] in sha and v["policy_sha256"] == sha[v["policy_version"]]
        assert (v["decision"] == "deny") == (word[key] == denied_word[v["policy_version"]]), v
        if v["policy_version"] == v2.version:
            assert seconds(v["evaluated_at"]) >= published
    # one switch per partition, in offset order: never back to v1 once v2 served
    by_partition: dict[int, list[dict]] = {}
    for v in by_key.values():
        by_partition.setdefault(v["source"]["partition"], []).append(v)
    switch: dict[int, float] = {}
    for p, vs in by_partition.items():
        versions = [v["policy_version"] for v in sorted(vs, key=lambda v: v["source"]["offset"])]
        assert versions == sorted(versions), f"partition {p}: {versions}"
        first_v2 = min(seconds(v["evaluated_at"]) for v in vs if v["policy_version"] == v2.version)
        last_v1 = max((seconds(v["evaluated_at"]) for v in vs if v["policy_version"] == v1.version), default=0.0)
        switch[p] = max(0.0, last_v1 - published)
        assert first_v2 - published < 2.0 and last_v1 - published < 2.0, (p, first_v2 - published)
    for w in dep.workers:  # both workers switched (each its own partitions)
        assert set(w.assigned()) & set(by_partition), (w.assigned(), sorted(by_partition))
    print(f"hot reload: the last v1 verdict per partition came {', '.join(f'{s:.2f}' for s in switch.values())} s "
          f"after the publish; {len(by_key)} verdicts, none lost")


def test_rollback_serves_the_earlier_text_as_a_new_version(deployment: Deployment) -> None:
    dep = deployment
    v1 = dep.publish("rb", ALPHA)
    v2 = dep.publish("rb", BETA)
    dep.wait_active("rb", v2.version)
    v3 = dep.registry.rollback("rb", to=v1.version, author="test")
    assert (v3.version, v3.sha256, v3.note) == (v2.version + 1, v1.sha256, f"rollback to v{v1.version}")
    dep.wait_active("rb", v3.version)
    with MonitorClient(dep.bootstrap, dep.prefix) as client:
        alpha = client.check("rb-1", [{"role": "user", "content": "alpha"}], policy="rb", timeout=30)
        beta = client.check("rb-2", [{"role": "user", "content": "beta"}], policy="rb", timeout=30)
    assert (alpha.decision, alpha.policy_version, alpha.policy_sha256) == ("deny", v3.version, v1.sha256)
    assert (beta.decision, beta.policy_version) == ("allow", v3.version)
    assert [r.version for r in dep.registry.read().history("rb")] == [1, 2, 3]


def test_an_unsigned_or_wrongly_signed_record_is_refused_logged_and_counted(deployment: Deployment) -> None:
    dep = deployment
    v1 = dep.publish("sig", ALPHA)
    dep.wait_active("sig", v1.version)
    before = scrape(dep.metrics_port)
    info = [line for line in before.splitlines() if line.startswith("agent_monitor_policy_info{")
            and 'policy_id="sig"' in line]
    assert len(info) == 1 and f'version="{v1.version}"' in info[0] and f'policy_sha256="{v1.sha256}"' in info[0]
    unsigned = dep.publish("sig", BETA, registry=Registry(dep.bootstrap, dep.prefix))
    stranger = signing.load_private_key(signing.generate_keypair()[0])
    forged = dep.publish("sig", BETA, registry=Registry(dep.bootstrap, dep.prefix, signing_key=stranger))
    for w in dep.workers:
        deadline = time.monotonic() + 20
        while f"sig (version {forged.version})" not in w.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, w.log_tail()
            time.sleep(0.1)
        log = w.log_path.read_text(errors="replace")
        assert f"refused sig (version {unsigned.version}): the record is not signed" in log
        assert f"refused sig (version {forged.version}): the signature does not match any trusted key" in log
    after = scrape(dep.metrics_port)

    def refused(text: str) -> float:
        line = next(l for l in text.splitlines() if l.startswith('agent_monitor_policy_records_refused_total{reason="signature"}'))
        return float(line.rsplit(" ", 1)[1])

    assert refused(after) - refused(before) >= 2  # each record twice: under <id> and <id>@<version>
    with MonitorClient(dep.bootstrap, dep.prefix) as client:
        v = client.check("sig-1", [{"role": "user", "content": "alpha beta"}], policy="sig", timeout=30)
    assert (v.decision, v.policy_version, [x.message for x in v.violations]) == (
        "deny", v1.version, ["alpha is not allowed"])


def test_a_flow_that_spans_an_update_is_caught(deployment: Deployment) -> None:
    dep = deployment
    v1 = dep.publish("flow", FLOW.format(message="v1: email after send"))
    dep.wait_active("flow", v1.version)
    with MonitorClient(dep.bootstrap, dep.prefix) as client:
        first = client.check("flow-1", [{"role": "user", "content": "please send the report"},
                                        {"role": "assistant", "content": "on it"}], policy="flow", timeout=30)
        assert (first.decision, first.policy_version) == ("allow", v1.version)
        v2 = dep.publish("flow", FLOW.format(message="v2: email after send") + ALPHA)
        dep.wait_active("flow", v2.version)
        second = client.check("flow-1", [SEND_EMAIL], policy="flow", timeout=30)
    assert (second.decision, second.policy_version, second.policy_sha256) == ("deny", v2.version, v2.sha256)
    assert [(x.message, x.addresses) for x in second.violations] == [
        ("v2: email after send", ["messages.0", "messages.0.content:7-11", "messages.2"])]


def test_log_versus_block(deployment: Deployment) -> None:
    dep = deployment
    logged = dep.publish("act", ALPHA, actions=[("0", "log")])
    assert logged.actions == {"0": "log"}
    dep.wait_active("act", logged.version)
    with MonitorClient(dep.bootstrap, dep.prefix) as client:
        v = client.check("act-1", [{"role": "user", "content": "alpha"}], policy="act", timeout=30)
        assert v.decision == "allow" and [(x.message, x.action) for x in v.violations] == [
            ("alpha is not allowed", "log")]
        blocked = dep.publish("act", ALPHA + "\n# every rule blocks again\n")
        dep.wait_active("act", blocked.version)
        w = client.check("act-2", [{"role": "user", "content": "alpha"}], policy="act", timeout=30)
    assert w.decision == "deny" and [x.action for x in w.violations] == ["block"]
    alerts = consume_covering(dep.bootstrap, dep.topics.alerts, {("act-1", v.batch_id), ("act-2", w.batch_id)})
    got = {(a["session_id"], a["action"], a["decision"], a["policy_version"]) for a in alerts
           if a["session_id"].startswith("act-")}
    assert got == {("act-1", "log", "allow", logged.version), ("act-2", "block", "deny", blocked.version)}


def test_a_shadow_candidate_reports_where_it_differs_and_is_promoted(deployment: Deployment,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    dep = deployment
    active = dep.publish("shadowed", ALPHA)
    candidate = dep.publish("shadowed", BETA, stage="shadow")
    dep.wait_active("shadowed", active.version)
    dep.wait_active("shadowed", candidate.version, what="shadow")
    with MonitorClient(dep.bootstrap, dep.prefix) as client:
        verdicts = [client.check(f"sh-{n}", [{"role": "user", "content": word}], policy="shadowed", timeout=30)
                    for n, word in enumerate(["alpha", "alpha", "alpha", "beta", "beta", "gamma"])]
    # agents see the active version only
    assert [(v.decision, v.policy_version) for v in verdicts] == [("deny", active.version)] * 3 + [
        ("allow", active.version)] * 3
    keys = {(v.session_id, v.batch_id) for v in verdicts}
    shadow = consume_covering(dep.bootstrap, dep.topics.shadow, keys)
    assert {(s["session_id"], s["candidate"]["policy_version"]) for s in shadow} == {
        (k[0], candidate.version) for k in keys}
    assert main(["policy", "shadow-report", "shadowed", "--json", "--prefix", dep.prefix,
                 "--bootstrap-servers", dep.bootstrap]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["batches"], report["differing"], report["newly_allowed"], report["newly_denied"]) == (6, 5, 3, 2)
    assert {s["session_id"] for s in report["differing_sessions"]} == {f"sh-{n}" for n in range(5)}
    assert {(r["rule"], r["candidate_only"], r["active_only"]) for r in report["rules"]} == {
        ("alpha is not allowed", 0, 3), ("beta is not allowed", 2, 0)}
    promoted = dep.registry.promote("shadowed", author="test")
    assert (promoted.version, promoted.stage, promoted.sha256) == (candidate.version, "active", candidate.sha256)
    dep.wait_active("shadowed", promoted.version)
    with MonitorClient(dep.bootstrap, dep.prefix) as client:
        v = client.check("sh-after", [{"role": "user", "content": "beta"}], policy="shadowed", timeout=30)
    assert (v.decision, v.policy_version) == ("deny", candidate.version)
    view = dep.registry.read()
    assert view.active("shadowed").version == candidate.version and view.candidate("shadowed") is None


def test_publish_refuses_a_bad_or_unsafe_policy_before_anything_reaches_the_topic(
        deployment: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dep = deployment
    unsafe = tmp_path / "unsafe.gr"
    unsafe.write_text('from urllib.request import urlopen\nraise "x" if:\n    (m: Message)\n'
                      '    urlopen("http://127.0.0.1:9/" + m.content)\n')
    broken = tmp_path / "broken.gr"
    broken.write_text('raise "x" if:\n    (m: Message)\n    m.content ==\n')
    for path, where in ((unsafe, f"{unsafe}:1: refused by the policy sandbox"), (broken, f"{broken}:")):
        assert main(["policy", "publish", str(path), "--id", "refused", "--prefix", dep.prefix,
                     "--bootstrap-servers", dep.bootstrap]) == 2
        assert where in capsys.readouterr().err
    assert main(["policy", "publish", str(unsafe), "--id", "bad id!", "--prefix", dep.prefix,
                 "--bootstrap-servers", dep.bootstrap]) == 2
    assert "refused" not in dep.registry.read().ids()
