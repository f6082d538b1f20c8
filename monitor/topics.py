"""Topic specs and JSON Schemas of the wire contracts, and their provisioning with Kafka's admin API.

``topics/topics.toml`` declares the topics of a deployment (name suffix, partitions, configs);
``topics/schemas/<Model>.schema.json`` are the JSON Schemas of ``monitor.models.WIRE_MODELS``,
generated from the pydantic models (validation mode: what a valid record on the wire is; every record
the monitor publishes validates against its schema).

Example::

    >>> from monitor.topics import topic_specs
    >>> specs = {s.key: s for s in topic_specs("agent")}
    >>> specs["state"].name, specs["state"].partitions == specs["events"].partitions
    ('agent.monitor-state-changelog', True)
    >>> specs["state"].config["cleanup.policy"]
    'compact'
    >>> {s.key: s.partitions for s in topic_specs("demo", partitions_override=24)}["state"]
    24

Provisioning (needs a broker)::

    from monitor.topics import create_topics
    for result in create_topics("127.0.0.1:9092", "agent"):
        print(result)          # agent.events: created (12 partitions) ...

Regenerating the schemas after a model change: ``agent-monitor topics schemas`` or
``python -m monitor.topics schemas``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import GenerateJsonSchema

from monitor.config import DEFAULT_PREFIX, TopicNames
from monitor.errors import MonitorError
from monitor.models import WIRE_MODELS

SPEC_ENV = "AGENT_MONITOR_TOPICS_SPEC"
"""Environment variable naming the spec file (the Docker image sets it: the package has no data)."""

PREFIX_ENV = "AGENT_MONITOR_PREFIX"

REPO_TOPICS_DIR = Path(__file__).resolve().parent.parent / "topics"
DEFAULT_SCHEMA_DIR = REPO_TOPICS_DIR / "schemas"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

TOPIC_KEYS: tuple[str, ...] = ("events", "verdicts", "alerts", "deadletter", "state", "policies", "shadow")


# --------------------------------------------------------------------------------------------------
# The spec file


class TopicEntry(BaseModel):
    """One ``[topics.<key>]`` table of ``topics.toml``."""

    model_config = ConfigDict(extra="forbid")

    suffix: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    description: str
    key: str = Field(description="what the record key is")
    value_schema: str | None = Field(default=None, description="a model name of WIRE_MODELS")
    partitions: int | None = Field(default=None, ge=1)
    partitions_from: str | None = Field(default=None, description="take another topic's partitions")
    config: dict[str, str] = Field(default_factory=dict)

    @field_validator("config", mode="before")
    @classmethod
    def _as_strings(cls, value: Any) -> Any:
        # Kafka configs are strings; TOML gives ints and bools
        if isinstance(value, Mapping):
            return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _one_partition_source(self) -> "TopicEntry":
        if (self.partitions is None) == (self.partitions_from is None):
            raise ValueError("set exactly one of `partitions` and `partitions_from`")
        return self


class TopicsFile(BaseModel):
    """The whole ``topics.toml``."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    prefix: str = Field(default=DEFAULT_PREFIX, min_length=1)
    replication_factor: int = Field(default=-1, description="-1: the broker's default")
    topics: dict[str, TopicEntry]

    @model_validator(mode="after")
    def _consistent(self) -> "TopicsFile":
        if set(self.topics) != set(TOPIC_KEYS):
            raise ValueError(f"topics must be exactly {sorted(TOPIC_KEYS)}, got {sorted(self.topics)}")
        for key, entry in self.topics.items():
            if entry.partitions_from is not None:
                src = self.topics.get(entry.partitions_from)
                if src is None or src.partitions is None:
                    raise ValueError(f"topics.{key}.partitions_from must name a topic with `partitions`")
            if entry.value_schema is not None and entry.value_schema not in WIRE_MODELS:
                raise ValueError(f"topics.{key}.value_schema {entry.value_schema!r} is not a wire model")
        state = self.topics["state"]
        # the worker's table changelog: same partitions as its source, compacted, never deleted
        if state.partitions_from != "events":
            raise ValueError("topics.state must set partitions_from = \"events\"")
        if state.config.get("cleanup.policy") != "compact":
            raise ValueError("topics.state needs cleanup.policy = \"compact\" (delete retention would drop live sessions' state)")
        policies = self.topics["policies"]
        # one partition: the registry's records keep one order; compacted: every version stays
        if policies.partitions != 1 or policies.config.get("cleanup.policy") != "compact":
            raise ValueError("topics.policies needs partitions = 1 and cleanup.policy = \"compact\"")
        if self.replication_factor == 0 or self.replication_factor < -1:
            raise ValueError("replication_factor must be -1 (broker default) or >= 1")
        return self


