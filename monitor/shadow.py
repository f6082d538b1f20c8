"""Shadow rollout, read back: where a candidate version and the active one disagreed on live traffic.

Workers check a candidate (``policy publish --shadow``) beside the active version of its policy
and write one :class:`~monitor.models.ShadowVerdict` per batch to ``<prefix>.shadow``.
:func:`summarise` turns those records into a :class:`ShadowReport`: batches compared, how many
differ and how (allowed by one and denied by the other, or the same decision for other rules),
which rules only one of them raised, and the sessions that differ: the live twin of
``replay --compare``.

Example::

    >>> from monitor.models import ShadowVerdict, Verdict, Violation
    >>> v = lambda d, rules=(): Verdict(session_id="s", batch_id="b", decision=d, policy_version=2,
    ...     violations=[Violation(alert_id="a", rule_index=0, message=m, key="k") for m in rules])
    >>> r = summarise([ShadowVerdict(session_id="s", batch_id="b", policy_id="p", candidate=v("deny", ["new"]),
    ...                              active=v("allow"), differs=True)], "p")
    >>> r.batches, r.differing, r.newly_denied, r.rules[0].rule, r.rules[0].candidate_only
    (1, 1, 1, 'new', 1)
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, Field, ValidationError

from monitor.models import ShadowVerdict, Verdict


class RuleDifference(BaseModel):
    """One rule (by message) and how often only one side raised it."""

    rule: str
    candidate_only: int = 0
    active_only: int = 0
    both: int = 0


class SessionDifference(BaseModel):
    session_id: str
    batches: int = 0
    differing: int = 0
    first_batch: str = Field(description="the first batch where they differ")


class ShadowReport(BaseModel):
    """Where a candidate and the active version differed (see the module docstring)."""

    policy_id: str
    candidate_versions: list[int] = Field(default_factory=list)
    active_versions: list[int] = Field(default_factory=list)
    batches: int = 0
    differing: int = 0
    newly_denied: int = Field(default=0, description="allowed by the active version, denied by the candidate")
    newly_allowed: int = Field(default=0, description="denied by the active version, allowed by the candidate")
    other_rules: int = Field(default=0, description="the same decision, other rules matched")
    candidate_failures: int = Field(default=0, description="the candidate's check failed (budget, error)")
    sessions: int = 0
    differing_sessions: list[SessionDifference] = Field(default_factory=list)
    rules: list[RuleDifference] = Field(default_factory=list)
    unreadable: int = 0


def _rules(v: Verdict) -> set[str]:
    return {x.message for x in v.violations}


def summarise(records: Iterable[ShadowVerdict], policy_id: str, version: int | None = None) -> ShadowReport:
    """The report for ``policy_id`` (and only candidate ``version``, when given)."""
    report = ShadowReport(policy_id=policy_id)
    sessions: dict[str, SessionDifference] = {}
    rules: dict[str, RuleDifference] = {}
    cand_versions: set[int] = set()
    active_versions: set[int] = set()
    for rec in records:
        if rec.policy_id != policy_id or (version is not None and rec.candidate.policy_version != version):
            continue
        report.batches += 1
        if rec.candidate.policy_version is not None:
            cand_versions.add(rec.candidate.policy_version)
        if rec.active.policy_version is not None:
            active_versions.add(rec.active.policy_version)
        s = sessions.setdefault(rec.session_id, SessionDifference(session_id=rec.session_id, first_batch=""))
        s.batches += 1
        if rec.candidate.reason is not None:
            report.candidate_failures += 1
        cand, act = _rules(rec.candidate), _rules(rec.active)
        for rule in cand | act:
            r = rules.setdefault(rule, RuleDifference(rule=rule))
            if rule in cand and rule in act:
                r.both += 1
            elif rule in cand:
                r.candidate_only += 1
            else:
                r.active_only += 1
        if not rec.differs:
            continue
        report.differing += 1
        s.differing += 1
        s.first_batch = s.first_batch or rec.batch_id
        if rec.candidate.decision == "deny" and rec.active.decision == "allow":
            report.newly_denied += 1
        elif rec.candidate.decision == "allow" and rec.active.decision == "deny":
            report.newly_allowed += 1
        else:
            report.other_rules += 1
    report.sessions = len(sessions)
    report.differing_sessions = sorted((s for s in sessions.values() if s.differing),
                                       key=lambda s: (-s.differing, s.session_id))
    report.rules = sorted((r for r in rules.values() if r.candidate_only or r.active_only),
                          key=lambda r: (-(r.candidate_only + r.active_only), r.rule))
    report.candidate_versions = sorted(cand_versions)
    report.active_versions = sorted(active_versions)
    return report


def read_shadow(values: Iterable[bytes | None]) -> tuple[list[ShadowVerdict], int]:
    """Shadow records from raw values, and how many could not be read."""
    out: list[ShadowVerdict] = []
    bad = 0
    for value in values:
        if value is None:
            continue
        try:
            out.append(ShadowVerdict.model_validate_json(value))
        except ValidationError:
            bad += 1
    return out, bad
