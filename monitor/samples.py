"""Sample sessions: example agent traces split into batches, with the verdict each batch must get.

A sample file (``examples/sessions/*.json``) holds one session::

    {"session_id": "flow-send-email-split", "policy": "send_after_keyword",
     "description": "...",
     "batches": [[{"role": "user", "content": "Can you send this email to Peter?"}],
                 [{"id": "1", "type": "function", "function": {"name": "send_email", "arguments": {}}}]],
     "expect": [{"decision": "allow", "violations": []},
                {"decision": "deny", "violations": ["Must not call tool after user uses keyword"]}]}

``policy`` is a policy id: the stem of a file in the policy folder the worker serves. The demo plays
these sessions through Kafka; :func:`verify_sample` checks them against an engine directly (no broker).
:func:`read_batches` reads what ``agent-monitor produce`` is given: EventBatch records or a sample.

Example::

    >>> from monitor.samples import SampleSession
    >>> s = SampleSession(session_id="s1", policy="p", batches=[[{"role": "user", "content": "hi"}]],
    ...                   expect=[{"decision": "allow"}])
    >>> [b.batch_id for b in s.event_batches()]
    ['s1:0']
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from monitor.errors import EXIT_USAGE, MonitorError
from monitor.models import Decision, EventBatch, Verdict

if TYPE_CHECKING:
    from monitor.policy import PolicySet


class SampleError(MonitorError, ValueError):
    """A sample file is missing or not a valid sample session; the message names the file."""

    exit_code = EXIT_USAGE


class Expectation(BaseModel):
    """What one batch must get: the decision and the distinct rule messages of its violations."""

    decision: Decision
    violations: list[str] = Field(default_factory=list)

    def mismatch(self, decision: str, messages: list[str]) -> str | None:
        """``None`` when ``decision``/``messages`` meet this expectation, else what differs.

        Violations compare as sets of rule messages: engines may report one rule's several matches
        differently, the rules that fired are what a sample pins down.

        >>> Expectation(decision="deny", violations=["x"]).mismatch("deny", ["x", "x"]) is None
        True
        >>> Expectation(decision="allow").mismatch("deny", ["x"])
        "expected allow [], got deny ['x']"
        """
        got = sorted(set(messages))
        if decision == self.decision and got == sorted(set(self.violations)):
            return None
        return f"expected {self.decision} {sorted(set(self.violations))}, got {decision} {got}"

    def matches_verdict(self, verdict: Verdict) -> str | None:
        """:meth:`mismatch` for a verdict from the wire."""
        return self.mismatch(verdict.decision, [v.message for v in verdict.violations])


class SampleSession(BaseModel):
    """One example session: its batches in order and the expected verdict of each."""

    session_id: str = Field(min_length=1)
    policy: str = Field(min_length=1, description="policy id: the stem of a policy file")
    description: str = ""
    batches: list[list[dict[str, Any]]] = Field(min_length=1)
    expect: list[Expectation]
    path: str | None = Field(default=None, exclude=True, description="the file it came from")

    @model_validator(mode="after")
    def _one_expectation_per_batch(self) -> SampleSession:
        if len(self.expect) != len(self.batches):
            raise ValueError(f"{len(self.batches)} batches but {len(self.expect)} expectations: "
                             "give exactly one expectation per batch")
        for i, batch in enumerate(self.batches):
            if not batch:
                raise ValueError(f"batch {i} is empty: a batch holds at least one event")
        return self

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path else self.session_id

    def event_batches(self, session_id: str | None = None) -> list[EventBatch]:
        """The batches as wire records; ``batch_id`` is ``<session>:<index>`` and ``seq`` the index.

        Pass ``session_id`` to play the session under another id (e.g. a fresh one per run).
        """
        sid = session_id or self.session_id
        return [
            EventBatch.model_validate({"session_id": sid, "batch_id": f"{sid}:{i}", "seq": i, "events": events,
                                       "policy": self.policy, "metadata": {"agent": "sample", "sample": self.name}})
            for i, events in enumerate(self.batches)
        ]


def load_sample(path: str | Path) -> SampleSession:
    """Read one sample file; raises :class:`SampleError` naming the file on any problem."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SampleError(f"{p}: cannot read the sample: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SampleError(f"{p}:{exc.lineno}: not JSON: {exc.msg}") from None
    try:
        sample = SampleSession.model_validate(data)
    except ValidationError as exc:
        raise SampleError(f"{p}: not a sample session:\n{exc}") from None
    sample.path = str(p)
    return sample


def is_sample(data: Any) -> bool:
    """Whether parsed JSON looks like a sample session rather than an EventBatch."""
    return isinstance(data, dict) and "batches" in data and "expect" in data


def load_samples(folder: str | Path) -> list[SampleSession]:
    """Every ``*.json`` sample of a folder, in file-name order.

    >>> from pathlib import Path
    >>> samples = load_samples(Path(__file__).parent.parent / "examples" / "sessions")
    >>> len(samples) > 5 and all(len(s.batches) == len(s.expect) for s in samples)
    True
    """
    p = Path(folder)
    if not p.is_dir():
        raise SampleError(f"{p}: no such folder of sample sessions")
    files = sorted(p.glob("*.json"))
    if not files:
        raise SampleError(f"{p}: the folder holds no *.json sample sessions")
    return [load_sample(f) for f in files]


# -- the input of `agent-monitor produce` -------------------------------------------------------

