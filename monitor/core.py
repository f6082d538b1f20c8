"""The Kafka-free core: one record in; its verdict, alerts and dead letter out.

Everything that decides what a batch gets lives here, once: decoding a record (and the reason a
person can act on when it is refused), the deny for a refused record, the redelivery of a known
batch id, policy selection, the per-session order check, the engine run within its time budget
(fail closed), the verdict with one alert per violation, and whether the batch joins the
session's past. The live worker's runtime, replay, the demo and the HTTP API all call it; none of
them repeats a rule of it.

Example::

    >>> import asyncio
    >>> from monitor.config import WorkerSettings
    >>> from monitor.core import BatchEvaluator
    >>> from monitor.policy import PolicySet, load_policy_text
    >>> from monitor.state import SessionStore
    >>> policy = load_policy_text('raise "no" if:\\n    (m: Message) -> (t: ToolCall)\\n'
    ...                           '    "send" in m.content\\n    t is tool:send_email\\n', "flow")
    >>> core = BatchEvaluator(PolicySet.single(policy), WorkerSettings(policy_path="-"))
    >>> store = SessionStore({})
    >>> send = b'{"session_id": "s", "batch_id": "b1", "events": [{"role": "user", "content": "send it"}]}'
    >>> asyncio.run(core.process_record(store, b"s", send, None)).verdict.decision
    'allow'
    >>> call = (b'{"session_id": "s", "batch_id": "b2", "events": [{"type": "function", "id": "1",'
    ...         b' "function": {"name": "send_email", "arguments": {}}}]}')
    >>> out = asyncio.run(core.process_record(store, b"s", call, None))
    >>> out.verdict.decision, [a.message for a in out.alerts()]
    ('deny', ['no'])
    >>> bad = asyncio.run(core.process_record(store, b"s", b"{not json", None))
    >>> bad.dead_letter.kind, bad.verdict is None
    ('not_json', True)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json

from monitor import sandbox
from monitor.config import DEFAULT_MAX_BATCH_EVENTS, DEFAULT_MAX_ID_BYTES, WorkerSettings
from monitor.engine import BudgetExceeded, CheckResult, Engine, EngineError, MatchCaps, SessionState, make_engine
from monitor.engine.isolation import IsolatedPool
from monitor.errors import MonitorError
from monitor.limits import fit_verdict
from monitor.models import (
    Action,
    Alert,
    DeadLetter,
    DeadLetterKind,
    EventBatch,
    ShadowVerdict,
    SourceRef,
    Verdict,
    Violation,
)
from monitor.policy import LoadedPolicy, PolicySet
from monitor.state import SessionHead, SessionStore, StateCorrupted, StateTooLarge

log = logging.getLogger("agent_monitor.core")

BUDGET_REASON = "the policy check exceeded its time budget"
ERROR_REASON = "the policy raised an error"
FAILED_REASON = "the policy check failed"
STATE_REASON = "the session's state is over its limit"
FAILURE_PREFIXES = (BUDGET_REASON, ERROR_REASON, FAILED_REASON)


class Rejected(MonitorError):
    """A record that is not a valid EventBatch; carries what the dead letter needs."""

    def __init__(self, kind: DeadLetterKind, reason: str, session_id: str | None = None,
                 batch_id: str | None = None) -> None:
        reason = clip(reason, MAX_REASON_CHARS)  # a reason may quote input: never unbounded
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.session_id = session_id
        self.batch_id = batch_id

    @property
    def addressable(self) -> bool:
        """Its session and batch ids could be read: the waiting agent still gets a deny."""
        return bool(self.session_id and self.batch_id)


def short_validation(exc: ValidationError, limit: int = 5) -> str:
    """The first ``limit`` errors of a validation, as ``field: message`` parts."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


TOO_DEEP = "it is nested too deeply"
MAX_REASON_CHARS = 2000  # a reason that quotes input (an error message, ids) is cut to this
# CPython refuses to convert longer integers between text and int (quadratic time otherwise)
INT_DIGITS = sys.get_int_max_str_digits() or 4300


