"""Topic specs, checked-in JSON Schemas, and provisioning against the real broker."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from monitor.config import TopicNames
from monitor.models import (
    WIRE_MODELS,
    Alert,
    DeadLetter,
    EventBatch,
    Match,
    PolicyRecord,
    ShadowVerdict,
    SourceRef,
    Verdict,
    Violation,
)
from monitor.topics import (
    DEFAULT_SCHEMA_DIR,
    TopicProvisioningError,
    TopicsFile,
    create_topics,
    generate_schemas,
    load_spec,
    parse_partition_overrides,
    render_schema,
    schema_filename,
    topic_specs,
    write_schemas,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "topics" / "schemas"


# -- (a) checked-in schemas ------------------------------------------------------------------------


def test_checked_in_schemas_equal_the_models():
    assert DEFAULT_SCHEMA_DIR == SCHEMA_DIR
    generated = generate_schemas()
    on_disk = {p.name for p in SCHEMA_DIR.glob("*.schema.json")}
    assert on_disk == {schema_filename(n) for n in WIRE_MODELS}, (
        "topics/schemas/ and monitor.models.WIRE_MODELS disagree: run `agent-monitor topics schemas`"
    )
    for name, schema in generated.items():
        text = (SCHEMA_DIR / schema_filename(name)).read_text(encoding="utf-8")
        assert json.loads(text) == schema, (
            f"topics/schemas/{schema_filename(name)} is stale: the model changed; "
            "run `agent-monitor topics schemas` (or `python -m monitor.topics schemas`) and commit"
        )
        assert text == render_schema(schema), f"{schema_filename(name)} is not in the generated layout"


def test_write_schemas_regenerates_and_removes_stale(tmp_path):
    (tmp_path / "Gone.schema.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("kept")
    written = write_schemas(tmp_path)
    assert sorted(p.name for p in written) == sorted(schema_filename(n) for n in WIRE_MODELS)
    assert not (tmp_path / "Gone.schema.json").exists()
    assert (tmp_path / "notes.txt").read_text() == "kept"
    for p in written:
        assert p.read_bytes() == (SCHEMA_DIR / p.name).read_bytes()


def _examples() -> dict[str, list[dict]]:
    src = SourceRef(topic="agent.events", partition=3, offset=42)
    batch = EventBatch(
        session_id="s1", batch_id="b1", seq=0,
        events=[
            {"role": "user", "content": "hi", "x-extra": 1},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "1", "type": "function",
                             "function": {"name": "send_email", "arguments": {"to": "a@b"}}}]},
            {"role": "tool", "tool_call_id": "1", "content": "sent"},
            {"id": "2", "type": "function", "function": {"name": "get_inbox", "arguments": "{}"}},
        ],
        metadata={"agent": "a", "tenant": "t", "anything": [1, 2]},
    )
    match = Match(rule_index=0, message="secret leaked [risk=medium]", key="(0, (2,))",
                  addresses=["messages.2.content:0-4"])
    violation = Violation.from_match(match, "s1", "f" * 64)
    verdict = Verdict(session_id="s1", batch_id="b1", decision="deny", violations=[violation],
                      policy_id="p", policy_sha256="f" * 64, engine="reference", eval_ms=1.5, source=src)
    allow = Verdict(session_id="s1", batch_id="b2", decision="allow")
    alert = Alert.from_violation(violation, verdict)
    dead = DeadLetter(kind="not_json", reason="value is not JSON", source=src, key="s1",
                      value_b64=DeadLetter.encode(b"\xff"), size=1)
    text = 'raise "x [action=log]" if:\n    (m: Message)\n    "x" in m.content\n'
    record = PolicyRecord(policy_id="p", version=3, text=text, sha256=hashlib.sha256(text.encode()).hexdigest(),
                          actions={"0": "log"}, rules=["x [action=log]"], author="ops", key_id="0" * 16,
                          signature="c2ln")
    logged = verdict.model_copy(update={"decision": "allow", "policy_version": 4,
                                        "violations": [violation.model_copy(update={"action": "log"})]})
    shadow = ShadowVerdict(session_id="s1", batch_id="b1", policy_id="p", candidate=logged, active=verdict,
                           differs=True)
    return {
        "EventBatch": [batch.model_dump(mode="json")],
        "Verdict": [verdict.model_dump(mode="json"), allow.model_dump(mode="json"), logged.model_dump(mode="json")],
        "Alert": [alert.model_dump(mode="json")],
        "DeadLetter": [dead.model_dump(mode="json")],
        "PolicyRecord": [record.model_dump(mode="json")],
        "ShadowVerdict": [shadow.model_dump(mode="json")],
    }


def test_every_published_record_validates_against_its_checked_in_schema():
    examples = _examples()
    assert set(examples) == set(WIRE_MODELS)
    for name, records in examples.items():
        schema = json.loads((SCHEMA_DIR / schema_filename(name)).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        for record in records:
            jsonschema.validate(record, schema, cls=jsonschema.Draft202012Validator)
            # and the model reads back what it wrote: the schema and the model describe one contract
            assert WIRE_MODELS[name].model_validate(record).model_dump(mode="json") == record


def test_schemas_reject_what_the_models_reject():
    batch_schema = json.loads((SCHEMA_DIR / "EventBatch.schema.json").read_text())
    verdict_schema = json.loads((SCHEMA_DIR / "Verdict.schema.json").read_text())
    bad = [
        (batch_schema, {"session_id": "s", "batch_id": "b", "events": []}),  # min 1 event
        (batch_schema, {"session_id": "s", "batch_id": "b"}),  # no events, no end_session
        (batch_schema, {"session_id": "s", "batch_id": "b", "events": [], "end_session": False}),
        (batch_schema, {"session_id": "s", "events": [{"role": "user"}]}),  # no batch_id
        (batch_schema, {"session_id": "s", "batch_id": "b", "events": [{"role": "robot"}]}),
        (verdict_schema, {"session_id": "s", "batch_id": "b", "decision": "maybe"}),
    ]
    for schema, record in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(record, schema, cls=jsonschema.Draft202012Validator)


def test_an_end_session_batch_may_have_no_events_in_schema_and_model():
    schema = json.loads((SCHEMA_DIR / "EventBatch.schema.json").read_text())
    for record in ({"session_id": "s", "batch_id": "b", "end_session": True},
                   {"session_id": "s", "batch_id": "b", "events": [], "end_session": True}):
        jsonschema.validate(record, schema, cls=jsonschema.Draft202012Validator)
        assert EventBatch.model_validate(record).end_session
    with pytest.raises(ValidationError):
        EventBatch.model_validate({"session_id": "s", "batch_id": "b", "events": []})


def test_message_with_extra_function_field_is_valid_in_schema_and_model():
    # the Event union is told apart by a function; the schema must not reject what pydantic accepts
    schema = json.loads((SCHEMA_DIR / "EventBatch.schema.json").read_text())
    record = {"session_id": "s", "batch_id": "b",
              "events": [{"role": "assistant", "content": "x", "function": {"name": "f"}}]}
    jsonschema.validate(record, schema, cls=jsonschema.Draft202012Validator)
    assert EventBatch.model_validate(record).events[0]["role"] == "assistant"


# -- (b) the spec --------------------------------------------------------------------------------


def test_spec_loads_and_state_changelog_follows_events_and_is_compacted(monkeypatch):
    monkeypatch.delenv("AGENT_MONITOR_PREFIX", raising=False)
    spec = load_spec()
    assert spec.prefix == "agent"
    specs = {s.key: s for s in topic_specs()}
    assert set(specs) == {"events", "verdicts", "alerts", "deadletter", "state", "policies", "shadow"}
    assert {k: s.partitions for k, s in specs.items()} == {
        "events": 12, "verdicts": 12, "alerts": 6, "deadletter": 3, "state": 12, "policies": 1, "shadow": 12}
    # the registry: one order of records, and every version kept (compacted, a key per version)
    assert specs["policies"].config["cleanup.policy"] == "compact"
    state = specs["state"]
    assert state.partitions == specs["events"].partitions
    assert state.config["cleanup.policy"] == "compact"
    assert "retention.ms" not in state.config  # no time-based deletion of session state
    for key in ("events", "verdicts", "alerts", "deadletter", "shadow"):
        assert specs[key].config["cleanup.policy"] == "delete"
        assert int(specs[key].config["retention.ms"]) > 0
        assert int(specs[key].config["max.message.bytes"]) >= 1_000_000
    # a dead letter carries a 1 MiB record base64-encoded: it needs more room than the events topic
    assert int(specs["deadletter"].config["max.message.bytes"]) > 4 * int(
        specs["events"].config["max.message.bytes"]) // 3
    assert {s.value_schema for s in specs.values()} - {None} == set(WIRE_MODELS)


def test_names_agree_with_monitor_config_for_any_prefix():
    for prefix in ("agent", "prod-eu.x"):
        names = TopicNames.for_prefix(prefix)
        assert {s.key: s.name for s in topic_specs(prefix)} == {
            k: getattr(names, k) for k in ("events", "verdicts", "alerts", "deadletter", "state", "policies",
                                           "shadow")}


def test_partition_overrides(monkeypatch):
    monkeypatch.delenv("AGENT_MONITOR_PREFIX", raising=False)
    by_int = {s.key: s.partitions for s in topic_specs(partitions_override=24)}
    assert by_int["events"] == by_int["state"] == 24
    assert by_int["verdicts"] == 12
    by_map = {s.key: s.partitions for s in topic_specs(partitions_override={"events": 4, "alerts": 2})}
    assert (by_map["events"], by_map["state"], by_map["alerts"]) == (4, 4, 2)
    assert {s.key: s.partitions for s in topic_specs(partitions_override={"events": 4, "state": 4})}["state"] == 4
    with pytest.raises(ValueError, match="state takes its partitions from events"):
        topic_specs(partitions_override={"events": 4, "state": 8})
    with pytest.raises(ValueError, match="unknown topic"):
        topic_specs(partitions_override={"event": 4})
    with pytest.raises(ValueError, match="positive"):
        topic_specs(partitions_override={"alerts": 0})
    assert parse_partition_overrides(["events=6", " alerts = 2"]) == {"events": 6, "alerts": 2}
    with pytest.raises(ValueError):
        parse_partition_overrides(["events:6"])


def _raw_spec() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "topics" / "topics.toml").read_text())


def test_spec_validation_refuses_a_deleting_or_unaligned_changelog():
    raw = _raw_spec()
    raw["topics"]["state"]["config"]["cleanup.policy"] = "compact,delete"
    with pytest.raises(ValueError, match="compact"):
        TopicsFile.model_validate(raw)
    raw = _raw_spec()
    del raw["topics"]["state"]["partitions_from"]
    raw["topics"]["state"]["partitions"] = 12
    with pytest.raises(ValueError, match="partitions_from"):
        TopicsFile.model_validate(raw)
    raw = _raw_spec()
    raw["topics"]["verdicts"]["suffix"] = "verdict"
    with pytest.raises(ValueError, match="monitor.config"):
        topic_specs(spec=TopicsFile.model_validate(raw))
    raw = _raw_spec()
    raw["topics"].pop("alerts")
    with pytest.raises(ValueError, match="exactly"):
        TopicsFile.model_validate(raw)


def test_prefix_from_environment(monkeypatch):
    monkeypatch.setenv("AGENT_MONITOR_PREFIX", "staging")
    assert topic_specs()[0].name == "staging.events"
    assert topic_specs("explicit")[0].name == "explicit.events"


def test_spec_path_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("AGENT_MONITOR_PREFIX", raising=False)
    raw = (ROOT / "topics" / "topics.toml").read_text().replace('prefix = "agent"', 'prefix = "fromenv"')
    path = tmp_path / "topics.toml"
    path.write_text(raw)
    monkeypatch.setenv("AGENT_MONITOR_TOPICS_SPEC", str(path))
    assert topic_specs()[0].name == "fromenv.events"
    monkeypatch.setenv("AGENT_MONITOR_TOPICS_SPEC", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError, match="AGENT_MONITOR_TOPICS_SPEC"):
        load_spec()


# -- (c) provisioning against the real broker ----------------------------------------------------


def _describe(bootstrap: str, names: list[str]) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(timeout=30)
    parts = {n: len(md.topics[n].partitions) for n in names if n in md.topics}
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in names])
    configs = {r.name: {k: e.value for k, e in f.result(30).items()} for r, f in futures.items()}
    return parts, configs


def test_create_topics_provisions_spec_and_is_idempotent(kafka_bootstrap, topic_prefix):
    specs = topic_specs(topic_prefix)
    first = create_topics(kafka_bootstrap, topic_prefix)
    assert [(r.name, r.status, r.partitions) for r in first] == [
        (s.name, "created", s.partitions) for s in specs]

    parts, configs = _describe(kafka_bootstrap, [s.name for s in specs])
    for s in specs:
        assert parts[s.name] == s.partitions, s.name
        for key, value in s.config.items():
            assert configs[s.name][key] == value, (s.name, key)
    assert parts[f"{topic_prefix}.monitor-state-changelog"] == parts[f"{topic_prefix}.events"] == 12
    assert configs[f"{topic_prefix}.monitor-state-changelog"]["cleanup.policy"] == "compact"

    second = create_topics(kafka_bootstrap, topic_prefix)
    assert [(r.name, r.status, r.partitions, r.config_drift) for r in second] == [
        (s.name, "exists", s.partitions, {}) for s in specs]
    assert _describe(kafka_bootstrap, [s.name for s in specs])[0] == parts


def test_create_topics_partition_mismatch(kafka_bootstrap, topic_prefix):
    small = {"events": 2, "verdicts": 2, "alerts": 1, "deadletter": 1}
    create_topics(kafka_bootstrap, topic_prefix, small)
    events = f"{topic_prefix}.events"

    # fewer than wanted: an error that names the topic and the counts, and nothing changes
    with pytest.raises(TopicProvisioningError, match=rf"{events} has 2 partitions, the spec wants 4"):
        create_topics(kafka_bootstrap, topic_prefix, {**small, "events": 4})
    assert _describe(kafka_bootstrap, [events])[0][events] == 2

    # more than wanted can never be fixed
    with pytest.raises(TopicProvisioningError, match="cannot remove partitions"):
        create_topics(kafka_bootstrap, topic_prefix, {**small, "events": 1})

    # an explicit increase grows events and the state changelog together
    grown = create_topics(kafka_bootstrap, topic_prefix, {**small, "events": 4}, increase_partitions=True)
    status = {r.key: (r.status, r.partitions) for r in grown}
    assert status["events"] == status["state"] == ("increased", 4)
    assert status["alerts"] == ("exists", 1)
    parts, _ = _describe(kafka_bootstrap, [events, f"{topic_prefix}.monitor-state-changelog"])
    assert set(parts.values()) == {4}


def test_create_topics_reports_config_drift_and_refuses_a_deleting_changelog(kafka_bootstrap, topic_prefix):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    names = TopicNames.for_prefix(topic_prefix)
    futures = admin.create_topics([
        NewTopic(names.alerts, 6, 1, config={"retention.ms": "1000"}),
        NewTopic(names.state, 12, 1, config={"cleanup.policy": "delete"}),
    ])
    for f in futures.values():
        f.result(30)
    with pytest.raises(TopicProvisioningError, match="must be compact"):
        create_topics(kafka_bootstrap, topic_prefix)
    # nothing was created after the refusal
    assert names.events not in admin.list_topics(timeout=30).topics

    other = f"{topic_prefix}-b"
    admin.create_topics([NewTopic(f"{other}.alerts", 6, 1, config={"retention.ms": "1000"})])[
        f"{other}.alerts"].result(30)
    results = {r.key: r for r in create_topics(kafka_bootstrap, other)}
    assert results["alerts"].status == "exists"
    assert results["alerts"].config_drift["retention.ms"] == ("1000", "2592000000")
    assert "retention.ms=1000" in str(results["alerts"])
    assert results["events"].status == "created"


def test_create_topics_without_broker_fails_clearly():
    with pytest.raises(TopicProvisioningError, match="no broker"):
        create_topics("127.0.0.1:1", "nobroker", timeout=2)
