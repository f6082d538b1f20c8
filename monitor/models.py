"""Wire models: everything that crosses Kafka or a file is one of these.

JSON on the wire; the JSON Schemas under ``topics/schemas/`` are generated from these classes
(``agent-monitor topics schemas``) and a test keeps them equal.

Example::

    >>> from monitor.models import EventBatch
    >>> b = EventBatch(session_id="s1", batch_id="b1",
    ...                events=[{"role": "user", "content": "hi"}])
    >>> b.trace()
    [{'role': 'user', 'content': 'hi'}]
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Annotated, Any, Final, Literal, Union, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
    with_config,
)
from pydantic.json_schema import JsonDict
from typing_extensions import NotRequired, TypedDict

SCHEMA_VERSION: Final = 1

Decision = Literal["allow", "deny"]
Severity = Literal["low", "medium", "high", "critical"]
Action = Literal["block", "log"]
"""What a rule's violation does: ``block`` denies the batch, ``log`` lets it through (alerts still go out)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Open(BaseModel):
    """Metadata keeps every field the agent sent."""

    model_config = ConfigDict(extra="allow")


# Events are validated but stay plain dicts (TypedDicts): the policy must see exactly what the
# agent sent, and a dict needs no dump before the engine reads it (the hot path of replay).
_OPEN_DICT = ConfigDict(extra="allow")


@with_config(_OPEN_DICT)
class FunctionCall(TypedDict):
    name: Annotated[str, Field(min_length=1)]
    arguments: NotRequired[dict[str, Any] | str]


@with_config(_OPEN_DICT)
class ToolCall(TypedDict):
    """A tool call, inside an assistant message or as an event of its own."""

    id: NotRequired[str | None]
    type: NotRequired[Literal["function"]]
    function: FunctionCall


@with_config(_OPEN_DICT)
class ChatMessage(TypedDict):
    """An OpenAI-style chat message (user, assistant, system, developer or tool output)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: NotRequired[str | list[dict[str, Any]] | None]
    tool_calls: NotRequired[list[ToolCall] | None]
    tool_call_id: NotRequired[str | None]
    metadata: NotRequired[dict[str, Any] | None]


def _event_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return "tool_call" if "function" in value and "role" not in value else "message"
    return None


Event = Annotated[
    Union[Annotated[ChatMessage, Tag("message")], Annotated[ToolCall, Tag("tool_call")]],
    Discriminator(_event_kind),
]


def plain_events(events: Iterable[Event]) -> list[dict[str, Any]]:
    """``events`` in a new list, as the plain dicts they are (each kind of event is a TypedDict)."""
    return cast(list[dict[str, Any]], list(events))


class BatchMetadata(_Open):
    agent: str | None = None
    tenant: str | None = None
    user: str | None = None


# the JSON Schema says what the validator below says: no events only with end_session
_EVENTS_UNLESS_END: JsonDict = {
    "if": {"properties": {"end_session": {"const": True}}, "required": ["end_session"]},
    "else": {"properties": {"events": {"minItems": 1}}, "required": ["events"]},
}


class EventBatch(BaseModel):
    """One pending batch of events of one session; the record on ``agent.events``."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_EVENTS_UNLESS_END)

    schema_version: Literal[1] = SCHEMA_VERSION
    session_id: str = Field(min_length=1, max_length=512)
    batch_id: str = Field(min_length=1, max_length=512, description="producer-chosen idempotency key")
    seq: int | None = Field(default=None, ge=0, description="optional per-session order number")
    # (before events: their check reads it)
    end_session: bool = Field(default=False, description=(
        "the session's last batch: it is checked and answered as any other, then the session's "
        "state is removed (a later batch with the same session id starts afresh)"))
    events: list[Event] = Field(default_factory=list, validate_default=True, description=(
        "the pending events; at least one unless end_session is set"))
    policy: str | None = Field(default=None, max_length=512, description="optional policy id")
    metadata: BatchMetadata = Field(default_factory=BatchMetadata)
    produced_at: datetime = Field(default_factory=utcnow)

    @field_validator("events")
    @classmethod
    def _some_events(cls, events: list[Any], info: ValidationInfo) -> list[Any]:
        if not events and not info.data.get("end_session"):
            raise ValueError("at least one event is needed (only an end_session batch may have none)")
        return events

    def trace(self) -> list[dict[str, Any]]:
        """The events exactly as the agent sent them, in Invariant's input format."""
        return plain_events(self.events)