class TopicSpec(BaseModel):
    """One topic of one deployment, resolved for a prefix: what ``create_topics`` provisions."""

    model_config = ConfigDict(frozen=True)

    key: str
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]
    value_schema: str | None = None
    description: str = ""


def spec_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The spec file: ``path``, else ``$AGENT_MONITOR_TOPICS_SPEC``, else the repository's ``topics/``."""
    chosen = path or os.environ.get(SPEC_ENV) or REPO_TOPICS_DIR / "topics.toml"
    return Path(chosen)


def load_spec(path: str | os.PathLike[str] | None = None) -> TopicsFile:
    """Read and validate ``topics.toml``.

    >>> load_spec().topics["events"].partitions
    12
    """
    p = spec_path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"topic spec {p} not found: pass its path or set {SPEC_ENV}"
        ) from None
    return TopicsFile.model_validate(raw)


def topic_specs(
    prefix: str | None = None,
    partitions_override: int | Mapping[str, int] | None = None,
    *,
    replication_factor: int | None = None,
    spec: TopicsFile | str | os.PathLike[str] | None = None,
) -> list[TopicSpec]:
    """The topics of one deployment, in spec order.

    ``prefix``: default ``$AGENT_MONITOR_PREFIX``, else the spec's (``agent``). ``partitions_override``: an int sets the events topic
    (and so the state changelog); a mapping sets topics by key (``{"events": 24, "alerts": 3}``).
    The state changelog always has the events topic's partitions; overriding it to anything else
    is an error. ``replication_factor`` overrides the spec's (-1 = broker default).

    >>> [s.name for s in topic_specs("t1")][:2]
    ['t1.events', 't1.verdicts']
    >>> {s.key: s.partitions for s in topic_specs(partitions_override={"alerts": 2})}["alerts"]
    2
    """
    tf = spec if isinstance(spec, TopicsFile) else load_spec(spec)
    # same precedence as WorkerSettings: explicit, then the environment, then the spec's default
    prefix = prefix or os.environ.get(PREFIX_ENV) or tf.prefix
    overrides = _normalise_overrides(partitions_override)
    parts: dict[str, int] = {}
    for key, entry in tf.topics.items():
        if entry.partitions is not None:
            parts[key] = overrides.get(key, entry.partitions)
    for key, entry in tf.topics.items():
        if entry.partitions_from is not None:
            parts[key] = parts[entry.partitions_from]
            if key in overrides and overrides[key] != parts[key]:
                raise ValueError(
                    f"{key} takes its partitions from {entry.partitions_from} ({parts[key]}); "
                    f"an override of {overrides[key]} would break the worker's state"
                )
    names = TopicNames.for_prefix(prefix)
    specs = []
    for key, entry in tf.topics.items():
        name = f"{prefix}.{entry.suffix}"
        # the worker, client and CLI find topics through TopicNames: the spec must agree with it
        if name != getattr(names, key):
            raise ValueError(f"topics.{key}: spec gives {name!r}, monitor.config gives {getattr(names, key)!r}")
        specs.append(TopicSpec(
            key=key, name=name, partitions=parts[key],
            replication_factor=replication_factor if replication_factor is not None else tf.replication_factor,
            config=dict(entry.config), value_schema=entry.value_schema, description=entry.description,
        ))
    return specs


