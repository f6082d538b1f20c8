"""Settings shared by the worker, the client, the CLI and replay: topic names and broker access.

Every setting can come from a flag or an environment variable (``KAFKA_BOOTSTRAP_SERVERS``,
``AGENT_MONITOR_*``).

Example::

    >>> from monitor.config import TopicNames
    >>> TopicNames.for_prefix("agent").verdicts
    'agent.verdicts'
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, model_validator

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_PREFIX = "agent"
DEFAULT_MAX_BATCH_EVENTS = 2000
DEFAULT_MAX_ID_BYTES = 512

FailOpenKind = Literal["timeout", "error"]
FAIL_OPEN_KINDS: tuple[str, ...] = ("timeout", "error")


def env_bootstrap(default: str = DEFAULT_BOOTSTRAP) -> str:
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or default


class TopicNames(BaseModel):
    """The topics of one deployment; ``prefix`` keeps deployments (and tests) apart."""

    prefix: str = DEFAULT_PREFIX
    events: str
    verdicts: str
    alerts: str
    deadletter: str
    state: str = Field(description="the worker's compacted state changelog")
    policies: str = Field(description="the policy registry (compacted)")
    shadow: str = Field(description="shadow verdicts of candidate policy versions")

    @classmethod
    def for_prefix(cls, prefix: str = DEFAULT_PREFIX) -> "TopicNames":
        return cls(
            prefix=prefix,
            events=f"{prefix}.events",
            verdicts=f"{prefix}.verdicts",
            alerts=f"{prefix}.alerts",
            deadletter=f"{prefix}.deadletter",
            state=f"{prefix}.monitor-state-changelog",
            policies=f"{prefix}.policies",
            shadow=f"{prefix}.shadow",
        )


class WorkerSettings(BaseModel):
    """How a monitor worker runs. Flags of ``agent-monitor run`` map one to one."""

    bootstrap_servers: str = Field(default_factory=env_bootstrap)
    topic_prefix: str = Field(default_factory=lambda: os.environ.get("AGENT_MONITOR_PREFIX", DEFAULT_PREFIX))
    group_id: str | None = Field(default=None, description="consumer group; default <prefix>-monitor")
    policy_path: str | None = Field(default=None, description=(
        "a policy file or folder; or none, with policy_registry"))
    policy_registry: bool = Field(default=False, description=(
        "serve the policies of <prefix>.policies, following new versions as they are published"))
    policy_public_keys: list[str] = Field(default_factory=list, description=(
        "PEM files of the Ed25519 keys registry records must be signed with (none: unsigned records are taken)"))
    default_policy: str | None = Field(default=None, description=(
        "with policy_registry: the policy id of batches that name none"))
    engine: Literal["incremental", "reference"] = "incremental"
    partitions: int = Field(default=12, ge=1, description="partitions of the events topic")
    budget_ms: float | None = Field(default=5000.0, gt=0,
                                    description="time budget of one batch check; None: unbounded (replay)")
    fail_closed: bool = Field(default=True, description="deny when the policy errors or overruns")
    keep_denied: bool = Field(default=False, description="denied batches join the session's past")
    max_record_bytes: int = Field(default=1_000_000, ge=1024)
    verdict_memory: int = Field(default=64, ge=1, description="recent batch verdicts kept per session")
    max_verdict_violations: int = Field(default=200, ge=1, description=(
        "violations listed in one verdict; the rest are counted (alerts carry every one)"))
    reference_max_history: int = Field(default=2000, ge=1)
    allow_imports: list[str] = Field(default_factory=list, description=(
        "modules or names policies may import beyond invariant's builtins and detectors (the sandbox)"))
    # -- what one record may cost (README "Limits"): every check is O(1) on the live path
    max_batch_events: int = Field(default=DEFAULT_MAX_BATCH_EVENTS, ge=1, description=(
        "events in one batch; a batch with more is refused (deny + dead letter)"))
    max_id_bytes: int = Field(default=DEFAULT_MAX_ID_BYTES, ge=16, le=2048, description=(
        "UTF-8 bytes of a session id, batch id, policy id or record key (every field a verdict or "
        "dead letter echoes); a longer one is refused, never echoed"))
    max_rule_matches: int = Field(default=100, ge=1, description=(
        "violations of one rule in one batch; past it matching stops and one summary violation "
        "says there are more (the batch is denied)"))
    max_batch_matches: int = Field(default=1000, ge=1, description=(
        "violations of all rules in one batch; past it matching stops, as for max_rule_matches"))
    max_batch_alerts: int = Field(default=1000, ge=1, description=(
        "alerts published for one batch; the rest are counted in one summary alert"))
    max_session_entries: int = Field(default=10_000, ge=1, description=(
        "state entries one session may keep per policy; a batch that would go past it is denied "
        "and does not join the past (the reason says so)"))
    max_output_bytes: int = Field(default=1_000_000, ge=4096, le=1_048_000, description=(
        "bytes of one verdict or alert record (the topics take 1,048,588); a larger one is cut "
        "down to a smaller valid record that keeps its decision and says why"))
    max_state_record_bytes: int = Field(default=2_000_000, ge=4096, le=2_097_000, description=(
        "bytes of one state (changelog) or dead-letter record (the topics take 2 MiB); a batch "
        "whose state would need a larger one is denied and does not join the past"))
    fail_open_kinds: list[FailOpenKind] = Field(default_factory=lambda: list[FailOpenKind](["timeout"]), description=(
        "with fail_closed=False, the kinds of failed check that allow: timeout (the budget ran "
        "out), error (the policy raised on a batch the schema accepts: input can choose that)"))
    engine_processes: int = Field(default=2, ge=0, description=(
        "processes that run the reference engine and uncompiled rules, killed and replaced when a "
        "check overruns its budget; 0: threads in the worker (a check past its budget is "
        "abandoned but keeps running)"))
    guarantee: Literal["at-least-once", "exactly-once"] = Field(default="at-least-once", description=(
        "at-least-once: verdicts go out at once, a crash may repeat one; exactly-once: verdicts, "
        "alerts, state and offsets commit in one Kafka transaction"))
    commit_interval_ms: float | None = Field(default=None, gt=0, description=(
        "commit interval; default 200 ms (at-least-once) or 50 ms (exactly-once)"))
    session_ttl_s: float | None = Field(default=86_400.0, gt=0, description=(
        "a session idle this long is forgotten (its state tombstoned); None: never"))
    metrics_port: int | None = Field(default=None, description="serve Prometheus /metrics here")
    worker_id: str | None = None
    create_topics: bool = Field(default=True, description="provision missing topics at start")
    log_level: str = "warning"

    @model_validator(mode="after")
    def _one_policy_source(self) -> "WorkerSettings":
        if (self.policy_path is None) == (not self.policy_registry):
            raise ValueError("give exactly one of policy_path (files) and policy_registry")
        if self.policy_public_keys and not self.policy_registry:
            raise ValueError("policy_public_keys checks registry records: it needs policy_registry")
        return self

    @property
    def topics(self) -> TopicNames:
        return TopicNames.for_prefix(self.topic_prefix)

    @property
    def group(self) -> str:
        return self.group_id or f"{self.topic_prefix}-monitor"
