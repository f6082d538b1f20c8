"""The reference engine: invariant-ai's own local evaluator on (past, pending).

Correct by definition but its cost grows with the session (it rebuilds its input on every call),
so the past it sees is bounded by ``max_history`` events, and it runs on a thread of its own so a
slow policy never holds the worker's event loop.
"""

from __future__ import annotations

from typing import Any

from monitor.engine.base import CheckResult, Engine, EngineError, RuleInfo, SessionState
from monitor.engine.support import DEFAULT_MAX_HISTORY, LoopPool, error_to_match, rule_message, within
from monitor.policy import LoadedPolicy


class ReferenceEngine(Engine):
    """invariant-ai's ``LocalPolicy.a_analyze_pending`` over the last ``max_history`` events."""

    name = "reference"
    state_is_raw = True

    def __init__(self, policy: LoadedPolicy, max_history: int = DEFAULT_MAX_HISTORY,
                 offload: bool = True) -> None:
        super().__init__(policy)
        self.local = policy.local
        self.max_history = max_history
        self._thread = LoopPool("reference-engine") if offload else None

    async def analyze(self, past: list[dict[str, Any]], pending: list[dict[str, Any]]) -> Any:
        """Run invariant-ai itself; raises :class:`EngineError` when the policy raises."""
        try:
            return await self.local.a_analyze_pending(past, pending)
        except Exception as exc:  # noqa: BLE001 - any policy failure fails the batch closed
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc

    async def check(self, state: SessionState, pending: list[dict[str, Any]],
                    deadline: float | None = None) -> CheckResult:
        past = list(state.log)
        offset = state.log_start
        coro = self.analyze(past, pending)
        result = await within(self._thread.run(coro) if self._thread else coro, deadline)
        matches = [error_to_match(e, offset) for e in result.errors]
        total = offset + len(past) + len(pending)
        return CheckResult(
            matches=matches,
            head={},
            appended=list(pending),
            log_start=max(offset, total - self.max_history),
            pending_len=len(pending),
            engine=self.name,
        )

    def explain(self) -> list[RuleInfo]:
        return [
            RuleInfo(index=i, message=rule_message(s), engine=self.name,
                     reason="the reference engine was chosen")
            for i, s in enumerate(self.policy.rules)
        ]

    def close(self) -> None:
        if self._thread:
            self._thread.close()