def _normalise_overrides(value: int | Mapping[str, int] | None) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, bool):
        raise TypeError("partitions_override must be an int or a mapping")
    mapping = {"events": value} if isinstance(value, int) else dict(value)
    for key, n in mapping.items():
        if key not in TOPIC_KEYS:
            raise ValueError(f"unknown topic {key!r} in partitions_override; known: {', '.join(TOPIC_KEYS)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"partitions_override[{key!r}] must be a positive int, got {n!r}")
    return mapping


def parse_partition_overrides(items: list[str] | tuple[str, ...]) -> dict[str, int]:
    """CLI helper: ``["events=24", "alerts=3"]`` to ``{"events": 24, "alerts": 3}``.

    >>> parse_partition_overrides(["events=24", "alerts=3"])
    {'events': 24, 'alerts': 3}
    """
    out: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"expected TOPIC=PARTITIONS, got {item!r}")
        out[key.strip()] = int(value)
    _normalise_overrides(out)
    return out


# --------------------------------------------------------------------------------------------------
# Provisioning


class TopicProvisioningError(MonitorError):
    """Topics could not be created, or existing ones contradict the spec."""


class TopicResult(BaseModel):
    """What ``create_topics`` did with one topic."""

    key: str
    name: str
    status: Literal["created", "exists", "increased"]
    partitions: int
    config_drift: dict[str, tuple[str | None, str]] = Field(
        default_factory=dict, description="config: (on the broker, in the spec), for existing topics"
    )

    def __str__(self) -> str:
        text = f"{self.name}: {self.status} ({self.partitions} partitions)"
        if self.config_drift:
            drift = ", ".join(f"{k}={have} (spec {want})" for k, (have, want) in self.config_drift.items())
            text += f"; differs from the spec: {drift}"
        return text


def create_topics(
    bootstrap: str,
    prefix: str | None = None,
    partitions_override: int | Mapping[str, int] | None = None,
    *,
    replication_factor: int | None = None,
    increase_partitions: bool = False,
    spec: TopicsFile | str | os.PathLike[str] | None = None,
    admin_config: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    only: Collection[str] | None = None,
) -> list[TopicResult]:
    """Provision the deployment's topics; idempotent.

    Missing topics are created with the spec's partitions and configs. An existing topic with the
    spec's partition count is reported as ``exists`` (with any config that differs from the spec in
    ``config_drift``). An existing topic with fewer partitions is an error unless
    ``increase_partitions`` is set (then ``increased``) - adding partitions moves sessions to other
    partitions, away from their state, so it is never implicit. More partitions than the spec is
    always an error (Kafka cannot shrink a topic). A state changelog that is not compacted is an
    error. Nothing is created when any existing topic contradicts the spec.

    ``bootstrap``: Kafka bootstrap servers. ``prefix``: topic name prefix (default
    ``$AGENT_MONITOR_PREFIX``, else the spec's ``agent``). ``partitions_override``: see :func:`topic_specs`. ``admin_config``: extra
    librdkafka settings (security.protocol, sasl.*, ...). ``only``: provision only these topic keys
    (``policy publish`` makes sure of ``policies`` alone).

    Example (needs a broker)::

        >>> for r in create_topics("127.0.0.1:9092", "agent"):  # doctest: +SKIP
        ...     print(r)
        agent.events: created (12 partitions)
        ...
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    specs = topic_specs(prefix, partitions_override, replication_factor=replication_factor, spec=spec)
    if only is not None:
        specs = [s for s in specs if s.key in only]
    admin = AdminClient({"bootstrap.servers": bootstrap, **dict(admin_config or {})})
    existing = _partition_counts(admin, timeout)

    # check everything before changing anything
    problems, to_increase = _partition_problems(specs, existing, increase_partitions)
    present = [s for s in specs if s.name in existing]
    configs = _topic_configs(admin, [s.name for s in present], timeout) if present else {}
    problems += _config_problems(present, configs)
    if problems:
        raise TopicProvisioningError("topics contradict the spec:\n- " + "\n- ".join(problems))

    results: dict[str, TopicResult] = {}
    missing = [s for s in specs if s.name not in existing]
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor,
                      config=dict(s.config)) for s in missing],
            request_timeout=timeout, operation_timeout=timeout,
        )
        raced: list[TopicSpec] = []
        for s in missing:
            try:
                futures[s.name].result(timeout)
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    raced.append(s)  # another provisioner won the race: check it like an existing one
                    continue
                raise TopicProvisioningError(f"creating {s.name} failed: {exc.args[0].str()}") from exc
            results[s.name] = TopicResult(key=s.key, name=s.name, status="created", partitions=s.partitions)
        if raced:
            # the broker knows a topic before its metadata lists it: wait until it does, then check
            # the raced topics like existing ones
            counts = _wait_listed(admin, [s.name for s in raced], timeout)
            problems, more = _partition_problems(raced, counts, increase_partitions)
            lost = [s.name for s in raced if s.name not in counts]
            if lost:
                raise TopicProvisioningError(
                    f"{', '.join(lost)}: the broker says it exists but its metadata does not list it")
            configs.update(_topic_configs(admin, [s.name for s in raced], timeout))
            problems += _config_problems(raced, configs)
            if problems:
                raise TopicProvisioningError("topics contradict the spec:\n- " + "\n- ".join(problems))
            to_increase += more
            present += raced
        created = [s.name for s in missing if s.name in results]
        if created:
            # return only once clients can see the new topics (workers start right after this)
            _wait_listed(admin, created, timeout)
    if to_increase:
        results.update(_increase_partitions(admin, to_increase, timeout))
    for s in present:
        drift = {k: (configs.get(s.name, {}).get(k), v) for k, v in s.config.items()
                 if configs.get(s.name, {}).get(k) != v}
        if s.name in results:  # increased
            results[s.name] = results[s.name].model_copy(update={"config_drift": drift})
        else:
            results[s.name] = TopicResult(key=s.key, name=s.name, status="exists", partitions=s.partitions,
                                          config_drift=drift)
    return [results[s.name] for s in specs]



def _increase_partitions(admin: Any, specs: list[TopicSpec], timeout: float) -> dict[str, TopicResult]:
    """Add partitions to existing topics up to their specs' counts (``increase_partitions``)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewPartitions

    results: dict[str, TopicResult] = {}
    futures = admin.create_partitions(
        [NewPartitions(s.name, s.partitions) for s in specs],
        request_timeout=timeout, operation_timeout=timeout,
    )
    for s in specs:
        try:
            futures[s.name].result(timeout)
        except KafkaException as exc:
            raise TopicProvisioningError(f"adding partitions to {s.name} failed: {exc.args[0].str()}") from exc
        results[s.name] = TopicResult(key=s.key, name=s.name, status="increased", partitions=s.partitions)
    return results