class SourceRef(BaseModel):
    """Where a record came from."""

    topic: str
    partition: int
    offset: int


_RISK = re.compile(r"\[(?:risk|severity)\s*=\s*(low|medium|high|critical)\]", re.I)


def parse_severity(message: str, kwargs: dict[str, Any] | None = None,
                   default: Severity = "high") -> Severity:
    """``[risk=medium]`` in a rule's message (or a ``severity=`` argument) sets the severity.

    >>> parse_severity("Vulnerability in python code [risk=medium]")
    'medium'
    """
    for source in ((kwargs or {}).get("severity"), (kwargs or {}).get("risk")):
        if isinstance(source, str) and source.lower() in ("low", "medium", "high", "critical"):
            return source.lower()  # type: ignore[return-value]
    m = _RISK.search(message)
    return m.group(1).lower() if m else default  # type: ignore[return-value]


_ACTION = re.compile(r"\[action\s*=\s*(block|log)\]", re.I)


def parse_action(message: str) -> Action | None:
    """``[action=log]`` (or ``[action=block]``) in a rule's message, as ``[risk=...]`` sets severity;
    None when the message names no action.

    >>> parse_action("Secret in a shell command [risk=medium] [action=log]"), parse_action("x")
    ('log', None)
    """
    m = _ACTION.search(message)
    return m.group(1).lower() if m else None  # type: ignore[return-value]


class Match(BaseModel):
    """One rule match as an engine reports it, before it is tied to a session."""

    rule_index: int
    message: str
    key: str = Field(description="invariant-ai's stable error key, e.g. '(0, (2, 5))'")
    addresses: list[str] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


def make_alert_id(session_id: str, policy_sha256: str, key: str) -> str:
    """Deterministic: the same violation of the same session and policy always has the same id."""
    raw = f"{session_id}\x00{policy_sha256}\x00{key}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


class Violation(BaseModel):
    """A violated rule: its message, severity and the addresses of the violating parts.

    Addresses count over the session's whole trace (``messages.3.content:12-40``).
    """

    alert_id: str
    rule_index: int
    message: str
    severity: Severity = "high"
    addresses: list[str] = Field(default_factory=list)
    key: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    action: Action = Field(default="block", description=(
        "block: this violation denies the batch; log: it is listed and alerted, the batch is allowed"))

    @classmethod
    def from_match(cls, match: Match, session_id: str, policy_sha256: str,
                   action: Action = "block") -> "Violation":
        return cls(
            alert_id=make_alert_id(session_id, policy_sha256, match.key),
            rule_index=match.rule_index,
            message=match.message,
            severity=parse_severity(match.message, match.kwargs),
            addresses=list(match.addresses),
            key=match.key,
            kwargs=dict(match.kwargs),
            action=action,
        )


class Verdict(BaseModel):
    """Exactly one per batch, on ``agent.verdicts``, keyed by session id."""

    schema_version: Literal[1] = SCHEMA_VERSION
    session_id: str
    batch_id: str
    seq: int | None = None
    decision: Decision
    violations: list[Violation] = Field(default_factory=list)
    violations_omitted: int = Field(default=0, ge=0, description=(
        "violations left out to keep the record small; every one still has its alert"))
    reason: str | None = Field(default=None, description="why, when the deny is not a rule match")
    policy_id: str | None = None
    policy_version: int | None = Field(default=None, description=(
        "the registry version that checked the batch (None: a policy from files)"))
    policy_sha256: str | None = None
    engine: str | None = None
    evaluated_at: datetime = Field(default_factory=utcnow)
    eval_ms: float = 0.0
    source: SourceRef | None = None

    @property
    def allowed(self) -> bool:
        return self.decision == "allow"


