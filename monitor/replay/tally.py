"""What a replay counts as it goes: per session (:class:`SessionTally`), per rule
(:class:`RuleTally`), and per shard (:class:`ShardSummary`); shards hold disjoint sessions, so
their tallies add up (:meth:`Tally.merge`).

Example::

    >>> a, b = RuleTally("high", violations=2, batches=1, sessions={"s1"}), RuleTally("high", 1, 1, {"s2"})
    >>> a.add(b)
    >>> a.violations, a.batches, sorted(a.sessions)
    (3, 2, ['s1', 's2'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from monitor.models import Severity
from monitor.report import BadInput, BatchResult, Counts, Inputs, RuleTotal

RuleKey = tuple[str | None, int, str]  # policy id, rule index, message


@dataclass(slots=True)
class RuleTally:
    """How often one rule fired: violations, batches with at least one, and the sessions."""

    severity: Severity
    violations: int = 0
    batches: int = 0
    sessions: set[str] = field(default_factory=set)

    def add(self, other: RuleTally) -> None:
        self.violations += other.violations
        self.batches += other.batches
        self.sessions |= other.sessions

    def total(self, key: RuleKey) -> RuleTotal:
        """The report's line for this rule."""
        return RuleTotal(policy_id=key[0], rule_index=key[1], message=key[2], severity=self.severity,
                         violations=self.violations, batches=self.batches, sessions=len(self.sessions))


@dataclass
class SessionTally:
    """One session so far: its next batch's position, events, denied batches and violations."""

    ord: int = 0
    events: int = 0
    denied: int = 0
    violations: int = 0
    other_denied: int = 0  # batches the compared policy denies


def _no_decisions() -> dict[str, int]:
    return {"allow": 0, "deny": 0}


@dataclass
class Tally:
    """What a replay (or one shard of it) found, besides its per-batch spool."""

    sessions: dict[str, SessionTally] = field(default_factory=dict)
    rules: dict[RuleKey, RuleTally] = field(default_factory=dict)
    bad: list[BadInput] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    decisions: dict[str, int] = field(default_factory=_no_decisions)
    other_decisions: dict[str, int] = field(default_factory=_no_decisions)
    batches_changed: int = 0

    def count_rules(self, session_id: str, result: BatchResult) -> None:
        """The violations of a (new) batch result, by rule: a rule counts one batch however often
        it matched in it."""
        seen: set[RuleKey] = set()
        for v in result.violations:
            k = (result.policy_id, v.rule_index, v.message)
            r = self.rules.get(k)
            if r is None:
                r = self.rules[k] = RuleTally(v.severity)
            r.violations += 1
            if k not in seen:
                r.batches += 1
                seen.add(k)
            r.sessions.add(session_id)

    def rule_totals(self) -> list[RuleTotal]:
        """Every rule that fired, in (policy, rule index, message) order."""
        ordered = sorted(self.rules.items(), key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2]))
        return [v.total(k) for k, v in ordered]

    @classmethod
    def merge(cls, parts: Sequence[Tally]) -> Tally:
        """The tally of shards that held disjoint sessions: sums and unions (sessions and bad input
        come in shard order; the report sorts them)."""
        out = cls()
        for s in parts:
            out.sessions.update(s.sessions)
            out.bad.extend(s.bad)
            for name in ("records", "batches", "duplicates", "events"):
                setattr(out.counts, name, getattr(out.counts, name) + getattr(s.counts, name))
            for d in ("allow", "deny"):
                out.decisions[d] += s.decisions[d]
                out.other_decisions[d] += s.other_decisions[d]
            for k, v in s.rules.items():
                out.rules.setdefault(k, RuleTally(v.severity)).add(v)
            out.batches_changed += s.batches_changed
        return out


@dataclass
class ShardSummary(Tally):
    """What one shard found: its tally, where it spooled its results, what it read."""

    db: str = ""  # its ResultStore
    inputs: Inputs | None = None
    engine: str = ""
    peak_rss_mib: float = 0.0  # of the shard's process, when it has its own