def _partition_problems(specs: list[TopicSpec], existing: Mapping[str, int],
                        increase: bool) -> tuple[list[str], list[TopicSpec]]:
    """What contradicts the spec among existing topics, and which topics may grow."""
    problems: list[str] = []
    to_increase: list[TopicSpec] = []
    for s in specs:
        have = existing.get(s.name)
        if have is None or have == s.partitions:
            continue
        if have < s.partitions and increase:
            to_increase.append(s)
        elif have < s.partitions:
            problems.append(
                f"{s.name} has {have} partitions, the spec wants {s.partitions}; adding partitions "
                "moves sessions away from their state: pass increase_partitions=True (--increase-partitions) "
                "to do it anyway, or override the partitions to match"
            )
        else:
            problems.append(
                f"{s.name} has {have} partitions, more than the spec's {s.partitions}; Kafka cannot "
                f"remove partitions: override the partitions to {have} or recreate the topic"
            )
    return problems, to_increase


def _config_problems(specs: list[TopicSpec], configs: Mapping[str, Mapping[str, str | None]]) -> list[str]:
    problems = []
    for s in specs:
        policy = configs.get(s.name, {}).get("cleanup.policy")
        if s.key == "state" and policy is not None and "delete" in policy:
            problems.append(f"{s.name} has cleanup.policy={policy}; the state changelog must be compact only "
                            "(delete retention would drop live sessions' state): fix it with kafka-configs")
    return problems