class Alert(Violation):
    """One per violation, on ``agent.alerts``; ``alert_id`` recognises duplicates."""

    schema_version: Literal[1] = SCHEMA_VERSION
    session_id: str
    batch_id: str
    decision: Decision
    policy_id: str | None = None
    policy_version: int | None = None
    policy_sha256: str | None = None
    raised_at: datetime = Field(default_factory=utcnow)
    source: SourceRef | None = None

    @classmethod
    def from_violation(cls, v: Violation, verdict: Verdict) -> "Alert":
        return cls(
            **v.model_dump(),
            session_id=verdict.session_id,
            batch_id=verdict.batch_id,
            decision=verdict.decision,
            policy_id=verdict.policy_id,
            policy_version=verdict.policy_version,
            policy_sha256=verdict.policy_sha256,
            raised_at=verdict.evaluated_at,
            source=verdict.source,
        )


POLICY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A registry policy id: letters, digits, ``.``, ``_``, ``-`` (``@`` and ``#`` separate its record keys)."""

Stage = Literal["active", "shadow"]


class PolicyRecord(BaseModel):
    """One version of a policy, on ``<prefix>.policies`` (compacted; see :mod:`monitor.registry`).

    ``actions`` gives every rule's action by rule index (JSON keys are strings); ``rules`` the
    rules' messages, for people. ``signature`` is Ed25519 over :meth:`signed_bytes` (every other
    field), by the key ``key_id`` names.
    """

    model_config = ConfigDict(extra="ignore")

    schema_version: Literal[1] = SCHEMA_VERSION
    policy_id: str = Field(pattern=POLICY_ID_PATTERN)
    version: int = Field(ge=1, description="monotonic per policy id")
    stage: Stage = Field(default="active", description="active: serves verdicts; shadow: a candidate")
    text: str = Field(min_length=1, max_length=1_000_000)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of text (UTF-8)")
    actions: dict[str, Action] = Field(default_factory=dict, description="rule index -> block or log")
    rules: list[str] = Field(default_factory=list, description="each rule's message, in rule-index order")
    author: str = Field(default="", max_length=256)
    created_at: datetime = Field(default_factory=utcnow)
    note: str | None = Field(default=None, max_length=1000, description="e.g. rollback to v3")
    sources: list[str] = Field(default_factory=list, description="the files the text came from")
    key_id: str | None = Field(default=None, description="the signing key's id (sha256 of its raw bytes, 16 hex)")
    signature: str | None = Field(default=None, description="Ed25519 over signed_bytes(), base64")

    @field_validator("actions")
    @classmethod
    def _rule_indices(cls, actions: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in actions if not k.isdigit()]
        if bad:
            raise ValueError(f"action keys are rule indices (0, 1, ...), not {bad[0]!r}")
        return actions

    @model_validator(mode="after")
    def _text_matches_sha256(self) -> "PolicyRecord":
        if hashlib.sha256(self.text.encode()).hexdigest() != self.sha256:
            raise ValueError("sha256 is not the sha256 of text")
        return self

    def signed_bytes(self) -> bytes:
        """What the signature covers: every field but the signature, as canonical JSON."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def rule_actions(self) -> dict[int, Action]:
        return {int(k): v for k, v in self.actions.items()}


class ShadowVerdict(BaseModel):
    """A candidate version's verdict beside the active one's, on ``<prefix>.shadow`` (never on the
    verdicts topic: agents never see it)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    session_id: str
    batch_id: str
    policy_id: str
    candidate: Verdict = Field(description="what the candidate would have answered")
    active: Verdict = Field(description="what the active version answered (and was published)")
    differs: bool = Field(description="the decisions, or the rules that matched, differ")


DeadLetterKind = Literal["not_json", "invalid", "too_large", "out_of_order", "internal"]


class DeadLetter(BaseModel):
    """A record the worker could not take, with what a person needs to act on it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: DeadLetterKind
    reason: str
    source: SourceRef
    key: str | None = None
    value_b64: str = Field(description="the original record value, base64")
    size: int
    session_id: str | None = None
    batch_id: str | None = None
    failed_at: datetime = Field(default_factory=utcnow)

    @staticmethod
    def encode(raw: bytes | None) -> str:
        return base64.b64encode(raw or b"").decode()

    def original(self) -> bytes:
        return base64.b64decode(self.value_b64)


WIRE_MODELS: dict[str, type[BaseModel]] = {
    "EventBatch": EventBatch,
    "Verdict": Verdict,
    "Alert": Alert,
    "DeadLetter": DeadLetter,
    "PolicyRecord": PolicyRecord,
    "ShadowVerdict": ShadowVerdict,
}
