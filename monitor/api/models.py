"""Request and response bodies of the HTTP API (pydantic; they are the OpenAPI schema at ``/docs``).

Three families:

- invariant-server's shapes: ``POST /api/policy/analyze`` ``{trace, policy}`` and
  ``POST /api/monitor/check`` ``{past_events, pending_events, policy}``; each error is an
  :class:`AnalysisError` (invariant-server's ``error`` string and ``ranges``, plus ``message``,
  ``key``, ``rule_index``, ``severity`` and ``kwargs``);
- invariant-ai's ``RemotePolicy`` client: ``POST /api/v1/policy/check`` ``{messages, policy,
  parameters}`` answers ``{"errors": [{key, args, kwargs, ranges}]}``, ``POST /api/v1/policy/load``
  ``{policy}``;
- session-aware (through Kafka): ``POST /api/v1/sessions/{session_id}/batches`` and
  ``GET /api/v1/sessions/{session_id}/verdicts``.

Every non-2xx answer is one :class:`ErrorBody`.

Example::

    >>> from monitor.api.models import AnalysisError
    >>> AnalysisError.of(rule_index=0, message="no", key="(0, (1,))", ranges=["messages.1"],
    ...                  kwargs={}).error
    'ErrorInformation(no)'
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from monitor.models import BatchMetadata, Event, Severity, Verdict, parse_severity

MAX_POLICY_CHARS = 65_536
MAX_ID_CHARS = 512

ErrorCode = Literal[
    "bad_request",        # 400: the body or a parameter is invalid (``where`` says which)
    "policy_invalid",     # 400: the policy does not parse (``where``: policy:LINE)
    "policy_text_refused",  # 400: this server runs no policy text from requests (see --allow-policy-text)
    "unknown_policy",     # 400: no policy with that id is served
    "missing_parameter",  # 400: invariant's MissingPolicyParameter
    "excessive_policy",   # 400: invariant's ExcessivePolicyError
    "attribute_error",    # 400: invariant's InvariantAttributeError
    "input_invalid",      # 400: invariant's InvariantInputValidationError
    "unauthorized",       # 401: no or an unknown bearer API key
    "not_found",          # 404
    "method_not_allowed",  # 405
    "too_large",          # 413: the body (or the batch record) is over the limit
    "policy_error",       # 422: the policy raised while it ran (fail closed)
    "budget_exceeded",    # 422: the check ran past its time budget (fail closed)
    "rate_limited",       # 429: this key's request rate is over the limit (Retry-After)
    "internal",           # 500
    "unavailable",        # 503: Kafka is not reachable (session endpoints)
    "verdict_timeout",    # 504: no verdict within the wait (retry with the same batch_id)
]


class ErrorBody(BaseModel):
    """The one shape of every error answer (400, 401, 404, 413, 422, 429, 500, 503, 504).

    ``detail`` is the text a person reads (and what invariant-ai's ``RemotePolicy`` reads: its
    error kinds are recognised by their catchphrase in it, e.g. ``Missing Policy Parameter: ``).
    """

    error: ErrorCode = Field(description="machine-readable kind of the error")
    detail: str = Field(description="what went wrong and what to do, for a person")
    where: str | None = Field(default=None, description=(
        "the part of the request at fault: a body path like 'body.trace.3.role', 'header "
        "Authorization', or 'policy:LINE'"))


class AnalysisError(BaseModel):
    """One violation, in invariant-server's response shape plus the structured fields.

    ``error`` and ``ranges`` are what invariant-server answers (``repr`` of invariant's
    ``ErrorInformation`` and its addresses); the rest are structured: ``message`` (the error's
    arguments joined by spaces), ``key`` (invariant's stable error key ``(rule, (indices))``),
    ``rule_index``, ``severity`` (``[risk=...]`` in the message) and ``kwargs``.
    """

    error: str = Field(examples=["ErrorInformation(Vulnerability in python code [risk=medium])"])
    ranges: list[str] = Field(default_factory=list, examples=[["messages.1", "messages.1.content:0-4"]])
    message: str
    key: str = Field(examples=["(0, (1,))"])
    rule_index: int
    severity: Severity
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, rule_index: int, message: str, key: str, ranges: list[str],
           kwargs: dict[str, Any]) -> "AnalysisError":
        # invariant's ErrorInformation.__str__: the args joined by spaces, then ", k=v" per kwarg
        kvs = "".join(f", {k}={v}" for k, v in kwargs.items())
        return cls(error=f"ErrorInformation({message}{kvs})", ranges=ranges, message=message, key=key,
                   rule_index=rule_index, severity=parse_severity(message, kwargs), kwargs=kwargs)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _PolicyChoice(_Request):
    policy: str | None = Field(default=None, max_length=MAX_POLICY_CHARS, description=(
        "policy text; refused unless the server runs with --allow-policy-text or it is the exact "
        "text of a policy the server serves"))
    policy_id: str | None = Field(default=None, max_length=MAX_ID_CHARS, description=(
        "instead of text: the id of a policy the server serves (agent-monitor serve --policy)"))


class AnalyzeRequest(_PolicyChoice):
    """invariant-server's ``POST /api/policy/analyze``: the whole trace against a policy."""

    trace: list[Event] = Field(description="the whole trace, in OpenAI chat format")


class AnalyzeResponse(BaseModel):
    """invariant-server's shape: ``errors`` and ``handled_errors`` (always empty here)."""

    errors: list[AnalysisError]
    handled_errors: list[str] = Field(default_factory=list)
    errors_omitted: int = Field(default=0, description="violations past --max-verdict-violations")


class MonitorCheckRequest(_PolicyChoice):
    """invariant-server's ``POST /api/monitor/check``: violations of the pending events given the
    past (only errors that bind a pending event; addresses count over past + pending)."""

    past_events: list[Event] = Field(default_factory=list)
    pending_events: list[Event]


class PolicyCheckRequest(_Request):
    """invariant-ai ``RemotePolicy.a_analyze``'s body."""

    model_config = ConfigDict(extra="ignore")

    messages: list[Event]
    policy: str = Field(max_length=MAX_POLICY_CHARS)
    parameters: dict[str, Any] = Field(default_factory=dict)


class RemoteError(BaseModel):
    """invariant-ai's ``ErrorInformation.to_dict()``: what ``ErrorInformation.from_dict`` reads."""

    key: str | None
    args: list[Any]
    kwargs: dict[str, Any]
    ranges: list[str]


class PolicyCheckResponse(BaseModel):
    errors: list[RemoteError]
    errors_omitted: int = 0


class PolicyLoadRequest(_Request):
    model_config = ConfigDict(extra="ignore")

    policy: str = Field(max_length=MAX_POLICY_CHARS)


class PolicyLoadResponse(BaseModel):
    """A policy that parses (a 400 says why one does not); never an ``errors`` key, which
    ``RemotePolicy.preload`` would take for a failure."""

    ok: Literal[True] = True
    policy_sha256: str
    rules: int
    incremental_rules: int = Field(description="rules the incremental engine evaluates")


class BatchRequest(_Request):
    """One pending batch of a session; becomes an EventBatch on ``<prefix>.events``."""

    batch_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS, description=(
        "idempotency key (default: a new uuid4); retry a timed-out batch with the same id"))
    seq: int | None = Field(default=None, ge=0)
    events: list[Event] = Field(default_factory=list)
    policy: str | None = Field(default=None, max_length=MAX_ID_CHARS,
                               description="id of a policy the worker serves (not policy text)")
    metadata: BatchMetadata = Field(default_factory=BatchMetadata)
    end_session: bool = False


class BatchResult(BaseModel):
    """Where the batch went, and with ``wait=true`` the worker's verdict."""

    session_id: str
    batch_id: str
    topic: str
    verdict: Verdict | None = Field(default=None, description="the worker's verdict (wait=true)")


class SessionVerdicts(BaseModel):
    session_id: str
    verdicts: list[Verdict] = Field(description="oldest first, one per batch id")
    note: str = Field(description="which verdicts this server can list")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    policies: list[str]
    sessions: Literal["ready", "starting", "off", "unavailable"]