def _wait_listed(admin: Any, names: list[str], timeout: float) -> dict[str, int]:
    """Partition counts, once the metadata lists every topic of ``names`` (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    counts = _partition_counts(admin, timeout)
    while any(n not in counts for n in names) and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = _partition_counts(admin, timeout)
    return counts


def _partition_counts(admin: Any, timeout: float) -> dict[str, int]:
    from confluent_kafka import KafkaError, KafkaException

    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise TopicProvisioningError(f"no broker answered: {exc.args[0].str()}") from exc
    # a topic whose leaders are still being elected carries an error but exists all the same
    return {name: len(t.partitions) for name, t in md.topics.items()
            if t.partitions and (t.error is None or t.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART)}


def _topic_configs(admin: Any, names: list[str], timeout: float) -> dict[str, dict[str, str | None]]:
    from confluent_kafka.admin import ConfigResource, ResourceType

    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in names],
                                     request_timeout=timeout)
    out: dict[str, dict[str, str | None]] = {}
    for resource, fut in futures.items():
        out[resource.name] = {k: e.value for k, e in fut.result(timeout).items()}
    return out


# --------------------------------------------------------------------------------------------------
# JSON Schemas


class _WireSchema(GenerateJsonSchema):
    """pydantic's generator, with ``anyOf`` for callable-discriminated unions.

    ``Event`` is a message or a tool call, told apart by a function (a dict with ``role`` is a
    message even when it also has ``function``); ``oneOf`` would reject such a dict because both
    open-ended branches match it, while pydantic accepts it.
    """

    def tagged_union_schema(self, schema: Any) -> Any:
        out = super().tagged_union_schema(schema)
        if "oneOf" in out and "discriminator" not in out:
            out["anyOf"] = out.pop("oneOf")
        return out


def generate_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every wire model, by model name (validation mode).

    >>> schemas = generate_schemas()
    >>> sorted(schemas)
    ['Alert', 'DeadLetter', 'EventBatch', 'PolicyRecord', 'ShadowVerdict', 'Verdict']
    >>> schemas["Verdict"]["properties"]["decision"]["enum"]
    ['allow', 'deny']
    """
    out: dict[str, dict[str, Any]] = {}
    for name, model in WIRE_MODELS.items():
        body = model.model_json_schema(mode="validation", schema_generator=_WireSchema)
        out[name] = {"$schema": JSON_SCHEMA_DIALECT, "$id": f"{name}.schema.json", **body}
    return out


def schema_filename(model_name: str) -> str:
    """``EventBatch`` -> ``EventBatch.schema.json``."""
    return f"{model_name}.schema.json"


def render_schema(schema: Mapping[str, Any]) -> str:
    """The checked-in text of a schema: stable, diff-friendly."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(folder: str | os.PathLike[str] | None = None) -> list[Path]:
    """(Re)write ``<Model>.schema.json`` for every wire model into ``folder`` (default ``topics/schemas``).

    Returns the paths written. Schema files of models that no longer exist are removed.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     for p in write_schemas(d):
    ...         print(p.name)
    EventBatch.schema.json
    Verdict.schema.json
    Alert.schema.json
    DeadLetter.schema.json
    PolicyRecord.schema.json
    ShadowVerdict.schema.json
    """
    target = Path(folder) if folder is not None else DEFAULT_SCHEMA_DIR
    target.mkdir(parents=True, exist_ok=True)
    schemas = generate_schemas()
    written = []
    for name, schema in schemas.items():
        path = target / schema_filename(name)
        path.write_text(render_schema(schema), encoding="utf-8")
        written.append(path)
    keep = {p.name for p in written}
    for stale in target.glob("*.schema.json"):
        if stale.name not in keep:
            stale.unlink()
    return written


def _main(argv: list[str]) -> int:
    """``python -m monitor.topics schemas [FOLDER]`` / ``python -m monitor.topics specs [PREFIX]``."""
    if argv[:1] == ["schemas"]:
        for p in write_schemas(argv[1] if len(argv) > 1 else None):
            print(p)
        return 0
    if argv[:1] == ["specs"]:
        for s in topic_specs(argv[1] if len(argv) > 1 else None):
            print(f"{s.name}\t{s.partitions}\t{json.dumps(s.config)}")
        return 0
    print("usage: python -m monitor.topics schemas [FOLDER] | specs [PREFIX]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