def clip(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its beginning and how long it was.

    >>> clip("abc", 10), clip("x" * 30, 10)
    ('abc', 'xxxxxxxxxx… (30 characters)')
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def too_long(text: str, limit: int) -> bool:
    """More than ``limit`` UTF-8 bytes (only text that may be longer is encoded to find out).

    >>> too_long("abc", 3), too_long("ééé", 5), too_long("x" * 4, 3)
    (False, True, True)
    """
    n = len(text)
    if n > limit:
        return True
    if n * 4 <= limit or text.isascii():
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


class HugeInt:
    """What stands in for an integer too long to convert (see :class:`IntDigits`)."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


class IntDigits:
    """A ``parse_int`` for ``json.loads`` that notes integers too long to convert; a
    :class:`HugeInt` stands in for each, so that the rest (the ids) can still be read.

    >>> digits = IntDigits()
    >>> doc = json.loads('{"batch_id": "b", "n": 1%s}' % ("0" * 5000), parse_int=digits)
    >>> doc["batch_id"], digits.longest, huge_int_in(doc)
    ('b', 5001, 5001)
    """

    __slots__ = ("longest",)

    def __init__(self) -> None:
        self.longest = 0

    def __call__(self, text: str) -> int | HugeInt:
        digits = len(text) - (text[:1] == "-")
        if digits > INT_DIGITS:
            self.longest = max(self.longest, digits)
            return HugeInt(digits)
        return int(text)


def huge_int_in(value: Any) -> int:
    """The digits of the longest :class:`HugeInt` in a parsed JSON value (0: none)."""
    if type(value) is HugeInt:
        return value.digits
    if type(value) is dict:
        return max(map(huge_int_in, value.values()), default=0)
    if type(value) is list:
        return max(map(huge_int_in, value), default=0)
    return 0


def huge_int_reason(digits: int) -> str:
    """Why a record holding an integer of ``digits`` digits is refused."""
    return (f"the record holds an integer of {digits} digits: at most {INT_DIGITS} digits are "
            "accepted (longer ones take quadratic time to convert, so Python refuses them)")


LONE_SURROGATE = ("the record holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair): "
                  "not Unicode text, so no verdict or report could quote it")


def is_unicode(value: Any) -> bool:
    r"""False when a JSON value holds a lone surrogate (``json.loads`` lets ``"\ud83d"`` through).

    >>> is_unicode({"a": ["\U0001f600"]}), is_unicode(json.loads(r'{"a": "\ud83d"}'))
    (True, False)
    """
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_batch(key: bytes | None, value: bytes | None, max_bytes: int, *, keyed: bool = True,
                 max_events: int = DEFAULT_MAX_BATCH_EVENTS,
                 max_id_bytes: int = DEFAULT_MAX_ID_BYTES) -> EventBatch:
    """Parse a record into an EventBatch or raise :class:`Rejected` with a reason a person can act on.

    ``keyed=False`` is for records that never had a Kafka key (lines of a replayed file): no key
    is then required, and the session id is the record's own. ``max_events`` bounds the events
    of a batch, ``max_id_bytes`` the key and every id a verdict would echo (session, batch,
    policy): an id past it is never echoed, so a record too long to be answered is refused.

    >>> decode_batch(b"s", b'{"session_id": "s", "batch_id": "b", "events": []}', 1000)
    Traceback (most recent call last):
    ...
    monitor.core.Rejected: not a valid EventBatch: events: Value error, at least one event is needed (only an end_session batch may have none)
    >>> decode_batch(b"s", b'{"session_id": "s", "batch_id": "b", "seq": 1%s}' % (b"0" * 5000), 10**6)
    Traceback (most recent call last):
    ...
    monitor.core.Rejected: the record holds an integer of 5001 digits: at most 4300 digits are accepted (longer ones take quadratic time to convert, so Python refuses them)
    """
    if key and len(key) > max_id_bytes:
        # the key is the session id: one this long could not be answered without echoing it
        raise Rejected("invalid", f"the record key is {len(key)} bytes, over the limit of {max_id_bytes} "
                       "(--max-id-bytes): the key must be the session_id, and ids that long are refused")
    key_text = key.decode("utf-8", "replace") if key else None
    if keyed and not key_text:
        raise Rejected("invalid", "the record has no key: the key must be the session_id, so that a "
                       "session stays on one partition")
    if value is None:
        raise Rejected("invalid", "the record has no value (a tombstone?)", key_text)
    unicode_ok = True
    huge = 0
    data: Any
    try:
        # pydantic-core's parser: over twice as fast as json's on agent records, and equal on
        # every text it accepts (numbers included)
        data = from_json(value, cache_strings=False)
    except ValueError:
        digits = IntDigits()
        try:  # json decides the rest (it also takes a BOM and UTF-16) and words the error
            data = json.loads(value, parse_int=digits)
            # it also takes lone surrogates, which no JSON out can carry (a record with a huge
            # integer is refused for that, once its ids are checked on their own)
            unicode_ok = not digits.longest and is_unicode(data)
        except RecursionError:
            data = ValueError(TOO_DEEP)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            data = exc
        huge = digits.longest  # the ids can still be read: the agent gets its deny
    sid = data.get("session_id") if isinstance(data, dict) else None
    bid = data.get("batch_id") if isinstance(data, dict) else None
    # (ids from_json read are Unicode already: only json's may hold a lone surrogate); an id too
    # long to echo is no id. (4 bytes per character at most: short ids are not measured.)
    long_id = None
    if type(sid) is str and len(sid) * 4 > max_id_bytes and too_long(sid, max_id_bytes):
        long_id = "session_id"
    elif type(bid) is str and len(bid) * 4 > max_id_bytes and too_long(bid, max_id_bytes):
        long_id = "batch_id"
    sid = sid if isinstance(sid, str) and sid and long_id != "session_id" and (
        unicode_ok or is_unicode(sid)) else key_text
    bid = bid if isinstance(bid, str) and bid and long_id != "batch_id" and (
        unicode_ok or is_unicode(bid)) else None
    if len(value) > max_bytes:
        # still read its ids (Kafka bounded its size) so the waiting agent gets a deny
        raise Rejected("too_large", f"the record is {len(value)} bytes, over the limit of {max_bytes}",
                       sid, bid)
    if isinstance(data, Exception):
        raise Rejected("not_json", f"the record value is not JSON: {data}", key_text)
    if not isinstance(data, dict):
        raise Rejected("invalid", f"an EventBatch is a JSON object, not {type(data).__name__}", sid, bid)
    if huge:
        raise Rejected("invalid", huge_int_reason(huge), sid, bid)
    if not unicode_ok:
        raise Rejected("invalid", LONE_SURROGATE, sid, bid)
    policy = data.get("policy")
    if long_id is None and type(policy) is str and len(policy) * 4 > max_id_bytes and too_long(policy, max_id_bytes):
        long_id = "policy"
    if long_id is not None:
        raise Rejected("invalid", f"the {long_id} is over the limit of {max_id_bytes} bytes "
                       "(--max-id-bytes): ids that long are refused, never echoed", sid, bid)
    events = data.get("events")
    if type(events) is list and len(events) > max_events:
        raise Rejected("invalid", f"the batch has {len(events)} events, over the limit of {max_events} "
                       "(--max-batch-events): split it", sid, bid)
    try:
        batch = EventBatch.model_validate(data)
    except ValidationError as exc:
        raise Rejected("invalid", f"not a valid EventBatch: {short_validation(exc)}", sid, bid) from None
    if keyed and key_text != batch.session_id:
        raise Rejected("invalid", f"the record key {key_text!r} is not its session_id "
                       f"{batch.session_id!r}: a session must stay on one partition", sid, bid)
    return batch


def batch_id_of(value: bytes | None) -> str | None:
    """The batch id of a record, if one can be read at all (for a record that failed later)."""
    try:
        bid = json.loads(value or b"").get("batch_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return bid if isinstance(bid, str) and bid else None


def rejected_verdict(rejected: Rejected, source: SourceRef | None) -> Verdict:
    """The deny an agent gets for a record that could not be checked."""
    assert rejected.session_id and rejected.batch_id  # noqa: S101 - only an addressable refusal is denied
    return Verdict(session_id=rejected.session_id, batch_id=rejected.batch_id, decision="deny",
                   source=source, reason=f"rejected record ({rejected.kind}): {rejected.reason}")


def dead_letter_for(rejected: Rejected, key: bytes | None, value: bytes | None,
                    source: SourceRef, max_id_bytes: int = DEFAULT_MAX_ID_BYTES) -> DeadLetter:
    """The dead letter of a refused record: its bytes, where it came from and why (a key too
    long to echo shows its beginning; the reason says how long it was)."""
    return DeadLetter(kind=rejected.kind, reason=rejected.reason, source=source,
                      key=clip(key[:max_id_bytes + 4].decode("utf-8", "replace"), max_id_bytes) if key else None,
                      value_b64=DeadLetter.encode(value), size=len(value or b""),
                      session_id=rejected.session_id, batch_id=rejected.batch_id)


def joins_past(verdict: Verdict, keep_denied: bool) -> bool:
    """Whether a checked batch joins its session's past: allowed, or denied with ``keep_denied``.

    A batch denied for a reason other than a rule (budget, error, order) never does.
    """
    return verdict.reason is None and (verdict.decision == "allow" or keep_denied)


def failure_kind(verdict: Verdict) -> str | None:
    """``timeout`` or ``error`` for a verdict decided by a failed check, else None."""
    if verdict.reason and verdict.reason.startswith(FAILURE_PREFIXES):
        return "timeout" if verdict.reason.startswith(BUDGET_REASON) else "error"
    return None


@dataclass(slots=True)
class Outcome:
    """What the core decided for one record."""

    verdict: Verdict | None  # None: the record could not be tied to a session and batch
    new: bool = True  # False: a repeat of a batch id that has its verdict already
    # violations past the verdict's cap (``max_verdict_violations``): not in the verdict, but each
    # still gets its alert
    omitted: tuple[Violation, ...] = ()
    joined: bool = False  # the batch joined the session's past
    verdict_json: bytes | None = None  # the verdict as committed (serialised once)
    dead_letter: DeadLetter | None = None
    events: int = 0  # events in the batch (0 for a refused record)
    ended: bool = False  # an end_session batch: the session's state is gone
    shadow: ShadowVerdict | None = None  # a shadow candidate's verdict beside this one
    # the verdict's violations as they were before it was cut to fit its topic (alerts carry
    # them whole); empty when it was not cut
    cut: tuple[Violation, ...] = ()

    def alerted(self) -> list[Violation]:
        """Every violation of the batch, whole, in order: one alert each."""
        if self.verdict is None:
            return []
        return [*(self.cut or self.verdict.violations), *self.omitted]

    def alerts(self) -> list[Alert]:
        """The alerts to publish: one per violation. A repeated verdict sends its alerts again
        (the first sending may be what a crash cut short); their ids show them as repeats."""
        if self.verdict is None:
            return []
        return [Alert.from_violation(v, self.verdict) for v in self.alerted()]


_SAME: Any = object()


def _repeat(known: bytes | dict[str, Any], events: int) -> Outcome:
    """The stored verdict of a batch id seen before, to send again as it was."""
    if type(known) is bytes:
        return Outcome(Verdict.model_validate_json(known), new=False, events=events, verdict_json=known)
    return Outcome(Verdict.model_validate(known), new=False, events=events)


SHADOW_CURSOR = "#shadow"
"""A shadow candidate's state sits in the session head under ``<policy id>#shadow``."""


@dataclass(slots=True)
class Candidate:
    """A shadow candidate: a policy version checked beside the active one, its verdicts never
    published to agents."""

    policy: LoadedPolicy
    engine: Engine
    actions: dict[int, Action]


def _violated(verdict: Verdict) -> list[tuple[str, str]]:
    return sorted({(v.message, v.action) for v in verdict.violations})


class BatchEvaluator:
    """Decides each batch's verdict against a session store; free of Kafka.

    ``settings`` gives the budget, fail-closed, keep-denied, record size and verdict caps. A
    worker that follows the policy registry (``settings.policy_registry``) swaps versions in with
    :meth:`install` and shadow candidates with :meth:`install_shadow` between batches, and keeps
    each session's last ``reference_max_history`` raw events in its state (written once per event,
    read only when a new version first meets the session), from which that version rebuilds the
    session's past.
    """

    def __init__(self, policies: PolicySet, settings: WorkerSettings) -> None:
        self.policies = policies
        self.settings = settings
        self.caps = MatchCaps(rule=settings.max_rule_matches, batch=settings.max_batch_matches)
        # invariant-ai (the reference engine, rules the incremental one cannot compile) runs in
        # processes that are killed at a check's deadline, when there are any; they run policy
        # code in the sandbox, as the worker does
        self.pool = (IsolatedPool(settings.engine_processes, allowed_imports=sandbox.allowed_imports())
                     if settings.engine_processes else None)
        # the reference engine's window, and the incremental engine's for rules it cannot compile
        self.engines: dict[str, Engine] = {p.policy_id: self._engine(p) for p in policies.all()}
        # per policy id: what each rule's violations do (block or log)
        self.actions: dict[str, dict[int, Action]] = {p.policy_id: p.rule_actions() for p in policies.all()}
        self.shadows: dict[str, Candidate] = {}
        if self.pool is not None and self.pool.specs:
            self.pool.start()  # now: the first check must not wait for its process

    def _engine(self, policy: LoadedPolicy) -> Engine:
        return make_engine(policy, self.settings.engine, max_history=self.settings.reference_max_history,
                           caps=self.caps, pool=self.pool)

    def install(self, policy: LoadedPolicy) -> None:
        """Serve ``policy`` (a new version of its id, or a new id) from the next batch on; call it
        between batches. A session's past carries over (see the class docstring)."""
        old = self.engines.get(policy.policy_id)
        self.engines[policy.policy_id] = self._engine(policy)
        self.actions[policy.policy_id] = policy.rule_actions()
        self.policies.put(policy)
        if old is not None:
            old.close()
        candidate = self.shadows.get(policy.policy_id)
        if candidate is not None and (candidate.policy.version or 0) <= (policy.version or 0):
            self.withdraw_shadow(policy.policy_id)  # promoted, or overtaken by a newer version

    def install_shadow(self, policy: LoadedPolicy) -> None:
        """Check ``policy`` beside the active version of its id from the next batch on: its verdicts
        go to :attr:`Outcome.shadow` only."""
        old = self.shadows.get(policy.policy_id)
        self.shadows[policy.policy_id] = Candidate(policy, self._engine(policy), policy.rule_actions())
        if old is not None:
            old.engine.close()

    def withdraw_shadow(self, policy_id: str) -> None:
        """Stop the candidate of ``policy_id`` (its session states are dropped as sessions go on)."""
        old = self.shadows.pop(policy_id, None)
        if old is not None:
            old.engine.close()

    def engine_names(self) -> str:
        return ",".join(sorted({e.name for e in self.engines.values()}))

    async def process_record(self, store: SessionStore, key: bytes | None, value: bytes | None,
                             source: SourceRef | None) -> Outcome:
        """A Kafka record in, what to publish out: decoding, checking, and every failure in
        between ends as a dead letter and (when its ids can be read) a deny, never an exception."""
        st = self.settings
        try:
            batch = decode_batch(key, value, st.max_record_bytes, max_events=st.max_batch_events,
                                 max_id_bytes=st.max_id_bytes)
        except Rejected as rej:
            return await self._refused(store, rej, key, value, source)
        try:
            return await self.evaluate(store, batch, source)
        except Exception as exc:  # noqa: BLE001 - one record costs only itself
            log.exception("processing %s failed", source)
            failed = Rejected("internal", f"the worker failed on this record: {type(exc).__name__}: {exc}",
                              batch.session_id, batch.batch_id)
            return await self._refused(store, failed, key, value, source)

    async def _refused(self, store: SessionStore, rej: Rejected, key: bytes | None,
                       value: bytes | None, source: SourceRef | None) -> Outcome:
        dead = dead_letter_for(rej, key, value, source or SourceRef(topic="", partition=-1, offset=-1),
                               self.settings.max_id_bytes)
        if not rej.addressable:
            return Outcome(None, dead_letter=dead)
        # its state lives on this partition only when the key is its session id: remember the deny
        keyed = bool(key and key.decode("utf-8", "replace") == rej.session_id)
        try:
            out = await self.reject(store, rej, source, remember=keyed)
        except Exception:  # noqa: BLE001 - the store failed too: the deny is still owed
            log.exception("could not remember the deny of %s", source)
            out = Outcome(rejected_verdict(rej, source))
        out.dead_letter = dead
        return out

    async def reject(self, store: SessionStore, rejected: Rejected, source: SourceRef | None,
                     remember: bool = True) -> Outcome:
        """A deny for a record that is not a valid batch, remembered like any verdict so that a
        redelivery repeats it (and a batch id that already has a verdict keeps it). With
        ``remember=False`` (a record not keyed by its session id) a deny that is only sent."""
        verdict = rejected_verdict(rejected, source)
        if not remember:
            return Outcome(verdict)
        sid, bid = verdict.session_id, verdict.batch_id
        head = store.head(sid)
        known = store.known_verdict(head, sid, bid)
        if known is not None:
            return _repeat(known, 0)
        return self._remember(store, head, verdict, seq=None)

    async def evaluate(self, store: SessionStore, batch: EventBatch,
                       source: SourceRef | None) -> Outcome:
        """The verdict for a batch; ``new`` is False for a repeat of a known batch id. After an
        ``end_session`` batch's verdict, whatever it is, the session's state is removed."""
        out = await self._evaluate(store, batch, source)
        if batch.end_session and out.new:
            store.delete_session(batch.session_id)
            out.ended = True
        return out

    async def _evaluate(self, store: SessionStore, batch: EventBatch,
                        source: SourceRef | None) -> Outcome:
        head = store.head(batch.session_id)
        known = store.known_verdict(head, batch.session_id, batch.batch_id)
        if known is not None:
            return _repeat(known, len(batch.events))
        started = time.perf_counter()
        fields: dict[str, Any] = {"session_id": batch.session_id, "batch_id": batch.batch_id,
                                  "seq": batch.seq, "source": source}
        n = len(batch.events)
        try:
            policy: LoadedPolicy = self.policies.resolve(batch.policy)
        except KeyError as exc:
            verdict = Verdict(decision="deny", reason=str(exc.args[0]), policy_id=batch.policy, **fields)
            return self._remember(store, head, verdict, events=n)
        engine = self.engines[policy.policy_id]
        fields.update(policy_id=policy.policy_id, policy_version=policy.version, policy_sha256=policy.sha256,
                      engine=engine.name)

        if batch.seq is not None and head.last_seq is not None and batch.seq <= head.last_seq:
            verdict = Verdict(decision="deny", reason=(
                f"out of order: seq {batch.seq} arrived after seq {head.last_seq} of this session"),
                **fields)
            # a stale seq does not move the session's last seq
            return self._remember(store, head, verdict, seq=None, events=n)

        state, reason = self._state(store, head, policy.policy_id, engine, batch.session_id, policy.policy_id)
        result, reason, kind = (await self._check(engine, state, batch, started) if state is not None
                                else (None, reason, None))
        verdict, violations = self._decide(self.actions[policy.policy_id], policy, result, reason, kind,
                                           (time.perf_counter() - started) * 1000.0, fields)
        joins = result is not None and joins_past(verdict, self.settings.keep_denied)
        shadow, more = None, ()
        candidate = self.shadows.get(policy.policy_id)
        if candidate is not None:
            shadow, more = await self._shadow(candidate, store, head, batch, verdict, fields)
        cap = self.settings.max_verdict_violations
        try:
            # (joins only when the check ran: on a state, with a result)
            new_state = result.advance(state) if joins and result is not None and state is not None else None
            if new_state is not None and len(new_state.log) > self.settings.max_session_entries:
                raise StateTooLarge(
                    f"it would keep {len(new_state.log)} entries for policy {policy.policy_id!r}, over the "
                    f"limit of {self.settings.max_session_entries} (--max-session-entries)")
            out = self._remember(
                store, head, verdict, events=n,
                policy_id=policy.policy_id if joins else None, new_state=new_state,
                appended=result.appended if joins and result is not None else None,
                more=more, forget=self._gone_candidates(head),
                raw=batch.trace() if joins and self.settings.policy_registry and not engine.state_is_raw else None,
                history=self.settings.reference_max_history,
            )
        except StateTooLarge as exc:
            # fail closed, and the past stays as it was: a later batch is checked against it
            verdict = verdict.model_copy(update={"decision": "deny", "reason": (
                f"{STATE_REASON}: {exc}; the batch is denied and does not join the session's past. "
                "End the session (end_session) and start a new one, or raise the limit")})
            out, joins = self._remember(store, head, verdict, events=n), False
        out.omitted, out.joined, out.shadow = tuple(violations[cap:]), joins, shadow
        return out

    def _state(self, store: SessionStore, head: SessionHead, key: str, engine: Engine, session_id: str,
               policy_id: str) -> tuple[SessionState | None, str | None]:
        """The engine's state of the session (under ``key``); a stale one (another version wrote
        it) comes with the raw events the session keeps for ``policy_id``, to rebuild it."""
        try:
            state = store.engine_state(head, key, engine.name, session_id)
            if self.settings.policy_registry and engine.stale(state):
                state.raw = store.raw_events(head, policy_id, session_id)
            return state, None
        except StateCorrupted as exc:
            log.error("%s", exc)
            return None, clip(f"the session's stored state is damaged: {exc}", MAX_REASON_CHARS)

    async def _check(self, engine: Engine, state: SessionState, batch: EventBatch,
                     started: float) -> tuple[CheckResult | None, str | None, str | None]:
        """The engine's result within the time budget, in the sandbox; or None, why not and the
        kind of failure (only a kind the operator chose may fail open)."""
        budget = self.settings.budget_ms
        try:
            deadline = None if budget is None else started + budget / 1000.0
            with sandbox.guarded():  # no network, process or file write while policy code runs
                return await engine.check(state, batch.trace(), deadline=deadline), None, None
        except BudgetExceeded:
            return None, f"{BUDGET_REASON} of {budget:g} ms", "timeout"
        except EngineError as exc:
            # on input the schema accepted: an agent can choose to make the policy raise, so this
            # allows only when the operator said so (fail_open_kinds), never with timeouts alone
            return None, clip(f"{ERROR_REASON}: {exc}", MAX_REASON_CHARS), "error"
        except Exception as exc:  # noqa: BLE001 - any failure of a check fails closed
            log.exception("policy check failed")
            return None, clip(f"{FAILED_REASON}: {type(exc).__name__}: {exc}", MAX_REASON_CHARS), None

    def _decide(self, actions: dict[int, Action], policy: LoadedPolicy, result: CheckResult | None,
                reason: str | None, kind: str | None, eval_ms: float,
                fields: dict[str, Any]) -> tuple[Verdict, list[Violation]]:
        """The verdict of a check: deny iff a violation blocks (a logged one is listed and alerted
        only); a failed check denies unless its ``kind`` is one the operator lets fail open. Also
        every violation, past the cap too."""
        if result is None:
            st = self.settings
            opens = not st.fail_closed and kind in st.fail_open_kinds
            return Verdict(decision="allow" if opens else "deny", reason=reason, eval_ms=eval_ms, **fields), []
        sid = fields["session_id"]
        violations = [Violation.from_match(m, sid, policy.sha256, actions.get(m.rule_index, "block"))
                      for m in result.matches]
        cap = self.settings.max_verdict_violations
        blocked = any(v.action == "block" for v in violations)
        return Verdict(decision="deny" if blocked else "allow", violations=violations[:cap], eval_ms=eval_ms,
                       violations_omitted=max(0, len(violations) - cap), **fields), violations

    async def _shadow(self, candidate: Candidate, store: SessionStore, head: SessionHead, batch: EventBatch,
                      active: Verdict, fields: dict[str, Any]) -> tuple[ShadowVerdict, tuple]:
        """The candidate's verdict on this batch, beside the active one, and its session state to
        commit. The candidate keeps a past of its own (the batches it would have let through); in
        a session it meets for the first time it starts from the active version's past."""
        started = time.perf_counter()
        policy, engine = candidate.policy, candidate.engine
        key = policy.policy_id + SHADOW_CURSOR
        seeded = key not in head.policies
        state, reason = self._state(store, head, policy.policy_id if seeded else key, engine, batch.session_id,
                                    policy.policy_id)
        result, reason, kind = (await self._check(engine, state, batch, started) if state is not None
                                else (None, reason, None))
        mine = {**fields, "policy_version": policy.version, "policy_sha256": policy.sha256, "engine": engine.name}
        verdict, _ = self._decide(candidate.actions, policy, result, reason, kind,
                                  (time.perf_counter() - started) * 1000.0, mine)
        more: tuple = ()
        if result is not None and state is not None and joins_past(verdict, self.settings.keep_denied):
            new = result.advance(state)
            more = ((key, new, new.log if seeded else result.appended),)
        elif seeded and state is not None:
            more = ((key, state, state.log),)  # its own past from here on, without this batch
        differs = (verdict.decision != active.decision or _violated(verdict) != _violated(active)
                   or (verdict.reason is None) != (active.reason is None))
        return ShadowVerdict(session_id=batch.session_id, batch_id=batch.batch_id, policy_id=policy.policy_id,
                             candidate=verdict, active=active, differs=differs), more

    def _gone_candidates(self, head: SessionHead) -> tuple[str, ...]:
        """Candidate states in a session head whose candidate is no longer checked."""
        if len(head.policies) < 2:
            return ()
        return tuple(k for k in head.policies
                     if k.endswith(SHADOW_CURSOR) and k[: -len(SHADOW_CURSOR)] not in self.shadows)

    def _remember(self, store: SessionStore, head: SessionHead, verdict: Verdict, seq: int | None = _SAME,
                  events: int = 0, **state: Any) -> Outcome:
        """Commit ``verdict`` (and, in ``state``, the session state it brings) for its batch; a
        verdict too large for its topic is cut down first (its alerts carry the violations whole)."""
        raw = verdict.model_dump_json().encode()
        verdict, raw, whole = fit_verdict(verdict, raw, self.settings.max_output_bytes)
        store.commit(verdict.session_id, head, verdict.batch_id, raw,
                     seq=verdict.seq if seq is _SAME else seq, **state)
        return Outcome(verdict, events=events, verdict_json=raw, cut=whole)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        if self.pool is not None:
            self.pool.close()
