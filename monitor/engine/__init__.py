"""Policy engines behind one interface: the reference (invariant-ai) and the incremental one."""

from __future__ import annotations

from typing import Any

from monitor.engine.base import (
    BudgetExceeded,
    CheckResult,
    Deadline,
    Engine,
    EngineError,
    MatchCaps,
    RuleInfo,
    SessionState,
)
from monitor.policy import LoadedPolicy

ENGINES = ("incremental", "reference")


def make_engine(policy: LoadedPolicy, kind: str = "incremental", **options: Any) -> Engine:
    """The engine for ``policy``: ``incremental`` (default; falls back per rule) or ``reference``.

    ``options``: ``max_history``, ``caps`` (:class:`MatchCaps`), ``pool`` (an
    :class:`~monitor.engine.isolation.IsolatedPool` that runs invariant-ai where a check past its
    deadline can be stopped; default: threads), ``offload``.
    """
    if kind == "reference":
        from monitor.engine.reference import ReferenceEngine

        return ReferenceEngine(policy, **options)
    if kind == "incremental":
        try:
            from monitor.engine.incremental import IncrementalEngine
        except ImportError:  # until the incremental engine lands
            from monitor.engine.reference import ReferenceEngine

            return ReferenceEngine(policy, **options)
        return IncrementalEngine(policy, **options)
    raise ValueError(f"unknown engine {kind!r}: expected one of {', '.join(ENGINES)}")


__all__ = ["BudgetExceeded", "CheckResult", "Deadline", "Engine", "EngineError", "MatchCaps", "RuleInfo",
           "SessionState",
           "make_engine", "ENGINES"]
