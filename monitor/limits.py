"""What one record may cost: caps on what the worker computes and produces for it.

An agent's events are hostile input. Whatever one record makes the worker produce - a verdict, its
alerts, a dead letter, the state it leaves - is bounded here, so that nothing it produces can be
refused by the broker (a refused record stops the worker, and a restarted worker reads the same
record again: a stuck partition). Each function is called with a record already serialised, so
the check on the live path is one ``len``; only a record over its limit costs more.

- :func:`summary_match`: what an engine reports for the matches of a rule it did not enumerate
  (``--max-rule-matches``, ``--max-batch-matches``); :func:`cap_matches` applies those caps to an
  engine that computes every match itself (invariant-ai).
- :func:`fit_verdict`: a verdict over ``--max-output-bytes`` cut down to a smaller valid one that
  keeps its decision and says why (the violations it leaves out still get their alerts).
- :func:`alert_records`: the alerts of a batch, at most ``--max-batch-alerts`` (the rest in one
  summary alert), each within ``--max-output-bytes``.
- :func:`fit_shadow`: a shadow verdict within ``--max-output-bytes`` (its two verdicts cut as
  :func:`fit_verdict` cuts one).
- :func:`fit_dead_letter`: a dead letter within ``--max-state-record-bytes`` (a record too large to
  copy is named by its topic, partition and offset instead).

Example::

    >>> from monitor.models import Verdict, Violation
    >>> big = Violation(alert_id="a", rule_index=0, message="x" * 5000, key="(0, (1,))")
    >>> v = Verdict(session_id="s", batch_id="b", decision="deny", violations=[big] * 10)
    >>> fitted, raw, whole = fit_verdict(v, v.model_dump_json().encode(), 4096)
    >>> fitted.decision, len(raw) <= 4096, len(fitted.violations), len(whole)
    ('deny', True, 0, 10)
    >>> fitted.reason.split(":")[0]
    'the verdict was 51530 bytes, over the limit of 4096 (--max-output-bytes)'
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from monitor.models import Alert, DeadLetter, Match, Severity, ShadowVerdict, Verdict, Violation, make_alert_id

# a violation lists at most this many addresses (a rule marking every "send" in a 1 MB message
# would otherwise list 250,000 of them, in the state and in every verdict and alert)
MAX_ADDRESSES = 100
# a violation's message in a verdict cut down to fit, and in an alert cut down to fit
SLIM_MESSAGE_CHARS = 1000
_SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def summary_match(rule_index: int, message: str | None, listed: int, end: int, why: str) -> Match:
    """The match an engine reports in place of the violations of rule ``rule_index`` it did not
    enumerate, once ``listed`` were: enumerating them all is what a fan-out attack costs.

    ``end`` (the session's trace length after the batch) makes its key, and so its alert id, one
    per batch and the same on a redelivery.

    >>> m = summary_match(0, "no send [risk=low]", 100, 812, "--max-rule-matches")
    >>> m.message
    'no send [risk=low] (and more violations of rule 0 in this batch: matching stopped after 100, --max-rule-matches)'
    >>> m.key
    "(0, ('more', 812))"
    """
    what = message if message is not None else f"rule {rule_index}"
    return Match(rule_index=rule_index, key=str((rule_index, ("more", end))),
                 message=f"{what} (and more violations of rule {rule_index} in this batch: "
                         f"matching stopped after {listed}, {why})")


def cap_matches(matches: Sequence[Match], rule_cap: int, batch_cap: int, end: int,
                messages: Mapping[int, str | None] | None = None) -> list[Match]:
    """``matches`` as an engine that enumerates within the caps would report them: the first
    ``rule_cap`` of each rule and ``batch_cap`` in all, then one :func:`summary_match` per rule
    that had more (for engines that compute every match, such as invariant-ai's own).

    >>> ms = [Match(rule_index=0, message="m", key=f"(0, ({i},))") for i in range(5)]
    >>> [m.key for m in cap_matches(ms, 2, 10, 9)]
    ['(0, (0,))', '(0, (1,))', "(0, ('more', 9))"]
    """
    out: list[Match] = []
    per_rule: Counter[int] = Counter()
    cut: dict[int, str] = {}
    for m in matches:
        r = m.rule_index
        if r in cut:
            continue
        if per_rule[r] >= rule_cap:
            cut[r] = "--max-rule-matches"
        elif len(out) - len(cut) >= batch_cap:
            cut[r] = "--max-batch-matches"
        else:
            per_rule[r] += 1
            out.append(m)
            continue
        message = (messages or {}).get(r, m.message)
        out.append(summary_match(r, message, per_rule[r], end, cut[r]))
    return out


def _slim(v: Violation) -> Violation:
    """A violation without what only makes it large: a long message, its kwargs."""
    if len(v.message) <= SLIM_MESSAGE_CHARS and not v.kwargs and len(v.addresses) <= MAX_ADDRESSES:
        return v
    return v.model_copy(update={"message": _clip(v.message, SLIM_MESSAGE_CHARS), "kwargs": {},
                                "addresses": v.addresses[:MAX_ADDRESSES]})


def fit_verdict(verdict: Verdict, raw: bytes, limit: int) -> tuple[Verdict, bytes, tuple[Violation, ...]]:
    """``verdict`` (serialised as ``raw``) if it fits in ``limit`` bytes; else a smaller valid
    verdict with the same decision whose ``reason`` says why, and its violations as they were
    (their alerts carry them whole; ``()`` when nothing was cut).

    First the violations lose their kwargs and long messages; if that is not enough, the
    verdict lists none (``violations_omitted`` counts them). Ids are bounded (``--max-id-bytes``)
    and reasons clipped, so the smallest verdict always fits in 4,096 bytes.
    """
    if len(raw) <= limit:
        return verdict, raw, ()
    note = f"the verdict was {len(raw)} bytes, over the limit of {limit} (--max-output-bytes)"
    prior = f"; {_clip(verdict.reason, 1000)}" if verdict.reason else ""
    slim = verdict.model_copy(update={
        "violations": [_slim(v) for v in verdict.violations],
        "reason": f"{note}: violations shortened (their alerts carry them whole){prior}"})
    out = slim.model_dump_json().encode()
    if len(out) <= limit:
        return slim, out, tuple(verdict.violations)
    bare = verdict.model_copy(update={
        "violations": [], "violations_omitted": verdict.violations_omitted + len(verdict.violations),
        "reason": f"{note}: its violations are left out (each still has its alert){prior}"})
    return bare, bare.model_dump_json().encode(), tuple(verdict.violations)


def fit_shadow(shadow: ShadowVerdict, limit: int) -> bytes | None:
    """``shadow`` serialised within ``limit`` bytes: each of its verdicts cut to half of it if
    needed; None when even the cut record does not fit (the shadow verdict is skipped: agents
    never see it, and the active verdict went out).

    >>> big = Violation(alert_id="a", rule_index=0, message="x" * 5000, key="(0, (1,))")
    >>> v = Verdict(session_id="s", batch_id="b", decision="deny", violations=[big] * 10)
    >>> s = ShadowVerdict(session_id="s", batch_id="b", policy_id="p", candidate=v, active=v, differs=False)
    >>> raw = fit_shadow(s, 16_000)
    >>> len(raw) <= 16_000, ShadowVerdict.model_validate_json(raw).candidate.violations_omitted
    (True, 10)
    """
    raw = shadow.model_dump_json().encode()
    if len(raw) <= limit:
        return raw
    half = max(0, limit - 512) // 2
    fitted = [fit_verdict(v, v.model_dump_json().encode(), half)[0] for v in (shadow.candidate, shadow.active)]
    out = shadow.model_copy(update={"candidate": fitted[0], "active": fitted[1]}).model_dump_json().encode()
    return out if len(out) <= limit else None


def _fit_alert(alert: Alert, raw: bytes, limit: int) -> tuple[Alert, bytes]:
    if len(raw) <= limit:
        return alert, raw
    note = f" [alert cut from {len(raw)} bytes to fit the limit of {limit}, --max-output-bytes]"
    slim = alert.model_copy(update={"message": _clip(alert.message, SLIM_MESSAGE_CHARS) + note, "kwargs": {},
                                    "addresses": alert.addresses[:MAX_ADDRESSES]})
    out = slim.model_dump_json().encode()
    if len(out) > limit:  # only ids and the cut message are left: this fits (ids are bounded)
        slim = slim.model_copy(update={"message": _clip(alert.message, 200) + note, "addresses": []})
        out = slim.model_dump_json().encode()
    return slim, out


def _summary_alert(verdict: Verdict, rest: Sequence[Violation], limit: int) -> Alert:
    by_rule = Counter(v.rule_index for v in rest)
    if len(by_rule) == 1:
        what = f"{len(rest)} more violations of rule {rest[0].rule_index}"
    else:
        what = f"{len(rest)} more violations (" + ", ".join(
            f"rule {r}: {n}" for r, n in by_rule.most_common(20)) + ")"
    severity: Severity = max((v.severity for v in rest), key=_SEVERITY_RANK.__getitem__)
    key = f"more alerts of batch {verdict.batch_id}"
    return Alert(alert_id=make_alert_id(verdict.session_id, verdict.policy_sha256 or "", key),
                 rule_index=rest[0].rule_index, severity=severity, key=key,
                 message=f"{what} in this batch, not sent one by one (--max-batch-alerts {limit})",
                 session_id=verdict.session_id, batch_id=verdict.batch_id, decision=verdict.decision,
                 policy_id=verdict.policy_id, policy_sha256=verdict.policy_sha256,
                 raised_at=verdict.evaluated_at, source=verdict.source)


def alert_records(verdict: Verdict, violations: Sequence[Violation], max_alerts: int,
                  max_bytes: int) -> list[tuple[Alert, bytes]]:
    """The alerts to publish for a verdict, serialised: one per violation of ``violations`` (all
    of the batch's: those the verdict lists, or listed before it was cut to fit, and those past
    its cap), at most ``max_alerts`` (the last one then sums up the rest), each within
    ``max_bytes``.

    >>> vs = [Violation(alert_id=str(i), rule_index=1, message="m", key=str(i)) for i in range(5)]
    >>> v = Verdict(session_id="s", batch_id="b", decision="deny", violations=vs)
    >>> [a.message for a, _ in alert_records(v, vs, 3, 10_000)][-1]
    '3 more violations of rule 1 in this batch, not sent one by one (--max-batch-alerts 3)'
    """
    listed = violations if len(violations) <= max_alerts else violations[:max_alerts - 1]
    out = []
    for v in listed:
        alert = Alert.from_violation(v, verdict)
        out.append(_fit_alert(alert, alert.model_dump_json().encode(), max_bytes))
    if len(listed) < len(violations):
        alert = _summary_alert(verdict, violations[len(listed):], max_alerts)
        out.append(_fit_alert(alert, alert.model_dump_json().encode(), max_bytes))
    return out


def fit_dead_letter(dead: DeadLetter, raw: bytes, limit: int) -> bytes:
    """``raw`` (``dead`` serialised) if it fits in ``limit`` bytes, else the dead letter without
    the record's bytes: the reason names where the record stays (its topic, partition, offset).

    >>> from monitor.models import SourceRef
    >>> d = DeadLetter(kind="too_large", reason="big", source=SourceRef(topic="t", partition=1, offset=7),
    ...                value_b64="QUFB" * 2000, size=6000)
    >>> DeadLetter.model_validate_json(fit_dead_letter(d, d.model_dump_json().encode(), 4096)).reason
    'big (the record, 6000 bytes, is not copied here: over the limit of 4096 bytes with its envelope; it stays at t[1]@7)'
    """
    if len(raw) <= limit:
        return raw
    s = dead.source
    slim = dead.model_copy(update={"value_b64": "", "reason": (
        f"{_clip(dead.reason, 2000)} (the record, {dead.size} bytes, is not copied here: over the limit of "
        f"{limit} bytes with its envelope; it stays at {s.topic}[{s.partition}]@{s.offset})")})
    return slim.model_dump_json().encode()