def validation_errors(exc: ValidationError, limit: int = 3) -> str:
    """The first ``limit`` errors of a validation as ``field: message`` parts.

    >>> try:
    ...     EventBatch.model_validate({"session_id": "", "events": [{"role": "robot"}]})
    ... except ValidationError as exc:
    ...     print(validation_errors(exc, 2))
    session_id: String should have at least 1 character; batch_id: Field required (+1 more)
    """
    errs = exc.errors(include_url=False)
    parts = [f"{'.'.join(str(x) for x in e['loc']) or '<record>'}: {e['msg']}" for e in errs[:limit]]
    return "; ".join(parts) + (f" (+{len(errs) - limit} more)" if len(errs) > limit else "")


def _to_batch(data: Any, where: str, session_id: str | None) -> EventBatch:
    if not isinstance(data, dict):
        raise SampleError(f"{where}: expected a JSON object (an EventBatch), got {type(data).__name__}")
    data = dict(data)
    data.setdefault("batch_id", uuid.uuid4().hex)  # a fresh idempotency key for hand-written input
    if session_id:
        data["session_id"] = session_id
    try:
        return EventBatch.model_validate(data)
    except ValidationError as exc:
        raise SampleError(f"{where}: not an EventBatch: {validation_errors(exc)}") from None


def read_batches(text: str, source: str = "<input>", session_id: str | None = None
                 ) -> tuple[list[EventBatch], list[Expectation] | None]:
    """Parse ``produce`` input: one EventBatch object, a JSON list of them, JSON Lines, or a sample
    session (then its expectations come back too). Errors name ``source`` and the line.

    >>> bs, exp = read_batches('{"session_id": "s", "events": [{"role": "user", "content": "hi"}]}')
    >>> bs[0].session_id, len(bs[0].batch_id), exp
    ('s', 32, None)
    >>> [b.seq for b in read_batches('{"session_id": "a", "seq": 0, "events": [{"role": "user"}]}\\n'
    ...                              '{"session_id": "a", "seq": 1, "events": [{"role": "user"}]}')[0]]
    [0, 1]
    """
    stripped = text.strip()
    if not stripped:
        raise SampleError(f"{source}: no input (expected EventBatch JSON, JSON Lines or a sample session)")
    try:
        whole = json.loads(stripped)
    except json.JSONDecodeError:
        whole = None
        lines = True
    else:
        lines = False
    if not lines:
        if is_sample(whole):
            try:
                sample = SampleSession.model_validate(whole)
            except ValidationError as exc:
                raise SampleError(f"{source}: not a sample session: {validation_errors(exc)}") from None
            return sample.event_batches(session_id), list(sample.expect)
        if isinstance(whole, list):
            return [_to_batch(item, f"{source}[{i}]", session_id) for i, item in enumerate(whole)], None
        return [_to_batch(whole, source, session_id)], None
    batches = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SampleError(f"{source}:{n}: not JSON: {exc.msg} (column {exc.colno})") from None
        batches.append(_to_batch(data, f"{source}:{n}", session_id))
    return batches, None


class BatchOutcome(BaseModel):
    """How one batch of a sample fared against an engine."""

    index: int
    decision: Decision
    messages: list[str]
    addresses: list[list[str]] = Field(default_factory=list)
    problem: str | None = None


async def averify_sample(sample: SampleSession, policy_folder: str | Path | PolicySet,
                         engine: str = "reference", keep_denied: bool = False) -> list[BatchOutcome]:
    """Evaluate a sample batch by batch as the worker does (a denied batch does not join the past
    unless ``keep_denied``) and compare each batch with its expectation.

    The policy is ``<policy_folder>/<sample.policy>.<suffix>``; pass a loaded ``PolicySet`` to
    check many samples without parsing the policies again. Returns one outcome per batch;
    ``problem`` is set where the expectation was not met.
    """
    from monitor.engine import make_engine
    from monitor.policy import PolicySet, load_policy_set

    policies = policy_folder if isinstance(policy_folder, PolicySet) else load_policy_set(policy_folder)
    eng = make_engine(policies.resolve(sample.policy), engine)
    try:
        state = eng.initial_state()
        outcomes = []
        for i, (events, want) in enumerate(zip(sample.batches, sample.expect, strict=True)):
            pending = EventBatch.model_validate(
                {"session_id": sample.session_id, "batch_id": str(i), "events": events}).trace()
            result = await eng.check(state, pending)
            decision: Decision = "deny" if result.matches else "allow"
            messages = [m.message for m in result.matches]
            outcomes.append(BatchOutcome(index=i, decision=decision, messages=messages,
                                         addresses=[m.addresses for m in result.matches],
                                         problem=want.mismatch(decision, messages)))
            if decision == "allow" or keep_denied:
                state = result.advance(state)
        return outcomes
    finally:
        eng.close()


def verify_sample(sample: SampleSession, policy_folder: str | Path | PolicySet,
                  engine: str = "reference", keep_denied: bool = False) -> list[BatchOutcome]:
    """Blocking form of :func:`averify_sample`.

    >>> from pathlib import Path
    >>> ex = Path(__file__).parent.parent / "examples"
    >>> s = load_sample(ex / "sessions" / "flow_send_email_split.json")
    >>> [(o.decision, o.problem) for o in verify_sample(s, ex / "policies")]
    [('allow', None), ('deny', None)]
    """
    return asyncio.run(averify_sample(sample, policy_folder, engine, keep_denied))
